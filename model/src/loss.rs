//! The MultiTalent loss (DESIGN.md §1.3): BCE + Dice, summed over the classes that each sample's
//! dataset annotates, on every deep-supervision level.
//!
//! Per level i with weight w_i:
//! `CE  = Σ_(b,c annotated) mean_voxels BCE(logit[b,c], target[b,c])` (a sum, not a mean),
//! `DC  = Σ_c 2·TP_c / max(2·TP_c + FP_c + FN_c, 1e-7)` with soft TP/FP/FN pooled over the batch
//! (`batch`, the paper's definition) or per sample and summed (`per_sample`),
//! `L_i = CE − DC`, `L = Σ_i w_i·L_i`. Unannotated (sample, class) pairs contribute nothing and get
//! exactly zero gradient: that is the whole point of the method.
//!
//! A dataset whose classes are mutually exclusive (no voxel in two of them) may instead train
//! them as FIRENet does: one softmax over background + its classes with nnU-Net's DC_and_CE
//! (cross-entropy + soft Dice without the background), see [`ClassRegions::exclusive`]. Its
//! terms follow the same conventions as the sigmoid ones (a sum over samples and classes, Dice
//! without smoothing), so that such a site's gradient has the scale of any other site's; with one
//! class the two losses are identical.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

pub use fedtalent_vocab::DiceMode;

/// For one dataset: the label values forming each network class (a region), or `None` when the
/// dataset does not annotate that class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassRegions {
    pub regions: Vec<Option<Vec<u32>>>,
    /// The dataset's classes are mutually exclusive and trained as one softmax over background +
    /// them (categorical cross-entropy + soft Dice) instead of one sigmoid each; their label
    /// sets must be disjoint.
    #[serde(default)]
    pub exclusive: bool,
}

impl ClassRegions {
    /// A dataset that annotates every class of the network (a site's local model).
    pub fn all_annotated(label_sets: &[Vec<u32>]) -> Self {
        Self { regions: label_sets.iter().cloned().map(Some).collect(), exclusive: false }
    }

