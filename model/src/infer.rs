//! Sliding-window inference (DESIGN.md §1.5), as nnU-Net v2 does it: tiles of the training patch
//! at a step of half the patch, Gaussian importance weighting (σ = patch/8, centred), optional
//! 8-way mirroring, and per-class sigmoid probabilities accumulated as a weighted average.
//!
//! Tiles run in mini-batches on the inference device. The accumulator (C + 1 channels of the
//! whole volume) lives on that device when it fits, else on the CPU: then the image stays on the
//! CPU too and tiles are streamed to the device and their probabilities back, batch by batch, so
//! volumes larger than GPU memory work.

use anyhow::{ensure, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::{Device, Kind, Tensor};

use crate::network::MultiTalentNet;

/// Where the probability accumulator lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// On the inference device when its free memory allows, else on the CPU.
    Auto,
    Device,
    Cpu,
}

/// Sliding-window settings.
#[derive(Clone, Debug)]
pub struct InferOptions {
    /// Step between tiles as a fraction of the patch (nnU-Net: 0.5).
    pub step: f64,
    /// Average the class probabilities over all 8 combinations of flips of z, y and x.
    pub mirror: bool,
    /// Tiles per forward pass.
    pub tile_batch: usize,
    /// Device the network runs on (the network's parameters must live there).
    pub device: Device,
    pub accumulate: Accumulate,
    /// Output channels to compute (indices into the network's classes); `None`: all.
    pub channels: Option<Vec<i64>>,
    /// fp16 autocast on CUDA (as nnU-Net's inference); ignored on the CPU.
    pub half: bool,
    /// Show a progress bar (indicatif hides it by itself when stderr is not a terminal).
    pub progress: bool,
    /// Channels (indices into the computed channels: `channels`' positions, or the network's
    /// classes) that form one softmax over background + them (a site with mutually exclusive
    /// classes, [`crate::loss::ClassRegions::exclusive`]); every other channel is a sigmoid.
    pub softmax_groups: Vec<Vec<i64>>,
    /// Run the network channels-last (NDHWC): its 5-D weights and each tile batch are laid out
    /// channels-last for the duration of the call (values unchanged; the layout is restored
    /// afterwards). `None`: on the CPU only, where oneDNN's channels-last convolutions measured
    /// faster (scripts/bench.sh, predict); on CUDA it waits for a GPU figure.
    pub channels_last: Option<bool>,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self {
            step: 0.5,
            mirror: false,
            tile_batch: 2,
            device: Device::Cpu,
            accumulate: Accumulate::Auto,
            channels: None,
            half: true,
            progress: true,
            softmax_groups: Vec::new(),
            channels_last: None,
        }
    }
}

/// nnU-Net's Gaussian importance map for a patch: per axis exp(−d²/2σ²) with σ = patch/8 around
/// the centre voxel `patch / 2`, truncated at scipy's radius `int(4σ + 0.5)` (as nnU-Net's
/// `gaussian_filter` of a delta), normalised to a maximum of 1, zeros replaced by the smallest
/// nonzero value. Returns a CPU f32 tensor of shape `patch`.
pub fn gaussian_importance(patch: [i64; 3]) -> Tensor {
    let axis = |n: i64| -> Vec<f64> {
        let sigma = n as f64 / 8.0;
        let centre = (n / 2) as f64;
        let radius = (4.0 * sigma + 0.5).floor();
        (0..n)
            .map(|i| {
                let d = i as f64 - centre;
                if d.abs() > radius || sigma == 0.0 {
                    if d == 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    (-d * d / (2.0 * sigma * sigma)).exp()
                }
            })
            .collect()
    };
    let (az, ay, ax) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut values = Vec::with_capacity((patch[0] * patch[1] * patch[2]) as usize);
    for z in &az {
        for y in &ay {
            for x in &ax {
                values.push(z * y * x);
            }
        }
    }
    let max = values.iter().cloned().fold(0.0f64, f64::max);
    let mut values: Vec<f32> = values.iter().map(|v| (v / max) as f32).collect();
    let min_nonzero = values.iter().cloned().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
    for v in values.iter_mut() {
        if *v == 0.0 {
            *v = min_nonzero;
        }
    }
    Tensor::from_slice(&values).reshape(patch)
}

