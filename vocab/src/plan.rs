//! The federation plan: `[plan]` of `federation.toml`, fixed for the whole run and sent to every
//! site in `Welcome` as it was read (one type, no copy).

use serde::{Deserialize, Serialize};

/// The federation plan, fixed for the whole run. The patch and spacing are the preset's
/// (`Topology::preset`), so they are not repeated here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Network preset (`Topology::preset`): unet, resenc, tiny, firenet, firenet-tiny.
    pub preset: String,
    pub rounds: u32,
    pub local_steps: u32,
    pub batch: u32,
    /// The local optimizer's base learning rate (the poly schedule's start); absent: the
    /// optimizer's own default ([`LocalOptimizer::default_lr`]). Read it with [`Plan::local_lr`].
    #[serde(default)]
    pub lr: Option<f64>,
    /// The sites' local optimizer: `sgd` (MultiTalent / nnU-Net, the default) or `adam` (FIRENet).
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    pub eval_every: u32,
    pub min_sites: u32,
    pub round_deadline_s: u64,
    #[serde(default)]
    pub dice_mode: DiceMode,
    /// How model tensors travel both ways; `bf16_transport = true | false` in the TOML.
    #[serde(default, rename = "bf16_transport", with = "bf16_flag")]
    pub transport: Transport,
    /// Updates whose backbone moved farther than this (L2 over all backbone tensors) from the
    /// round's global backbone are refused.
    #[serde(default = "default_max_update_norm")]
    pub max_update_norm: f64,
    /// One decoder per site, kept by its owner like its heads (only the encoder, and FIRENet's
    /// fabric module, are averaged): FIRENet's multi-decoder mode, for every preset.
    #[serde(default)]
    pub per_site_decoders: bool,
    /// With `per_site_decoders`: the deepest encoder stages each site also keeps as its own, in
    /// front of its decoder (0: the whole encoder is averaged).
    #[serde(default)]
    pub site_encoder_stages: u32,
    /// `[plan.local]`: the sites' round-boundary policy.
    #[serde(default)]
    pub local: LocalPolicy,
    /// `[plan.server]`: how the coordinator applies the sites' mean backbone change.
    #[serde(default)]
    pub server: ServerOptimizer,
    /// An exported model folder the federation starts from instead of a fresh network
    /// (`coordinator export`, `site-agent train`, `site-agent import-nnunet`): its backbone
    /// (and decoders), and the heads of the classes that continue, matched by class id; new
    /// classes get fresh heads. Relative to the config file.
    #[serde(default)]
    pub init_model: Option<std::path::PathBuf>,
    /// With `init_model`: whose CT normalization the federation uses.
    #[serde(default)]
    pub init_normalization: InitNormalization,
    /// The network's input channels in order, each with its normalization (`input_channels =
    /// [{ name = "T2", normalization = "zscore" }, ...]`); every site's dataset must declare the
    /// same. Absent: one CT channel.
    #[serde(default)]
    pub input_channels: crate::InputChannels,
    /// `[plan.privacy]`: client-level differential privacy of the backbone (absent: none).
    /// (No `skip_serializing_if`: the plan also travels as bincode, which needs every field.)
    #[serde(default)]
    pub privacy: Option<crate::Privacy>,
}

/// `[plan].init_normalization`: the CT normalization of a federation that starts from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitNormalization {
    /// The model's: its features were learned on intensities normalized so.
    #[default]
    Model,
    /// Recomputed from the sites' foreground histograms, as for a fresh network.
    Sites,
}

fn default_max_update_norm() -> f64 {
    1.0e4
}

