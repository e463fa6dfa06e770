//! The local optimizers, SGD with Nesterov momentum (MultiTalent / nnU-Net, the default) and Adam
//! (FIRENet), both with PyTorch's semantics; the poly learning-rate schedule, gradient-norm
//! clipping, and an optimizer state that a site keeps on its disk across rounds and restarts.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

pub use fedtalent_vocab::LocalOptimizer;

/// `lr · (1 − t/T)^0.9` (nnU-Net's poly schedule); `t` is the global step, `T` the total.
pub fn poly_lr(base_lr: f64, step: u64, total_steps: u64) -> f64 {
    if total_steps == 0 {
        return base_lr;
    }
    let frac = (step.min(total_steps) as f64) / total_steps as f64;
    base_lr * (1.0 - frac).powf(0.9)
}

/// SGD's hyper-parameters (DESIGN.md §1.4).
#[derive(Clone, Debug)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { momentum: 0.99, weight_decay: 3e-5, nesterov: true }
    }
}

/// Adam's hyper-parameters, `torch.optim.Adam`'s (amsgrad off). The weight decay is an L2 term
/// added to the gradient, as torch's Adam does (not AdamW's decoupled decay); 3e-5 is nnU-Net's
/// (its own Adam trainer variant and its SGD), since FIRENet's paper states none.
#[derive(Clone, Debug)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 3e-5 }
    }
}

/// The update rule of the local optimizer.
#[derive(Clone, Debug)]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    Adam(AdamConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Sgd(SgdConfig::default())
    }
}

impl OptimizerConfig {
    /// The plan's choice with its default hyper-parameters.
    pub fn of(kind: LocalOptimizer) -> Self {
        match kind {
            LocalOptimizer::Sgd => Self::Sgd(SgdConfig::default()),
            LocalOptimizer::Adam => Self::Adam(AdamConfig::default()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sgd(_) => "sgd",
            Self::Adam(_) => "adam",
        }
    }
}

/// What the optimizer keeps for one parameter between steps.
enum ParamState {
    /// SGD's momentum buffer.
    Momentum(Tensor),
    /// Adam's moments and the parameter's own step count (PyTorch counts per parameter, so a
    /// parameter frozen for a while has taken fewer steps and gets its own bias correction).
    Adam { step: u64, exp_avg: Tensor, exp_avg_sq: Tensor },
}

/// Names of Adam's state tensors in the saved file: `<kind>/<parameter>` (parameter names hold
/// no `/`). SGD's momentum is saved under the bare parameter name, as before Adam existed, so
/// that existing site state directories still resume.
const EXP_AVG: &str = "exp_avg/";
const EXP_AVG_SQ: &str = "exp_avg_sq/";
const STEP: &str = "step/";

/// `torch.optim.SGD(momentum, nesterov, weight_decay)` or `torch.optim.Adam(betas, eps,
/// weight_decay)` over named parameters.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<(String, Tensor)>,
    /// Per-parameter state by name; created on a parameter's first step, as in PyTorch.
    state: HashMap<String, ParamState>,
    /// Parameters the step leaves alone (no update, no weight decay, no state change).
    frozen: HashSet<String>,
}

