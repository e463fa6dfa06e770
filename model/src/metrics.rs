//! Segmentation metrics: Dice and the 95th-percentile Hausdorff distance in mm (with the voxel
//! spacing), and the evaluation of a model on a labelled dataset folder (per case, per class).
//!
//! HD95 follows MONAI's `compute_hausdorff_distance(percentile=95)`: the surface of a mask is its
//! voxels with a 6-neighbour outside the mask or outside the volume; for each surface voxel of A
//! the Euclidean distance (mm) to the nearest surface voxel of B is taken, and vice versa; the
//! result is the larger of the two directed 95th percentiles (numpy's linear interpolation).
//! Undefined cases are `None`: Dice when both masks are empty, HD95 when either is.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fedtalent_data::{read_label_nifti, Case, Dataset, SiteDataConfig, ValCases};
use fedtalent_vocab::ClassRegion;
use ndarray::Array3;
use serde::Serialize;
use tracing::warn;

use crate::predict::Predictor;

/// Dice = 2|A∩B| / (|A| + |B|); `None` when both are empty.
pub fn dice(pred: &Array3<bool>, reference: &Array3<bool>) -> Option<f64> {
    assert_eq!(pred.dim(), reference.dim(), "dice: shapes differ");
    let (mut inter, mut a, mut b) = (0u64, 0u64, 0u64);
    for (&p, &r) in pred.iter().zip(reference.iter()) {
        a += p as u64;
        b += r as u64;
        inter += (p && r) as u64;
    }
    (a + b > 0).then(|| 2.0 * inter as f64 / (a + b) as f64)
}

/// Surface voxels: in the mask, with a 6-neighbour outside the mask or outside the volume.
pub fn surface(mask: &Array3<bool>) -> Array3<bool> {
    let (nz, ny, nx) = mask.dim();
    Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| {
        if !mask[(z, y, x)] {
            return false;
        }
        let outside = |dz: i64, dy: i64, dx: i64| {
            let (zz, yy, xx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
            zz < 0
                || yy < 0
                || xx < 0
                || zz >= nz as i64
                || yy >= ny as i64
                || xx >= nx as i64
                || !mask[(zz as usize, yy as usize, xx as usize)]
        };
        outside(-1, 0, 0)
            || outside(1, 0, 0)
            || outside(0, -1, 0)
            || outside(0, 1, 0)
            || outside(0, 0, -1)
            || outside(0, 0, 1)
    })
}

/// Squared Euclidean distance (mm²) of every voxel to the nearest `true` voxel of `sites`
/// (exact, separable; Felzenszwalb & Huttenlocher). Infinite everywhere when `sites` is empty.
pub fn squared_distance_transform(sites: &Array3<bool>, spacing: [f64; 3]) -> Array3<f64> {
    let dim = sites.dim();
    let shape = [dim.0, dim.1, dim.2];
    let mut d: Vec<f64> = sites.iter().map(|&s| if s { 0.0 } else { f64::INFINITY }).collect();
    let strides = [shape[1] * shape[2], shape[2], 1];
    let mut f = Vec::new();
    let mut out = Vec::new();
    for axis in 0..3 {
        let n = shape[axis];
        let w = spacing[axis] * spacing[axis];
        let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
        for i in 0..shape[others[0]] {
            for j in 0..shape[others[1]] {
                let base = i * strides[others[0]] + j * strides[others[1]];
                f.clear();
                f.extend((0..n).map(|k| d[base + k * strides[axis]]));
                lower_envelope(&f, w, &mut out);
                for k in 0..n {
                    d[base + k * strides[axis]] = out[k];
                }
            }
        }
    }
    Array3::from_shape_vec(dim, d).expect("shape")
}

/// 1D: out[p] = min_q f[q] + w·(p − q)².
fn lower_envelope(f: &[f64], w: f64, out: &mut Vec<f64>) {
    let n = f.len();
    out.clear();
    out.resize(n, f64::INFINITY);
    let mut v: Vec<usize> = Vec::with_capacity(n);
    let mut z: Vec<f64> = Vec::with_capacity(n + 1);
    let key = |q: usize| f[q] + w * (q * q) as f64;
    for q in (0..n).filter(|&q| f[q].is_finite()) {
        loop {
            match v.last() {
                None => {
                    v.push(q);
                    z.clear();
                    z.push(f64::NEG_INFINITY);
                    break;
                }
                Some(&p) => {
                    let s = (key(q) - key(p)) / (2.0 * w * (q - p) as f64);
                    if s <= *z.last().unwrap() {
                        v.pop();
                        z.pop();
                        continue;
                    }
                    v.push(q);
                    z.push(s);
                    break;
                }
            }
        }
    }
    if v.is_empty() {
        return;
    }
    let mut k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < p as f64 {
            k += 1;
        }
        let q = v[k];
        let dq = p as f64 - q as f64;
        *o = f[q] + w * dq * dq;
    }
}

