//! Fixed-point encoding of f32 into the ring Z_2^32 (two's complement).
//!
//! A site encodes each value `x` of its input (the backbone change) with its weight `w`
//! (sqrt of its case count): `q = round(w · clamp(x, −R, R) · 2^f)`, `R` = `clip_range`,
//! `f` = `frac_bits`. The unmasked sum, read as a signed 32-bit integer, is `Σ_k q_k`; divided by
//! `2^f · W` (`W = Σ_k w_k`, public: the case counts are) it is the weighted mean of the
//! clamped values, with an error of at most `n / (2 · 2^f · W)` per coordinate (each `q_k`
//! rounds by at most 1/2 unit).
//!
//! No overflow: `|q_k| ≤ w_k·R·2^f + 1/2`, so `|Σ q_k| ≤ R·2^f·W + n/2`, which
//! [`Encoding::check_total`] requires to stay below 2^31. With the defaults (`R` = 1, `f` = 20)
//! that allows `W` up to about 2047 (e.g. 100 sites of 400 cases each: W = 2000).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// R: every value is clamped to [−R, R] before it is encoded.
    pub clip_range: f32,
    /// f: a unit of the ring is 2^-f (before the weight).
    pub frac_bits: u32,
}

impl Default for Encoding {
    fn default() -> Self {
        Self { clip_range: 1.0, frac_bits: 20 }
    }
}

const LIMIT: f64 = 2147483648.0; // 2^31

impl Encoding {
    fn scale(&self) -> f64 {
        (self.frac_bits as f64).exp2()
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.clip_range > 0.0 && self.clip_range.is_finite()) {
            return Err(format!("secure aggregation clip_range = {} must be positive", self.clip_range));
        }
        if self.frac_bits > 30 {
            return Err(format!("secure aggregation frac_bits = {} must be at most 30", self.frac_bits));
        }
        if self.clip_range as f64 * self.scale() >= LIMIT {
            return Err(format!(
                "secure aggregation clip_range {} x 2^frac_bits {} does not fit 31 bits",
                self.clip_range, self.frac_bits
            ));
        }
        Ok(())
    }

    /// The largest sum of weights whose `n`-site sum cannot overflow.
    pub fn max_total_weight(&self, n: usize) -> f64 {
        (LIMIT - 1.0 - n as f64 / 2.0) / (self.clip_range as f64 * self.scale())
    }

    /// Checks that `n` sites of weights summing to `total_weight` cannot overflow the ring.
    pub fn check_total(&self, total_weight: f64, n: usize) -> Result<()> {
        let max = self.max_total_weight(n);
        if total_weight.is_nan() || total_weight > max {
            return Err(Error::Overflow(format!(
                "a total weight of {total_weight:.1} over {n} sites can overflow 32 bits with clip_range {} and \
                 frac_bits {} (at most {max:.1}): lower frac_bits",
                self.clip_range, self.frac_bits
            )));
        }
        Ok(())
    }

    /// The largest error of one coordinate of the decoded weighted mean.
    pub fn precision(&self, total_weight: f64, n: usize) -> f64 {
        n as f64 / (2.0 * self.scale() * total_weight)
    }

    /// Encodes `values` with `weight`; a non-finite value is refused (the coordinator cannot see
    /// it any more, so the site must not send it).
    pub fn encode(&self, values: &[f32], weight: f64) -> Result<Vec<u32>> {
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(Error::protocol(format!("weight {weight} must be positive")));
        }
        self.check_total(weight, 1)?;
        let (r, scale) = (self.clip_range, self.scale() * weight);
        values
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                if !value.is_finite() {
                    return Err(Error::NotFinite { index, value });
                }
                let q = (value.clamp(-r, r) as f64 * scale).round() as i64;
                Ok(q as i32 as u32)
            })
            .collect()
    }

    /// Decodes an unmasked sum into the weighted mean: `Σ q / (2^f · total_weight)`.
    pub fn decode_mean(&self, sum: &[u32], total_weight: f64) -> Vec<f32> {
        let scale = self.scale() * total_weight;
        sum.iter().map(|&w| (w as i32 as f64 / scale) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_clamped_and_non_finite_refused() {
        let e = Encoding::default();
        let words = e.encode(&[0.25, -0.5, 3.0, -7.0, 1e-7], 2.0).unwrap();
        let back = e.decode_mean(&words, 2.0);
        assert_eq!(&back[..4], &[0.25, -0.5, 1.0, -1.0]);
        assert!(back[4].abs() <= 1e-6);
        assert!(matches!(e.encode(&[0.0, f32::NAN], 1.0), Err(Error::NotFinite { index: 1, .. })));
    }

    #[test]
    fn overflow_bound() {
        let e = Encoding { clip_range: 1.0, frac_bits: 20 };
        assert!(e.check_total(2000.0, 100).is_ok());
        assert!(e.check_total(2048.0, 100).is_err());
        // At the bound, n sites at +R each sum to less than 2^31.
        let n = 4;
        let w = e.max_total_weight(n) / n as f64;
        let sum = (0..n).map(|_| e.encode(&[1.0], w).unwrap()[0]).fold(0u32, u32::wrapping_add);
        assert!((sum as i32) > 0, "{sum}");
        assert!(Encoding { clip_range: 4.0, frac_bits: 29 }.validate().is_err());
    }
}