impl Optimizer {
    pub fn new(params: Vec<(String, Tensor)>, config: OptimizerConfig) -> Self {
        Self { config, params, state: HashMap::new(), frozen: Default::default() }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Freezes the named parameters (heads-only training): they get no gradient (their
    /// `requires_grad` is switched off, so backward does not even reach them) and the step leaves
    /// them and their state untouched. An empty set unfreezes everything.
    pub fn set_frozen(&mut self, names: HashSet<String>) {
        for (name, p) in &mut self.params {
            let _ = p.set_requires_grad(!names.contains(name));
        }
        self.frozen = names;
    }

    /// Drops every parameter's state (SGD's momentum, Adam's moments and step counts): the next
    /// step starts like a fresh optimizer.
    pub fn clear_state(&mut self) {
        self.state.clear();
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Gradients present on the parameters (missing ones are skipped, as PyTorch does).
    fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .filter(|(name, _)| !self.frozen.contains(name))
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect()
    }

    /// Global L2 norm of all gradients (a device scalar, no host sync): the norm of the
    /// per-gradient norms, as `clip_grad_norm_` computes it, with no temporary of a gradient's size.
    pub fn grad_norm(&self) -> Tensor {
        let norms: Vec<Tensor> = self.grads().iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        Tensor::stack(&norms, 0).norm()
    }

    /// Scales gradients so that their global norm is at most `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let norm = self.grad_norm();
        let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for mut g in self.grads() {
                let _ = g.g_mul_(&coef);
            }
        });
        norm
    }

    /// Multiplies every gradient by `factor` (loss-scale removal).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for mut g in self.grads() {
                let _ = g.g_mul_scalar_(factor);
            }
        });
    }

    /// One step with learning rate `lr` on every parameter that has a gradient and is not frozen,
    /// in place: no update allocates a tensor the size of a parameter (only a parameter's first
    /// step allocates its state), and the gradients are consumed (each ends up holding its
    /// parameter's update direction; the next step's `zero_grad` clears them).
    ///
    /// One parameter at a time, all of its updates together: tch 0.24 does not bind torch's
    /// multi-tensor `_foreach_*` ops, and on the CPU those are a loop over the same per-tensor
    /// kernels anyway, whereas a parameter-major loop keeps small parameters in cache between
    /// their updates.
    pub fn step(&mut self, lr: f64) {
        let mut scalars = match &self.config {
            OptimizerConfig::Sgd(c) => sgd_scalars(c, lr),
            OptimizerConfig::Adam(c) => adam_scalars(c, lr),
        };
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let mut grad = p.grad();
                if !grad.defined() || self.frozen.contains(name) {
                    continue;
                }
                let s = scalars.for_param(p);
                let state = self.state.get_mut(name);
                let fresh = match &self.config {
                    OptimizerConfig::Sgd(c) => sgd_update(c, s, p, &mut grad, state),
                    OptimizerConfig::Adam(c) => adam_update(c, s, p, &mut grad, state),
                };
                if let Some(fresh) = fresh {
                    self.state.insert(name.clone(), fresh);
                }
            }
        });
    }

    /// Saves the per-parameter state (safetensors, written atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut named = Vec::new();
        for (name, state) in &self.state {
            match state {
                ParamState::Momentum(buf) => named.push((name.clone(), cpu(buf))),
                ParamState::Adam { step, exp_avg, exp_avg_sq } => {
                    named.push((format!("{EXP_AVG}{name}"), cpu(exp_avg)));
                    named.push((format!("{EXP_AVG_SQ}{name}"), cpu(exp_avg_sq)));
                    named.push((format!("{STEP}{name}"), Tensor::from_slice(&[*step as i64])));
                }
            }
        }
        crate::io::write_tensors_atomic(path, &named)
    }

    /// Restores the state saved by [`Optimizer::save`]; tensors whose parameter is unknown or of
    /// another shape, or the state of the other update rule, are refused by name.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let what = || format!("optimizer state {}", path.display());
        let tensors = crate::io::read_tensors(path).with_context(what)?;
        let shapes: HashMap<&str, (Vec<i64>, tch::Device)> =
            self.params.iter().map(|(n, p)| (n.as_str(), (p.size(), p.device()))).collect();
        let mut by_param: HashMap<String, SavedState> = HashMap::new();
        for (key, t) in tensors {
            let (part, name) = split_state_key(&key);
            let (shape, device) =
                shapes.get(name).with_context(|| format!("{}: unknown parameter {name:?} ({key:?})", what()))?;
            let is_adam = part != SavedPart::Momentum;
            if is_adam != matches!(self.config, OptimizerConfig::Adam(_)) {
                let held = if is_adam { "adam" } else { "sgd" };
                bail!("{}: {key:?} is {held} state but the optimizer is {}", what(), self.config.name());
            }
            let entry = by_param.entry(name.to_string()).or_default();
            if part == SavedPart::Step {
                entry.step = Some(step_count(&t).with_context(|| format!("{}: {key:?}", what()))?);
                continue;
            }
            anyhow::ensure!(
                &t.size() == shape,
                "{}: {key:?} has shape {:?}, the parameter {shape:?}",
                what(),
                t.size()
            );
            let t = t.to_device(*device);
            match part {
                SavedPart::Momentum => entry.momentum = Some(t),
                SavedPart::ExpAvg => entry.exp_avg = Some(t),
                _ => entry.exp_avg_sq = Some(t),
            }
        }
        let mut restored = HashMap::new();
        for (name, saved) in by_param {
            let state = saved.into_state().with_context(|| format!("{}: parameter {name:?}", what()))?;
            restored.insert(name, state);
        }
        self.state = restored;
        Ok(())
    }

    /// The parameter's first-moment state: SGD's momentum buffer or Adam's `exp_avg`.
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name).map(|s| match s {
            ParamState::Momentum(buf) => buf,
            ParamState::Adam { exp_avg, .. } => exp_avg,
        })
    }

    /// Adam's step count of the parameter (`None` for SGD or before its first step).
    pub fn adam_steps(&self, name: &str) -> Option<u64> {
        match self.state.get(name)? {
            ParamState::Adam { step, .. } => Some(*step),
            ParamState::Momentum(_) => None,
        }
    }
}

