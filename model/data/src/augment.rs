//! Batched data augmentation on the training device (nnU-Net v1's default set and probabilities).
//!
//! Order as nnU-Net: spatial (rotation + scaling in one affine grid, [`crate::spatial`], applied
//! by the loader because it needs context around the patch), Gaussian noise, Gaussian blur,
//! brightness, contrast, simulated low resolution, inverted gamma, gamma, mirroring. Labels only
//! follow the spatial transform (nearest) and the mirroring, so they stay integers from the
//! input's label set. Per-sample decisions and parameters come from a seeded ChaCha RNG; the
//! noise voxels come from torch's generator on the device.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::spatial::around_one;

/// Augmentation probabilities and ranges (defaults: nnU-Net v1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    pub p_rotation: f64,
    /// Maximum absolute rotation per axis, radians.
    pub max_rotation: f64,
    pub p_scale: f64,
    pub scale_range: (f64, f64),
    pub p_noise: f64,
    /// batchgenerators calls this range the noise "variance" but draws the std from it.
    pub noise_variance: (f64, f64),
    pub p_blur: f64,
    /// batchgenerators' p_per_channel of the blur (a second coin per sample and channel).
    pub p_blur_per_channel: f64,
    pub blur_sigma: (f64, f64),
    pub p_brightness: f64,
    pub brightness_range: (f64, f64),
    pub p_contrast: f64,
    pub contrast_range: (f64, f64),
    pub p_low_res: f64,
    /// batchgenerators' p_per_channel of the simulated low resolution.
    pub p_low_res_per_channel: f64,
    pub low_res_zoom: (f64, f64),
    pub p_gamma_inverted: f64,
    pub p_gamma: f64,
    pub gamma_range: (f64, f64),
    pub p_mirror_per_axis: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            p_rotation: 0.2,
            max_rotation: 30f64.to_radians(),
            p_scale: 0.2,
            scale_range: (0.7, 1.4),
            p_noise: 0.1,
            noise_variance: (0.0, 0.1),
            p_blur: 0.2,
            blur_sigma: (0.5, 1.0),
            p_blur_per_channel: 0.5,
            p_brightness: 0.15,
            brightness_range: (0.75, 1.25),
            p_contrast: 0.15,
            contrast_range: (0.75, 1.25),
            p_low_res: 0.25,
            p_low_res_per_channel: 0.5,
            low_res_zoom: (0.5, 1.0),
            p_gamma_inverted: 0.1,
            p_gamma: 0.3,
            gamma_range: (0.7, 1.5),
            p_mirror_per_axis: 0.5,
        }
    }
}

/// Applies [`AugmentConfig`] to batches.
pub struct Augmenter {
    pub config: AugmentConfig,
    seed: u64,
    rng: ChaCha8Rng,
}

fn per_sample(values: &[f64], device: Device) -> Tensor {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_slice(&v).to_device(device).view([-1, 1, 1, 1, 1])
}

fn index_tensor(sel: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(sel).to_device(device)
}

impl Augmenter {
    pub fn new(config: AugmentConfig, seed: u64) -> Self {
        Augmenter { config, seed, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Augments batch `index` of a stream: its draws depend only on the seed and the index, so
    /// a stream resumed at a later batch continues exactly (see [`Augmenter::apply`]).
    pub fn apply_to_batch(&mut self, index: u64, image: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        self.apply(image, labels)
    }

    /// Augments `image` [B,C,Z,Y,X] float and `labels` [B,1,Z,Y,X] int64 on their device, with
    /// everything but the spatial transform, which the loader applies sample by sample with
    /// context around each patch ([`crate::spatial`]).
    pub fn apply(&mut self, image: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let img = self.noise(image);
            let img = self.blur(&img);
            let img = self.brightness(&img);
            let img = self.contrast(&img);
            let img = self.low_resolution(&img);
            let img = self.gamma(&img, true);
            let img = self.gamma(&img, false);
            self.mirror(&img, labels)
        })
    }

