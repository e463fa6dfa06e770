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
        ClassRegions { regions: vec![Some(vec![1, 2]), Some(vec![2]), None, None] },
        ClassRegions { regions: vec![None, None, Some(vec![1]), None] },
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

#[test]
fn loss_matches_pytorch_in_both_dice_modes() {
    // Three samples: two from dataset A (so batch and per-sample pooling differ), one from B.
    let (outs, labels) = random_batch(3);
    let mut regions = regions();
    regions.push(regions[0].clone());
    let targets = BatchTargets::new(&[&regions[0], &regions[1], &regions[2]], Device::Cpu).unwrap();
    let ws = vec![4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("batch.safetensors");
    let mut named: Vec<(String, Tensor)> =
        outs.iter().enumerate().map(|(i, o)| (format!("out{i}"), o.shallow_clone())).collect();
    named.push(("labels".into(), labels.shallow_clone()));
    fedtalent_model::io::write_tensors_atomic(&file, &named).unwrap();
    for (mode, name) in [(DiceMode::Batch, "batch"), (DiceMode::PerSample, "per_sample")] {
        let loss = MultiTalentLoss { ds_weights: ws.clone(), dice: mode };
        let ours = f64::try_from(loss.compute(&outs, &labels, &targets).unwrap()).unwrap();
        let meta = serde_json::json!({"regions": regions_json(&regions), "ws": ws, "mode": name}).to_string();
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
    let batch = MultiTalentLoss { ds_weights: ws.clone(), dice: DiceMode::Batch };
    let per_sample = MultiTalentLoss { ds_weights: ws, dice: DiceMode::PerSample };
    let a = f64::try_from(batch.compute(&outs, &labels, &targets).unwrap()).unwrap();
    let b = f64::try_from(per_sample.compute(&outs, &labels, &targets).unwrap()).unwrap();
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
