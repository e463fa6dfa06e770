//! CT intensity normalization (DESIGN.md §1.4): clip to the foreground's [0.5, 99.5]
//! percentiles, then z-score with the foreground mean and std.

use serde::{Deserialize, Serialize};

/// CT normalization: clip to `[clip_low, clip_high]`, then `(x - mean) / std`.
///
/// f32 because that is how the federation stores it (`federation.json`, `model.json`) and sends
/// it (`Welcome`); [`CtNormalization::apply`] computes in f64, so every consumer of one value
/// produces the same voxels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtNormalization {
    pub clip_low: f32,
    pub clip_high: f32,
    pub mean: f32,
    pub std: f32,
}

impl CtNormalization {
    /// The fixed statistics of the MultiTalent paper (Ulrich et al. 2023): what a model uses
    /// when no site reported foreground intensities.
    pub const PAPER: CtNormalization =
        CtNormalization { clip_low: -927.0, clip_high: 275.0, mean: 63.436882, std: 175.48094 };

    pub fn apply(&self, hu: f32) -> f32 {
        let clipped = (hu as f64).clamp(self.clip_low as f64, self.clip_high as f64);
        ((clipped - self.mean as f64) / (self.std as f64).max(1e-8)) as f32
    }

    pub fn apply_slice(&self, data: &mut [f32]) {
        for v in data.iter_mut() {
            *v = self.apply(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_then_standardizes() {
        let n = CtNormalization { clip_low: -10.0, clip_high: 10.0, mean: 2.0, std: 4.0 };
        assert_eq!(n.apply(6.0), 1.0);
        assert_eq!(n.apply(100.0), 2.0);
        assert_eq!(n.apply(-100.0), -3.0);
        let zero_std = CtNormalization { std: 0.0, ..n };
        assert!(zero_std.apply(3.0).is_finite(), "a zero std must not divide by zero");
    }
}