    fn batch(t: &Tensor) -> usize {
        t.size()[0] as usize
    }

    fn noise(&mut self, image: &Tensor) -> Tensor {
        let c = &self.config;
        let stds: Vec<f64> = (0..Self::batch(image))
            .map(|_| {
                if self.rng.gen_bool(c.p_noise) {
                    self.rng.gen_range(c.noise_variance.0..=c.noise_variance.1)
                } else {
                    0.0
                }
            })
            .collect();
        if stds.iter().all(|&s| s == 0.0) {
            return image.shallow_clone();
        }
        // The noise voxels come from torch's generator: seed it from this stream so that the same
        // seed gives the same noise (and hence the same model).
        tch::manual_seed(self.rng.gen::<i64>());
        image + image.randn_like() * per_sample(&stds, image.device())
    }

    fn blur(&mut self, image: &Tensor) -> Tensor {
        const RADIUS: i64 = 3; // covers 3 sigma for sigma <= 1
        let c = &self.config;
        let (mut sel, mut kernels) = (Vec::new(), Vec::new());
        for b in 0..Self::batch(image) {
            if self.rng.gen_bool(c.p_blur) && self.rng.gen_bool(c.p_blur_per_channel) {
                let sigma = self.rng.gen_range(c.blur_sigma.0..=c.blur_sigma.1);
                let w: Vec<f32> =
                    (-RADIUS..=RADIUS).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
                let sum: f32 = w.iter().sum();
                kernels.extend(w.into_iter().map(|v| v / sum));
                sel.push(b as i64);
            }
        }
        if sel.is_empty() {
            return image.shallow_clone();
        }
        let device = image.device();
        let n = sel.len() as i64;
        let idx = index_tensor(&sel, device);
        let k = Tensor::from_slice(&kernels).to_device(device);
        let size = image.size();
        // Every channel of every selected sample as a channel of one image, so that a grouped
        // convolution gives each sample its own sigma (the same for all its input channels).
        let channels = size[1];
        let k = k.view([n, 1, 2 * RADIUS + 1]).expand([n, channels, 2 * RADIUS + 1], false).reshape([-1]);
        let n = n * channels;
        let mut x = image.index_select(0, &idx).reshape([1, n, size[2], size[3], size[4]]);
        let k_len = 2 * RADIUS + 1;
        for (shape, pad) in [
            ([n, 1, k_len, 1, 1], [0, 0, 0, 0, RADIUS, RADIUS]),
            ([n, 1, 1, k_len, 1], [0, 0, RADIUS, RADIUS, 0, 0]),
            ([n, 1, 1, 1, k_len], [RADIUS, RADIUS, 0, 0, 0, 0]),
        ] {
            let padded = x.pad(pad, "replicate", None);
            x = padded.conv3d::<Tensor>(&k.view(shape), None, [1, 1, 1], [0, 0, 0], [1, 1, 1], n);
        }
        image.index_copy(0, &idx, &x.reshape([n / channels, channels, size[2], size[3], size[4]]))
    }

    fn factors(&mut self, n: usize, p: f64, range: (f64, f64)) -> Option<Vec<f64>> {
        let f: Vec<f64> =
            (0..n).map(|_| if self.rng.gen_bool(p) { around_one(&mut self.rng, range) } else { 1.0 }).collect();
        f.iter().any(|&v| v != 1.0).then_some(f)
    }

    fn brightness(&mut self, image: &Tensor) -> Tensor {
        let (p, r) = (self.config.p_brightness, self.config.brightness_range);
        match self.factors(Self::batch(image), p, r) {
            // nnU-Net's brightness is multiplicative.
            Some(f) => image * per_sample(&f, image.device()),
            None => image.shallow_clone(),
        }
    }

