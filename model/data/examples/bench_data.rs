//! Data-path benchmark: load (memory-mapped cache), crop, sample and augment batches of 2 at
//! 96x192x192, printing one JSON line with samples/s.
//!
//! `cargo run --release -p fedtalent-data --example bench_data -- --device cpu|cuda --threads 4`
//! The training-step figure to compare against comes from the model crate's benchmark.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedtalent_data::*;
use tch::Device;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let device = match arg(&args, "--device", "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: CUDA is not available");
            }
            Device::Cuda(0)
        }
        other => bail!("--device must be cpu or cuda, not {other:?}"),
    };
    let threads: usize = arg(&args, "--threads", "4").parse().context("--threads")?;
    let batches: usize = arg(&args, "--batches", "20").parse().context("--batches")?;
    let cases: usize = arg(&args, "--cases", "3").parse().context("--cases")?;
    // The augmentation's CPU fallback should not use more threads than the data path may.
    tch::set_num_threads(threads as i32);

    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let sites = generate_sites(
        dir.path(),
        &SynthOptions { seed: 1, cases_per_site: cases, shape: [80, 256, 256], sites: vec![SiteKind::MultiOrgan] },
    )?;
    let cfg = SiteDataConfig {
        dataset_dir: sites[0].dataset_dir.clone(),
        classes: sites[0].classes.clone(),
        val_cases: ValCases::Count(0),
        cache_dir: dir.path().join("cache"),
        target_spacing: [1.5, 1.0, 1.0],
        label_interp: LabelInterp::Nearest,
    };
    let ds = Dataset::open(&cfg)?;
    let opts = PreprocessOptions::from_dataset(&ds);
    let (prepped, failed) = preprocess_cases(&ds.cases, &opts, &cfg.cache_dir, threads);
    if !failed.is_empty() {
        bail!("{} cases failed to preprocess", failed.len());
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let shapes: Vec<[usize; 3]> = prepped.iter().map(|c| c.meta.shape).collect();

    let batch = 2;
    let mut loader =
        BatchLoader::new(prepped, LoaderOptions::new([96, 192, 192], batch, Normalization::PAPER, 7, threads, device))?;
    // Warm-up: fills the prefetch queue and initialises the device.
    for _ in 0..2 {
        loader.next_batch()?;
    }
    let t = Instant::now();
    for _ in 0..batches {
        let b = loader.next_batch()?;
        // Wait for the device so asynchronous CUDA work is counted.
        let _ = b.image.sum(tch::Kind::Float).double_value(&[]);
    }
    let secs = t.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "bench": "data_path",
        "device": format!("{device:?}"),
        "threads": threads,
        "batch": batch,
        "patch": [96, 192, 192],
        "batches": batches,
        "seconds": secs,
        "samples_per_s": (batches * batch) as f64 / secs,
        "augmentation": true,
        "preprocessed_shapes": shapes,
        "setup_seconds": setup_s,
    });
    println!("{line}");
    Ok(())
}