    /// The same dataset with its classes trained as one softmax ([`ClassRegions::exclusive`]);
    /// refused, naming the label value, when two of its classes share a label value.
    pub fn into_exclusive(self) -> Result<Self> {
        let mut seen = std::collections::HashMap::new();
        for (c, labels) in self.regions.iter().enumerate() {
            for &l in labels.iter().flatten() {
                if let Some(other) = seen.insert(l, c) {
                    anyhow::bail!(
                        "classes {other} and {c} both contain label value {l}: overlapping classes cannot be \
                         mutually exclusive (one softmax)"
                    );
                }
            }
        }
        Ok(Self { exclusive: true, ..self })
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
    /// `[B, C_active]`: 1 where sample b's dataset annotates class c with a sigmoid head (0 for
    /// the samples of exclusive datasets: their classes are in `groups`).
    annotated: Tensor,
    /// Whether any sample trains sigmoid heads (otherwise the sigmoid terms are skipped).
    any_sigmoid: bool,
    /// One softmax group per distinct exclusive dataset of the batch.
    groups: Vec<SoftmaxGroup>,
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
                    annotated[b * active.len() + a] = if s.exclusive { 0.0 } else { 1.0 };
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
            any_sigmoid: samples.iter().any(|s| !s.exclusive),
            groups: SoftmaxGroup::of_batch(samples, &active, device)?,
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

/// The samples of one exclusive dataset in a batch and the positions (among the batch's active
/// classes) of that dataset's classes.
struct SoftmaxGroup {
    samples: Tensor,
    classes: Tensor,
}

impl SoftmaxGroup {
    /// One group per distinct exclusive dataset among `samples` (pooled training may mix them).
    fn of_batch(samples: &[&ClassRegions], active: &[usize], device: Device) -> Result<Vec<Self>> {
        let mut datasets: Vec<&ClassRegions> = Vec::new();
        for s in samples.iter().filter(|s| s.exclusive) {
            if !datasets.contains(s) {
                datasets.push(s);
            }
        }
        datasets
            .into_iter()
            .map(|d| {
                let d = d.clone().into_exclusive()?;
                let members: Vec<i64> = (0..samples.len()).filter(|&b| *samples[b] == d).map(|b| b as i64).collect();
                let classes: Vec<i64> =
                    (0..active.len()).filter(|&a| d.regions[active[a]].is_some()).map(|a| a as i64).collect();
                ensure!(!classes.is_empty(), "an exclusive dataset of the batch annotates no class");
                Ok(Self {
                    samples: Tensor::from_slice(&members).to_device(device),
                    classes: Tensor::from_slice(&classes).to_device(device),
                })
            })
            .collect()
    }

    /// `[S, K, ...]`: the group's samples and classes of a `[B, C_active, ...]` tensor.
    fn pick(&self, t: &Tensor) -> Tensor {
        t.index_select(0, &self.samples).index_select(1, &self.classes)
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
            let (logits, target) = (targets.select(out), targets.targets(&level_labels)?);
            let mut level = targets.any_sigmoid.then(|| self.level_loss(&logits, &target, &targets.annotated));
            for group in &targets.groups {
                let term = self.softmax_loss(&group.pick(&logits), &group.pick(&target));
                level = Some(match level {
                    Some(l) => l + term,
                    None => term,
                });
            }
            let weighted = level.context("a batch without classes")? * w;
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
        ce - self.dice_sum(&p, &g)
    }

    /// `CE − DC` of one exclusive dataset's samples at one level: `logits`, `target` (one-hot,
    /// disjoint regions): `[S,K,...]`. Softmax over [0, logits]: the background logit is a fixed
    /// zero rather than an extra head, because softmax is invariant to adding one constant to
    /// every logit, so a background head would add only a redundant degree of freedom; with the
    /// zero, each class keeps exactly one head (its row of every level's head, owned and
    /// averaged like any class's), the exported tensors keep nnU-Net's shapes, and a one-class
    /// group is exactly a sigmoid head. `CE = Σ_samples mean_voxels −log p[target]` (PyTorch's
    /// `CrossEntropyLoss` times the number of samples), `DC = Σ_c soft Dice` over the classes
    /// without the background (nnU-Net's `do_bg=False`), pooled as the sigmoid Dice is.
    pub fn softmax_loss(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        let logits = logits.to_kind(Kind::Float);
        let classes = logits.size()[1];
        let log_p = with_background_logit(&logits).log_softmax(1, Kind::Float);
        let background = target.ones_like().narrow(1, 0, 1) - target.sum_dim_intlist(&[1i64][..], true, Kind::Float);
        let one_hot = Tensor::cat(&[background, target.to_kind(Kind::Float)], 1);
        let ce = -(one_hot * &log_p).sum_dim_intlist(&[1i64][..], false, Kind::Float);
        let ce = ce.mean_dim(&[1i64, 2, 3][..], false, Kind::Float).sum(Kind::Float);
        let p = log_p.narrow(1, 1, classes).exp();
        ce - self.dice_sum(&p, &target.to_kind(Kind::Float))
    }

    /// `Σ 2·TP / max(2·TP + FP + FN, 1e-7)` of soft predictions `p` against targets `g`
    /// (`[B,C,...]`), TP/FP/FN pooled per class over the batch or per (sample, class).
    fn dice_sum(&self, p: &Tensor, g: &Tensor) -> Tensor {
        let pool: &[i64] = match self.dice {
            DiceMode::Batch => &[0, 2, 3, 4],
            DiceMode::PerSample => &[2, 3, 4],
        };
        let tp = (p * g).sum_dim_intlist(pool, false, Kind::Float);
        let not_g = g.ones_like() - g;
        let not_p = p.ones_like() - p;
        let fp = (p * not_g).sum_dim_intlist(pool, false, Kind::Float);
        let fn_ = (not_p * g).sum_dim_intlist(pool, false, Kind::Float);
        (&tp * 2.0 / (&tp * 2.0 + fp + fn_).clamp_min(1e-7)).sum(Kind::Float)
    }
}

/// `[B, 1 + K, ...]`: a zero background logit in front of the K class logits of a softmax group.
pub fn with_background_logit(logits: &Tensor) -> Tensor {
    Tensor::cat(&[logits.narrow(1, 0, 1).zeros_like(), logits.shallow_clone()], 1)
}

/// The hard prediction of a softmax group from its class scores `[.., K, ...]` along `dim`
/// (logits, or softmax probabilities of the classes without the background): class k wins a
/// voxel where its score is the largest of the group and beats the background (a logit above the
/// fixed zero, or a probability above `1 − Σ p`). A voxel gets at most one class of the group.
pub fn exclusive_masks(scores: &Tensor, dim: i64, probabilities: bool) -> Tensor {
    let background = if probabilities {
        scores.ones_like().narrow(dim, 0, 1) - scores.sum_dim_intlist(&[dim][..], true, Kind::Float)
    } else {
        scores.narrow(dim, 0, 1).zeros_like()
    };
    let winner = Tensor::cat(&[background, scores.to_kind(Kind::Float)], dim).argmax(dim, true);
    let k = scores.size()[dim as usize];
    let ids = Tensor::arange_start(1, k + 1, (Kind::Int64, scores.device()));
    let mut shape = vec![1i64; scores.dim()];
    shape[dim as usize] = k;
    winner.eq_tensor(&ids.view(shape.as_slice()))
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