    fn contrast(&mut self, image: &Tensor) -> Tensor {
        let (p, r) = (self.config.p_contrast, self.config.contrast_range);
        let Some(f) = self.factors(Self::batch(image), p, r) else {
            return image.shallow_clone();
        };
        let dims = [1i64, 2, 3, 4];
        let mean = image.mean_dim(&dims[..], true, Kind::Float);
        let (lo, hi) = (image.amin(&dims[..], true), image.amax(&dims[..], true));
        // Preserve the range, as nnU-Net's ContrastAugmentationTransform(preserve_range=True).
        ((image - &mean) * per_sample(&f, image.device()) + &mean).maximum(&lo).minimum(&hi)
    }

    fn low_resolution(&mut self, image: &Tensor) -> Tensor {
        let size = image.size();
        let mut out = image.shallow_clone();
        for b in 0..Self::batch(image) {
            if !(self.rng.gen_bool(self.config.p_low_res) && self.rng.gen_bool(self.config.p_low_res_per_channel)) {
                continue;
            }
            let zoom = self.rng.gen_range(self.config.low_res_zoom.0..=self.config.low_res_zoom.1);
            let small: Vec<i64> = size[2..].iter().map(|&s| ((s as f64 * zoom).round() as i64).max(1)).collect();
            let x = out.narrow(0, b as i64, 1);
            let down = x.upsample_nearest3d(&small, None::<f64>, None::<f64>, None::<f64>);
            // nnU-Net upsamples with cubic splines; trilinear is the device-side equivalent.
            let up = down.upsample_trilinear3d(&size[2..], false, None::<f64>, None::<f64>, None::<f64>);
            out = out.index_copy(0, &index_tensor(&[b as i64], image.device()), &up);
        }
        out
    }

    fn gamma(&mut self, image: &Tensor, invert: bool) -> Tensor {
        let c = &self.config;
        let p = if invert { c.p_gamma_inverted } else { c.p_gamma };
        let (mut sel, mut gammas) = (Vec::new(), Vec::new());
        for b in 0..Self::batch(image) {
            if self.rng.gen_bool(p) {
                gammas.push(around_one(&mut self.rng, c.gamma_range));
                sel.push(b as i64);
            }
        }
        if sel.is_empty() {
            return image.shallow_clone();
        }
        let device = image.device();
        let idx = index_tensor(&sel, device);
        let sign = if invert { -1.0 } else { 1.0 };
        let x = image.index_select(0, &idx) * sign;
        let dims = [1i64, 2, 3, 4];
        let (mean, std) = (x.mean_dim(&dims[..], true, Kind::Float), x.std_dim(&dims[..], false, true));
        let lo = x.amin(&dims[..], true);
        let range = x.amax(&dims[..], true) - &lo + 1e-7;
        let y = ((&x - &lo) / &range).clamp_min(0.0).pow(&per_sample(&gammas, device)) * &range + &lo;
        // retain_stats: restore each sample's mean and std.
        let (m2, s2) = (y.mean_dim(&dims[..], true, Kind::Float), y.std_dim(&dims[..], false, true));
        let y = (y - &m2) / (s2 + 1e-8) * std + mean;
        image.index_copy(0, &idx, &(y * sign))
    }

    fn mirror(&mut self, image: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let (mut imgs, mut labs) = (Vec::new(), Vec::new());
        let mut any = false;
        for b in 0..Self::batch(image) {
            let axes: Vec<i64> = (2..5).filter(|_| self.rng.gen_bool(self.config.p_mirror_per_axis)).collect();
            let (i, l) = (image.narrow(0, b as i64, 1), labels.narrow(0, b as i64, 1));
            if axes.is_empty() {
                imgs.push(i);
                labs.push(l);
            } else {
                any = true;
                imgs.push(i.flip(&axes));
                labs.push(l.flip(&axes));
            }
        }
        if !any {
            return (image.shallow_clone(), labels.shallow_clone());
        }
        (Tensor::cat(&imgs, 0), Tensor::cat(&labs, 0))
    }
}
