//! SGD with Nesterov momentum (PyTorch semantics), the poly learning-rate schedule, gradient-norm
//! clipping, and an optimizer state that a site keeps on its disk across rounds and restarts.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// `lr · (1 − t/T)^0.9` (nnU-Net's poly schedule); `t` is the global step, `T` the total.
pub fn poly_lr(base_lr: f64, step: u64, total_steps: u64) -> f64 {
    if total_steps == 0 {
        return base_lr;
    }
    let frac = (step.min(total_steps) as f64) / total_steps as f64;
    base_lr * (1.0 - frac).powf(0.9)
}

/// Hyper-parameters of DESIGN.md §1.4.
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

/// `torch.optim.SGD(momentum, nesterov, weight_decay)` over named parameters.
pub struct Sgd {
    config: SgdConfig,
    params: Vec<(String, Tensor)>,
    /// Momentum buffers by parameter name; created on a parameter's first step, as in PyTorch.
    momentum: HashMap<String, Tensor>,
    /// Parameters the step leaves alone (no update, no weight decay, no momentum).
    frozen: std::collections::HashSet<String>,
}

impl Sgd {
    pub fn new(params: Vec<(String, Tensor)>, config: SgdConfig) -> Self {
        Self { config, params, momentum: HashMap::new(), frozen: Default::default() }
    }

    /// Freezes the named parameters (heads-only training): they get no gradient (their
    /// `requires_grad` is switched off, so backward does not even reach them) and the step leaves
    /// them and their momentum untouched. An empty set unfreezes everything.
    pub fn set_frozen(&mut self, names: std::collections::HashSet<String>) {
        for (name, p) in &mut self.params {
            let _ = p.set_requires_grad(!names.contains(name));
        }
        self.frozen = names;
    }

    /// Drops every momentum buffer: the next step starts like a fresh optimizer.
    pub fn clear_momentum(&mut self) {
        self.momentum.clear();
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

    /// Global L2 norm of all gradients (a device scalar, no host sync).
    pub fn grad_norm(&self) -> Tensor {
        let grads = self.grads();
        let squares: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
        Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
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

    /// One SGD step with learning rate `lr`:
    /// `g += wd·p; buf = μ·buf + g; p -= lr·(g + μ·buf)` (Nesterov) or `p -= lr·buf`.
    pub fn step(&mut self, lr: f64) {
        let SgdConfig { momentum, weight_decay, nesterov } = self.config;
        tch::no_grad(|| {
            for (name, p) in &mut self.params {
                let grad = p.grad();
                if !grad.defined() || self.frozen.contains(name) {
                    continue;
                }
                let mut d = if weight_decay != 0.0 { &grad + &*p * weight_decay } else { grad.shallow_clone() };
                if momentum != 0.0 {
                    let buf = match self.momentum.get_mut(name) {
                        Some(buf) => {
                            let _ = buf.g_mul_scalar_(momentum).g_add_(&d);
                            buf.shallow_clone()
                        }
                        None => {
                            let buf = d.detach().copy();
                            self.momentum.insert(name.clone(), buf.shallow_clone());
                            buf
                        }
                    };
                    d = if nesterov { d + buf * momentum } else { buf };
                }
                let _ = p.g_sub_(&(d * lr));
            }
        });
    }

    /// Saves the momentum buffers (safetensors, written atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, Tensor)> =
            self.momentum.iter().map(|(k, v)| (k.clone(), v.to_device(tch::Device::Cpu))).collect();
        crate::io::write_tensors_atomic(path, &named)
    }

    /// Restores momentum buffers saved by [`Sgd::save`]; buffers whose parameter is unknown or of
    /// another shape are refused by name.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors = crate::io::read_tensors(path).with_context(|| format!("optimizer state {}", path.display()))?;
        let shapes: HashMap<&str, (Vec<i64>, tch::Device)> =
            self.params.iter().map(|(n, p)| (n.as_str(), (p.size(), p.device()))).collect();
        let mut restored = HashMap::new();
        for (name, t) in tensors {
            let (shape, device) = shapes
                .get(name.as_str())
                .with_context(|| format!("optimizer state {}: unknown parameter {name:?}", path.display()))?;
            anyhow::ensure!(
                &t.size() == shape,
                "optimizer state {}: {name:?} has shape {:?}, the parameter {:?}",
                path.display(),
                t.size(),
                shape
            );
            restored.insert(name, t.to_device(*device));
        }
        self.momentum = restored;
        Ok(())
    }

    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.momentum.get(name)
    }
}
