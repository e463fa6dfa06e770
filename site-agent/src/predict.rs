//! `site-agent predict`: segments NIfTI volumes with an exported model, one uint8 mask per class.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use fedtalent_model::infer::InferOptions;
use fedtalent_model::predict::{input_files, parse_device, Predictor};

/// Segment CT volumes with an exported fedtalent model.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Exported model folder (model.json + model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A .nii/.nii.gz file, or a folder of them.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: <output>/<case>/<site>__<name>.nii.gz per class, plus classes.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Classes to write, by index, id (site/name), name or site; repeat or comma-separate.
    /// Default: all.
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    #[command(flatten)]
    pub infer: InferArgs,
}

/// Sliding-window options shared by `predict` and `evaluate`.
#[derive(Debug, Clone, ClapArgs)]
pub struct InferArgs {
    /// Test-time augmentation: average over all 8 mirrorings.
    #[arg(long)]
    pub tta: bool,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Sliding-window tiles per forward pass.
    #[arg(long, default_value_t = 2)]
    pub tile_batch: usize,
}

impl InferArgs {
    pub fn options(&self) -> Result<InferOptions> {
        anyhow::ensure!(self.tile_batch >= 1, "--tile-batch must be at least 1");
        let device = parse_device(&self.device)?;
        Ok(InferOptions { mirror: self.tta, tile_batch: self.tile_batch, device, ..InferOptions::default() })
    }
}

pub fn run(args: Args) -> Result<()> {
    let options = args.infer.options()?;
    let files = input_files(&args.input)?;
    let predictor = Predictor::load(&args.model, options)?;
    let classes = predictor.select_classes(&args.classes)?;
    std::fs::create_dir_all(&args.output).with_context(|| format!("{}: cannot create", args.output.display()))?;
    let mut failed = 0usize;
    for file in &files {
        let start = std::time::Instant::now();
        match predictor.predict_to(file, &args.output, &classes) {
            Ok(written) => {
                let voxels: Vec<String> = written.iter().map(|w| format!("{} {}", w.id, w.voxels)).collect();
                println!(
                    "{}: {} masks in {:.1} s ({})",
                    file.display(),
                    written.len(),
                    start.elapsed().as_secs_f64(),
                    voxels.join(", ")
                );
            }
            // A directory of inputs goes on past a bad file; a single bad file is the error.
            Err(e) if files.len() > 1 => {
                eprintln!("error: {e:#}");
                failed += 1;
            }
            Err(e) => return Err(e),
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} input(s) could not be segmented", files.len());
    Ok(())
}