/// nnU-Net's tile start positions along one axis: `ceil((size − patch) / (patch·step)) + 1`
/// tiles, evenly spread from 0 to `size − patch` (numpy rounding, half to even).
pub fn tile_starts(size: i64, patch: i64, step: f64) -> Vec<i64> {
    assert!(size >= patch, "tile_starts: size {size} is smaller than the patch {patch}");
    let target = patch as f64 * step;
    let n = ((size - patch) as f64 / target).ceil() as i64 + 1;
    if n <= 1 {
        return vec![0];
    }
    let actual = (size - patch) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as i64).collect()
}

/// Every tile's start (z, y, x) for a volume of `shape` (at least `patch` on every axis).
pub fn tiles(shape: [i64; 3], patch: [i64; 3], step: f64) -> Vec<[i64; 3]> {
    let (sz, sy, sx) = (
        tile_starts(shape[0], patch[0], step),
        tile_starts(shape[1], patch[1], step),
        tile_starts(shape[2], patch[2], step),
    );
    let mut out = Vec::with_capacity(sz.len() * sy.len() * sx.len());
    for &z in &sz {
        for &y in &sy {
            for &x in &sx {
                out.push([z, y, x]);
            }
        }
    }
    out
}

/// Free and total memory of the current CUDA device, from the CUDA runtime that libtorch loaded
/// (`cudaMemGetInfo`, looked up with `dlsym`); `None` when it is not available.
pub fn cuda_mem_info() -> Option<(u64, u64)> {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    // SAFETY: RTLD_DEFAULT (null) searches the global scope; the symbol, when found, is the CUDA
    // runtime's `cudaError_t cudaMemGetInfo(size_t*, size_t*)`.
    unsafe {
        let sym = dlsym(std::ptr::null_mut(), c"cudaMemGetInfo".as_ptr());
        if sym.is_null() {
            return None;
        }
        let f: MemGetInfo = std::mem::transmute(sym);
        let (mut free, mut total) = (0usize, 0usize);
        (f(&mut free, &mut total) == 0).then_some((free as u64, total as u64))
    }
}

/// Whether an accumulator of `channels` probability maps (+ the weight map and the image) of
/// `voxels` voxels should live on `device`.
fn accumulate_on_device(
    device: Device,
    channels: i64,
    voxels: i64,
    patch_voxels: i64,
    tile_batch: usize,
    mode: Accumulate,
) -> bool {
    match (mode, device) {
        (_, Device::Cpu) => true,
        (Accumulate::Device, _) => true,
        (Accumulate::Cpu, _) => false,
        (Accumulate::Auto, _) => {
            let need = 4 * voxels as u64 * (channels as u64 + 2);
            // Working memory of a tile batch: the network's activations (generous for the presets)
            // and the logits/probabilities of every mirror.
            let work = (3u64 << 30) + 16 * patch_voxels as u64 * tile_batch as u64 * channels as u64;
            match cuda_mem_info() {
                Some((free, _)) => need + work < free / 10 * 9,
                None => need <= 4u64 << 30,
            }
        }
    }
}

/// `t` ([N, C, D, H, W]) with channels-last strides, same shape and values.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 4, 1]).contiguous().permute([0, 4, 1, 2, 3])
}

/// The network's 5-D weights laid out channels-last while this lives; contiguous again on drop.
/// Layout only: every value stays the same, so nothing reading the network meanwhile sees a
/// difference but the strides.
struct ChannelsLastWeights(Vec<Tensor>);

