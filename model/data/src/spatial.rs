//! The spatial augmentation (rotation ±30° and scaling 0.7–1.4, p 0.2 each, as nnU-Net), applied
//! with context: a rotated or zoomed-out patch needs voxels from around it, so the sampler cuts
//! a larger region for such a sample (its [`SpatialTransform::source_size`]) and the device warps
//! that region onto the patch with one affine grid (trilinear image, nearest labels). Without
//! the context the corners of every rotated patch would be padding, and labels there would say
//! "background" wherever the anatomy actually is. nnU-Net cuts one enlarged patch for every
//! sample; we enlarge only the ~36 % of samples that are transformed, and each only as much as
//! its own transform needs.

use rand::Rng;
use tch::{Kind, Tensor};

use crate::augment::AugmentConfig;

/// Voxels of margin around the exact source extent, for trilinear interpolation at its edge.
const MARGIN: usize = 1;

/// A rotation and/or scaling about the patch centre, in voxel space: `matrix` (x, y, z order)
/// maps an output voxel's offset from the patch centre to the source offset it samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpatialTransform {
    pub matrix: [[f64; 3]; 3],
}

/// nnU-Net's way to draw a factor from a range around 1: half the time below 1, else above.
pub(crate) fn around_one<R: Rng>(rng: &mut R, (lo, hi): (f64, f64)) -> f64 {
    if rng.gen_bool(0.5) && lo < 1.0 {
        rng.gen_range(lo..1.0)
    } else {
        rng.gen_range(1.0f64.max(lo)..hi.max(1.0 + 1e-9))
    }
}

/// Rotation by `ax`, `ay`, `az` radians about the x, y and z axes (applied x first).
pub fn rotation_xyz(ax: f64, ay: f64, az: f64) -> [[f64; 3]; 3] {
    let (sx, cx) = ax.sin_cos();
    let (sy, cy) = ay.sin_cos();
    let (sz, cz) = az.sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    matmul3(&rz, &matmul3(&ry, &rx))
}

fn matmul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

impl SpatialTransform {
    /// Draws one sample's transform: `None` when it is neither rotated nor scaled.
    pub fn draw<R: Rng>(config: &AugmentConfig, rng: &mut R) -> Option<SpatialTransform> {
        let rotate = rng.gen_bool(config.p_rotation.clamp(0.0, 1.0));
        let scale = rng.gen_bool(config.p_scale.clamp(0.0, 1.0));
        if !(rotate || scale) {
            return None;
        }
        let max = config.max_rotation;
        let mut angle = || if max > 0.0 { rng.gen_range(-max..=max) } else { 0.0 };
        let r = if rotate { rotation_xyz(angle(), angle(), angle()) } else { rotation_xyz(0.0, 0.0, 0.0) };
        let s = if scale { around_one(rng, config.scale_range) } else { 1.0 };
        Some(SpatialTransform { matrix: std::array::from_fn(|i| std::array::from_fn(|j| r[i][j] * s)) })
    }

    /// Size (z, y, x) of the source region, centred like the patch, that holds every voxel the
    /// warped `patch` samples. Each axis grows by an even number of voxels, so the region's
    /// centre falls on the patch's.
    pub fn source_size(&self, patch: [usize; 3]) -> [usize; 3] {
        let half_xyz = [patch[2] as f64 / 2.0, patch[1] as f64 / 2.0, patch[0] as f64 / 2.0];
        let reach = |i: usize| (0..3).map(|j| self.matrix[i][j].abs() * half_xyz[j]).sum::<f64>();
        let grow = |i: usize| (reach(i) - half_xyz[i]).max(0.0).ceil() as usize + MARGIN;
        let [gx, gy, gz] = [grow(0), grow(1), grow(2)];
        [patch[0] + 2 * gz, patch[1] + 2 * gy, patch[2] + 2 * gx]
    }

    /// `affine_grid` theta (normalized output coordinates → normalized source coordinates, x, y, z
    /// order, align_corners = false): θ_ij = M_ij · out_j / src_i.
    fn theta(&self, out_xyz: [f64; 3], src_xyz: [f64; 3]) -> [f32; 12] {
        let mut t = [0f32; 12];
        for i in 0..3 {
            for j in 0..3 {
                t[i * 4 + j] = (self.matrix[i][j] * out_xyz[j] / src_xyz[i]) as f32;
            }
        }
        t
    }