/// One step's scalar factors as 0-dim tensors on the parameters' device and kind: with them
/// `x.addcmul_(y, s)` is `x += s·y` in one in-place pass (torch's `add_(y, alpha=s)`; tch 0.24
/// binds neither `alpha` nor torch's `_foreach_*` / `_fused_*` ops), so no update allocates a
/// temporary the size of a parameter. Made once per step, remade only for a parameter on
/// another device or of another kind.
struct StepScalars {
    values: Vec<f64>,
    made: Option<((tch::Device, Kind), Vec<Tensor>)>,
}

impl StepScalars {
    fn new(values: Vec<f64>) -> Self {
        Self { values, made: None }
    }

    fn for_param(&mut self, p: &Tensor) -> &[Tensor] {
        let key = (p.device(), p.kind());
        if self.made.as_ref().map(|(k, _)| *k) != Some(key) {
            let tensors = self.values.iter().map(|&v| Tensor::scalar_tensor(v, (key.1, key.0))).collect();
            self.made = Some((key, tensors));
        }
        self.made.as_ref().map_or(&[], |(_, tensors)| tensors.as_slice())
    }
}

/// The step's scalars of SGD: `[wd, μ, −lr]`.
fn sgd_scalars(c: &SgdConfig, lr: f64) -> StepScalars {
    StepScalars::new(vec![c.weight_decay, c.momentum, -lr])
}

/// `torch.optim.SGD`: `g += wd·p; buf = μ·buf + g; p -= lr·(g + μ·buf)` (Nesterov) or
/// `p -= lr·buf`, every update in place (`grad` ends up holding the step's direction). Returns
/// the state to insert when the parameter had none (its momentum buffer: a copy of `g`, as torch
/// clones it on the first step).
fn sgd_update(
    c: &SgdConfig,
    s: &[Tensor],
    p: &mut Tensor,
    grad: &mut Tensor,
    state: Option<&mut ParamState>,
) -> Option<ParamState> {
    let (wd, mu, neg_lr) = (&s[0], &s[1], &s[2]);
    if c.weight_decay != 0.0 {
        let _ = grad.addcmul_(p, wd);
    }
    if c.momentum == 0.0 {
        let _ = p.addcmul_(grad, neg_lr);
        return None;
    }
    let mut fresh = None;
    let buf = match state {
        Some(ParamState::Momentum(buf)) => {
            let _ = buf.g_mul_scalar_(c.momentum).g_add_(grad);
            buf.shallow_clone()
        }
        // Never Adam state: `load` refuses it and `step` only creates the configured rule's.
        _ => {
            let buf = grad.detach().copy();
            fresh = Some(ParamState::Momentum(buf.shallow_clone()));
            buf
        }
    };
    if c.nesterov {
        let _ = grad.addcmul_(&buf, mu);
        let _ = p.addcmul_(grad, neg_lr);
    } else {
        let _ = p.addcmul_(&buf, neg_lr);
    }
    fresh
}

/// The step's scalars of Adam: `[wd, −lr]` (the step size's bias correction is per parameter).
fn adam_scalars(c: &AdamConfig, lr: f64) -> StepScalars {
    StepScalars::new(vec![c.weight_decay, -lr])
}

