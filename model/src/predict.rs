//! End-to-end prediction with an exported model (DESIGN.md §1.5, §2.5): read a NIfTI, crop to the
//! nonzero region, resample to the model's spacing (cubic), normalize with the model's CT
//! statistics, sliding window, probabilities back to the original geometry (linear), p > 0.5
//! (argmax among the classes of a site trained as one softmax), one uint8 mask per class with
//! the input's qform/sform.
//!
//! Output layout: `<output>/<case>/<site>__<name>.nii.gz` per selected class plus
//! `<output>/<case>/classes.json` (class index, id, label set, file, voxel count). `<case>` is the
//! input's file name without `.nii[.gz]` and without nnU-Net's channel suffix `_0000`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use fedtalent_data::{load_for_inference, write_mask_nifti, InferenceImage, Interp, SpatialHeader};
use fedtalent_vocab::GlobalClass;
use ndarray::{Array3, Array4, Axis};
use serde::Serialize;
use tch::{Device, Tensor};

use crate::infer::{sliding_window_probabilities, InferOptions};
use crate::manifest::{ModelManifest, MANIFEST_FILE};
use crate::network::MultiTalentNet;
use crate::postprocess::keep_largest_component;

/// Probability above which a voxel belongs to a class.
pub const THRESHOLD: f32 = 0.5;

/// Masks of probabilities `[C, Z, Y, X]`: p > 0.5 per class, except in a softmax group (rows
/// listed in `groups`), where a voxel gets the group's most probable class if that beats the
/// background (1 − Σ p of the group) and no other class of the group: nnU-Net's argmax.
pub fn masks_of(probs: &Array4<f32>, groups: &[Vec<usize>]) -> Vec<Array3<u8>> {
    let mut masks: Vec<Array3<u8>> = probs.axis_iter(Axis(0)).map(|p| p.mapv(|v| u8::from(v > THRESHOLD))).collect();
    for group in groups {
        let rows = || group.iter().map(|&r| probs.index_axis(Axis(0), r));
        let mut best = rows().fold(Array3::<f32>::ones(masks[0].dim()), |bg, p| bg - p);
        let mut winner = Array3::<usize>::from_elem(best.dim(), usize::MAX);
        for (&r, p) in group.iter().zip(rows()) {
            ndarray::Zip::from(&mut best).and(&mut winner).and(&p).for_each(|b, w, &v| {
                // Strictly greater: a tie keeps the background (or the earlier class).
                if v > *b {
                    *b = v;
                    *w = r;
                }
            });
        }
        for &r in group {
            masks[r] = winner.mapv(|w| u8::from(w == r));
        }
    }
    masks
}

/// An exported model ready to segment volumes.
pub struct Predictor {
    pub manifest: ModelManifest,
    pub net: MultiTalentNet,
    pub options: InferOptions,
}

/// Masks of one volume in its original geometry.
pub struct Prediction {
    /// Class indices (into the manifest's classes), in the order of `masks`.
    pub classes: Vec<usize>,
    /// One [Z, Y, X] mask (0/1) per selected class.
    pub masks: Vec<Array3<u8>>,
    pub header: SpatialHeader,
    pub affine: [[f64; 4]; 4],
    /// Spacing [z, y, x] in mm of the input.
    pub spacing: [f64; 3],
}

/// One written mask.
#[derive(Clone, Debug, Serialize)]
pub struct WrittenMask {
    pub index: u32,
    pub id: String,
    pub labels: Vec<u32>,
    pub file: PathBuf,
    pub voxels: u64,
}

