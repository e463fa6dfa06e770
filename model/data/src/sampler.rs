//! Patch sampling: uniform crops, plus foreground-centred crops (a random present class, then a
//! random voxel of it), padded where the case is smaller than the patch.

use rand::Rng;

use fedtalent_vocab::{CtNormalization, NormalizationScheme};

/// Fraction of samples centred on foreground (DESIGN.md §1.4).
pub const FOREGROUND_FRACTION: f64 = 1.0 / 3.0;

/// A case as the sampler sees it.
pub struct CaseView<'a> {
    pub shape: [usize; 3],
    /// [c, z, y, x] flattened: CT channels in HU, the others normalized already.
    pub image: &'a [f32],
    /// What each channel holds ([`crate::CaseMeta::channels`]): CT channels are normalized as cut.
    pub channels: &'a [NormalizationScheme],
    pub labels: &'a [u16],
    pub class_locations: &'a [Vec<[u32; 3]>],
}

/// One cut patch: normalized image [c, z, y, x] and raw labels [z, y, x], flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub image: Vec<f32>,
    pub labels: Vec<u16>,
    /// Start of the patch in case coordinates (negative where padded).
    pub start: [i64; 3],
    /// The foreground voxel the patch was centred on, if it was.
    pub centred_on: Option<[usize; 3]>,
}

/// Range of valid patch starts along one axis: inside the volume when it is large enough, else
/// any placement that keeps the whole volume extent inside the patch (padding around it).
fn start_range(size: usize, patch: usize) -> (i64, i64) {
    let (s, p) = (size as i64, patch as i64);
    if s >= p {
        (0, s - p)
    } else {
        (s - p, 0)
    }
}

/// Chooses the patch start; centred on a foreground voxel when `foreground` and one exists.
pub fn choose_start<R: Rng>(
    case: &CaseView,
    patch: [usize; 3],
    foreground: bool,
    rng: &mut R,
) -> ([i64; 3], Option<[usize; 3]>) {
    let present: Vec<&Vec<[u32; 3]>> = case.class_locations.iter().filter(|l| !l.is_empty()).collect();
    let centre = if foreground && !present.is_empty() {
        let locs = present[rng.gen_range(0..present.len())];
        let v = locs[rng.gen_range(0..locs.len())];
        Some([v[0] as usize, v[1] as usize, v[2] as usize])
    } else {
        None
    };
    let start = std::array::from_fn(|a| {
        let (lo, hi) = start_range(case.shape[a], patch[a]);
        match centre {
            Some(c) => (c[a] as i64 - patch[a] as i64 / 2).clamp(lo, hi),
            None => rng.gen_range(lo..=hi),
        }
    });
    (start, centre)
}

/// Cuts the patch at `start` from every channel, normalizing CT channels with `norm`; outside
/// the case the image is 0 (the normalized mean, as nnU-Net pads) and the labels are background.
pub fn cut(case: &CaseView, patch: [usize; 3], start: [i64; 3], norm: &CtNormalization) -> (Vec<f32>, Vec<u16>) {
    let n: usize = patch.iter().product();
    let voxels: usize = case.shape.iter().product();
    let mut image = vec![0.0f32; n * case.channels.len()];
    let mut labels = vec![0u16; n];
    for (c, scheme) in case.channels.iter().enumerate() {
        let source = &case.image[c * voxels..(c + 1) * voxels];
        let ct = (*scheme == NormalizationScheme::Ct).then_some(norm);
        copy_box(case.shape, patch, start, source, &mut image[c * n..(c + 1) * n], |h| ct.map_or(h, |n| n.apply(h)));
    }
    copy_box(case.shape, patch, start, case.labels, &mut labels, |l| l);
    (image, labels)
}

/// Copies the part of `source` (a [z, y, x] volume of `shape`) that the patch at `start` covers
/// into `dest` (the patch), mapping each value with `map`; the rest of `dest` is left as is.
fn copy_box<T: Copy>(
    shape: [usize; 3],
    patch: [usize; 3],
    start: [i64; 3],
    source: &[T],
    dest: &mut [T],
    map: impl Fn(T) -> T,
) {
    let [sz, sy, sx] = shape;
    let x0 = start[2].max(0) as usize;
    let x1 = ((start[2] + patch[2] as i64).min(sx as i64)).max(0) as usize;
    if x1 <= x0 {
        return;
    }
    let px = (x0 as i64 - start[2]) as usize;
    for pz in 0..patch[0] {
        let z = start[0] + pz as i64;
        if z < 0 || z >= sz as i64 {
            continue;
        }
        for py in 0..patch[1] {
            let y = start[1] + py as i64;
            if y < 0 || y >= sy as i64 {
                continue;
            }
            let src = (z as usize * sy + y as usize) * sx;
            let dst = (pz * patch[1] + py) * patch[2] + px;
            let len = x1 - x0;
            for (d, &v) in dest[dst..dst + len].iter_mut().zip(&source[src + x0..src + x1]) {
                *d = map(v);
            }
        }
    }
}

/// Samples one patch; it is foreground-centred with probability `foreground_fraction`.
pub fn sample_patch<R: Rng>(
    case: &CaseView,
    patch: [usize; 3],
    norm: &CtNormalization,
    foreground_fraction: f64,
    rng: &mut R,
) -> Patch {
    sample_region(case, patch, patch, norm, foreground_fraction, rng)
}

/// Samples one patch as [`sample_patch`] does, but cuts the `region` (at least the patch, each
/// axis larger by an even count) centred on it: the context a spatial transform of the patch
/// samples from ([`crate::spatial::SpatialTransform::source_size`]). The returned image and
/// labels are region-sized and `start` is the region's.
pub fn sample_region<R: Rng>(
    case: &CaseView,
    patch: [usize; 3],
    region: [usize; 3],
    norm: &CtNormalization,
    foreground_fraction: f64,
    rng: &mut R,
) -> Patch {
    debug_assert!(
        (0..3).all(|a| region[a] >= patch[a] && (region[a] - patch[a]).is_multiple_of(2)),
        "{region:?} {patch:?}"
    );
    let foreground = rng.gen_bool(foreground_fraction.clamp(0.0, 1.0));
    let (patch_start, centred_on) = choose_start(case, patch, foreground, rng);
    let start = std::array::from_fn(|a| patch_start[a] - ((region[a] - patch[a]) / 2) as i64);
    let (image, labels) = cut(case, region, start, norm);
    Patch { image, labels, start, centred_on }
}