/// `torch.optim.Adam` (amsgrad off): `g += wd·p; t += 1; m = lerp(m, g, 1−β1);
/// v = β2·v + (1−β2)·g²; p -= lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε)`, every update in place
/// (`grad` is reused for `√(1−β2)·g` and then the step's direction). Returns the state to insert
/// when the parameter had none.
fn adam_update(
    c: &AdamConfig,
    s: &[Tensor],
    p: &mut Tensor,
    grad: &mut Tensor,
    state: Option<&mut ParamState>,
) -> Option<ParamState> {
    if c.weight_decay != 0.0 {
        let _ = grad.addcmul_(p, &s[0]);
    }
    let mut fresh = None;
    let (step, exp_avg, exp_avg_sq) = match state {
        Some(ParamState::Adam { step, exp_avg, exp_avg_sq }) => (step, exp_avg, exp_avg_sq),
        // Never SGD state (see `sgd_update`): a parameter's first step starts from zero moments.
        _ => {
            let zeros = || p.zeros_like();
            fresh = Some(ParamState::Adam { step: 0, exp_avg: zeros(), exp_avg_sq: zeros() });
            match fresh.as_mut() {
                Some(ParamState::Adam { step, exp_avg, exp_avg_sq }) => (step, exp_avg, exp_avg_sq),
                _ => unreachable!("just created as Adam state"),
            }
        }
    };
    *step += 1;
    let _ = exp_avg.lerp_(grad, 1.0 - c.beta1);
    // v·β2 + (√(1−β2)·g)², the gradient's last use.
    let _ = grad.g_mul_scalar_((1.0 - c.beta2).sqrt());
    let _ = exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(grad, grad);
    let t = *step as i32;
    let bias_correction1 = 1.0 - c.beta1.powi(t);
    let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
    // m / ((1−β1^t)·(√v/√(1−β2^t) + ε)) into the gradient's memory, then p += −lr · that: torch's
    // step size lr/(1−β1^t) folded into the denominator, so that −lr is one scalar for all.
    let _ = exp_avg_sq.sqrt_out(grad);
    let _ = grad.g_mul_scalar_(bias_correction1 / bias_correction2_sqrt).g_add_scalar_(c.eps * bias_correction1);
    let _ = exp_avg.div_out(grad, grad);
    let _ = p.addcmul_(grad, &s[1]);
    fresh
}

/// Which state tensor a saved key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SavedPart {
    Momentum,
    ExpAvg,
    ExpAvgSq,
    Step,
}

/// `(part, parameter name)` of a key written by [`Optimizer::save`].
fn split_state_key(key: &str) -> (SavedPart, &str) {
    for (prefix, part) in [(EXP_AVG, SavedPart::ExpAvg), (EXP_AVG_SQ, SavedPart::ExpAvgSq), (STEP, SavedPart::Step)] {
        if let Some(name) = key.strip_prefix(prefix) {
            return (part, name);
        }
    }
    (SavedPart::Momentum, key)
}

/// A saved Adam step count: one non-negative integer.
fn step_count(t: &Tensor) -> Result<u64> {
    anyhow::ensure!(t.numel() == 1, "a step count must be one number, got shape {:?}", t.size());
    let step = t.to_kind(Kind::Int64).int64_value(&[0]);
    u64::try_from(step).ok().context("a step count must not be negative")
}

/// One parameter's tensors as read from a file, before they are checked complete.
#[derive(Default)]
struct SavedState {
    momentum: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    step: Option<u64>,
}

impl SavedState {
    fn into_state(self) -> Result<ParamState> {
        if let Some(buf) = self.momentum {
            return Ok(ParamState::Momentum(buf));
        }
        match (self.step, self.exp_avg, self.exp_avg_sq) {
            (Some(step), Some(exp_avg), Some(exp_avg_sq)) => Ok(ParamState::Adam { step, exp_avg, exp_avg_sq }),
            (step, m, v) => bail!(
                "incomplete adam state: {} missing",
                [(step.is_none(), "step"), (m.is_none(), "exp_avg"), (v.is_none(), "exp_avg_sq")]
                    .iter()
                    .filter(|(missing, _)| *missing)
                    .map(|(_, what)| *what)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}