    /// Warps a source region ([1, 1, Qz, Qy, Qx] image float and labels int64, on one device) onto
    /// a `patch` ([1, 1, Pz, Py, Px]): trilinear for the image, nearest for the labels, zeros
    /// outside the region (which [`SpatialTransform::source_size`] makes never sampled).
    pub fn warp(&self, image: &Tensor, labels: &Tensor, patch: [usize; 3]) -> (Tensor, Tensor) {
        let src = image.size();
        let src_xyz = [src[4] as f64, src[3] as f64, src[2] as f64];
        let out_xyz = [patch[2] as f64, patch[1] as f64, patch[0] as f64];
        let theta = Tensor::from_slice(&self.theta(out_xyz, src_xyz)).to_device(image.device()).view([1, 3, 4]);
        let [pz, py, px] = patch.map(|p| p as i64);
        let grid = Tensor::affine_grid_generator(&theta, [1, 1, pz, py, px], false);
        // grid_sampler modes: interpolation 0 = trilinear, 1 = nearest; padding 0 = zeros.
        tch::no_grad(|| {
            let img = image.grid_sampler(&grid, 0, 0, false);
            let lab = labels.to_kind(Kind::Float).grid_sampler(&grid, 1, 0, false).round().to_kind(Kind::Int64);
            (img, lab)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use tch::Device;

    fn identity() -> SpatialTransform {
        SpatialTransform { matrix: rotation_xyz(0.0, 0.0, 0.0) }
    }

    fn ramp(shape: [i64; 5]) -> (Tensor, Tensor) {
        let n: i64 = shape.iter().product();
        let image = Tensor::arange(n, (Kind::Float, Device::Cpu)).view(shape);
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(7).view(shape);
        (image, labels)
    }

    fn centre_crop(t: &Tensor, patch: [usize; 3]) -> Tensor {
        let s = t.size();
        let mut out = t.shallow_clone();
        for (a, &p) in patch.iter().enumerate() {
            let off = (s[2 + a] - p as i64) / 2;
            out = out.narrow(2 + a as i64, off, p as i64);
        }
        out
    }

    #[test]
    fn identity_needs_only_the_margin_and_returns_the_centre() {
        let patch = [6, 8, 10];
        let src = identity().source_size(patch);
        assert_eq!(src, [8, 10, 12]);
        let (image, labels) = ramp([1, 1, src[0] as i64, src[1] as i64, src[2] as i64]);
        let (img, lab) = identity().warp(&image, &labels, patch);
        assert!(img.allclose(&centre_crop(&image, patch), 1e-3, 1e-3, false));
        assert!(lab.equal(&centre_crop(&labels, patch)));
    }

    #[test]
    fn quarter_turn_about_z_is_a_transpose_and_flip_of_the_centre() {
        // 90° about z maps output (x, y) to source (-y, x): the result is the centre crop
        // rotated in the y-x plane, exactly (every sample lands on a voxel centre).
        let t = SpatialTransform { matrix: rotation_xyz(0.0, 0.0, std::f64::consts::FRAC_PI_2) };
        let patch = [4, 8, 8];
        let src = t.source_size(patch);
        assert_eq!(src, [6, 10, 10]);
        let (image, labels) = ramp([1, 1, 6, 10, 10]);
        let (img, lab) = t.warp(&image, &labels, patch);
        let expect = |x: &Tensor| centre_crop(x, patch).flip([4]).transpose(3, 4);
        assert!(img.allclose(&expect(&image), 1e-3, 1e-3, false), "{img}");
        assert!(lab.equal(&expect(&labels)));
    }

    #[test]
    fn rotated_and_zoomed_out_patches_sample_only_inside_their_region() {
        // A region of ones: a warped patch that reaches outside it would show padding zeros.
        let config = AugmentConfig { p_rotation: 1.0, p_scale: 1.0, ..AugmentConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let patch = [12, 20, 16];
        for _ in 0..20 {
            let t = SpatialTransform::draw(&config, &mut rng).expect("p = 1");
            let src = t.source_size(patch);
            let shape = [1, 1, src[0] as i64, src[1] as i64, src[2] as i64];
            let ones = Tensor::ones(shape, (Kind::Float, Device::Cpu));
            let (img, lab) = t.warp(&ones, &ones.to_kind(Kind::Int64), patch);
            assert_eq!(img.size(), vec![1, 1, 12, 20, 16]);
            let min = img.min().double_value(&[]);
            assert!(min > 0.999, "{t:?} sampled outside its {src:?} region (min {min})");
            assert_eq!(lab.min().int64_value(&[]), 1);
        }
    }

    #[test]
    fn draw_respects_probabilities_and_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let off = AugmentConfig { p_rotation: 0.0, p_scale: 0.0, ..AugmentConfig::default() };
        assert!((0..50).all(|_| SpatialTransform::draw(&off, &mut rng).is_none()));
        let scale_only = AugmentConfig { p_rotation: 0.0, p_scale: 1.0, ..AugmentConfig::default() };
        for _ in 0..50 {
            let m = SpatialTransform::draw(&scale_only, &mut rng).unwrap().matrix;
            let s = m[0][0];
            assert!((0.7..=1.4).contains(&s), "{s}");
            assert_eq!(m, [[s, 0.0, 0.0], [0.0, s, 0.0], [0.0, 0.0, s]]);
        }
    }
}
