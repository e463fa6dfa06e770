//! Times sliding-window inference of one volume (random weights, random normalized image) and
//! prints one JSON line: seconds per volume, tiles, peak memory.
//!
//!   cargo run --release -p fedtalent-model --example bench_predict -- \
//!       --preset unet --classes 47 --shape 200 512 512 --device cuda [--tta] [--tile-batch 2] \
//!       [--accumulate auto|device|cpu] [--channels-last true|false]
//!
//! Peak GPU memory is sampled every 5 ms from `cudaMemGetInfo` (device-wide: total − free,
//! CUDA context and the caching allocator's reserve included); peak RSS is the process's VmHWM.
//! PyTorch counterpart: `bench_predict_torch.py` (same tiling, weights, mirroring, fp16 autocast).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedtalent_model::infer::{cuda_mem_info, sliding_window_probabilities, tiles, Accumulate, InferOptions};
use fedtalent_model::predict::parse_device;
use fedtalent_model::{MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn main() -> Result<()> {
    fedtalent_data::alloc::keep_freed_memory();
    let mut preset = "unet".to_string();
    let mut classes = 47i64;
    let mut shape = [200i64, 512, 512];
    let mut device = "auto".to_string();
    let mut tta = false;
    let mut tile_batch = 2usize;
    let mut accumulate = Accumulate::Auto;
    let mut channels_last: Option<bool> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: usize| args.get(i + 1).with_context(|| format!("{} needs a value", args[i]));
    while i < args.len() {
        match args[i].as_str() {
            "--preset" => preset = value(i)?.clone(),
            "--classes" => classes = value(i)?.parse()?,
            "--device" => device = value(i)?.clone(),
            "--tile-batch" => tile_batch = value(i)?.parse()?,
            "--channels-last" => channels_last = Some(value(i)?.parse().context("--channels-last true|false")?),
            "--accumulate" => {
                accumulate = match value(i)?.as_str() {
                    "auto" => Accumulate::Auto,
                    "device" => Accumulate::Device,
                    "cpu" => Accumulate::Cpu,
                    other => bail!("--accumulate {other:?}: auto | device | cpu"),
                }
            }
            "--shape" => {
                for (a, s) in shape.iter_mut().enumerate() {
                    *s = args.get(i + 1 + a).context("--shape needs 3 values")?.parse()?;
                }
                i += 4;
            }
            "--tta" => {
                tta = true;
                i += 1;
                continue;
            }
            other => bail!("unknown argument {other:?}"),
        }
        i += 2;
    }
    let device = parse_device(&device)?;
    let topology = Topology::preset(&preset)?;
    let patch = topology.patch;
    tch::manual_seed(0);
    let net = MultiTalentNet::new(&topology, classes, device)?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let image = Tensor::randn([1, shape[0], shape[1], shape[2]], (Kind::Float, Device::Cpu));
    let opts = InferOptions {
        mirror: tta,
        tile_batch,
        device,
        accumulate,
        progress: false,
        channels_last,
        ..InferOptions::default()
    };
    // Warm-up: one tile batch through the same path as the timed run (its layout, so oneDNN's
    // primitives for channels-last and cuDNN's autotuning are made here, as the PyTorch peer's
    // warm-up makes them for its own layout).
    let warm = Tensor::randn([1, patch[0], patch[1] * tile_batch as i64, patch[2]], (Kind::Float, Device::Cpu));
    let _ = sliding_window_probabilities(&net, &warm, patch, &InferOptions { step: 1.0, ..opts.clone() })?
        .sum(Kind::Float)
        .double_value(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = device.is_cuda().then(|| {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some((free, total)) = cuda_mem_info() {
                    peak.fetch_max(total - free, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    });
    let start = Instant::now();
    let probs = sliding_window_probabilities(&net, &image, patch, &opts)?;
    let checksum = probs.mean(Kind::Float).double_value(&[]);
    if device.is_cuda() {
        tch::Cuda::synchronize(match device {
            Device::Cuda(n) => n as i64,
            _ => 0,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let padded: [i64; 3] = std::array::from_fn(|a| shape[a].max(patch[a]));
    let n_tiles = tiles(padded, patch, opts.step).len();
    let peak_gpu = device.is_cuda().then(|| peak.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64);
    println!(
        "{}",
        serde_json::json!({
            "impl": "fedtalent-tch",
            "device": format!("{device:?}"),
            "preset": preset,
            "classes": classes,
            "shape": shape,
            "patch": patch,
            "tiles": n_tiles,
            "tta": tta,
            "tile_batch": tile_batch,
            "channels_last": opts.channels_last.unwrap_or(device == Device::Cpu),
            "accumulator_device": format!("{:?}", probs.device()),
            "seconds_per_volume": (seconds * 1000.0).round() / 1000.0,
            "peak_gpu_used_gib": peak_gpu.map(|g| (g * 100.0).round() / 100.0),
            "peak_rss_gib": peak_rss_gib().map(|g| (g * 100.0).round() / 100.0),
            "mean_probability": checksum,
        })
    );
    Ok(())
}