/// Resolves the device argument of the CLIs: `auto` (CUDA when available), `cpu`, `cuda`,
/// `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            ensure!(tch::Cuda::is_available(), "--device cuda: no CUDA device is available");
            Ok(Device::Cuda(0))
        }
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => {
                ensure!(
                    n < tch::Cuda::device_count() as usize,
                    "--device {other}: only {} CUDA device(s)",
                    tch::Cuda::device_count()
                );
                Ok(Device::Cuda(n))
            }
            None => bail!("--device {other:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

/// The endings of an image an input names: a NIfTI file, or the header of a `.hdr`/`.img` pair
/// (which reads the pair).
const IMAGE_ENDINGS: [&str; 4] = [".nii", ".nii.gz", ".hdr", ".hdr.gz"];

fn is_image_name(name: &str) -> bool {
    IMAGE_ENDINGS.iter().any(|e| name.ends_with(e))
}

/// Refuses paths that are not NIfTI files (`.nii`, `.nii.gz`, a pair's `.hdr`) or are empty,
/// naming the file.
pub fn check_nifti_path(path: &Path) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    ensure!(is_image_name(&name), "{}: not a NIfTI file (expected .nii, .nii.gz or .hdr)", path.display());
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    ensure!(meta.is_file(), "{}: not a file", path.display());
    ensure!(meta.len() > 0, "{}: empty file", path.display());
    Ok(())
}

/// The images named by `input` for a model of `channels` input channels: the file itself, or the
/// NIfTI files of a folder (sorted; other files are ignored). With several channels, a case
/// stored one file per channel is named by its `_0000` file: its `_0001` … files are not inputs.
pub fn input_files(input: &Path, channels: usize) -> Result<Vec<PathBuf>> {
    if input.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(input).with_context(|| format!("{}: cannot list", input.display()))? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if path.is_file() && is_image_name(&name) && !is_later_channel(&path, channels) {
                files.push(path);
            }
        }
        files.sort();
        ensure!(!files.is_empty(), "{}: no .nii, .nii.gz or .hdr files in this folder", input.display());
        Ok(files)
    } else {
        check_nifti_path(input)?;
        Ok(vec![input.to_path_buf()])
    }
}

/// Whether `path` is channel 1 … `channels - 1` of a case whose `_0000` file is beside it.
fn is_later_channel(path: &Path, channels: usize) -> bool {
    let Some((case, k)) = fedtalent_data::channel_suffix(path) else {
        return false;
    };
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    // `<case>_<kkkk><ending>`: the ending follows the case and the 5 characters of `_<kkkk>`.
    let first = path.with_file_name(format!("{case}_0000{}", &name[case.len() + 5..]));
    (1..channels).contains(&k) && first.exists()
}

/// `<case>` of an input file: the name without its ending and without a `_0000` channel suffix.
pub fn case_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let ending = IMAGE_ENDINGS.iter().filter(|e| name.ends_with(*e)).max_by_key(|e| e.len());
    let stem = ending.map_or(name.as_str(), |e| &name[..name.len() - e.len()]);
    stem.strip_suffix("_0000").unwrap_or(stem).to_string()
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// File name of a class's mask: `<site>__<name>.nii.gz`.
pub fn mask_file_name(class: &GlobalClass) -> String {
    format!("{}__{}.nii.gz", sanitize(&class.site), sanitize(&class.name))
}

