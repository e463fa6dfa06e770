//! Foreground HU histograms and the CT normalization derived from them.
//!
//! A site shares only a histogram of its foreground intensities (1 HU bins), never voxels; the
//! coordinator merges the histograms and derives nnU-Net's CT statistics from the merged one.

use serde::{Deserialize, Serialize};

/// Counts of foreground voxels per 1 HU bin; bin `i` holds values rounding to `min_hu + i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HuHistogram {
    pub min_hu: i32,
    pub counts: Vec<u64>,
}

/// CT normalization: clip to [clip_low, clip_high], then (x - mean) / std.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub clip_low: f64,
    pub clip_high: f64,
    pub mean: f64,
    pub std: f64,
}

/// Intensities are clamped into this range before binning so that one absurd voxel cannot make a
/// histogram of billions of bins (CT lives in roughly [-1024, 3071]).
pub const HU_RANGE: (i32, i32) = (-2048, 8191);

impl Normalization {
    /// The fixed statistics of the MultiTalent paper.
    pub const PAPER: Normalization =
        Normalization { clip_low: -927.0, clip_high: 275.0, mean: 63.436882, std: 175.48094 };

    pub fn apply(&self, hu: f32) -> f32 {
        let clipped = (hu as f64).clamp(self.clip_low, self.clip_high);
        ((clipped - self.mean) / self.std.max(1e-8)) as f32
    }

    pub fn apply_slice(&self, data: &mut [f32]) {
        for v in data.iter_mut() {
            *v = self.apply(*v);
        }
    }
}

impl HuHistogram {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds one value (rounded to the nearest HU, clamped into [`HU_RANGE`]); NaNs are ignored.
    pub fn add(&mut self, hu: f32) {
        if hu.is_nan() {
            return;
        }
        let v = (hu.round() as i64).clamp(HU_RANGE.0 as i64, HU_RANGE.1 as i64) as i32;
        if self.counts.is_empty() {
            self.min_hu = v;
            self.counts.push(0);
        }
        if v < self.min_hu {
            let grow = (self.min_hu - v) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.min_hu = v;
        }
        let idx = (v - self.min_hu) as usize;
        if idx >= self.counts.len() {
            self.counts.resize(idx + 1, 0);
        }
        self.counts[idx] += 1;
    }

    /// Histogram of `image` where `labels` is nonzero (the foreground of any class).
    pub fn from_foreground(image: &[f32], labels: &[u16]) -> Self {
        let mut h = HuHistogram::default();
        let fg: Vec<f32> = image.iter().zip(labels).filter(|(_, &l)| l != 0).map(|(&v, _)| v).collect();
        if let (Some(lo), Some(hi)) = (
            fg.iter().filter(|v| !v.is_nan()).map(|v| v.round() as i64).min(),
            fg.iter().filter(|v| !v.is_nan()).map(|v| v.round() as i64).max(),
        ) {
            // Pre-size once instead of growing bin by bin.
            let lo = lo.clamp(HU_RANGE.0 as i64, HU_RANGE.1 as i64) as i32;
            let hi = hi.clamp(HU_RANGE.0 as i64, HU_RANGE.1 as i64) as i32;
            h.min_hu = lo;
            h.counts = vec![0; (hi - lo + 1) as usize];
        }
        for v in fg {
            h.add(v);
        }
        h
    }

    /// Sum of histograms with possibly different ranges.
    pub fn merge(parts: &[HuHistogram]) -> HuHistogram {
        let nonempty: Vec<&HuHistogram> = parts.iter().filter(|h| !h.counts.is_empty()).collect();
        let Some(lo) = nonempty.iter().map(|h| h.min_hu).min() else {
            return HuHistogram::default();
        };
        let hi = nonempty.iter().map(|h| h.min_hu + h.counts.len() as i32 - 1).max().unwrap();
        let mut counts = vec![0u64; (hi - lo + 1) as usize];
        for h in nonempty {
            let off = (h.min_hu - lo) as usize;
            for (i, c) in h.counts.iter().enumerate() {
                counts[off + i] += c;
            }
        }
        HuHistogram { min_hu: lo, counts }
    }

