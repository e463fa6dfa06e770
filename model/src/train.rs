//! One MultiTalent training step: forward with deep supervision, masked loss, backward, gradient
//! clipping, the local optimizer (SGD Nesterov or Adam) on the poly schedule; fp16 autocast with dynamic loss scaling on CUDA.

use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::loss::{BatchTargets, DiceMode, MultiTalentLoss};
use crate::network::MultiTalentNet;
use crate::optim::{poly_lr, Optimizer, OptimizerConfig};

/// Arithmetic of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// fp16 autocast with dynamic loss scaling (CUDA only).
    Fp16,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Self::Fp32),
            "fp16" => Ok(Self::Fp16),
            other => anyhow::bail!("unknown precision {other:?} (fp32 | fp16)"),
        }
    }
}

/// Training hyper-parameters (DESIGN.md §1.4).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub base_lr: f64,
    /// Total local steps of the whole federation: the poly schedule's horizon.
    pub total_steps: u64,
    pub grad_clip: f64,
    pub precision: Precision,
    pub dice: DiceMode,
    pub optimizer: OptimizerConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            base_lr: 0.01,
            total_steps: 1000,
            grad_clip: 12.0,
            precision: Precision::Fp32,
            dice: DiceMode::Batch,
            optimizer: OptimizerConfig::default(),
        }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// An fp16 step whose gradients overflowed is skipped and the loss scale halved.
    pub skipped: bool,
}

/// nnU-Net's `GradScaler` behaviour: start at 2^16, halve on overflow, double after 2000 good steps.
#[derive(Clone, Debug)]
struct LossScaler {
    scale: f64,
    good_steps: u32,
}

impl LossScaler {
    const GROWTH_INTERVAL: u32 = 2000;

    fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale *= 0.5;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

/// A network with its optimizer and loss: everything a site needs to run local steps.
pub struct Trainer {
    pub net: MultiTalentNet,
    pub optimizer: Optimizer,
    loss: MultiTalentLoss,
    config: TrainConfig,
    scaler: Option<LossScaler>,
    /// Global step of the poly schedule (the next step's t).
    pub step: u64,
}

impl Trainer {
    pub fn new(net: MultiTalentNet, config: TrainConfig) -> Result<Self> {
        let fp16 = config.precision == Precision::Fp16;
        ensure!(
            !fp16 || net.device().is_cuda(),
            "fp16 training needs a CUDA device, the network is on {:?}",
            net.device()
        );
        if net.device().is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let optimizer = Optimizer::new(net.params().trainable(), config.optimizer.clone());
        let loss = MultiTalentLoss { ds_weights: net.topology().ds_weights.clone(), dice: config.dice };
        let scaler = fp16.then_some(LossScaler { scale: 65536.0, good_steps: 0 });
        Ok(Self { net, optimizer, loss, config, scaler, step: 0 })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Heads-only training: with `frozen`, every step updates only the per-class heads (the
    /// backbone and any site decoder keep their values); without, everything trains again.
    pub fn freeze_backbone(&mut self, frozen: bool) {
        let names = if frozen {
            self.net
                .params()
                .iter()
                .filter(|p| !matches!(p.role, crate::params::Role::Head { .. }))
                .map(|p| p.name.clone())
                .collect()
        } else {
            Default::default()
        };
        self.optimizer.set_frozen(names);
    }

    pub fn set_total_steps(&mut self, total: u64) {
        self.config.total_steps = total;
    }

    pub fn loss_fn(&self) -> &MultiTalentLoss {
        &self.loss
    }

    /// One step on `image` `[B,1,Z,Y,X]` and integer `labels` `[B,1,Z,Y,X]`.
    pub fn train_step(&mut self, image: &Tensor, labels: &Tensor, targets: &BatchTargets) -> Result<StepStats> {
        let lr = poly_lr(self.config.base_lr, self.step, self.config.total_steps);
        self.optimizer.zero_grad();
        let autocast = self.scaler.is_some();
        let loss = tch::autocast(autocast, || {
            let outputs = self.net.forward_ds(image);
            self.loss.compute(&outputs, labels, targets)
        })?;
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        (&loss * scale).backward();
        if scale != 1.0 {
            self.optimizer.scale_grads(1.0 / scale);
        }
        let norm = self.optimizer.clip_grad_norm(self.config.grad_clip);
        // One host sync per step for both numbers (GradScaler syncs on found_inf as well).
        let stats = Tensor::stack(&[loss.detach().to_kind(Kind::Float), norm.to_kind(Kind::Float)], 0);
        let stats = Vec::<f32>::try_from(stats.to_device(Device::Cpu))?;
        let (loss_value, grad_norm) = (stats[0] as f64, stats[1] as f64);
        let overflow = !grad_norm.is_finite();
        if let Some(scaler) = &mut self.scaler {
            scaler.update(overflow);
        }
        if overflow {
            ensure!(self.scaler.is_some(), "non-finite gradient norm at step {} (loss {loss_value})", self.step);
            self.optimizer.zero_grad();
        } else {
            self.optimizer.step(lr);
        }
        self.step += 1;
        Ok(StepStats { loss: loss_value, lr, grad_norm, skipped: overflow })
    }
}
