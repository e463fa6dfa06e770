//! The MultiTalent loss equals an independent PyTorch computation of DESIGN.md §1.3 (Python in the
//! venv), in both Dice modes, for a batch whose samples come from datasets with different classes;
//! unannotated classes get exactly zero gradient.

mod common;

use fedtalent_model::{BatchTargets, ClassRegions, DiceMode, MultiTalentLoss, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = r#"
import json, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch_reference import multitalent_loss
d = load_file(sys.argv[1]); meta = json.loads(sys.argv[2])
labels, regions, ws, mode = d["labels"], meta["regions"], meta["ws"], meta["mode"]
B, C = len(regions), len(regions[0])
def class_targets(lbl):
    t = torch.zeros(B, C, *lbl.shape[2:], dtype=torch.float64); ann = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            if regions[b][c] is not None:
                ann[b, c] = 1
                t[b, c] = torch.isin(lbl[b, 0], torch.tensor(regions[b][c])).double()
    return t, ann
total = 0.0
outs = [d[f"out{i}"].double() for i in range(len(ws))]
for out, w in zip(outs, ws):
    if w == 0: continue
    lbl = F.interpolate(labels.double(), size=out.shape[2:], mode="nearest").long()
    tgt, ann = class_targets(lbl)
    ce = (F.binary_cross_entropy_with_logits(out, tgt, reduction="none").mean(dim=(2, 3, 4)) * ann).sum()
    m = ann[:, :, None, None, None]
    p, g = torch.sigmoid(out) * m, tgt * m
    dims = (0, 2, 3, 4) if mode == "batch" else (2, 3, 4)
    tp, fp, fn = (p * g).sum(dims), (p * (1 - g)).sum(dims), ((1 - p) * g).sum(dims)
    total += w * (ce - (2 * tp / torch.clamp(2 * tp + fp + fn, min=1e-7)).sum())
ref = None
if mode == "batch":
    full, ann = class_targets(labels)
    ref = float(multitalent_loss(outs, full, ann.bool(), ws))
print(json.dumps({"loss": float(total), "reference_script": ref}))
"#;

fn regions() -> Vec<ClassRegions> {
    // Network classes: 0 liver {1,2} + 1 tumour {2} of dataset A; 2 kidney {1} of dataset B; 3 of nobody.
    vec![
        ClassRegions { regions: vec![Some(vec![1, 2]), Some(vec![2]), None, None], exclusive: false },
        ClassRegions { regions: vec![None, None, Some(vec![1]), None], exclusive: false },
    ]
}

fn regions_json(r: &[ClassRegions]) -> serde_json::Value {
    serde_json::to_value(r.iter().map(|s| &s.regions).collect::<Vec<_>>()).unwrap()
}

fn random_batch(n: i64) -> (Vec<Tensor>, Tensor) {
    tch::manual_seed(7);
    let outs = vec![
        Tensor::randn([n, 4, 8, 12, 12], (Kind::Float, Device::Cpu)) * 3.0,
        Tensor::randn([n, 4, 4, 6, 6], (Kind::Float, Device::Cpu)) * 3.0,
        Tensor::randn([n, 4, 2, 3, 3], (Kind::Float, Device::Cpu)) * 3.0,
    ];
    let labels = Tensor::randint(3, [n, 1, 8, 12, 12], (Kind::Int64, Device::Cpu));
    (outs, labels)
}

/// Deep-supervision weights of the oracle tests (three levels).
const WS: [f64; 3] = [4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];

/// Both Dice modes with the oracles' names for them.
const MODES: [(DiceMode, &str); 2] = [(DiceMode::Batch, "batch"), (DiceMode::PerSample, "per_sample")];

/// Our loss of `outs` in `mode` with the weights [`WS`].
fn our_loss(mode: DiceMode, outs: &[Tensor], labels: &Tensor, targets: &BatchTargets) -> f64 {
    let loss = MultiTalentLoss { ds_weights: WS.to_vec(), dice: mode };
    f64::try_from(loss.compute(outs, labels, targets).unwrap()).unwrap()
}

/// The oracles' input: the level outputs `out<i>` and the `labels`, in one safetensors file.
fn write_batch(dir: &std::path::Path, outs: &[Tensor], labels: &Tensor) -> std::path::PathBuf {
    let file = dir.join("batch.safetensors");
    let mut named: Vec<(String, Tensor)> =
        outs.iter().enumerate().map(|(i, o)| (format!("out{i}"), o.shallow_clone())).collect();
    named.push(("labels".into(), labels.shallow_clone()));
    fedtalent_model::io::write_tensors_atomic(&file, &named).unwrap();
    file
}

#[test]
fn loss_matches_pytorch_in_both_dice_modes() {
    // Three samples: two from dataset A (so batch and per-sample pooling differ), one from B.
    let (outs, labels) = random_batch(3);
    let mut regions = regions();
    regions.push(regions[0].clone());
    let targets = BatchTargets::new(&[&regions[0], &regions[1], &regions[2]], Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_batch(dir.path(), &outs, &labels);
    for (mode, name) in MODES {
        let ours = our_loss(mode, &outs, &labels, &targets);
        let meta = serde_json::json!({"regions": regions_json(&regions), "ws": WS, "mode": name}).to_string();
        let out: serde_json::Value =
            serde_json::from_str(&common::run_python(ORACLE, &[file.to_str().unwrap(), &meta])).unwrap();
        let theirs = out["loss"].as_f64().unwrap();
        assert!(((ours - theirs) / theirs).abs() < 1e-5, "{name}: ours {ours}, PyTorch {theirs}");
        if let Some(reference) = out["reference_script"].as_f64() {
            assert!(
                ((ours - reference) / reference).abs() < 1e-5,
                "{name}: ours {ours}, torch_reference.py {reference}"
            );
        }
    }
    // The two modes really differ on this batch (otherwise the comparison above proves less).
    let a = our_loss(DiceMode::Batch, &outs, &labels, &targets);
    let b = our_loss(DiceMode::PerSample, &outs, &labels, &targets);
    assert!((a - b).abs() > 1e-3, "batch {a} vs per-sample {b}");
}

#[test]
fn unannotated_classes_get_exactly_zero_gradient() {
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 4, Device::Cpu).unwrap();
    let regions = regions();
    let targets = BatchTargets::new(&[&regions[0], &regions[1]], Device::Cpu).unwrap();
    let x = Tensor::randn([2, 1, 16, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(3, [2, 1, 16, 32, 32], (Kind::Int64, Device::Cpu));
    let loss = MultiTalentLoss { ds_weights: topo.ds_weights.clone(), dice: DiceMode::Batch };
    loss.compute(&net.forward_ds(&x), &labels, &targets).unwrap().backward();
    let mut checked = 0;
    for p in net.params().iter().filter(|p| p.name.starts_with("seg_outputs")) {
        let grad = p.tensor.grad();
        if !grad.defined() {
            continue; // the level with weight 0 is not in the graph at all
        }
        for class in 0..4 {
            let row_norm = f64::try_from(grad.get(class).abs().sum(Kind::Float)).unwrap();
            if class == 3 {
                assert_eq!(row_norm, 0.0, "{}: class 3 (annotated by nobody) got gradient", p.name);
            } else {
                assert!(row_norm > 0.0, "{}: annotated class {class} got no gradient", p.name);
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 2, "two head levels carry loss weight in the tiny preset");
}

#[test]
fn per_sample_masking_pools_only_annotating_samples() {
    // Class 2 is annotated by sample 1 only: sample 0's logits for it must get zero gradient.
    let (outs, labels) = random_batch(2);
    let outs: Vec<Tensor> = outs.into_iter().map(|o| o.set_requires_grad(true)).collect();
    let regions = regions();
    let targets = BatchTargets::new(&[&regions[0], &regions[1]], Device::Cpu).unwrap();
    let loss = MultiTalentLoss { ds_weights: vec![1.0, 0.5, 0.25], dice: DiceMode::Batch };
    loss.compute(&outs, &labels, &targets).unwrap().backward();
    let g = outs[0].grad();
    let zero = |b: i64, c: i64| f64::try_from(g.get(b).get(c).abs().sum(Kind::Float)).unwrap() == 0.0;
    assert!(zero(0, 2) && zero(1, 0) && zero(1, 1) && zero(0, 3) && zero(1, 3));
    assert!(!zero(0, 0) && !zero(0, 1) && !zero(1, 2));
}

/// The softmax loss of an exclusive dataset: PyTorch's `CrossEntropyLoss` and nnU-Net 1.7.1's
/// own `SoftDiceLoss` (softmax, `do_bg=False`, no smoothing) on the dataset's samples, with a
/// zero background logit, summed as the MultiTalent terms are (CE times the samples, Dice times
/// the classes it averages over); the sigmoid dataset of the same batch keeps its BCE + Dice.
const SOFTMAX_ORACLE: &str = r#"
import json, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file
from nnunet.training.loss_functions.dice_loss import SoftDiceLoss
from nnunet.training.loss_functions.crossentropy import RobustCrossEntropyLoss
from nnunet.utilities.nd_softmax import softmax_helper
d = load_file(sys.argv[1]); meta = json.loads(sys.argv[2])
labels, ws, batch_dice = d["labels"], meta["ws"], meta["mode"] == "batch"
exclusive, excl_classes, excl_labels = meta["exclusive_samples"], meta["exclusive_classes"], meta["exclusive_labels"]
sigmoid, sig_class, sig_labels = meta["sigmoid_sample"], meta["sigmoid_class"], meta["sigmoid_labels"]
total = 0.0
for i, w in enumerate(ws):
    if w == 0: continue
    out = d[f"out{i}"].double()
    lbl = F.interpolate(labels.double(), size=out.shape[2:], mode="nearest").long()
    z = out[exclusive][:, excl_classes]
    logits = torch.cat([torch.zeros_like(z[:, :1]), z], 1)
    target = torch.zeros_like(lbl[exclusive])
    for k, values in enumerate(excl_labels):
        target[torch.isin(lbl[exclusive], torch.tensor(values))] = k + 1
    ce = RobustCrossEntropyLoss()(logits, target) * len(exclusive)
    dice = SoftDiceLoss(apply_nonlin=softmax_helper, batch_dice=batch_dice, do_bg=False, smooth=0.0)(logits, target)
    dice_terms = len(excl_classes) * (1 if batch_dice else len(exclusive))
    s = out[sigmoid:sigmoid + 1, sig_class:sig_class + 1]
    g = torch.isin(lbl[sigmoid:sigmoid + 1], torch.tensor(sig_labels)).double()
    bce = F.binary_cross_entropy_with_logits(s, g)
    p = torch.sigmoid(s)
    tp, fp, fn = (p * g).sum(), (p * (1 - g)).sum(), ((1 - p) * g).sum()
    total += w * (ce + dice * dice_terms + bce - 2 * tp / torch.clamp(2 * tp + fp + fn, min=1e-7))
print(json.dumps({"loss": float(total)}))
"#;

#[test]
fn softmax_loss_of_an_exclusive_dataset_matches_cross_entropy_and_nnunet_soft_dice() {
    // Network classes: 0 kidney {1} + 1 spleen {2} of exclusive dataset E; 2 liver {1} of
    // sigmoid dataset B; 3 of nobody. Samples 0, 1, 3 from E, sample 2 from B.
    let e = ClassRegions { regions: vec![Some(vec![1]), Some(vec![2]), None, None], exclusive: false }
        .into_exclusive()
        .unwrap();
    let b = ClassRegions { regions: vec![None, None, Some(vec![1]), None], exclusive: false };
    let (outs, labels) = random_batch(4);
    let targets = BatchTargets::new(&[&e, &e, &b, &e], Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_batch(dir.path(), &outs, &labels);
    for (mode, name) in MODES {
        let ours = our_loss(mode, &outs, &labels, &targets);
        let meta = serde_json::json!({
            "ws": WS, "mode": name,
            "exclusive_samples": [0, 1, 3], "exclusive_classes": [0, 1], "exclusive_labels": [[1], [2]],
            "sigmoid_sample": 2, "sigmoid_class": 2, "sigmoid_labels": [1],
        });
        // nnU-Net prints a citation banner on import: the result is the last line.
        let stdout = common::run_python(SOFTMAX_ORACLE, &[file.to_str().unwrap(), &meta.to_string()]);
        let out: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let theirs = out["loss"].as_f64().unwrap();
        assert!(((ours - theirs) / theirs).abs() < 1e-5, "{name}: ours {ours}, PyTorch + nnU-Net {theirs}");
        // The same dataset as sigmoid heads gives another loss: the softmax path really ran.
        let sigmoid = ClassRegions { exclusive: false, ..e.clone() };
        let as_sigmoid = BatchTargets::new(&[&sigmoid, &sigmoid, &b, &sigmoid], Device::Cpu).unwrap();
        let other = our_loss(mode, &outs, &labels, &as_sigmoid);
        assert!((other - ours).abs() > 1e-3, "{name}: sigmoid {other} vs softmax {ours}");
    }
}

/// With one class, a softmax over [0, z] is sigmoid(z): an exclusive one-class dataset trains
/// exactly as a sigmoid head.
#[test]
fn a_one_class_exclusive_dataset_is_exactly_a_sigmoid_head() {
    let (outs, labels) = random_batch(2);
    let sigmoid = ClassRegions { regions: vec![None, Some(vec![1, 2]), None, None], exclusive: false };
    let exclusive = sigmoid.clone().into_exclusive().unwrap();
    let ws = vec![0.5, 0.3, 0.2];
    let loss = MultiTalentLoss { ds_weights: ws, dice: DiceMode::Batch };
    let a = loss.compute(&outs, &labels, &BatchTargets::new(&[&sigmoid, &sigmoid], Device::Cpu).unwrap()).unwrap();
    let b = loss.compute(&outs, &labels, &BatchTargets::new(&[&exclusive, &exclusive], Device::Cpu).unwrap()).unwrap();
    let (a, b) = (f64::try_from(&a).unwrap(), f64::try_from(&b).unwrap());
    assert!((a - b).abs() < 1e-5 * a.abs(), "sigmoid {a} vs one-class softmax {b}");
}

/// Overlapping classes cannot be one softmax: refused naming the shared label value.
#[test]
fn overlapping_classes_are_refused_as_exclusive() {
    let err = ClassRegions::all_annotated(&[vec![1, 2], vec![2]]).into_exclusive().unwrap_err().to_string();
    assert!(err.contains("label value 2"), "{err}");
}
