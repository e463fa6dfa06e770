//! Separable resampling of [z, y, x] volumes.
//!
//! Voxel centres are aligned (output voxel o samples input coordinate (o + 0.5)·n_in/n_out − 0.5),
//! as skimage's `resize` that nnU-Net uses, so a volume resampled to a new spacing covers the same
//! physical extent. Cubic interpolation uses the Keys kernel (a = −0.5) with ghost samples outside
//! the volume reflected oddly about the edge voxel (f(−k) = 2f(0) − f(k)): this keeps linear ramps
//! exact up to the border instead of bending them toward a constant.
//!
//! Anisotropy rule (DESIGN.md §1.4): when the source spacing is more than 3x anisotropic, the
//! coarse axis is resampled with nearest neighbour and the other two with the requested kernel.

use ndarray::{Array3, Array4, ArrayView3};

/// Interpolation kernel for one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    Nearest,
    Linear,
    Cubic,
}

/// How label maps are resampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelInterp {
    Nearest,
    /// Each label's indicator is resampled linearly and every voxel takes the label with the
    /// largest value (nnU-Net's `resize_segmentation` with order 1, without its order bias).
    #[default]
    PerLabelLinear,
}

/// Ratio above which a spacing counts as anisotropic.
pub const ANISOTROPY_THRESHOLD: f64 = 3.0;

/// The axis (0 = z, 1 = y, 2 = x) to resample separately with nearest neighbour, if any.
pub fn anisotropy_axis(spacing: [f64; 3]) -> Option<usize> {
    let max = spacing.iter().cloned().fold(f64::MIN, f64::max);
    let min = spacing.iter().cloned().fold(f64::MAX, f64::min);
    if max / min > ANISOTROPY_THRESHOLD {
        (0..3).max_by(|&a, &b| spacing[a].total_cmp(&spacing[b]))
    } else {
        None
    }
}

/// Shape after resampling `shape` from `from` spacing to `to` spacing (nnU-Net rounds).
pub fn target_shape(shape: [usize; 3], from: [f64; 3], to: [f64; 3]) -> [usize; 3] {
    std::array::from_fn(|a| ((shape[a] as f64 * from[a] / to[a]).round() as usize).max(1))
}

/// Taps (input index, weight) of each output index along one axis.
fn axis_taps(n_in: usize, n_out: usize, interp: Interp) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let x = ((o as f64 + 0.5) * scale - 0.5).clamp(-0.5, n_in as f64 - 0.5);
            match interp {
                Interp::Nearest => vec![(x.round().clamp(0.0, (n_in - 1) as f64) as usize, 1.0)],
                Interp::Linear => linear_taps(x, n_in),
                Interp::Cubic => cubic_taps(x, n_in),
            }
        })
        .collect()
}

fn linear_taps(x: f64, n: usize) -> Vec<(usize, f32)> {
    let x = x.clamp(0.0, (n - 1) as f64);
    let i = x.floor() as usize;
    let t = (x - i as f64) as f32;
    if i + 1 < n && t > 0.0 {
        vec![(i, 1.0 - t), (i + 1, t)]
    } else {
        vec![(i, 1.0)]
    }
}

fn keys_weights(t: f64) -> [f64; 4] {
    let (t2, t3) = (t * t, t * t * t);
    [(-t3 + 2.0 * t2 - t) / 2.0, (3.0 * t3 - 5.0 * t2 + 2.0) / 2.0, (-3.0 * t3 + 4.0 * t2 + t) / 2.0, (t3 - t2) / 2.0]
}

fn cubic_taps(x: f64, n: usize) -> Vec<(usize, f32)> {
    if n == 1 {
        return vec![(0, 1.0)];
    }
    let base = x.floor() as i64;
    let w = keys_weights(x - base as f64);
    let last = n as i64 - 1;
    let mut acc: Vec<(usize, f64)> = Vec::with_capacity(8);
    let mut push = |i: i64, w: f64| {
        let i = i.clamp(0, last) as usize;
        match acc.iter_mut().find(|(j, _)| *j == i) {
            Some(e) => e.1 += w,
            None => acc.push((i, w)),
        }
    };
    for (k, &wk) in w.iter().enumerate() {
        let i = base - 1 + k as i64;
        if i < 0 {
            push(0, 2.0 * wk);
            push(-i, -wk);
        } else if i > last {
            push(last, 2.0 * wk);
            push(2 * last - i, -wk);
        } else {
            push(i, wk);
        }
    }
    acc.into_iter().filter(|(_, w)| *w != 0.0).map(|(i, w)| (i, w as f32)).collect()
}