impl Plan {
    /// A plan of `rounds` rounds of `local_steps` steps of `preset`, the rest at small values:
    /// batch 2, SGD at lr 0.01, evaluated every round, one site enough for a round, a one-hour deadline,
    /// and every optional key (`dice_mode` … `privacy`) at its default, as if left out of the
    /// TOML. For tests and programs that write a plan; an operator's starts from `coordinator
    /// init`'s template.
    pub fn new(preset: impl Into<String>, rounds: u32, local_steps: u32) -> Self {
        Plan {
            preset: preset.into(),
            rounds,
            local_steps,
            batch: 2,
            lr: None,
            optimizer: LocalOptimizer::default(),
            eval_every: 1,
            min_sites: 1,
            round_deadline_s: 3600,
            dice_mode: DiceMode::default(),
            transport: Transport::default(),
            max_update_norm: default_max_update_norm(),
            per_site_decoders: false,
            site_encoder_stages: 0,
            local: LocalPolicy::default(),
            server: ServerOptimizer::default(),
            init_model: None,
            init_normalization: InitNormalization::default(),
            input_channels: crate::InputChannels::ct(),
            privacy: None,
        }
    }

    /// The rounds the federation runs: all of `rounds`, or fewer where `[plan.privacy]`'s ε
    /// budget would be exceeded first.
    pub fn rounds_to_run(&self) -> u32 {
        self.privacy.map_or(self.rounds, |p| p.rounds_within_budget(self.rounds))
    }

    /// The local optimizer's base learning rate: `lr` where the plan sets it, else the
    /// optimizer's default.
    pub fn local_lr(&self) -> f64 {
        self.lr.unwrap_or(self.optimizer.default_lr())
    }

    /// Local steps of the whole federation: the length of the lr schedule.
    pub fn total_steps(&self) -> u64 {
        self.rounds as u64 * self.local_steps as u64
    }

    /// Global step where `round`'s (1-based) lr schedule starts.
    pub fn step_offset(&self, round: u32) -> u64 {
        (round as u64).saturating_sub(1) * self.local_steps as u64
    }

    /// Whether the sites evaluate the global model at the start of `round`: every `eval_every`
    /// rounds from the first, and in the last round (the final model's predecessor).
    pub fn evaluates(&self, round: u32) -> bool {
        round.saturating_sub(1).is_multiple_of(self.eval_every.max(1)) || round == self.rounds_to_run()
    }
}

/// `bf16_transport = <bool>` in the TOML, a [`Transport`] in the program.
mod bf16_flag {
    use super::Transport;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Transport, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*t == Transport::Bf16)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Transport, D::Error> {
        Ok(if bool::deserialize(d)? { Transport::Bf16 } else { Transport::Native })
    }
}

/// How f32 tensors travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Transport {
    /// As they are.
    #[default]
    Native,
    /// f32 tensors are rounded to bf16 (round-to-nearest-even) for the wire and widened back to
    /// f32 on receipt; other dtypes travel as they are. Halves the traffic of an f32 model.
    Bf16,
}

/// How the Dice term pools soft TP/FP/FN (DESIGN.md §1.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiceMode {
    /// Pooled over the whole batch per class (the paper's "batch Dice").
    #[default]
    Batch,
    /// Pooled per sample and summed over samples (the public code on one GPU).
    PerSample,
}

/// `[plan].optimizer`: the update rule of every site's local training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LocalOptimizer {
    /// SGD, momentum 0.99, Nesterov, weight decay 3e-5 (MultiTalent, nnU-Net; DESIGN.md §1.4).
    #[default]
    Sgd,
    /// Adam, betas (0.9, 0.999), eps 1e-8, L2 weight decay 3e-5 as `torch.optim.Adam` (FIRENet).
    Adam,
}

impl LocalOptimizer {
    /// The base learning rate when the plan sets none: nnU-Net's 0.01 for SGD; for Adam 3e-4,
    /// nnU-Net's own Adam trainer's (FIRENet's paper, as far as we could find, states no value).
    pub fn default_lr(self) -> f64 {
        match self {
            LocalOptimizer::Sgd => 0.01,
            LocalOptimizer::Adam => 3e-4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LocalOptimizer::Sgd => "sgd",
            LocalOptimizer::Adam => "adam",
        }
    }
}