impl ChannelsLastWeights {
    fn apply(net: &MultiTalentNet) -> Self {
        let mut weights: Vec<Tensor> =
            net.params().trainable().into_iter().map(|(_, t)| t).filter(|t| t.dim() == 5).collect();
        tch::no_grad(|| {
            for w in &mut weights {
                let cl = channels_last(w);
                w.set_data(&cl);
            }
        });
        Self(weights)
    }
}

impl Drop for ChannelsLastWeights {
    fn drop(&mut self) {
        tch::no_grad(|| {
            for w in &mut self.0 {
                let plain = w.contiguous();
                w.set_data(&plain);
            }
        });
    }
}

fn flips() -> Vec<Vec<i64>> {
    vec![vec![], vec![2], vec![3], vec![4], vec![2, 3], vec![2, 4], vec![3, 4], vec![2, 3, 4]]
}

/// Sliding-window class probabilities (sigmoid, or softmax in `opts.softmax_groups`) of `net` on a normalized image `[C_in, Z, Y, X]` (its input channels; f32, any
/// device). Returns `[C, Z, Y, X]` f32 on the accumulator's device (see [`Accumulate`]).
pub fn sliding_window_probabilities(
    net: &MultiTalentNet,
    image: &Tensor,
    patch: [i64; 3],
    opts: &InferOptions,
) -> Result<Tensor> {
    ensure!(
        net.device() == opts.device,
        "the network is on {:?} but inference was asked to run on {:?}",
        net.device(),
        opts.device
    );
    let classes = net.classes();
    if let Some(ch) = &opts.channels {
        net.check_classes(ch)?;
    }
    let channels = opts.channels.as_ref().map_or(classes, |c| c.len() as i64);
    let last = opts.channels_last.unwrap_or(opts.device == Device::Cpu);
    let _layout = last.then(|| ChannelsLastWeights::apply(net));
    sliding_window_with(
        |x| {
            // Back to the plain layout once, on the small logits: the sigmoid, the Gaussian and the
            // accumulation into the (plain) volume then run over contiguous rows instead of
            // channel-strided ones.
            let x = if last { channels_last(x) } else { x.shallow_clone() };
            let logits = match &opts.channels {
                // Only the selected classes' decoders run (per-site decoders); checked above.
                Some(classes) => net.forward_classes(&x, classes).expect("output channels checked above"),
                None => net.forward(&x),
            };
            if last {
                logits.contiguous()
            } else {
                logits
            }
        },
        channels,
        image,
        patch,
        opts,
    )
}

/// Per-class probabilities of logits `[B, C, ...]`: sigmoid, except each softmax group's
/// channels, which get their softmax over [0, their logits] without the background (the zero
/// background logit of [`crate::loss::MultiTalentLoss::softmax_loss`]).
pub fn class_probabilities(logits: &Tensor, softmax_groups: &[Vec<i64>]) -> Tensor {
    let mut p = logits.sigmoid();
    for group in softmax_groups {
        let index = Tensor::from_slice(group).to_device(logits.device());
        let members = logits.index_select(1, &index);
        let softmax = crate::loss::with_background_logit(&members).softmax(1, Kind::Float);
        p = p.index_copy(1, &index, &softmax.narrow(1, 1, group.len() as i64));
    }
    p
}