/// Resamples one axis of a standard-layout [z, y, x] buffer.
fn resample_axis(src: &[f32], shape: [usize; 3], axis: usize, n_out: usize, interp: Interp) -> Vec<f32> {
    let n_in = shape[axis];
    if n_in == n_out {
        return src.to_vec();
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let taps = axis_taps(n_in, n_out, interp);
    let mut out = vec![0.0f32; outer * n_out * inner];
    for o in 0..outer {
        let src_block = &src[o * n_in * inner..(o + 1) * n_in * inner];
        let dst_block = &mut out[o * n_out * inner..(o + 1) * n_out * inner];
        for (j, tap) in taps.iter().enumerate() {
            let dst = &mut dst_block[j * inner..(j + 1) * inner];
            for &(i, w) in tap {
                let s = &src_block[i * inner..(i + 1) * inner];
                for (d, v) in dst.iter_mut().zip(s) {
                    *d += w * v;
                }
            }
        }
    }
    out
}

/// Resamples to `new_shape`; `separate_axis` (from [`anisotropy_axis`]) is resampled with nearest
/// neighbour after the others.
pub fn resample(
    data: ArrayView3<f32>,
    new_shape: [usize; 3],
    interp: Interp,
    separate_axis: Option<usize>,
) -> Array3<f32> {
    let mut shape = [data.dim().0, data.dim().1, data.dim().2];
    let mut buf: Vec<f32> = data.iter().cloned().collect();
    let order: Vec<usize> = (0..3).filter(|&a| Some(a) != separate_axis).chain(separate_axis).collect();
    for axis in order {
        let kernel = if Some(axis) == separate_axis { Interp::Nearest } else { interp };
        buf = resample_axis(&buf, shape, axis, new_shape[axis], kernel);
        shape[axis] = new_shape[axis];
    }
    Array3::from_shape_vec((shape[0], shape[1], shape[2]), buf).expect("resampled size")
}

/// Resamples an image (cubic) from `from` spacing to `to` spacing with the anisotropy rule.
pub fn resample_image(data: &Array3<f32>, from: [f64; 3], to: [f64; 3]) -> Array3<f32> {
    let shape = [data.dim().0, data.dim().1, data.dim().2];
    resample(data.view(), target_shape(shape, from, to), Interp::Cubic, anisotropy_axis(from))
}

/// Resamples a label map to `new_shape`; labels stay within the input's label set.
pub fn resample_labels(
    labels: &Array3<u16>,
    new_shape: [usize; 3],
    mode: LabelInterp,
    separate_axis: Option<usize>,
) -> Array3<u16> {
    let interp = match mode {
        LabelInterp::Nearest => Interp::Nearest,
        LabelInterp::PerLabelLinear => Interp::Linear,
    };
    let mut present: Vec<u16> = labels.iter().cloned().collect();
    present.sort_unstable();
    present.dedup();
    if interp == Interp::Nearest || present.len() <= 1 {
        let as_f32 = labels.mapv(|v| v as f32);
        return resample(as_f32.view(), new_shape, Interp::Nearest, None).mapv(|v| v as u16);
    }
    let n: usize = new_shape.iter().product();
    let mut best = vec![f32::MIN; n];
    let mut best_label = vec![0u16; n];
    for &label in &present {
        let indicator = labels.mapv(|v| if v == label { 1.0f32 } else { 0.0 });
        let r = resample(indicator.view(), new_shape, interp, separate_axis);
        for ((b, bl), &v) in best.iter_mut().zip(best_label.iter_mut()).zip(r.iter()) {
            if v > *b {
                *b = v;
                *bl = label;
            }
        }
    }
    Array3::from_shape_vec((new_shape[0], new_shape[1], new_shape[2]), best_label).expect("size")
}

/// Resamples a label map from `from` to `to` spacing with the anisotropy rule.
pub fn resample_labels_to_spacing(
    labels: &Array3<u16>,
    from: [f64; 3],
    to: [f64; 3],
    mode: LabelInterp,
) -> Array3<u16> {
    let shape = [labels.dim().0, labels.dim().1, labels.dim().2];
    resample_labels(labels, target_shape(shape, from, to), mode, anisotropy_axis(from))
}

/// Resamples per-class probabilities [C, Z, Y, X] to `new_shape` (e.g. back to the original
/// geometry); `separate_axis` should come from the original image's spacing, as on the way in.
pub fn resample_probabilities(
    probs: &Array4<f32>,
    new_shape: [usize; 3],
    interp: Interp,
    separate_axis: Option<usize>,
) -> Array4<f32> {
    let c = probs.dim().0;
    let mut out = Array4::<f32>::zeros((c, new_shape[0], new_shape[1], new_shape[2]));
    for ch in 0..c {
        let r = resample(probs.index_axis(ndarray::Axis(0), ch), new_shape, interp, separate_axis);
        out.index_axis_mut(ndarray::Axis(0), ch).assign(&r);
    }
    if interp == Interp::Cubic {
        // Cubic overshoot must not produce probabilities outside [0, 1].
        out.mapv_inplace(|v| v.clamp(0.0, 1.0));
    }
    out
}
