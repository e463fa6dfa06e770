//! Control messages of a federation. Every message is one [`Message`] value in one frame.
//!
//! Conversation (site = client, coordinator = server), each on a bidirectional QUIC stream:
//! 1. site → `Hello`; coordinator → `Welcome` (or `Error { kind: VersionMismatch | ... }`).
//! 2. coordinator → `RoundStart`; a site lacking the model with `model_digest` sends
//!    `ModelRequest` and receives the tensors on a separate stream (see `tensor`).
//! 3. site → `UpdateHeader` followed by the tensors on their own stream; coordinator → `Ack`.
//! 4. `Heartbeat` either way; `Admin`/`AdminReply` for the operator's CLI.
//!
//! Field order matters for compatibility: `Hello` is variant 0 and `protocol_version` its first
//! field, so a peer speaking another version is recognised even if the rest of its `Hello`
//! differs (see [`crate::frame::decode_payload`]).

use serde::{Deserialize, Serialize};

/// One class of a site's dataset: a name and the label values in the site's label maps that
/// form it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSpec {
    pub name: String,
    pub labels: Vec<u32>,
}

/// Histogram of CT intensities (HU) of a site's training foreground, bins of 1 HU from
/// `min_hu`; used by the coordinator to derive the global normalization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HuHistogram {
    pub min_hu: i32,
    pub counts: Vec<u64>,
}

/// What a site's optimizer momentum does at a round boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerState {
    /// Momentum buffers carry over from the site's previous round (and survive a restart).
    /// Measured better than `Reset` with short rounds: SGD momentum 0.99 needs ~100 steps to
    /// build up, which a 40-step round that starts empty never reaches.
    #[default]
    Keep,
    /// Every round starts with empty momentum, as a fresh local optimizer (FedAvg).
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

/// The federation plan, fixed for the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub preset: String,
    pub patch: [u32; 3],
    pub spacing: [f32; 3],
    pub rounds: u32,
    pub local_steps: u32,
    pub batch: u32,
    pub lr: f64,
    pub eval_every: u32,
    pub min_sites: u32,
    pub round_deadline_s: u64,
    pub dice_mode: String,
    pub bf16_transport: bool,
    /// FIRENet per-site decoders: each site's decoder stays with it like its heads.
    pub site_decoders: bool,
    pub local: LocalPolicy,
}

/// A class of the global model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalClass {
    /// Output channel index of the class in the global model.
    pub index: u32,
    /// `"<site>/<name>"`.
    pub id: String,
    pub site: String,
    pub name: String,
    pub labels: Vec<u32>,
}

/// Global CT intensity normalization.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub clip_low: f32,
    pub clip_high: f32,
    pub mean: f32,
    pub std: f32,
}

/// Why something was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The site is not (or no longer) allowed in this federation.
    NotAllowed,
    /// A message that is malformed or unexpected at this point of the conversation.
    BadMessage,
    /// An update that failed validation (shape, dtype, finiteness, norm, owner, digest...).
    BadUpdate,
    /// An update for a round that is closed.
    LateUpdate,
    /// The site's class set or dataset summary is unacceptable.
    BadDataset,
    /// Something failed on the sender's side.
    Internal,
}

/// An operator request (coordinator CLI → running coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Progress of the federation.
    Status,
    /// Start (or resume) rounds; `rounds` overrides the plan's total if given.
    Launch { rounds: Option<u32> },
    /// Write the global model (safetensors + JSON) into `dir` on the coordinator's machine.
    Export { dir: String },
    /// Replace the allowlist of site names.
    SetAllowlist { sites: Vec<String> },
}

/// State of one site as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub connected: bool,
    pub allowed: bool,
    pub last_round: Option<u32>,
    pub n_cases: u32,
    pub last_train_loss: Option<f32>,
}

/// Reply to [`AdminRequest::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub federation: String,
    pub current_round: u32,
    pub total_rounds: u32,
    pub running: bool,
    pub model_digest: String,
    pub sites: Vec<SiteStatus>,
    /// Latest per-class validation Dice, by class id.
    pub dice: Vec<(String, f32)>,
}

/// Reply to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminReply {
    Status(StatusReport),
    /// Request done; a human-readable summary (e.g. the export path and digest).
    Done {
        message: String,
    },
    /// Request refused.
    Refused {
        reason: String,
    },
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// site → coordinator, first message. Must stay variant 0 with `protocol_version` first.
    Hello {
        protocol_version: u32,
        site: String,
        classes: Vec<ClassSpec>,
        n_train: u32,
        n_val: u32,
        hu_histogram: HuHistogram,
        device: String,
    },
    /// coordinator → site, reply to `Hello`.
    Welcome {
        federation: String,
        plan: Plan,
        classes: Vec<GlobalClass>,
        normalization: Normalization,
        current_round: u32,
    },
    /// coordinator → site: train one round.
    RoundStart {
        round: u32,
        /// Wire digest of the site's part (backbone, its heads and decoder) of the global model
        /// this round starts from: the set digest its download must carry (the site checks).
        model_digest: String,
        local_steps: u32,
        /// Global step where this round's lr schedule starts.
        step_offset: u64,
        /// Total steps of the whole schedule.
        total_steps: u64,
        /// Whether the site evaluates the global model on its validation cases this round.
        evaluate: bool,
    },
    /// site → coordinator: ask for the model `digest` (sent back on a tensor stream);
    /// `full` asks for every head (export), otherwise backbone + the site's own heads.
    ModelRequest {
        digest: String,
        full: bool,
    },
    /// site → coordinator: an update follows on a tensor stream.
    UpdateHeader {
        round: u32,
        n_cases: u32,
        train_loss: f32,
        /// Per-class validation Dice, by class id (`"<site>/<name>"`); empty when not evaluated.
        dice: Vec<(String, f32)>,
        /// Digest of the tensor payload that follows ([`crate::TensorSet::digest`] of what is sent).
        payload_digest: String,
        /// Named durations of the round's phases in milliseconds (e.g. "download", "train").
        durations_ms: Vec<(String, u64)>,
    },
    /// Acknowledgement of an update (or another request).
    Ack {
        round: u32,
        accepted: bool,
        reason: Option<String>,
    },
    /// A refusal, with a reason naming the offending field.
    Error {
        kind: ErrorKind,
        reason: String,
    },
    /// Liveness.
    Heartbeat,
    Admin(AdminRequest),
    AdminReply(AdminReply),
    /// coordinator → site, reply to a poll (`Heartbeat`) once the last round is complete.
    Finished {
        rounds: u32,
        model_digest: String,
    },
}

impl Message {
    /// A short name of the variant, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::RoundStart { .. } => "RoundStart",
            Message::ModelRequest { .. } => "ModelRequest",
            Message::UpdateHeader { .. } => "UpdateHeader",
            Message::Ack { .. } => "Ack",
            Message::Error { .. } => "Error",
            Message::Heartbeat => "Heartbeat",
            Message::Admin(_) => "Admin",
            Message::AdminReply(_) => "AdminReply",
            Message::Finished { .. } => "Finished",
        }
    }
}
