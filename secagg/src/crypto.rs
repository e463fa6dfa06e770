//! The primitives: X25519 (x25519-dalek), HKDF-SHA256 and ChaCha20-Poly1305 (ring), and the
//! mask generator, ChaCha20 (rand_chacha) keyed by a 32-byte seed.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::{aead, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{Error, Result, SiteId};

/// An X25519 key pair whose secret can be agreed with many peers and secret-shared.
pub(crate) struct KeyPair {
    pub(crate) secret: [u8; 32],
    pub(crate) public: [u8; 32],
}

impl KeyPair {
    pub(crate) fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::from_secret(secret)
    }

    pub(crate) fn from_secret(secret: [u8; 32]) -> Self {
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        Self { secret, public }
    }
}

/// HKDF-SHA256 of X25519(`secret`, `public`), salted with the round and labelled with the use:
/// the same 32 bytes on both ends. A low-order public key (which would fix the secret) is refused.
pub(crate) fn agree(secret: &[u8; 32], public: &[u8; 32], round: u32, label: &[u8]) -> Result<[u8; 32]> {
    let shared = StaticSecret::from(*secret).diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(Error::protocol("a public key of low order (no contributory agreement)"));
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &round.to_le_bytes());
    let mut out = [0u8; 32];
    salt.extract(shared.as_bytes())
        .expand(&[label], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Ok(out)
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

pub(crate) const LABEL_PAIRWISE: &[u8] = b"fedtalent secagg pairwise mask";
pub(crate) const LABEL_SHARES: &[u8] = b"fedtalent secagg share encryption";

/// The nonce of the one message `from` sends `to` under their pair key in a round.
fn nonce(from: SiteId, to: SiteId) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, bytes).expect("a 32-byte key"))
}

pub(crate) fn seal(pair_key: &[u8; 32], round: u32, from: SiteId, to: SiteId, plaintext: &[u8]) -> Vec<u8> {
    let mut buf = plaintext.to_vec();
    key(pair_key)
        .seal_in_place_append_tag(nonce(from, to), aead::Aad::from(round.to_le_bytes()), &mut buf)
        .expect("in-memory encryption");
    buf
}

pub(crate) fn open(pair_key: &[u8; 32], round: u32, from: SiteId, to: SiteId, ciphertext: &[u8]) -> Result<Vec<u8>> {
    let mut buf = ciphertext.to_vec();
    let plain = key(pair_key)
        .open_in_place(nonce(from, to), aead::Aad::from(round.to_le_bytes()), &mut buf)
        .map_err(|_| Error::protocol(format!("the shares from site {from} to site {to} do not decrypt")))?;
    Ok(plain.to_vec())
}

/// The mask stream of a seed: ChaCha20's 32-bit words.
pub(crate) struct Prg(ChaCha20Rng);

impl Prg {
    pub(crate) fn new(seed: &[u8; 32]) -> Self {
        Prg(ChaCha20Rng::from_seed(*seed))
    }

    #[allow(clippy::should_implement_trait)]
    pub(crate) fn next(&mut self) -> u32 {
        self.0.next_u32()
    }
}