impl Predictor {
    /// Loads an exported model directory onto `options.device`; a missing `model.json`, a bad
    /// manifest or weights that do not match it are refused naming the file.
    pub fn load(model_dir: &Path, options: InferOptions) -> Result<Self> {
        ensure!(model_dir.is_dir(), "{}: not a model directory", model_dir.display());
        let manifest_path = model_dir.join(MANIFEST_FILE);
        ensure!(
            manifest_path.is_file(),
            "{}: no {MANIFEST_FILE} (not an exported fedtalent model)",
            model_dir.display()
        );
        let manifest = ModelManifest::read(model_dir)?;
        for (i, c) in manifest.classes.iter().enumerate() {
            ensure!(
                c.index as usize == i,
                "{}: class {:?} has index {} at position {i}",
                manifest_path.display(),
                c.id,
                c.index
            );
        }
        ensure!(!manifest.classes.is_empty(), "{}: the model has no classes", manifest_path.display());
        ensure!(
            manifest.spacing.iter().all(|s| *s > 0.0 && s.is_finite()),
            "{}: spacing {:?} must be positive",
            manifest_path.display(),
            manifest.spacing
        );
        ensure!(manifest.normalization.std > 0.0, "{}: normalization std must be positive", manifest_path.display());
        let weights = model_dir.join(&manifest.weights);
        ensure!(
            weights.is_file(),
            "{}: weights file {} named by {MANIFEST_FILE} is missing",
            model_dir.display(),
            weights.display()
        );
        let mut net = MultiTalentNet::new(&manifest.topology, manifest.classes.len() as i64, options.device)
            .with_context(|| format!("{}: bad topology", manifest_path.display()))?;
        net.load(&weights)
            .map_err(|e| anyhow::anyhow!("{}: weights do not match {MANIFEST_FILE}: {e:#}", weights.display()))?;
        Ok(Self { manifest, net, options })
    }