impl std::str::FromStr for LocalOptimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(LocalOptimizer::Sgd),
            "adam" => Ok(LocalOptimizer::Adam),
            other => Err(format!("unknown optimizer {other:?} (sgd | adam)")),
        }
    }
}

/// What a site's optimizer state (SGD's momentum, Adam's moments) does at a round boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerState {
    /// The optimizer state carries over from the site's previous round (and survives a restart).
    /// Measured better than `Reset` with short rounds: SGD momentum 0.99 needs ~100 steps to
    /// build up, which a 40-step round that starts empty never reaches.
    #[default]
    Keep,
    /// Every round starts with an empty state, as a fresh local optimizer (FedAvg).
    Reset,
}

impl OptimizerState {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerState::Keep => "keep",
            OptimizerState::Reset => "reset",
        }
    }
}

impl std::str::FromStr for OptimizerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(OptimizerState::Keep),
            "reset" => Ok(OptimizerState::Reset),
            other => Err(format!("unknown optimizer state policy {other:?} (keep | reset)")),
        }
    }
}

/// How a site trains within a round besides the step budget (DESIGN.md §2.1 step 2). The
/// defaults are the better of the policies `scripts/quality_bench.sh` compared (see the README).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalPolicy {
    pub optimizer_state: OptimizerState,
    /// Heads-only steps on the freshly downloaded global backbone before the round's local
    /// steps: re-fits the site's heads to the averaged backbone (MultiTalent's fine-tuning
    /// trains heads first for the same reason). Not counted in the lr schedule.
    pub head_warmup_steps: u32,
    /// The last round trains the heads alone on the final global backbone, so that the
    /// exported model pairs that backbone with heads fitted to it (otherwise each site's heads
    /// fit its own drifted backbone, which the final average replaces).
    pub final_heads_only: bool,
}

impl Default for LocalPolicy {
    fn default() -> Self {
        LocalPolicy { optimizer_state: OptimizerState::Keep, head_warmup_steps: 0, final_heads_only: false }
    }
}

/// `[plan.server]`: the coordinator's optimizer over the backbone (Flower's FedAvgM, Hsu et
/// al. 2019). The sqrt(n)-weighted mean of the sites' backbone changes Δ is a pseudo-gradient:
/// `v ← momentum · v + Δ`, `backbone ← backbone + lr · v`. `lr = 1, momentum = 0` is FedAvg (the
/// global backbone becomes the sites' weighted mean). Heads are never touched: each class keeps
/// its owner's upload.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerOptimizer {
    #[serde(default = "ServerOptimizer::default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
}

impl ServerOptimizer {
    fn default_lr() -> f64 {
        Self::default().lr
    }

    /// FedAvg: no server-side state.
    pub fn is_plain_average(&self) -> bool {
        self.lr == 1.0 && self.momentum == 0.0
    }
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self { lr: 1.0, momentum: 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rounds: u32, local_steps: u32, eval_every: u32) -> Plan {
        Plan { eval_every, ..Plan::new("tiny", rounds, local_steps) }
    }

    #[test]
    fn the_schedule_and_evaluation_rounds_follow_the_plan() {
        let p = plan(5, 10, 2);
        assert_eq!(p.total_steps(), 50);
        assert_eq!(p.local_lr(), 0.01);
        let adam = Plan { optimizer: LocalOptimizer::Adam, ..plan(5, 10, 2) };
        assert_eq!(adam.local_lr(), 3e-4);
        assert_eq!(Plan { lr: Some(1e-3), ..adam }.local_lr(), 1e-3);
        assert_eq!([1, 2, 5].map(|r| p.step_offset(r)), [0, 10, 40]);
        // Rounds 1, 3, 5 (every second from the first), and 5 is also the last.
        assert_eq!((1..=5).map(|r| p.evaluates(r)).collect::<Vec<_>>(), [true, false, true, false, true]);
        let p = plan(4, 10, 3);
        assert_eq!((1..=4).map(|r| p.evaluates(r)).collect::<Vec<_>>(), [true, false, false, true]);
    }
}
