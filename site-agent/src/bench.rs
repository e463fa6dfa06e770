//! `site-agent bench train`: N MultiTalent training steps of a preset, one JSON line
//! (compare with `model/tests/reference/torch_reference.py` at the same batch, patch and dtype).

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use fedtalent_model::train::{Precision, TrainConfig, Trainer};
use fedtalent_model::{BatchTargets, ClassRegions, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the training step (forward with deep supervision, masked loss, backward, clip, SGD).
    Train(TrainBench),
}

#[derive(Args)]
pub struct TrainBench {
    #[arg(long, default_value = "unet")]
    preset: String,
    #[arg(long, default_value_t = 47)]
    classes: i64,
    #[arg(long, default_value_t = 2)]
    batch: i64,
    /// Patch z y x (default: the preset's).
    #[arg(long, num_args = 3)]
    patch: Option<Vec<i64>>,
    #[arg(long, default_value_t = 20)]
    steps: u32,
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp16 (CUDA) or fp32.
    #[arg(long)]
    precision: Option<Precision>,
    /// Also time the step's phases (forward, loss, backward, clip, optimizer) over `--steps` more
    /// steps run phase by phase (fp32 only), reported as `split_ms`.
    #[arg(long)]
    split: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(b) => train(b),
    }
}

fn train(b: TrainBench) -> Result<()> {
    let device = crate::device::parse(&b.device)?;
    let topo = Topology::preset(&b.preset)?;
    let patch = b.patch.map_or(topo.patch, |p| [p[0], p[1], p[2]]);
    let precision = b.precision.unwrap_or(if device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 });
    tch::manual_seed(0);
    let net = MultiTalentNet::new(&topo, b.classes, device)?;
    let params = net.parameter_counts().0;
    let mut trainer = Trainer::new(net, TrainConfig { precision, total_steps: 1_000_000, ..TrainConfig::default() })?;
    // As the reference: random image, ~10 % foreground labels, a quarter of the classes annotated.
    let x = Tensor::randn([b.batch, 1, patch[0], patch[1], patch[2]], (Kind::Float, device));
    let labels = Tensor::randint(10, [b.batch, 1, patch[0], patch[1], patch[2]], (Kind::Int64, device))
        .eq(0)
        .to_kind(Kind::Int64);
    let annotated = (b.classes / 4).max(1);
    let regions =
        ClassRegions { regions: (0..b.classes).map(|c| (c < annotated).then(|| vec![1])).collect(), exclusive: false };
    let refs: Vec<&ClassRegions> = (0..b.batch).map(|_| &regions).collect();
    let targets = BatchTargets::new(&refs, device)?;
    for _ in 0..b.warmup {
        trainer.train_step(&x, &labels, &targets)?;
    }
    sync(device);
    let peak_before = reset_peak(device);
    let started = Instant::now();
    for _ in 0..b.steps {
        trainer.train_step(&x, &labels, &targets)?;
    }
    sync(device);
    let per_step = started.elapsed().as_secs_f64() / b.steps as f64;
    let _ = peak_before;
    let split = if b.split {
        anyhow::ensure!(precision == Precision::Fp32, "--split times fp32 steps only");
        Some(split_ms(&mut trainer, &x, &labels, &targets, b.steps, device)?)
    } else {
        None
    };
    let line = serde_json::json!({
        "impl": "fedtalent", "device": format!("{device:?}"), "precision": precision, "preset": b.preset,
        "batch": b.batch, "patch": patch, "classes": b.classes, "params": params,
        "ms_per_step": (per_step * 1e5).round() / 100.0, "samples_per_s": ((b.batch as f64 / per_step) * 1000.0).round() / 1000.0,
        "gpu_used_gib": gpu_used_gib(device), "split_ms": split,
    });
    println!("{line}");
    Ok(())
}

/// Mean milliseconds of each phase of `steps` fp32 steps run phase by phase, as
/// [`Trainer::train_step`] runs them (with a device sync after each phase).
fn split_ms(
    trainer: &mut Trainer,
    x: &Tensor,
    labels: &Tensor,
    targets: &BatchTargets,
    steps: u32,
    device: Device,
) -> Result<serde_json::Value> {
    const PHASES: [&str; 5] = ["forward", "loss", "backward", "clip", "optimizer"];
    let mut total = [0f64; PHASES.len()];
    let grad_clip = trainer.config().grad_clip;
    for _ in 0..steps {
        let mut marks = vec![Instant::now()];
        let mut mark = |device| {
            sync(device);
            marks.push(Instant::now());
        };
        trainer.optimizer.zero_grad();
        let outputs = trainer.net.forward_ds(x);
        mark(device);
        let loss = trainer.loss_fn().compute(&outputs, labels, targets)?;
        mark(device);
        loss.backward();
        mark(device);
        let norm = trainer.optimizer.clip_grad_norm(grad_clip);
        anyhow::ensure!(norm.double_value(&[]).is_finite(), "non-finite gradient norm while timing the phases");
        mark(device);
        trainer.optimizer.step(1e-2);
        mark(device);
        for (t, w) in total.iter_mut().zip(marks.windows(2)) {
            *t += (w[1] - w[0]).as_secs_f64();
        }
    }
    let ms = |t: f64| (t / steps as f64 * 1e4).round() / 10.0;
    let mut split: serde_json::Map<String, serde_json::Value> =
        PHASES.iter().zip(total).map(|(name, t)| (name.to_string(), ms(t).into())).collect();
    split.insert("total".into(), ms(total.iter().sum()).into());
    Ok(split.into())
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn reset_peak(_device: Device) -> Option<u64> {
    None
}

/// Device memory in use at the end (total − free, all processes; tch exposes no allocator peak).
fn gpu_used_gib(device: Device) -> Option<f64> {
    if !device.is_cuda() {
        return None;
    }
    fedtalent_model::infer::cuda_mem_info()
        .map(|(free, total)| ((total - free) as f64 / 1073741824.0 * 100.0).round() / 100.0)
}
