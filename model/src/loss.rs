//! The MultiTalent loss (DESIGN.md §1.3): BCE + Dice, summed over the classes that each sample's
//! dataset annotates, on every deep-supervision level.
//!
//! Per level i with weight w_i:
//! `CE  = Σ_(b,c annotated) mean_voxels BCE(logit[b,c], target[b,c])` (a sum, not a mean),
//! `DC  = Σ_c 2·TP_c / max(2·TP_c + FP_c + FN_c, 1e-7)` with soft TP/FP/FN pooled over the batch
//! (`batch`, the paper's definition) or per sample and summed (`per_sample`),
//! `L_i = CE − DC`, `L = Σ_i w_i·L_i`. Unannotated (sample, class) pairs contribute nothing and get
//! exactly zero gradient: that is the whole point of the method.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

pub use fedtalent_vocab::DiceMode;

/// For one dataset: the label values forming each network class (a region), or `None` when the
/// dataset does not annotate that class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassRegions {
    pub regions: Vec<Option<Vec<u32>>>,
}

impl ClassRegions {
    /// A dataset that annotates every class of the network (a site's local model).
    pub fn all_annotated(label_sets: &[Vec<u32>]) -> Self {
        Self { regions: label_sets.iter().cloned().map(Some).collect() }
    }

    fn max_label(&self) -> u32 {
        self.regions.iter().flatten().flatten().copied().max().unwrap_or(0)
    }
}

/// Per-batch lookup from integer label maps to per-class region targets, plus the annotation mask.
pub struct BatchTargets {
    /// `[B, C_active, L+1]`: 1 where label value l belongs to class c for sample b. Column L is the
    /// catch-all for label values no class uses (background everywhere).
    lut: Tensor,
    /// `[B, C_active]`: 1 where sample b's dataset annotates class c.
    annotated: Tensor,
    /// Network classes annotated by at least one sample; only these take part in the loss.
    active: Tensor,
    max_label: i64,
}

impl BatchTargets {
    /// `samples[b]` describes sample b's dataset; every entry must list the same number of classes
    /// (the network's).
    pub fn new(samples: &[&ClassRegions], device: Device) -> Result<Self> {
        ensure!(!samples.is_empty(), "a batch needs at least one sample");
        let classes = samples[0].regions.len();
        for (b, s) in samples.iter().enumerate() {
            ensure!(
                s.regions.len() == classes,
                "sample {b}: its dataset lists {} classes, the network has {classes}",
                s.regions.len()
            );
        }
        let active: Vec<usize> = (0..classes).filter(|&c| samples.iter().any(|s| s.regions[c].is_some())).collect();
        ensure!(!active.is_empty(), "no sample of the batch annotates any class");
        let max_label = samples.iter().map(|s| s.max_label()).max().unwrap_or(0) as usize;
        let width = max_label + 2;
        let mut lut = vec![0f32; samples.len() * active.len() * width];
        let mut annotated = vec![0f32; samples.len() * active.len()];
        for (b, s) in samples.iter().enumerate() {
            for (a, &c) in active.iter().enumerate() {
                if let Some(labels) = &s.regions[c] {
                    annotated[b * active.len() + a] = 1.0;
                    for &l in labels {
                        lut[(b * active.len() + a) * width + l as usize] = 1.0;
                    }
                }
            }
        }
        let (b, a) = (samples.len() as i64, active.len() as i64);
        Ok(Self {
            lut: Tensor::from_slice(&lut).view([b, a, width as i64]).to_device(device),
            annotated: Tensor::from_slice(&annotated).view([b, a]).to_device(device),
            active: Tensor::from_slice(&active.iter().map(|&c| c as i64).collect::<Vec<_>>()).to_device(device),
            max_label: max_label as i64,
        })
    }

    /// Region targets `[B, C_active, ...]` (float 0/1) for integer labels `[B, 1, ...]`.
    pub fn targets(&self, labels: &Tensor) -> Result<Tensor> {
        let size = labels.size();
        ensure!(size.len() == 5 && size[1] == 1, "labels must be [B,1,Z,Y,X], got {size:?}");
        let (b, a) = (size[0], self.active.size()[0]);
        ensure!(b == self.lut.size()[0], "labels have {b} samples, the batch targets {}", self.lut.size()[0]);
        // Values no class uses (or out of range) map to the catch-all background column.
        let idx = labels.to_kind(Kind::Int64).clamp(0, self.max_label + 1).view([b, 1, -1]).expand([b, a, -1], false);
        let flat = self.lut.f_gather(2, &idx, false).context("mapping labels to class regions")?;
        let mut shape = vec![b, a];
        shape.extend_from_slice(&size[2..]);
        Ok(flat.view(shape.as_slice()))
    }

