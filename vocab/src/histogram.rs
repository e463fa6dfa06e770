//! Foreground HU histograms and the CT normalization derived from them.
//!
//! A site shares only a histogram of its foreground intensities (1 HU bins), never voxels; the
//! coordinator merges the histograms and derives nnU-Net's CT statistics from the merged one.

use serde::{Deserialize, Serialize};

use crate::CtNormalization;

/// Counts of foreground voxels per 1 HU bin; bin `i` holds values rounding to `min_hu + i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HuHistogram {
    pub min_hu: i32,
    pub counts: Vec<u64>,
}

/// Intensities are clamped into this range before binning so that one absurd voxel cannot make a
/// histogram of billions of bins (CT lives in roughly [-1024, 3071]).
pub const HU_RANGE: (i32, i32) = (-2048, 8191);

/// Cap on the voxels one histogram may count (2^48 ≈ 2.8e14, a thousand times a large CT
/// collection): with it, the sum over any realistic number of sites stays far from u64::MAX.
pub const MAX_VOXELS: u64 = 1 << 48;

/// Why a histogram received from a peer is refused; each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("min_hu = {min_hu} is outside [{}, {}]", HU_RANGE.0, HU_RANGE.1)]
    MinOutOfRange { min_hu: i32 },
    #[error("counts: {bins} bins from min_hu = {min_hu} reach past {}", HU_RANGE.1)]
    TooManyBins { min_hu: i32, bins: usize },
    #[error("counts sum to more than {MAX_VOXELS} voxels")]
    TooManyVoxels,
}

impl HuHistogram {
    /// The counted voxels (saturating: a histogram that passed [`HuHistogram::check`] never
    /// reaches the cap, and an unchecked one must not panic).
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |sum, &c| sum.saturating_add(c))
    }

    /// Checks a histogram received from a peer before anything computes with it: every bin
    /// within [`HU_RANGE`] (what [`HuHistogram::add`] produces) and at most [`MAX_VOXELS`]
    /// counted, so that merging, percentiles and the CT statistics cannot overflow or allocate
    /// more than the range.
    pub fn check(&self) -> Result<(), HistogramError> {
        if self.counts.is_empty() {
            return Ok(());
        }
        if !(HU_RANGE.0..=HU_RANGE.1).contains(&self.min_hu) {
            return Err(HistogramError::MinOutOfRange { min_hu: self.min_hu });
        }
        let last = self.min_hu as i64 + self.counts.len() as i64 - 1;
        if last > HU_RANGE.1 as i64 {
            return Err(HistogramError::TooManyBins { min_hu: self.min_hu, bins: self.counts.len() });
        }
        let mut total = 0u64;
        for &c in &self.counts {
            total = total.checked_add(c).filter(|&t| t <= MAX_VOXELS).ok_or(HistogramError::TooManyVoxels)?;
        }
        Ok(())
    }

    /// The HU value of bin `i` (i64: no overflow whatever the histogram holds).
    fn value_of_bin(&self, i: usize) -> f64 {
        (self.min_hu as i64 + i as i64) as f64
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

    /// Sum of histograms with possibly different ranges (counts saturate). The parts must have
    /// passed [`HuHistogram::check`]: the result spans from the lowest to the highest bin.
    pub fn merge(parts: &[HuHistogram]) -> HuHistogram {
        let nonempty: Vec<&HuHistogram> = parts.iter().filter(|h| !h.counts.is_empty()).collect();
        let Some(lo) = nonempty.iter().map(|h| h.min_hu as i64).min() else {
            return HuHistogram::default();
        };
        let hi = nonempty.iter().map(|h| h.min_hu as i64 + h.counts.len() as i64 - 1).max().unwrap();
        let mut counts = vec![0u64; (hi - lo + 1) as usize];
        for h in nonempty {
            let off = (h.min_hu as i64 - lo) as usize;
            for (sum, c) in counts[off..].iter_mut().zip(&h.counts) {
                *sum = sum.saturating_add(*c);
            }
        }
        HuHistogram { min_hu: lo as i32, counts }
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
        let b = self.value_at_rank(lo.saturating_add(1).min(n - 1));
        Some(a + (b - a) * frac)
    }

    /// The k-th smallest counted value (0-based).
    fn value_at_rank(&self, k: u64) -> f64 {
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen > k {
                return self.value_of_bin(i);
            }
        }
        self.value_of_bin(self.counts.len() - 1)
    }

    /// CT statistics: the 0.5/99.5 percentiles of the foreground, then mean and std (population) of
    /// the foreground values that lie within that range, so that the outliers the clip removes do
    /// not inflate the std. Computed in f64, stored as the federation sends them (f32).
    pub fn ct_stats(&self) -> Option<CtNormalization> {
        let clip_low = self.percentile(0.5)?;
        let clip_high = self.percentile(99.5)?;
        let (mut n, mut sum, mut sum2) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &c) in self.counts.iter().enumerate() {
            let v = self.value_of_bin(i);
            if v < clip_low || v > clip_high {
                continue;
            }
            n += c as f64;
            sum += v * c as f64;
            sum2 += v * v * c as f64;
        }
        let mean = sum / n;
        let std = (sum2 / n - mean * mean).max(0.0).sqrt();
        Some(CtNormalization {
            clip_low: clip_low as f32,
            clip_high: clip_high as f32,
            mean: mean as f32,
            std: std as f32,
        })
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
        assert_eq!(merged.percentile(100.0), Some(1.0));
    }

    #[test]
    fn merge_aligns_ranges_and_stats_are_the_plain_ones() {
        let merged = HuHistogram::merge(&[hist(-1, vec![1, 2]), hist(1, vec![3]), HuHistogram::default()]);
        assert_eq!(merged, hist(-1, vec![1, 2, 3]));
        assert_eq!(merged.percentile(0.0), Some(-1.0));
        assert_eq!(merged.percentile(100.0), Some(1.0));
    }
}
