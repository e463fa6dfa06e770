//! The local Adam and SGD (Nesterov) equal `torch.optim.Adam` / `torch.optim.SGD` (Python in the
//! venv, their per-parameter `foreach=False` paths) step for step: same parameters, gradients and per-step learning rates (the poly schedule), one parameter frozen for the
//! first steps (so its bias correction lags, as PyTorch's per-parameter step count does), and a
//! save/load of the optimizer state in the middle (a site restart between rounds).

mod common;

use std::collections::HashSet;

use common::{named, set_grads, shallow};
use fedtalent_model::optim::{poly_lr, AdamConfig, Optimizer, OptimizerConfig, SgdConfig};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 6;
const FROZEN_STEPS: usize = 2;
const SAVED_AFTER: usize = 3;

const ORACLE: &str = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
d = load_file(sys.argv[1]); meta = json.loads(sys.argv[2])
names = meta["names"]
params = [torch.nn.Parameter(d["init/" + n].clone()) for n in names]
if meta["rule"] == "adam":
    opt = torch.optim.Adam(params, lr=meta["lrs"][0], betas=(meta["beta1"], meta["beta2"]), eps=meta["eps"],
                           weight_decay=meta["weight_decay"], foreach=False)
else:
    opt = torch.optim.SGD(params, lr=meta["lrs"][0], momentum=meta["momentum"], nesterov=meta["nesterov"],
                          weight_decay=meta["weight_decay"], foreach=False)
for step, lr in enumerate(meta["lrs"]):
    for group in opt.param_groups:
        group["lr"] = lr
    for n, p in zip(names, params):
        frozen = n == meta["frozen"] and step < meta["frozen_steps"]
        p.grad = None if frozen else d[f"grad{step}/{n}"].clone()
    opt.step()
save_file({n: p.detach().contiguous() for n, p in zip(names, params)}, sys.argv[3])
"#;

#[test]
fn adam_matches_torch_optim_adam_across_a_save_and_load() {
    let config = AdamConfig { weight_decay: 1e-2, ..AdamConfig::default() };
    let meta = serde_json::json!({
        "rule": "adam", "beta1": config.beta1, "beta2": config.beta2, "eps": config.eps,
        "weight_decay": config.weight_decay,
    });
    matches_torch_optim_across_a_save_and_load(OptimizerConfig::Adam(config), 3e-4, meta);
}

/// SGD with Nesterov momentum as the benchmark's PyTorch peer runs it (and as nnU-Net trains),
/// with a weight decay large enough to matter within six steps.
#[test]
fn sgd_matches_torch_optim_sgd_across_a_save_and_load() {
    let config = SgdConfig { weight_decay: 1e-2, ..SgdConfig::default() };
    let meta = serde_json::json!({
        "rule": "sgd", "momentum": config.momentum, "nesterov": config.nesterov,
        "weight_decay": config.weight_decay,
    });
    matches_torch_optim_across_a_save_and_load(OptimizerConfig::Sgd(config), 1e-2, meta);
}