    /// The value at percentile `p` (0..100) with numpy's default linear interpolation between the
    /// order statistics (`np.percentile(values, p)` of the voxels the histogram counts).
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = p / 100.0 * (n - 1) as f64;
        let lo = rank.floor() as u64;
        let frac = rank - lo as f64;
        let a = self.value_at_rank(lo);
        let b = self.value_at_rank((lo + 1).min(n - 1));
        Some(a + (b - a) * frac)
    }

    /// The k-th smallest counted value (0-based).
    fn value_at_rank(&self, k: u64) -> f64 {
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > k {
                return (self.min_hu + i as i32) as f64;
            }
        }
        (self.min_hu + self.counts.len() as i32 - 1) as f64
    }

    /// CT statistics: the 0.5/99.5 percentiles of the foreground, then mean and std (population) of
    /// the foreground values that lie within that range, so that the outliers the clip removes do
    /// not inflate the std.
    pub fn ct_stats(&self) -> Option<Normalization> {
        let clip_low = self.percentile(0.5)?;
        let clip_high = self.percentile(99.5)?;
        let (mut n, mut sum, mut sum2) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &c) in self.counts.iter().enumerate() {
            let v = (self.min_hu + i as i32) as f64;
            if v < clip_low || v > clip_high {
                continue;
            }
            n += c as f64;
            sum += v * c as f64;
            sum2 += v * v * c as f64;
        }
        let mean = sum / n;
        let std = (sum2 / n - mean * mean).max(0.0).sqrt();
        Some(Normalization { clip_low, clip_high, mean, std })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(min_hu: i32, counts: Vec<u64>) -> HuHistogram {
        HuHistogram { min_hu, counts }
    }

    /// Issue 21 item 3: what a site sends is checked before the coordinator computes with it;
    /// each refusal names the field.
    #[test]
    fn absurd_histograms_are_refused_naming_the_field() {
        let cases = [
            (hist(i32::MAX, vec![1, 1]), "min_hu"),
            (hist(i32::MIN, vec![1]), "min_hu"),
            (hist(HU_RANGE.0 - 1, vec![1]), "min_hu"),
            (hist(HU_RANGE.1, vec![1, 1]), "counts"),
            (hist(0, vec![0; (HU_RANGE.1 - HU_RANGE.0 + 2) as usize]), "counts"),
            (hist(0, vec![u64::MAX, 1]), "counts"),
            (hist(0, vec![MAX_VOXELS, 1]), "counts"),
        ];
        for (h, field) in cases {
            let err = h.check().expect_err(&format!("accepted min_hu {} with {} bins", h.min_hu, h.counts.len()));
            assert!(err.to_string().contains(field), "{err} does not name {field}");
        }
        // What sites build is accepted: empty, the whole range, one voxel at either end.
        let mut whole = HuHistogram::default();
        for v in [-1e9f32, 1e9, 0.0] {
            whole.add(v);
        }
        for h in [HuHistogram::default(), whole, hist(HU_RANGE.0, vec![1]), hist(HU_RANGE.1, vec![1])] {
            h.check().unwrap();
        }
    }

    /// Counts that sum past u64 saturate instead of overflowing (a panic in debug builds).
    #[test]
    fn totals_and_merges_saturate() {
        let big = hist(0, vec![u64::MAX / 2 + 1, u64::MAX / 2 + 1]);
        assert_eq!(big.total(), u64::MAX);
        let merged = HuHistogram::merge(&[big.clone(), big]);
        assert_eq!(merged.counts, vec![u64::MAX, u64::MAX]);
        assert_eq!(merged.total(), u64::MAX);
        assert!(merged.ct_stats().is_some());
    }

    #[test]
    fn merge_aligns_ranges_and_stats_are_the_plain_ones() {
        let merged = HuHistogram::merge(&[hist(-1, vec![1, 2]), hist(1, vec![3]), HuHistogram::default()]);
        assert_eq!(merged, hist(-1, vec![1, 2, 3]));
        assert_eq!(merged.percentile(0.0), Some(-1.0));
        assert_eq!(merged.percentile(100.0), Some(1.0));
    }
}