    /// Class indices from selectors: an index, a class id (`site/name`), a name (every class of
    /// that name) or a site (every class of that site); comma-separated lists are accepted.
    /// No selector: all classes.
    pub fn select_classes(&self, selectors: &[String]) -> Result<Vec<usize>> {
        let classes = &self.manifest.classes;
        let parts: Vec<&str> =
            selectors.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()).collect();
        if parts.is_empty() {
            return Ok((0..classes.len()).collect());
        }
        let mut out = Vec::new();
        for sel in parts {
            let found: Vec<usize> = if let Ok(i) = sel.parse::<usize>() {
                ensure!(
                    i < classes.len(),
                    "--classes {sel}: the model has {} classes (0..{})",
                    classes.len(),
                    classes.len() - 1
                );
                vec![i]
            } else {
                let by_id: Vec<usize> = classes.iter().filter(|c| c.id == sel).map(|c| c.index as usize).collect();
                if !by_id.is_empty() {
                    by_id
                } else {
                    let by_name: Vec<usize> =
                        classes.iter().filter(|c| c.name == sel).map(|c| c.index as usize).collect();
                    if !by_name.is_empty() {
                        by_name
                    } else {
                        classes.iter().filter(|c| c.site == sel).map(|c| c.index as usize).collect()
                    }
                }
            };
            if found.is_empty() {
                let known: Vec<&str> = classes.iter().map(|c| c.id.as_str()).collect();
                bail!("--classes {sel:?}: no class with that index, id, name or site (classes: {})", known.join(", "));
            }
            for i in found {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }

    /// Reads and preprocesses `path` (crop, cubic resampling, normalization).
    pub fn load_image(&self, path: &Path) -> Result<InferenceImage> {
        check_nifti_path(path)?;
        load_for_inference(path, &self.manifest.channels, self.manifest.spacing, &self.manifest.normalization)
    }

    /// Probabilities `[C_sel, Z, Y, X]` of the selected classes in the input's original geometry
    /// (a class of an exclusive site: its softmax probability among all its site's classes).
    pub fn probabilities(&self, path: &Path, classes: &[usize]) -> Result<(InferenceImage, Array4<f32>)> {
        let (prepared, probs) = self.group_probabilities(path, classes)?;
        Ok((prepared, probs.slice(ndarray::s![..classes.len(), .., .., ..]).to_owned()))
    }

    /// The probabilities of `classes` followed by the other classes of their exclusive sites
    /// ([`ModelManifest::with_whole_groups`]), in the input's original geometry.
    fn group_probabilities(&self, path: &Path, classes: &[usize]) -> Result<(InferenceImage, Array4<f32>)> {
        let computed = self.manifest.with_whole_groups(classes);
        let prepared = self.load_image(path)?;
        let (c, z, y, x) = prepared.image.dim();
        let image = Tensor::from_slice(prepared.image.as_slice().expect("standard layout"))
            .reshape([c as i64, z as i64, y as i64, x as i64]);
        let mut opts = self.options.clone();
        opts.channels = Some(computed.iter().map(|&c| c as i64).collect());
        opts.softmax_groups = self.softmax_groups(&computed);
        let probs = sliding_window_probabilities(&self.net, &image, self.manifest.patch, &opts)
            .with_context(|| format!("{}: inference failed", path.display()))?;
        let probs = probs.to_device(Device::Cpu).contiguous();
        let values = Vec::<f32>::try_from(probs.reshape([-1]))?;
        let probs = Array4::from_shape_vec((computed.len(), z, y, x), values).expect("probability shape");
        let original = prepared.probabilities_to_original(&probs, Interp::Linear);
        Ok((prepared, original))
    }

    /// The manifest's softmax groups among `computed`, as channel positions.
    fn softmax_groups(&self, computed: &[usize]) -> Vec<Vec<i64>> {
        let groups = self.manifest.softmax_groups(computed);
        groups.into_iter().map(|g| g.into_iter().map(|i| i as i64).collect()).collect()
    }

    /// Masks of the selected classes in the input's geometry: p > 0.5, then the model's
    /// post-processing (only the largest component of the classes `model.json` names).
    pub fn predict(&self, path: &Path, classes: &[usize]) -> Result<Prediction> {
        let mut prediction = self.predict_unprocessed(path, classes)?;
        for (&c, mask) in prediction.classes.iter().zip(&mut prediction.masks) {
            if self.manifest.largest_component.contains(&self.manifest.classes[c].id) {
                keep_largest_component(mask);
            }
        }
        Ok(prediction)
    }

    /// Thresholded masks (p > 0.5) without post-processing: what the post-processing is
    /// decided on.
    pub fn predict_unprocessed(&self, path: &Path, classes: &[usize]) -> Result<Prediction> {
        let (prepared, probs) = self.group_probabilities(path, classes)?;
        let computed = self.manifest.with_whole_groups(classes);
        let mut masks = masks_of(&probs, &self.manifest.softmax_groups(&computed));
        masks.truncate(classes.len());
        Ok(Prediction {
            classes: classes.to_vec(),
            masks,
            header: prepared.header,
            affine: prepared.affine,
            spacing: prepared.original_spacing,
        })
    }

    /// Segments `path` and writes `<output>/<case>/<site>__<name>.nii.gz` per selected class and
    /// `<output>/<case>/classes.json`.
    pub fn predict_to(&self, path: &Path, output: &Path, classes: &[usize]) -> Result<Vec<WrittenMask>> {
        let prediction = self.predict(path, classes)?;
        self.write_prediction(path, &prediction, output)
    }

    /// Writes the masks of `prediction` (of the input `path`) as [`Predictor::predict_to`] does.
    pub fn write_prediction(&self, path: &Path, prediction: &Prediction, output: &Path) -> Result<Vec<WrittenMask>> {
        let dir = output.join(case_name(path));
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut written = Vec::new();
        for (&c, mask) in prediction.classes.iter().zip(&prediction.masks) {
            let class = &self.manifest.classes[c];
            let file = dir.join(mask_file_name(class));
            write_mask_nifti(&file, mask, &prediction.header)?;
            written.push(WrittenMask {
                index: class.index,
                id: class.id.clone(),
                labels: class.labels.clone(),
                file,
                voxels: mask.iter().map(|&v| v as u64).sum(),
            });
        }
        let summary = serde_json::json!({
            "input": path,
            "model_digest": self.manifest.digest,
            "round": self.manifest.round,
            "threshold": THRESHOLD,
            "largest_component": self.manifest.largest_component,
            "classes": written,
        });
        let json_path = dir.join("classes.json");
        crate::io::write_bytes_atomic(&json_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        Ok(written)
    }
}