/// numpy's `percentile` with linear interpolation (values need not be sorted).
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "percentile of nothing");
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = q / 100.0 * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    values[lo] + (rank - lo as f64) * (values[hi] - values[lo])
}

/// Distances (mm) from every surface voxel of `from` to the nearest surface voxel of `to`.
pub fn directed_surface_distances(from: &Array3<bool>, to: &Array3<bool>, spacing: [f64; 3]) -> Vec<f64> {
    let dt = squared_distance_transform(&surface(to), spacing);
    surface(from).iter().zip(dt.iter()).filter(|(s, _)| **s).map(|(_, d)| d.sqrt()).collect()
}

/// The `q`-th percentile Hausdorff distance (mm): the larger of the two directed percentiles.
/// `None` when either mask is empty.
pub fn hausdorff_percentile(pred: &Array3<bool>, reference: &Array3<bool>, spacing: [f64; 3], q: f64) -> Option<f64> {
    assert_eq!(pred.dim(), reference.dim(), "hausdorff: shapes differ");
    if !pred.iter().any(|&v| v) || !reference.iter().any(|&v| v) {
        return None;
    }
    let mut ab = directed_surface_distances(pred, reference, spacing);
    let mut ba = directed_surface_distances(reference, pred, spacing);
    Some(percentile(&mut ab, q).max(percentile(&mut ba, q)))
}

/// HD95 in mm.
pub fn hd95(pred: &Array3<bool>, reference: &Array3<bool>, spacing: [f64; 3]) -> Option<f64> {
    hausdorff_percentile(pred, reference, spacing, 95.0)
}

/// The metrics of one class on one case.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Overlap {
    pub dice: Option<f64>,
    pub hd95_mm: Option<f64>,
    pub pred_voxels: u64,
    pub ref_voxels: u64,
}

pub fn overlap(pred: &Array3<bool>, reference: &Array3<bool>, spacing: [f64; 3]) -> Overlap {
    Overlap {
        dice: dice(pred, reference),
        hd95_mm: hd95(pred, reference, spacing),
        pred_voxels: pred.iter().filter(|&&v| v).count() as u64,
        ref_voxels: reference.iter().filter(|&&v| v).count() as u64,
    }
}

/// One case of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct CaseEvaluation {
    pub case: String,
    pub image: PathBuf,
    pub label: PathBuf,
    /// In the order of [`Evaluation::classes`].
    pub classes: Vec<Overlap>,
}

/// A class's summary over the cases: means over the cases where the metric is defined.
#[derive(Clone, Debug, Serialize)]
pub struct ClassEvaluation {
    pub index: u32,
    pub id: String,
    pub labels: Vec<u32>,
    pub mean_dice: Option<f64>,
    pub mean_hd95_mm: Option<f64>,
    /// Cases where Dice is defined (prediction or reference nonempty).
    pub dice_cases: usize,
    /// Cases where HD95 is defined (both nonempty).
    pub hd95_cases: usize,
}

/// A model's evaluation on a labelled folder.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub dataset: PathBuf,
    pub model_digest: String,
    pub round: u32,
    /// The classes whose masks were post-processed (only their largest component kept).
    pub largest_component: Vec<String>,
    pub classes: Vec<ClassEvaluation>,
    pub cases: Vec<CaseEvaluation>,
    /// Cases refused (unreadable, mismatched), with the reason naming the file.
    pub skipped: Vec<String>,
}

fn mean(values: impl Iterator<Item = f64>) -> (Option<f64>, usize) {
    let v: Vec<f64> = values.collect();
    ((!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64), v.len())
}