/// Runs `config` and torch's optimizer named in `meta` over the same steps and compares.
fn matches_torch_optim_across_a_save_and_load(config: OptimizerConfig, base_lr: f64, meta: serde_json::Value) {
    tch::manual_seed(3);
    let shapes: [(&str, &[i64]); 3] =
        [("conv.weight", &[4, 2, 3, 3, 3]), ("norm.bias", &[4]), ("seg_outputs.0.weight", &[2, 4, 1, 1, 1])];
    let init: Vec<(String, Tensor)> =
        shapes.iter().map(|(n, s)| (n.to_string(), Tensor::randn(*s, (Kind::Float, Device::Cpu)))).collect();
    let grads: Vec<Vec<(String, Tensor)>> =
        (0..STEPS).map(|_| init.iter().map(|(n, t)| (n.clone(), t.randn_like() * 0.1)).collect()).collect();
    let lrs: Vec<f64> = (0..STEPS as u64).map(|t| poly_lr(base_lr, t, STEPS as u64 + 2)).collect();
    let frozen = "seg_outputs.0.weight";
    let adam = matches!(config, OptimizerConfig::Adam(_));

    let params: Vec<(String, Tensor)> =
        init.iter().map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true))).collect();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("optimizer.safetensors");
    let mut opt = Optimizer::new(shallow(&params), config.clone());
    for (step, (lr, g)) in lrs.iter().zip(&grads).enumerate() {
        if step == SAVED_AFTER {
            // A restart: a fresh optimizer over the same parameters, its state read back.
            opt.save(&state_file).unwrap();
            opt = Optimizer::new(shallow(&params), config.clone());
            opt.load(&state_file).unwrap();
        }
        let frozen_now: HashSet<String> =
            if step < FROZEN_STEPS { [frozen.to_string()].into() } else { HashSet::new() };
        opt.set_frozen(frozen_now);
        set_grads(&mut opt, &params, g);
        opt.step(*lr);
    }
    if adam {
        assert_eq!(opt.adam_steps("conv.weight"), Some(STEPS as u64));
        assert_eq!(opt.adam_steps(frozen), Some((STEPS - FROZEN_STEPS) as u64));
    }

    let mut tensors = named("init/", &init);
    for (step, g) in grads.iter().enumerate() {
        tensors.extend(named(&format!("grad{step}/"), g));
    }
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    fedtalent_model::io::write_tensors_atomic(&input, &tensors).unwrap();
    let mut meta = meta;
    meta["names"] = shapes.iter().map(|(n, _)| *n).collect::<Vec<_>>().into();
    meta["lrs"] = lrs.into();
    meta["frozen"] = frozen.into();
    meta["frozen_steps"] = FROZEN_STEPS.into();
    common::run_python(ORACLE, &[input.to_str().unwrap(), &meta.to_string(), output.to_str().unwrap()]);
    let theirs = fedtalent_model::io::read_tensors(&output).unwrap();
    for (name, ours) in &params {
        let (_, t) = theirs.iter().find(|(n, _)| n == name).unwrap();
        let diff = f64::try_from((ours.detach() - t).abs().max()).unwrap();
        assert!(diff < 1e-6, "{name}: ours and torch.optim ({}) differ by {diff}", meta["rule"]);
        let moved = f64::try_from((ours.detach() - &init.iter().find(|(n, _)| n == name).unwrap().1).abs().max());
        assert!(moved.unwrap() > 1e-5, "{name} did not move: the comparison would prove nothing");
    }
}

/// An optimizer state of the other rule (a plan switched between sgd and adam) is refused by
/// name, and clearing the state restarts Adam's bias correction.
#[test]
fn adam_state_is_refused_by_sgd_and_cleared_by_the_reset_policy() {
    let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let params = vec![("w".to_string(), p.shallow_clone())];
    let mut adam = Optimizer::new(shallow(&params), OptimizerConfig::Adam(AdamConfig::default()));
    set_grads(&mut adam, &params, &[("w".to_string(), Tensor::ones([3], (Kind::Float, Device::Cpu)))]);
    adam.step(1e-3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optimizer.safetensors");
    adam.save(&file).unwrap();
    let mut sgd = Optimizer::new(shallow(&params), OptimizerConfig::Sgd(SgdConfig::default()));
    let err = format!("{:#}", sgd.load(&file).unwrap_err());
    // Named by its key (`exp_avg/w`, `exp_avg_sq/w` or `step/w`, whichever is read first).
    assert!(err.contains("is adam state but the optimizer is sgd") && err.contains("/w\""), "{err}");
    assert_eq!(adam.adam_steps("w"), Some(1));
    adam.clear_state();
    assert_eq!(adam.adam_steps("w"), None);
    assert!(adam.momentum_buffer("w").is_none());
}
