//! Shamir secret sharing of 32-byte secrets over the prime field GF(p), p = 2^61 − 1: the secret
//! is cut into five 7-byte limbs (56 bits < 61), each the constant term of its own random
//! polynomial of degree `t − 1`; a share is the five polynomials evaluated at the holder's id.
//! Any `t` shares rebuild the secret by Lagrange interpolation at 0; fewer reveal nothing.

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, SiteId};

/// The Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;
const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

/// One holder's share of a 32-byte secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The evaluation point: the holder's site id (never 0).
    pub x: SiteId,
    pub y: [u64; LIMBS],
}

impl Share {
    pub const BYTES: usize = 4 + 8 * LIMBS;

    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..4].copy_from_slice(&self.x.to_le_bytes());
        for (i, y) in self.y.iter().enumerate() {
            out[4 + 8 * i..12 + 8 * i].copy_from_slice(&y.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::BYTES {
            return Err(Error::protocol(format!("a share of {} bytes, not {}", bytes.len(), Self::BYTES)));
        }
        let x = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let mut y = [0u64; LIMBS];
        for (i, v) in y.iter_mut().enumerate() {
            *v = u64::from_le_bytes(bytes[4 + 8 * i..12 + 8 * i].try_into().expect("8 bytes"));
        }
        let share = Share { x, y };
        share.check()?;
        Ok(share)
    }

    fn check(&self) -> Result<()> {
        if self.x == 0 || self.y.iter().any(|&v| v >= P) {
            return Err(Error::protocol(format!("a share at x = {} outside the field", self.x)));
        }
        Ok(())
    }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // < 2^62: no overflow
    if s >= P {
        s - P
    } else {
        s
    }
}

fn sub(a: u64, b: u64) -> u64 {
    add(a, P - b)
}

fn mul(a: u64, b: u64) -> u64 {
    let prod = a as u128 * b as u128;
    // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones.
    let folded = (prod & P as u128) + (prod >> 61);
    let folded = (folded & P as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= P {
        r - P
    } else {
        r
    }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn random_element(rng: &mut (impl RngCore + CryptoRng)) -> u64 {
    loop {
        let v = rng.next_u64() & P; // 61 uniform bits; only p itself is out of the field
        if v < P {
            return v;
        }
    }
}

/// Splits `secret` into shares for the holders `ids` (distinct, non-zero), any `threshold` of
/// which rebuild it.
pub fn split(secret: &[u8; 32], threshold: usize, ids: &[SiteId], rng: &mut (impl RngCore + CryptoRng)) -> Vec<Share> {
    assert!(threshold >= 1 && threshold <= ids.len(), "threshold {threshold} of {} holders", ids.len());
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    padded[..32].copy_from_slice(secret);
    let polys: Vec<Vec<u64>> = (0..LIMBS)
        .map(|l| {
            let mut limb = [0u8; 8];
            limb[..LIMB_BYTES].copy_from_slice(&padded[l * LIMB_BYTES..(l + 1) * LIMB_BYTES]);
            let mut coefficients = vec![u64::from_le_bytes(limb)];
            coefficients.extend((1..threshold).map(|_| random_element(rng)));
            coefficients
        })
        .collect();
    ids.iter()
        .map(|&x| {
            assert!(x != 0, "site id 0 would hold the secret itself");
            let mut y = [0u64; LIMBS];
            for (yl, poly) in y.iter_mut().zip(&polys) {
                // Horner
                *yl = poly.iter().rev().fold(0, |acc, &c| add(mul(acc, x as u64), c));
            }
            Share { x, y }
        })
        .collect()
}

/// Rebuilds a secret from at least `threshold` shares of distinct holders (the first
/// `threshold` are used).
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; 32]> {
    if shares.len() < threshold || threshold == 0 {
        return Err(Error::protocol(format!("{} shares, {threshold} needed", shares.len())));
    }
    let used = &shares[..threshold];
    for (i, s) in used.iter().enumerate() {
        s.check()?;
        if used[..i].iter().any(|o| o.x == s.x) {
            return Err(Error::protocol(format!("two shares at x = {}", s.x)));
        }
    }
    let mut padded = [0u8; LIMBS * LIMB_BYTES];
    for l in 0..LIMBS {
        let mut value = 0;
        for (j, sj) in used.iter().enumerate() {
            // Lagrange basis at 0: Π_{m≠j} x_m / (x_m − x_j)
            let (mut num, mut den) = (1, 1);
            for (m, sm) in used.iter().enumerate() {
                if m != j {
                    num = mul(num, sm.x as u64);
                    den = mul(den, sub(sm.x as u64, sj.x as u64));
                }
            }
            value = add(value, mul(sj.y[l], mul(num, inv(den))));
        }
        if value >= 1 << (8 * LIMB_BYTES) {
            return Err(Error::protocol("the shares do not rebuild a secret (inconsistent shares)"));
        }
        padded[l * LIMB_BYTES..(l + 1) * LIMB_BYTES].copy_from_slice(&value.to_le_bytes()[..LIMB_BYTES]);
    }
    if padded[32..].iter().any(|&b| b != 0) {
        return Err(Error::protocol("the shares do not rebuild a secret (inconsistent shares)"));
    }
    Ok(padded[..32].try_into().expect("32 bytes"))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn any_threshold_subset_rebuilds_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        secret[31] = 0xff;
        let ids = [1, 2, 3, 4, 5];
        let shares = split(&secret, 3, &ids, &mut rng);
        for subset in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let picked: Vec<Share> = subset.iter().map(|&i| shares[i]).collect();
            assert_eq!(combine(&picked, 3).unwrap(), secret);
        }
        // Two shares interpolated as if the threshold were 2 give another value.
        assert_ne!(combine(&shares[..2], 2).ok(), Some(secret));
        assert!(combine(&shares[..2], 3).is_err());
        let mut twice = shares[..3].to_vec();
        twice[1] = twice[0];
        assert!(combine(&twice, 3).is_err());
        let bytes = shares[2].to_bytes();
        assert_eq!(Share::from_bytes(&bytes).unwrap(), shares[2]);
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(sub(3, 5), P - 2);
    }
}
