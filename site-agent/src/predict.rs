//! `site-agent predict`: segments NIfTI volumes with an exported model, one uint8 mask per class.
//! A multi-channel model reads each case as training did: a 4D image (one volume per channel),
//! or its `<case>_0000` file and the `_0001` … files beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use fedtalent_model::infer::InferOptions;
use fedtalent_model::predict::{case_name, input_files, parse_device, Prediction, Predictor, WrittenMask};
use fedtalent_report::preview::{preview_png, Overlay, Volume};
use fedtalent_vocab::NormalizationScheme;

/// Segment CT or MR volumes with an exported fedtalent model.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Exported model folder (model.json + model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A .nii/.nii.gz/.hdr file, or a folder of them. With a multi-channel model: 4D images, or
    /// each case's `<case>_0000` file (its other channels beside it).
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: <output>/<case>/<site>__<name>.nii.gz per class, plus classes.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Classes to write, by index, id (site/name), name or site; repeat or comma-separate.
    /// Default: all.
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Also write <output>/<case>/preview.png: axial, coronal and sagittal slices through the
    /// predicted foreground's centre (the volume's middle when nothing was found), the masks
    /// overlaid, a legend of the classes.
    #[arg(long)]
    pub preview: bool,
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
    let predictor = Predictor::load(&args.model, options)?;
    let files = input_files(&args.input, predictor.manifest.channels.len())?;
    let classes = predictor.select_classes(&args.classes)?;
    std::fs::create_dir_all(&args.output).with_context(|| format!("{}: cannot create", args.output.display()))?;
    let mut failed = 0usize;
    for file in &files {
        let start = std::time::Instant::now();
        match predict_one(&predictor, file, &args.output, &classes, args.preview) {
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

/// Segments one input and writes its masks (and its preview).
fn predict_one(
    predictor: &Predictor,
    file: &Path,
    output: &Path,
    classes: &[usize],
    preview: bool,
) -> Result<Vec<WrittenMask>> {
    let prediction = predictor.predict(file, classes)?;
    let written = predictor.write_prediction(file, &prediction, output)?;
    if preview {
        let path = output.join(case_name(file)).join("preview.png");
        write_preview(predictor, file, &prediction, &written, &path)?;
    }
    Ok(written)
}

/// The preview of a prediction: the input's first channel with each written mask overlaid, grey
/// values over the model's CT clip range when that channel is CT (else the preview's own window).
fn write_preview(
    predictor: &Predictor,
    file: &Path,
    prediction: &Prediction,
    written: &[WrittenMask],
    path: &Path,
) -> Result<()> {
    let manifest = &predictor.manifest;
    let image = fedtalent_data::read_case_image(file, manifest.channels.len())
        .with_context(|| format!("{}: reading", file.display()))?;
    let first_is_ct = manifest.channels.iter().next().is_some_and(|c| c.normalization == NormalizationScheme::Ct);
    let window = first_is_ct.then_some((manifest.normalization.clip_low, manifest.normalization.clip_high));
    let data = image.channels[0].as_standard_layout();
    let (z, y, x) = data.dim();
    let volume = Volume { data: data.as_slice().expect("standard layout"), shape: [z, y, x], spacing: image.spacing };
    let masks: Vec<_> = prediction.masks.iter().map(|m| m.as_standard_layout()).collect();
    let overlays: Vec<Overlay> = masks
        .iter()
        .zip(written)
        .map(|(m, w)| Overlay { label: w.id.clone(), mask: m.as_slice().expect("standard layout") })
        .collect();
    let png = preview_png(&case_name(file), &volume, &overlays, window)
        .with_context(|| format!("{}: drawing the preview", file.display()))?;
    fedtalent_report::write_atomic(path, &png)
}
