//! The in-place optimizer step and gradient clipping equal the per-parameter arithmetic they
//! replaced (written out here with a temporary per term, as `optim.rs` computed them before):
//! SGD with and without Nesterov and without momentum, and Adam, each with weight decay, a
//! parameter frozen for the first steps (its state is created at its first step), several steps
//! on the poly schedule; the momentum buffers / moments, the step counts and the parameters.

mod common;

use std::collections::{HashMap, HashSet};

use common::{set_grads, shallow};
use fedtalent_model::optim::{poly_lr, AdamConfig, Optimizer, OptimizerConfig, SgdConfig};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 5;
const FROZEN_STEPS: usize = 2;
const FROZEN: &str = "seg_outputs.0.weight";

/// The per-parameter state of the reference: SGD's buffer, or Adam's (step, m, v).
enum Ref {
    Momentum(Tensor),
    Adam(u64, Tensor, Tensor),
}

/// One step of the former per-parameter code on `p` (a detached copy) with gradient `grad`.
fn reference_step(config: &OptimizerConfig, p: &Tensor, grad: &Tensor, state: Option<Ref>, lr: f64) -> (Tensor, Ref) {
    match config {
        OptimizerConfig::Sgd(c) => {
            let d = grad + p * c.weight_decay;
            let buf = match state {
                Some(Ref::Momentum(buf)) => buf * c.momentum + &d,
                _ => d.copy(),
            };
            let d = if c.momentum == 0.0 {
                d
            } else if c.nesterov {
                &d + &buf * c.momentum
            } else {
                buf.copy()
            };
            (p - d * lr, Ref::Momentum(buf))
        }
        OptimizerConfig::Adam(c) => {
            let g = grad + p * c.weight_decay;
            let (step, m, v) = match state {
                Some(Ref::Adam(step, m, v)) => (step + 1, m, v),
                _ => (1, p.zeros_like(), p.zeros_like()),
            };
            let m = &m + (&g - &m) * (1.0 - c.beta1);
            let v = &v * c.beta2 + &g * &g * (1.0 - c.beta2);
            let t = step as i32;
            let step_size = lr / (1.0 - c.beta1.powi(t));
            let denom = v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps;
            (p - &m / denom * step_size, Ref::Adam(step, m, v))
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a.detach() - b).abs().max()).unwrap()
}

/// Runs `config` in place and the reference side by side and compares after every step.
fn matches_per_parameter_arithmetic(config: OptimizerConfig, base_lr: f64) {
    tch::manual_seed(11);
    let shapes: [(&str, &[i64]); 3] =
        [("conv.weight", &[8, 4, 3, 3, 3]), ("norm.bias", &[8]), (FROZEN, &[3, 8, 1, 1, 1])];
    let init: Vec<(String, Tensor)> =
        shapes.iter().map(|(n, s)| (n.to_string(), Tensor::randn(*s, (Kind::Float, Device::Cpu)))).collect();
    let params: Vec<(String, Tensor)> =
        init.iter().map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true))).collect();
    let mut opt = Optimizer::new(shallow(&params), config.clone());
    let mut reference: Vec<Tensor> = init.iter().map(|(_, t)| t.copy()).collect();
    let mut ref_state: HashMap<String, Ref> = HashMap::new();
    for step in 0..STEPS {
        let lr = poly_lr(base_lr, step as u64, STEPS as u64 + 1);
        let grads: Vec<(String, Tensor)> = init.iter().map(|(n, t)| (n.clone(), t.randn_like() * 0.1)).collect();
        let frozen_now = step < FROZEN_STEPS;
        opt.set_frozen(if frozen_now { HashSet::from([FROZEN.to_string()]) } else { HashSet::new() });
        set_grads(&mut opt, &params, &grads);
        opt.step(lr);
        for (((name, p), (_, g)), r) in params.iter().zip(&grads).zip(reference.iter_mut()) {
            if frozen_now && name == FROZEN {
                assert!(opt.momentum_buffer(name).is_none(), "{name}: frozen, yet it has state at step {step}");
                assert!(max_diff(p, r) == 0.0, "{name}: frozen, yet it moved at step {step}");
                continue;
            }
            let (next, state) = reference_step(&config, r, g, ref_state.remove(name), lr);
            *r = next;
            let diff = max_diff(p, r);
            assert!(diff < 1e-6, "{name}, step {step}: in place and per-parameter differ by {diff}");
            let (first_moment, steps) = match &state {
                Ref::Momentum(buf) => (buf, None),
                Ref::Adam(t, m, _) => (m, Some(*t)),
            };
            match (opt.momentum_buffer(name), &config) {
                (Some(ours), _) => {
                    let diff = max_diff(ours, first_moment);
                    assert!(diff < 1e-6, "{name}, step {step}: state differs by {diff}");
                }
                // No momentum: torch keeps no buffer either.
                (None, OptimizerConfig::Sgd(c)) if c.momentum == 0.0 => {}
                (None, _) => panic!("{name}: no state after step {step}"),
            }
            assert_eq!(opt.adam_steps(name), steps, "{name}: step count after step {step}");
            ref_state.insert(name.clone(), state);
        }
    }
    for ((name, p), (_, start)) in params.iter().zip(&init) {
        assert!(max_diff(p, start) > 1e-4, "{name} did not move: the comparison would prove nothing");
    }
}

