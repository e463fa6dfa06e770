//! Training throughput (samples/s) and peak memory of network presets at one patch, batch and
//! device: one JSON line per preset, each measured in its own child process so the peaks are
//! independent.
//!
//! `cargo run --release -p fedtalent-model --example bench_arch -- \
//!     --presets firenet,unet --patch 96,192,192 --batch 2 --device cuda --precision fp16`
//!
//! Peak memory: on CUDA the process's GPU memory as `nvidia-smi` reports it after the run (the
//! caching allocator keeps its peak reservation, so this is the peak reserved memory, CUDA context
//! included); on the CPU the process's peak resident set (`VmHWM`, libtorch included).

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_model::train::{Precision, TrainConfig, Trainer};
use fedtalent_model::{BatchTargets, ClassRegions, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

struct Args {
    presets: Vec<String>,
    patch: [i64; 3],
    batch: i64,
    classes: i64,
    device: String,
    precision: String,
    warmup: usize,
    steps: usize,
    /// Run exactly this preset in this process (set by the parent).
    single: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        presets: vec!["firenet".into(), "unet".into()],
        patch: [32, 64, 64],
        batch: 2,
        classes: 3,
        device: "cpu".into(),
        precision: "fp32".into(),
        warmup: 2,
        steps: 5,
        single: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--single" {
            a.single = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--presets" => a.presets = value.split(',').map(str::to_string).collect(),
            "--patch" => {
                let v: Vec<i64> =
                    value.split(',').map(str::parse).collect::<Result<_, _>>().context("--patch z,y,x")?;
                ensure!(v.len() == 3, "--patch needs 3 values");
                a.patch = [v[0], v[1], v[2]];
            }
            "--batch" => a.batch = value.parse()?,
            "--classes" => a.classes = value.parse()?,
            "--device" => a.device = value,
            "--precision" => a.precision = value,
            "--warmup" => a.warmup = value.parse()?,
            "--steps" => a.steps = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(a.steps > 0 && a.batch > 0 && a.classes > 0, "steps, batch and classes must be positive");
    Ok(a)
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            ensure!(tch::Cuda::is_available(), "no CUDA device");
            Ok(Device::Cuda(0))
        }
        other => bail!("unknown device {other:?} (cpu | cuda)"),
    }
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

fn peak_memory_mib(d: Device) -> (f64, &'static str) {
    if d.is_cuda() {
        let pid = std::process::id().to_string();
        let out = Command::new("nvidia-smi")
            .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
            .output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut f = line.split(',').map(str::trim);
                if f.next() == Some(pid.as_str()) {
                    if let Some(Ok(mib)) = f.next().map(str::parse::<f64>) {
                        return (mib, "nvidia-smi used_memory (reserved, incl. context)");
                    }
                }
            }
        }
        return (f64::NAN, "nvidia-smi unavailable");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    (kib / 1024.0, "VmHWM (peak RSS, incl. libtorch)")
}

fn run_one(a: &Args, preset: &str) -> Result<serde_json::Value> {
    let d = device(&a.device)?;
    let precision: Precision = a.precision.parse()?;
    let mut topo = Topology::preset(preset)?;
    topo.patch = a.patch;
    tch::manual_seed(0);
    let net = MultiTalentNet::new(&topo, a.classes, d)?;
    let params = net.parameter_counts().0;
    let config = TrainConfig { precision, total_steps: 1_000_000, ..TrainConfig::default() };
    let mut trainer = Trainer::new(net, config)?;
    let label_sets: Vec<Vec<u32>> = (0..a.classes as u32).map(|c| vec![c + 1]).collect();
    let regions = ClassRegions::all_annotated(&label_sets);
    let samples: Vec<&ClassRegions> = (0..a.batch).map(|_| &regions).collect();
    let targets = BatchTargets::new(&samples, d)?;
    let [z, y, x] = a.patch;
    let labels = Tensor::randint(a.classes + 1, [a.batch, 1, z, y, x], (Kind::Int64, d));
    let image = labels.to_kind(Kind::Float) + Tensor::randn([a.batch, 1, z, y, x], (Kind::Float, d));
    for _ in 0..a.warmup {
        trainer.train_step(&image, &labels, &targets)?;
    }
    sync(d);
    let start = Instant::now();
    for _ in 0..a.steps {
        trainer.train_step(&image, &labels, &targets)?;
    }
    sync(d);
    let secs = start.elapsed().as_secs_f64();
    let (peak, source) = peak_memory_mib(d);
    Ok(serde_json::json!({
        "preset": preset,
        "device": a.device,
        "precision": a.precision,
        "patch": a.patch,
        "batch": a.batch,
        "classes": a.classes,
        "parameters": params,
        "steps": a.steps,
        "step_ms": secs * 1000.0 / a.steps as f64,
        "samples_per_s": (a.steps as i64 * a.batch) as f64 / secs,
        "peak_mem_mib": peak,
        "peak_mem_source": source,
        "threads": tch::get_num_threads(),
    }))
}

fn main() -> Result<()> {
    fedtalent_data::alloc::keep_freed_memory();
    let a = parse()?;
    if a.single {
        ensure!(a.presets.len() == 1, "--single runs one preset");
        println!("{}", run_one(&a, &a.presets[0])?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let forwarded: Vec<String> = std::env::args().skip(1).collect();
    for preset in &a.presets {
        let mut args = forwarded.clone();
        args.extend(["--presets".into(), preset.clone(), "--single".into()]);
        let out = Command::new(&exe).args(&args).output().with_context(|| format!("running {preset}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            println!("{}", serde_json::json!({ "preset": preset, "error": err.trim() }));
            continue;
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}
