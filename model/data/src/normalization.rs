//! Per-channel intensity normalization, as nnU-Net v2 chooses and applies it
//! (`nnunetv2/preprocessing/normalization`).
//!
//! A dataset names each input channel (`channel_names` in nnU-Net v2's dataset.json, `modality` in
//! the MSD's); the name picks a [`NormalizationScheme`]. The planner then decides per channel
//! whether z-scoring is restricted to the nonzero mask ([`use_mask_for_norm`]), and CT channels get
//! the federation's CT statistics; together these make the [`Normalization`] applied to each
//! channel of each case. CT statistics are the federation's [`CtNormalization`] (from the sites'
//! merged foreground histograms), so the CT scheme here applies exactly what CT images get today.

use fedtalent_vocab::CtNormalization;
use ndarray::Array3;

/// The normalization a channel name selects: the vocabulary's type, shared with the federation's
/// declared input channels.
pub use fedtalent_vocab::NormalizationScheme;

/// nnU-Net v2's planner decision for one channel: normalize within the nonzero mask when cropping
/// to the nonzero region shrank the median case to below 3/4 of its size (skull-stripped MR as in
/// BraTS, where the zero background would otherwise dominate the statistics), and only for a
/// scheme that can use the mask.
pub fn use_mask_for_norm(scheme: NormalizationScheme, median_relative_size_after_cropping: f64) -> bool {
    median_relative_size_after_cropping < 0.75 && scheme.can_use_mask()
}

/// Why a channel could not be normalized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizationError {
    #[error("CT normalization needs the federation's CT statistics (clip range, mean, std), and none were given")]
    MissingCtStatistics,
    #[error("z-score normalization within the nonzero mask was asked for, but no mask was given")]
    MaskRequired,
    #[error("the mask has {mask} voxels but the channel has {voxels}")]
    MaskLength { mask: usize, voxels: usize },
    #[error("rgb_to_0_1 expects uint8 intensities in [0, 255], but the channel's values span [{min}, {max}]")]
    NotRgb { min: f32, max: f32 },
}

/// A channel's normalization with everything it needs to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    Ct(CtNormalization),
    /// `use_mask`: statistics and normalization within the mask only, voxels outside it unchanged.
    ZScore {
        use_mask: bool,
    },
    NoNorm,
    RescaleTo01,
    RgbTo01,
}

impl Normalization {
    /// The normalization of a channel with `scheme`; `ct` is required for CT and ignored otherwise,
    /// `use_mask` (see [`use_mask_for_norm`]) is ignored by schemes that cannot use a mask.
    pub fn new(
        scheme: NormalizationScheme,
        ct: Option<CtNormalization>,
        use_mask: bool,
    ) -> Result<Self, NormalizationError> {
        Ok(match scheme {
            NormalizationScheme::Ct => Self::Ct(ct.ok_or(NormalizationError::MissingCtStatistics)?),
            NormalizationScheme::ZScore => Self::ZScore { use_mask },
            NormalizationScheme::NoNorm => Self::NoNorm,
            NormalizationScheme::RescaleTo01 => Self::RescaleTo01,
            NormalizationScheme::RgbTo01 => Self::RgbTo01,
        })
    }

    pub fn scheme(&self) -> NormalizationScheme {
        match self {
            Self::Ct(_) => NormalizationScheme::Ct,
            Self::ZScore { .. } => NormalizationScheme::ZScore,
            Self::NoNorm => NormalizationScheme::NoNorm,
            Self::RescaleTo01 => NormalizationScheme::RescaleTo01,
            Self::RgbTo01 => NormalizationScheme::RgbTo01,
        }
    }

    /// Normalizes one channel's voxels in place. `mask` is nnU-Net's "seg >= 0" region: the
    /// case's nonzero mask ([`nonzero_mask`], after cropping), which during training also
    /// includes labelled voxels outside it. Only a masked z-score reads it.
    pub fn apply(&self, voxels: &mut [f32], mask: Option<&[bool]>) -> Result<(), NormalizationError> {
        if let Some(mask) = mask.filter(|m| m.len() != voxels.len()) {
            return Err(NormalizationError::MaskLength { mask: mask.len(), voxels: voxels.len() });
        }
        match *self {
            Self::Ct(ct) => ct.apply_slice(voxels),
            Self::ZScore { use_mask: false } => z_score(voxels, |_| true),
            Self::ZScore { use_mask: true } => {
                let mask = mask.ok_or(NormalizationError::MaskRequired)?;
                z_score(voxels, |i| mask[i]);
            }
            Self::NoNorm => {}
            Self::RescaleTo01 => rescale_to_01(voxels),
            Self::RgbTo01 => rgb_to_01(voxels)?,
        }
        Ok(())
    }