/// Evaluates one case: prediction of `classes` against the class regions of the label map.
pub fn evaluate_case(predictor: &Predictor, case: &Case, classes: &[usize]) -> Result<CaseEvaluation> {
    let labels = read_label_nifti(&case.label)?;
    let prediction = predictor.predict(&case.image, classes)?;
    let shape = prediction.masks.first().map(|m| m.dim()).unwrap_or(labels.data.dim());
    ensure!(
        labels.data.dim() == shape,
        "{}: shape {:?} differs from the image's {:?}",
        case.label.display(),
        labels.data.dim(),
        shape
    );
    let overlaps = classes
        .iter()
        .zip(&prediction.masks)
        .map(|(&c, mask)| {
            let region = &predictor.manifest.classes[c].labels;
            let reference = labels.data.mapv(|l| l != 0 && region.contains(&(l as u32)));
            overlap(&mask.mapv(|v| v != 0), &reference, labels.spacing)
        })
        .collect();
    Ok(CaseEvaluation {
        case: case.id.clone(),
        image: case.image.clone(),
        label: case.label.clone(),
        classes: overlaps,
    })
}

/// Evaluates `classes` on the given cases; cases that fail are skipped and reported by name.
pub fn evaluate_cases(predictor: &Predictor, dataset: &Path, cases: &[Case], classes: &[usize]) -> Result<Evaluation> {
    ensure!(!classes.is_empty(), "no class to evaluate");
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    for case in cases {
        match evaluate_case(predictor, case, classes) {
            Ok(e) => done.push(e),
            Err(e) => {
                warn!(case = %case.id, "skipping case: {e:#}");
                skipped.push(format!("{}: {e:#}", case.id));
            }
        }
    }
    ensure!(!done.is_empty(), "{}: no case could be evaluated ({})", dataset.display(), skipped.join("; "));
    let summaries = classes
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let info = &predictor.manifest.classes[c];
            let (mean_dice, dice_cases) = mean(done.iter().filter_map(|e| e.classes[k].dice));
            let (mean_hd95_mm, hd95_cases) = mean(done.iter().filter_map(|e| e.classes[k].hd95_mm));
            ClassEvaluation {
                index: info.index,
                id: info.id.clone(),
                labels: info.labels.clone(),
                mean_dice,
                mean_hd95_mm,
                dice_cases,
                hd95_cases,
            }
        })
        .collect();
    Ok(Evaluation {
        dataset: dataset.to_path_buf(),
        model_digest: predictor.manifest.digest.clone(),
        round: predictor.manifest.round,
        largest_component: predictor.manifest.largest_component.clone(),
        classes: summaries,
        cases: done,
        skipped,
    })
}

/// Evaluates `classes` on every case of an nnU-Net v2 or MSD folder (read by the data crate).
pub fn evaluate_dataset(predictor: &Predictor, dataset_dir: &Path, classes: &[usize]) -> Result<Evaluation> {
    let config = SiteDataConfig {
        input_channels: None,
        dataset_dir: dataset_dir.to_path_buf(),
        // Named by id: two sites' classes may share a name.
        classes: classes
            .iter()
            .map(|&c| {
                let info = &predictor.manifest.classes[c];
                ClassRegion { name: info.id.clone(), labels: info.labels.clone() }
            })
            .collect(),
        val_cases: ValCases::Count(0),
        cache_dir: std::env::temp_dir(),
        target_spacing: predictor.manifest.spacing,
        label_interp: Default::default(),
    };
    let dataset = Dataset::open(&config)?;
    // Same count but another order or modality would be predicted silently wrong: refuse by name.
    dataset.channels.check_against(&predictor.manifest.channels).with_context(|| {
        format!("{}: not the model's input channels ({})", dataset_dir.display(), predictor.manifest.channels)
    })?;
    evaluate_cases(predictor, dataset_dir, &dataset.cases, classes)
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let width = self.classes.iter().map(|c| c.id.len()).max().unwrap_or(5).max(5);
        writeln!(
            f,
            "{} cases of {} (model round {}, {} skipped)",
            self.cases.len(),
            self.dataset.display(),
            self.round,
            self.skipped.len()
        )?;
        writeln!(f, "{:>5}  {:<width$}  {:>8}  {:>10}  {:>6}", "index", "class", "Dice", "HD95 (mm)", "cases")?;
        for c in &self.classes {
            writeln!(
                f,
                "{:>5}  {:<width$}  {:>8}  {:>10}  {:>6}",
                c.index,
                c.id,
                fmt(c.mean_dice, 4),
                fmt(c.mean_hd95_mm, 2),
                c.dice_cases
            )?;
        }
        let processed: Vec<&str> =
            self.classes.iter().filter(|c| self.largest_component.contains(&c.id)).map(|c| c.id.as_str()).collect();
        if !processed.is_empty() {
            writeln!(f, "post-processed (largest component kept): {}", processed.join(", "))?;
        }
        for s in &self.skipped {
            writeln!(f, "skipped {s}")?;
        }
        Ok(())
    }
}
