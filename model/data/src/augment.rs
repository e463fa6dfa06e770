//! Batched data augmentation on the training device (nnU-Net v1's default set and probabilities).
//!
//! Order as nnU-Net: spatial (rotation + scaling in one affine grid, [`crate::spatial`], applied
//! by the loader because it needs context around the patch), Gaussian noise, Gaussian blur,
//! brightness, contrast, simulated low resolution, inverted gamma, gamma, mirroring. Labels only
//! follow the spatial transform (nearest) and the mirroring, so they stay integers from the
//! input's label set. Per-sample decisions and parameters come from a seeded ChaCha RNG; the
//! noise voxels come from torch's generator on the device. After the noise (one std per sample,
//! as batchgenerators' default), each transform draws one coin per sample and then its
//! parameter per channel, as nnU-Net's trainer configures batchgenerators.

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
            // The intensity transforms after the noise act per channel, as batchgenerators'
            // (per_channel / different_sigma_per_channel in nnU-Net's trainer): one coin per
            // sample, then each channel its own parameter. Each channel becomes a row of its own.
            let size = img.size();
            let channels = size[1] as usize;
            let rows = img.reshape([size[0] * size[1], 1, size[2], size[3], size[4]]);
            let rows = self.blur(&rows, channels);
            let rows = self.brightness(&rows, channels);
            let rows = self.contrast(&rows, channels);
            let rows = self.low_resolution(&rows, channels);
            let rows = self.gamma(&rows, channels, true);
            let rows = self.gamma(&rows, channels, false);
            self.mirror(&rows.reshape(&size[..]), labels)
        })
    }

    fn batch(t: &Tensor) -> usize {
        t.size()[0] as usize
    }

    /// Per channel row (sample-major), what `draw` gave for it: for each sample a coin of
    /// probability `p`, then, if it came up, one `draw` per channel; `None` where nothing applies.
    /// With one channel this is one coin and one draw per sample, in that order.
    fn per_channel_draws<T>(
        &mut self,
        rows: usize,
        channels: usize,
        p: f64,
        mut draw: impl FnMut(&mut ChaCha8Rng) -> Option<T>,
    ) -> Vec<Option<T>> {
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows / channels {
            let hit = self.rng.gen_bool(p);
            out.extend((0..channels).map(|_| if hit { draw(&mut self.rng) } else { None }));
        }
        out
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

    /// Gaussian blur of channel rows [N,1,Z,Y,X], each selected row with its own sigma.
    fn blur(&mut self, rows: &Tensor, channels: usize) -> Tensor {
        const RADIUS: i64 = 3; // covers 3 sigma for sigma <= 1
        let c = self.config.clone();
        let draws = self.per_channel_draws(Self::batch(rows), channels, c.p_blur, |rng| {
            rng.gen_bool(c.p_blur_per_channel).then(|| rng.gen_range(c.blur_sigma.0..=c.blur_sigma.1))
        });
        let (mut sel, mut kernels) = (Vec::new(), Vec::new());
        for (row, sigma) in draws.into_iter().enumerate() {
            let Some(sigma) = sigma else { continue };
            let w: Vec<f32> =
                (-RADIUS..=RADIUS).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
            let sum: f32 = w.iter().sum();
            kernels.extend(w.into_iter().map(|v| v / sum));
            sel.push(row as i64);
        }
        if sel.is_empty() {
            return rows.shallow_clone();
        }
        let device = rows.device();
        let n = sel.len() as i64;
        let idx = index_tensor(&sel, device);
        let k = Tensor::from_slice(&kernels).to_device(device);
        let size = rows.size();
        // Every selected row as a channel of one image, so that a grouped convolution gives each
        // its own sigma.
        let mut x = rows.index_select(0, &idx).reshape([1, n, size[2], size[3], size[4]]);
        let k_len = 2 * RADIUS + 1;
        for (shape, pad) in [
            ([n, 1, k_len, 1, 1], [0, 0, 0, 0, RADIUS, RADIUS]),
            ([n, 1, 1, k_len, 1], [0, 0, RADIUS, RADIUS, 0, 0]),
            ([n, 1, 1, 1, k_len], [RADIUS, RADIUS, 0, 0, 0, 0]),
        ] {
            let padded = x.pad(pad, "replicate", None);
            x = padded.conv3d::<Tensor>(&k.view(shape), None, [1, 1, 1], [0, 0, 0], [1, 1, 1], n);
        }
        rows.index_copy(0, &idx, &x.reshape([n, 1, size[2], size[3], size[4]]))
    }

    /// Per channel row, its factor around one (1 where the sample's coin did not come up), or
    /// `None` if no row changes.
    fn factors(&mut self, rows: usize, channels: usize, p: f64, range: (f64, f64)) -> Option<Vec<f64>> {
        let draws = self.per_channel_draws(rows, channels, p, |rng| Some(around_one(rng, range)));
        let f: Vec<f64> = draws.into_iter().map(|d| d.unwrap_or(1.0)).collect();
        f.iter().any(|&v| v != 1.0).then_some(f)
    }

    fn brightness(&mut self, rows: &Tensor, channels: usize) -> Tensor {
        let (p, r) = (self.config.p_brightness, self.config.brightness_range);
        match self.factors(Self::batch(rows), channels, p, r) {
            // nnU-Net's brightness is multiplicative.
            Some(f) => rows * per_sample(&f, rows.device()),
            None => rows.shallow_clone(),
        }
    }

    fn contrast(&mut self, rows: &Tensor, channels: usize) -> Tensor {
        let (p, r) = (self.config.p_contrast, self.config.contrast_range);
        let Some(f) = self.factors(Self::batch(rows), channels, p, r) else {
            return rows.shallow_clone();
        };
        let dims = [1i64, 2, 3, 4];
        let mean = rows.mean_dim(&dims[..], true, Kind::Float);
        let (lo, hi) = (rows.amin(&dims[..], true), rows.amax(&dims[..], true));
        // Preserve the range, as nnU-Net's ContrastAugmentationTransform(preserve_range=True).
        ((rows - &mean) * per_sample(&f, rows.device()) + &mean).maximum(&lo).minimum(&hi)
    }

    fn low_resolution(&mut self, rows: &Tensor, channels: usize) -> Tensor {
        let c = self.config.clone();
        let draws = self.per_channel_draws(Self::batch(rows), channels, c.p_low_res, |rng| {
            rng.gen_bool(c.p_low_res_per_channel).then(|| rng.gen_range(c.low_res_zoom.0..=c.low_res_zoom.1))
        });
        let size = rows.size();
        let mut out = rows.shallow_clone();
        for (row, zoom) in draws.into_iter().enumerate() {
            let Some(zoom) = zoom else { continue };
            let small: Vec<i64> = size[2..].iter().map(|&s| ((s as f64 * zoom).round() as i64).max(1)).collect();
            let x = out.narrow(0, row as i64, 1);
            let down = x.upsample_nearest3d(&small, None::<f64>, None::<f64>, None::<f64>);
            // nnU-Net upsamples with cubic splines; trilinear is the device-side equivalent.
            let up = down.upsample_trilinear3d(&size[2..], false, None::<f64>, None::<f64>, None::<f64>);
            out = out.index_copy(0, &index_tensor(&[row as i64], rows.device()), &up);
        }
        out
    }

    fn gamma(&mut self, rows: &Tensor, channels: usize, invert: bool) -> Tensor {
        let c = &self.config;
        let (p, range) = (if invert { c.p_gamma_inverted } else { c.p_gamma }, c.gamma_range);
        let draws = self.per_channel_draws(Self::batch(rows), channels, p, |rng| Some(around_one(rng, range)));
        let (mut sel, mut gammas) = (Vec::new(), Vec::new());
        for (row, gamma) in draws.into_iter().enumerate() {
            if let Some(gamma) = gamma {
                gammas.push(gamma);
                sel.push(row as i64);
            }
        }
        if sel.is_empty() {
            return rows.shallow_clone();
        }
        let device = rows.device();
        let idx = index_tensor(&sel, device);
        let sign = if invert { -1.0 } else { 1.0 };
        let x = rows.index_select(0, &idx) * sign;
        let dims = [1i64, 2, 3, 4];
        let (mean, std) = (x.mean_dim(&dims[..], true, Kind::Float), x.std_dim(&dims[..], false, true));
        let lo = x.amin(&dims[..], true);
        let range = x.amax(&dims[..], true) - &lo + 1e-7;
        let y = ((&x - &lo) / &range).clamp_min(0.0).pow(&per_sample(&gammas, device)) * &range + &lo;
        // retain_stats: restore each row's mean and std.
        let (m2, s2) = (y.mean_dim(&dims[..], true, Kind::Float), y.std_dim(&dims[..], false, true));
        let y = (y - &m2) / (s2 + 1e-8) * std + mean;
        rows.index_copy(0, &idx, &(y * sign))
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