    /// [`Normalization::apply`] on a [z, y, x] channel with a mask of the same shape.
    pub fn apply_array(&self, image: &mut Array3<f32>, mask: Option<&Array3<bool>>) -> Result<(), NormalizationError> {
        if let Some(mask) = mask.filter(|m| m.dim() != image.dim()) {
            return Err(NormalizationError::MaskLength { mask: mask.len(), voxels: image.len() });
        }
        // Both arrays come from this crate's readers and resamplers, hence standard layout; a
        // view with other strides is copied rather than refused.
        let mask: Option<Vec<bool>> = mask.map(|m| m.iter().copied().collect());
        match image.as_slice_mut() {
            Some(voxels) => self.apply(voxels, mask.as_deref()),
            None => {
                let mut voxels: Vec<f32> = image.iter().copied().collect();
                self.apply(&mut voxels, mask.as_deref())?;
                image.iter_mut().zip(voxels).for_each(|(v, n)| *v = n);
                Ok(())
            }
        }
    }
}

/// Subtracts the mean and divides by max(std, 1e-8) (population std, as numpy's), both over the
/// voxels `selected`; the others are left unchanged. Statistics are accumulated in f64 (numpy
/// uses f32 with pairwise sums; the two agree far below the 1e-5 the tests allow). No selected
/// voxel leaves everything unchanged, as nnU-Net's masked assignment does.
fn z_score(voxels: &mut [f32], selected: impl Fn(usize) -> bool) {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for (i, &v) in voxels.iter().enumerate() {
        if selected(i) {
            n += 1;
            sum += v as f64;
        }
    }
    if n == 0 {
        return;
    }
    let mean = sum / n as f64;
    let var =
        voxels.iter().enumerate().filter(|(i, _)| selected(*i)).map(|(_, &v)| (v as f64 - mean).powi(2)).sum::<f64>()
            / n as f64;
    let std = var.sqrt().max(1e-8);
    for (i, v) in voxels.iter_mut().enumerate() {
        if selected(i) {
            *v = ((*v as f64 - mean) / std) as f32;
        }
    }
}

/// nnU-Net's RescaleTo01Normalization, in f32 as it computes: subtract the minimum, then divide
/// by max(new maximum, 1e-8). The whole channel, never masked.
fn rescale_to_01(voxels: &mut [f32]) {
    let min = voxels.iter().copied().fold(f32::INFINITY, f32::min);
    voxels.iter_mut().for_each(|v| *v -= min);
    let max = voxels.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(1e-8);
    voxels.iter_mut().for_each(|v| *v /= max);
}

/// nnU-Net's RGBTo01Normalization: division by 255, refusing values outside uint8's range (nnU-Net
/// asserts the same, since such a channel is not an RGB channel).
fn rgb_to_01(voxels: &mut [f32]) -> Result<(), NormalizationError> {
    let min = voxels.iter().copied().fold(f32::INFINITY, f32::min);
    let max = voxels.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !voxels.is_empty() && (min < 0.0 || max > 255.0) {
        return Err(NormalizationError::NotRgb { min, max });
    }
    voxels.iter_mut().for_each(|v| *v /= 255.0);
    Ok(())
}

/// nnU-Net's nonzero mask of a case: voxels where any channel is nonzero, with enclosed holes
/// filled (scipy's `binary_fill_holes`: background voxels not 6-connected to the array's border
/// join the mask), so dark structures inside the anatomy stay in the normalization region.
///
/// Panics when `channels` is empty or the channels differ in shape (a [`crate::ChannelImage`]
/// cannot).
pub fn nonzero_mask(channels: &[Array3<f32>]) -> Array3<bool> {
    assert!(!channels.is_empty(), "a nonzero mask needs at least one channel");
    let dim = channels[0].dim();
    let mut mask = Array3::from_elem(dim, false);
    for channel in channels {
        assert_eq!(channel.dim(), dim, "channels of one case must share a shape");
        mask.zip_mut_with(channel, |m, &v| *m |= v != 0.0);
    }
    fill_holes(&mask)
}

