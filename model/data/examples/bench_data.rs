//! Data-path benchmark: load (memory-mapped cache), crop, sample and augment batches of 2 at
//! 96x192x192, printing one JSON line with samples/s of the CPU stage alone (`cpu_stage_…`)
//! and of the whole path, augmentation on `--device` included (`samples_per_s`).
//!
//! `cargo run --release -p fedtalent-data --example bench_data -- --device cpu|cuda --threads 4`
//! `--keep DIR` writes the generated cases and their preprocessed cache (`DIR/cache/*.ftp`) into
//! DIR and keeps them, so a peer (scripts/bench_data_nnunet.py) can read the very same cases.
//! `--patch Z Y X` (default 96 192 192): another patch, e.g. the small one of `scripts/bench.sh
//! --smoke`; the peer takes the same `--patch`.
//! The training-step figure to compare against comes from the model crate's benchmark.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedtalent_data::*;
use fedtalent_vocab::CtNormalization;
use tch::Device;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// The default patch: the `unet` preset's.
const PATCH: [usize; 3] = [96, 192, 192];

/// Samples/s of `batches` batches from a loader with the default augmentation (after two
/// warm-up batches, which fill the prefetch queue and initialise the device): of the CPU stage
/// alone (`whole` false: patches and the larger regions of samples to be rotated or scaled), or
/// of the whole path on `device`.
fn samples_per_s(
    cases: Vec<PreprocessedCase>,
    patch: [usize; 3],
    batch: usize,
    threads: usize,
    device: Device,
    whole: bool,
    batches: usize,
) -> Result<f64> {
    let opts = LoaderOptions::new(patch, batch, CtNormalization::PAPER, 7, threads, device);
    let mut loader = BatchLoader::new(cases, opts)?;
    for _ in 0..2 {
        loader.next_batch()?;
    }
    let t = Instant::now();
    for _ in 0..batches {
        let cpu = loader.next_cpu_batch()?;
        if whole {
            let b = loader.upload(cpu)?;
            // Wait for the device so asynchronous CUDA work is counted.
            let _ = b.image.sum(tch::Kind::Float).double_value(&[]);
        }
    }
    Ok((batches * batch) as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    fedtalent_data::alloc::keep_freed_memory();
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
    let mut patch = PATCH;
    if let Some(i) = args.iter().position(|a| a == "--patch") {
        for (a, p) in patch.iter_mut().enumerate() {
            *p = args.get(i + 1 + a).context("--patch needs 3 values")?.parse().context("--patch Z Y X")?;
        }
    }
    // The augmentation's CPU fallback should not use more threads than the data path may.
    tch::set_num_threads(threads as i32);

    let keep = args.iter().position(|a| a == "--keep").and_then(|i| args.get(i + 1)).map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let root = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    let t0 = Instant::now();
    let sites = generate_sites(
        &root,
        &SynthOptions { seed: 1, cases_per_site: cases, shape: [80, 256, 256], sites: vec![SiteKind::MultiOrgan] },
    )?;
    let cfg = SiteDataConfig {
        input_channels: None,
        dataset_dir: sites[0].dataset_dir.clone(),
        classes: sites[0].classes.clone(),
        val_cases: ValCases::Count(0),
        cache_dir: root.join("cache"),
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
    // The CPU stage alone (memory-mapped load, crop, sample, normalize, context regions for the
    // spatial transform; background threads), then the whole path with the augmentation on
    // `device`.
    let cpu_stage = samples_per_s(prepped, patch, batch, threads, device, false, batches)?;
    // A second loader over the same cache (preprocessing finds every case cached).
    let (prepped, _) = preprocess_cases(&ds.cases, &opts, &cfg.cache_dir, threads);
    let whole = samples_per_s(prepped, patch, batch, threads, device, true, batches)?;
    let line = serde_json::json!({
        "bench": "data_path",
        "device": format!("{device:?}"),
        "threads": threads,
        "batch": batch,
        "patch": patch,
        "batches": batches,
        "cpu_stage_samples_per_s": cpu_stage,
        "samples_per_s": whole,
        "augmentation_device": format!("{device:?}"),
        "preprocessed_shapes": shapes,
        "setup_seconds": setup_s,
    });
    println!("{line}");
    Ok(())
}