    /// The logits of the active classes.
    pub fn select(&self, logits: &Tensor) -> Tensor {
        if self.active.size()[0] == logits.size()[1] {
            logits.shallow_clone()
        } else {
            logits.index_select(1, &self.active)
        }
    }
}

/// Nearest-neighbour downsampling of an integer label map `[B,1,...]` to `size` (spatial dims).
pub fn downsample_labels(labels: &Tensor, size: &[i64]) -> Tensor {
    if &labels.size()[2..] == size {
        return labels.shallow_clone();
    }
    labels.to_kind(Kind::Float).upsample_nearest3d(size, None, None, None).to_kind(Kind::Int64)
}

/// Loss configuration: deep-supervision weights (full resolution first) and Dice pooling.
#[derive(Clone, Debug)]
pub struct MultiTalentLoss {
    pub ds_weights: Vec<f64>,
    pub dice: DiceMode,
}

impl MultiTalentLoss {
    /// Total loss over deep-supervision `outputs` (full resolution first) for integer `labels`
    /// `[B,1,Z,Y,X]` at full resolution.
    pub fn compute(&self, outputs: &[Tensor], labels: &Tensor, targets: &BatchTargets) -> Result<Tensor> {
        ensure!(
            outputs.len() == self.ds_weights.len(),
            "{} network outputs but {} deep-supervision weights",
            outputs.len(),
            self.ds_weights.len()
        );
        let mut total: Option<Tensor> = None;
        for (out, &w) in outputs.iter().zip(&self.ds_weights) {
            if w == 0.0 {
                continue;
            }
            let level_labels = downsample_labels(labels, &out.size()[2..]);
            let level = self.level_loss(&targets.select(out), &targets.targets(&level_labels)?, &targets.annotated);
            let weighted = level * w;
            total = Some(match total {
                Some(t) => t + weighted,
                None => weighted,
            });
        }
        total.context("every deep-supervision weight is zero")
    }

    /// `CE − DC` of one level; `logits`, `target`: `[B,C,...]`, `annotated`: `[B,C]`.
    pub fn level_loss(&self, logits: &Tensor, target: &Tensor, annotated: &Tensor) -> Tensor {
        let logits = logits.to_kind(Kind::Float);
        let spatial = [2i64, 3, 4];
        let bce = logits.binary_cross_entropy_with_logits::<Tensor>(target, None, None, Reduction::None).mean_dim(
            &spatial[..],
            false,
            Kind::Float,
        );
        let ce = (bce * annotated).sum(Kind::Float);
        let mask = annotated.view([annotated.size()[0], annotated.size()[1], 1, 1, 1]);
        let p = logits.sigmoid() * &mask;
        let g = target * &mask;
        let pool: &[i64] = match self.dice {
            DiceMode::Batch => &[0, 2, 3, 4],
            DiceMode::PerSample => &spatial,
        };
        let tp = (&p * &g).sum_dim_intlist(pool, false, Kind::Float);
        let not_g = g.ones_like() - &g;
        let not_p = p.ones_like() - &p;
        let fp = (&p * not_g).sum_dim_intlist(pool, false, Kind::Float);
        let fn_ = (not_p * &g).sum_dim_intlist(pool, false, Kind::Float);
        let dc = (&tp * 2.0 / (&tp * 2.0 + fp + fn_).clamp_min(1e-7)).sum(Kind::Float);
        ce - dc
    }
}

/// Hard Dice per class of thresholded logits (p > 0.5) against region targets, pooled over the
/// batch: `[C]`, NaN where a class is absent from both prediction and target.
pub fn hard_dice(logits: &Tensor, target: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let pred = logits.gt(0.0).to_kind(Kind::Float);
        let dims: &[i64] = &[0, 2, 3, 4];
        let tp = (&pred * target).sum_dim_intlist(dims, false, Kind::Float);
        let denom = pred.sum_dim_intlist(dims, false, Kind::Float) + target.sum_dim_intlist(dims, false, Kind::Float);
        let dice = tp * 2.0 / denom;
        Vec::<f64>::try_from(dice.to_kind(Kind::Double)).unwrap_or_default()
    })
}