/// The mask plus every background voxel that cannot reach the border through 6-connected
/// background voxels.
fn fill_holes(mask: &Array3<bool>) -> Array3<bool> {
    let (nz, ny, nx) = mask.dim();
    let mut outside = Array3::from_elem(mask.dim(), false);
    let mut stack: Vec<[usize; 3]> = Vec::new();
    let visit = |p: [usize; 3], outside: &mut Array3<bool>, stack: &mut Vec<[usize; 3]>| {
        if !mask[p] && !outside[p] {
            outside[p] = true;
            stack.push(p);
        }
    };
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let on_border = z == 0 || y == 0 || x == 0 || z + 1 == nz || y + 1 == ny || x + 1 == nx;
                if on_border {
                    visit([z, y, x], &mut outside, &mut stack);
                }
            }
        }
    }
    while let Some([z, y, x]) = stack.pop() {
        let neighbours = [
            (z > 0).then(|| [z - 1, y, x]),
            (z + 1 < nz).then(|| [z + 1, y, x]),
            (y > 0).then(|| [z, y - 1, x]),
            (y + 1 < ny).then(|| [z, y + 1, x]),
            (x > 0).then(|| [z, y, x - 1]),
            (x + 1 < nx).then(|| [z, y, x + 1]),
        ];
        for p in neighbours.into_iter().flatten() {
            visit(p, &mut outside, &mut stack);
        }
    }
    outside.mapv(|o| !o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_z_score_uses_the_mask_and_only_after_substantial_cropping() {
        assert!(use_mask_for_norm(NormalizationScheme::ZScore, 0.5));
        assert!(!use_mask_for_norm(NormalizationScheme::ZScore, 0.75));
        for s in [NormalizationScheme::Ct, NormalizationScheme::NoNorm, NormalizationScheme::RescaleTo01] {
            assert!(!use_mask_for_norm(s, 0.1), "{s:?}");
        }
    }

    #[test]
    fn missing_inputs_are_refused() {
        let err = Normalization::new(NormalizationScheme::Ct, None, false).unwrap_err();
        assert_eq!(err, NormalizationError::MissingCtStatistics);
        let mut v = vec![1.0, 2.0];
        assert_eq!(Normalization::ZScore { use_mask: true }.apply(&mut v, None), Err(NormalizationError::MaskRequired));
        assert_eq!(
            Normalization::ZScore { use_mask: true }.apply(&mut v, Some(&[true])),
            Err(NormalizationError::MaskLength { mask: 1, voxels: 2 })
        );
        let mut not_rgb = vec![0.0, 256.0];
        let err = Normalization::RgbTo01.apply(&mut not_rgb, None).unwrap_err();
        assert!(err.to_string().contains("[0, 256]"), "{err}");
    }

    #[test]
    fn ct_is_the_federations_ct_normalization() {
        let ct = CtNormalization { clip_low: -100.0, clip_high: 200.0, mean: 50.0, std: 25.0 };
        let mut v = vec![-500.0, 0.0, 75.0, 1000.0];
        Normalization::Ct(ct).apply(&mut v, None).unwrap();
        assert_eq!(v, vec![ct.apply(-500.0), ct.apply(0.0), ct.apply(75.0), ct.apply(1000.0)]);
    }

    #[test]
    fn fill_holes_closes_an_enclosed_cavity_but_not_a_tunnel() {
        let mut m = Array3::from_elem((5, 5, 5), false);
        for z in 1..4 {
            for y in 1..4 {
                for x in 1..4 {
                    m[[z, y, x]] = true;
                }
            }
        }
        m[[2, 2, 2]] = false; // enclosed
        let filled = fill_holes(&m);
        assert!(filled[[2, 2, 2]]);
        m[[2, 2, 1]] = false; // now opens to the outside through (2, 2, 0)
        m[[2, 2, 3]] = false;
        let filled = fill_holes(&m);
        assert!(!filled[[2, 2, 2]] && !filled[[2, 2, 0]]);
    }
}