/// The sliding window over any `forward` (`[B, 1, pz, py, px]` -> logits `[B, channels, pz, py,
/// px]`); [`sliding_window_probabilities`] with the network plugged in.
pub fn sliding_window_with(
    forward: impl Fn(&Tensor) -> Tensor,
    channels: i64,
    image: &Tensor,
    patch: [i64; 3],
    opts: &InferOptions,
) -> Result<Tensor> {
    let size = image.size();
    ensure!(size.len() == 4 && size[0] >= 1, "sliding window: expected an image [C, Z, Y, X], got {size:?}");
    ensure!(opts.step > 0.0 && opts.step <= 1.0, "sliding window: step {} is not in (0, 1]", opts.step);
    ensure!(opts.tile_batch >= 1, "sliding window: tile batch must be at least 1");
    ensure!(patch.iter().all(|&p| p > 0), "sliding window: bad patch {patch:?}");
    let shape = [size[1], size[2], size[3]];
    // Pad to at least the patch (nnU-Net: constant 0, half below, the rest above).
    let padded: [i64; 3] = std::array::from_fn(|a| shape[a].max(patch[a]));
    let below: [i64; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
    let voxels: i64 = padded.iter().product();
    let patch_voxels: i64 = patch.iter().product();
    let on_device = accumulate_on_device(opts.device, channels, voxels, patch_voxels, opts.tile_batch, opts.accumulate);
    let acc_device = if on_device { opts.device } else { Device::Cpu };

    let mut img = image.to_kind(Kind::Float).to_device(acc_device);
    if padded != shape {
        let pad = [
            below[2],
            padded[2] - shape[2] - below[2],
            below[1],
            padded[1] - shape[1] - below[1],
            below[0],
            padded[0] - shape[0] - below[0],
        ];
        img = img.constant_pad_nd(pad);
    }
    let gauss_acc = gaussian_importance(patch).to_device(acc_device);
    let gauss_dev = gauss_acc.to_device(opts.device);
    let mut acc = Tensor::zeros([channels, padded[0], padded[1], padded[2]], (Kind::Float, acc_device));
    let weight = Tensor::zeros([1, padded[0], padded[1], padded[2]], (Kind::Float, acc_device));

    let starts = tiles(padded, patch, opts.step);
    let bar = if opts.progress {
        ProgressBar::new(starts.len() as u64)
    } else {
        ProgressBar::with_draw_target(Some(starts.len() as u64), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tiles {elapsed} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message("predicting");
    let autocast = opts.half && opts.device.is_cuda();
    let mirrors = if opts.mirror { flips() } else { vec![vec![]] };
    let tile =
        |s: &[i64; 3], t: &Tensor| t.narrow(1, s[0], patch[0]).narrow(2, s[1], patch[1]).narrow(3, s[2], patch[2]);

    tch::no_grad(|| -> Result<()> {
        for batch in starts.chunks(opts.tile_batch) {
            let x = Tensor::stack(&batch.iter().map(|s| tile(s, &img)).collect::<Vec<_>>(), 0).to_device(opts.device);
            let mut probs: Option<Tensor> = None;
            for dims in &mirrors {
                let input = if dims.is_empty() { x.shallow_clone() } else { x.flip(dims.as_slice()) };
                let logits = tch::autocast(autocast, || forward(&input));
                let got = logits.size();
                ensure!(
                    got == [batch.len() as i64, channels, patch[0], patch[1], patch[2]],
                    "the network returned {got:?} for a tile batch of {:?}",
                    input.size()
                );
                let mut p = class_probabilities(&logits.to_kind(Kind::Float), &opts.softmax_groups);
                if !dims.is_empty() {
                    p = p.flip(dims.as_slice());
                }
                probs = Some(match probs {
                    None => p,
                    Some(sum) => sum + p,
                });
            }
            let mut probs = probs.expect("at least one mirror");
            if mirrors.len() > 1 {
                probs /= mirrors.len() as f64;
            }
            let _ = probs.g_mul_(&gauss_dev);
            let weighted = probs.to_device(acc_device);
            for (b, s) in batch.iter().enumerate() {
                let _ = tile(s, &acc).g_add_(&weighted.get(b as i64));
                let _ = tile(s, &weight).g_add_(&gauss_acc.unsqueeze(0));
            }
            bar.inc(batch.len() as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let _ = acc.g_div_(&weight);
    drop(weight);
    if padded != shape {
        acc =
            acc.narrow(1, below[0], shape[0]).narrow(2, below[1], shape[1]).narrow(3, below[2], shape[2]).contiguous();
    }
    Ok(acc)
}