#[test]
fn sgd_nesterov_in_place_equals_per_parameter_arithmetic() {
    let config = SgdConfig { weight_decay: 1e-2, ..SgdConfig::default() };
    matches_per_parameter_arithmetic(OptimizerConfig::Sgd(config), 1e-2);
}

#[test]
fn sgd_heavy_ball_in_place_equals_per_parameter_arithmetic() {
    let config = SgdConfig { momentum: 0.9, weight_decay: 1e-2, nesterov: false };
    matches_per_parameter_arithmetic(OptimizerConfig::Sgd(config), 1e-2);
}

#[test]
fn sgd_without_momentum_in_place_equals_per_parameter_arithmetic() {
    let config = SgdConfig { momentum: 0.0, weight_decay: 1e-2, nesterov: false };
    matches_per_parameter_arithmetic(OptimizerConfig::Sgd(config), 1e-1);
}

#[test]
fn adam_in_place_equals_per_parameter_arithmetic() {
    let config = AdamConfig { weight_decay: 1e-2, ..AdamConfig::default() };
    matches_per_parameter_arithmetic(OptimizerConfig::Adam(config), 1e-3);
}

/// `clip_grad_norm` returns the global norm of the per-parameter gradients and scales every
/// gradient by `min(1, max / (norm + 1e-6))` (`torch.nn.utils.clip_grad_norm_`), leaving frozen
/// parameters (no gradient) alone; `scale_grads` multiplies every gradient.
#[test]
fn clip_and_scale_equal_per_parameter_arithmetic() {
    tch::manual_seed(5);
    let params: Vec<(String, Tensor)> = [("a", &[6, 5][..]), ("b", &[7][..]), ("c", &[2, 3, 4][..])]
        .iter()
        .map(|(n, s)| (n.to_string(), Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true)))
        .collect();
    let mut opt = Optimizer::new(shallow(&params), OptimizerConfig::default());
    opt.set_frozen(HashSet::from(["c".to_string()]));
    for (max_norm, clips) in [(0.5, true), (1e3, false)] {
        let grads: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.randn_like())).collect();
        set_grads(&mut opt, &params, &grads);
        let expected_norm: f64 =
            grads[..2].iter().map(|(_, g)| f64::try_from(g.square().sum(Kind::Double)).unwrap()).sum::<f64>().sqrt();
        let norm = f64::try_from(opt.clip_grad_norm(max_norm)).unwrap();
        assert!((norm - expected_norm).abs() < 1e-5 * expected_norm, "norm {norm}, expected {expected_norm}");
        assert_eq!(expected_norm > max_norm, clips);
        let coef = (max_norm / (expected_norm + 1e-6)).min(1.0);
        for ((name, p), (_, g)) in params[..2].iter().zip(&grads) {
            let diff = max_diff(&p.grad(), &(g * coef));
            assert!(diff < 1e-6, "{name}: clipped gradient differs by {diff} (max_norm {max_norm})");
        }
        assert!(!params[2].1.grad().defined(), "the frozen parameter got a gradient");
        opt.scale_grads(0.25);
        for ((name, p), (_, g)) in params[..2].iter().zip(&grads) {
            let diff = max_diff(&p.grad(), &(g * (coef * 0.25)));
            assert!(diff < 1e-6, "{name}: scaled gradient differs by {diff}");
        }
    }
}
