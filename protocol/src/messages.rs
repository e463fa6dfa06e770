//! Control messages of a federation. Every message is one [`Message`] value in one frame.
//!
//! Conversation (site = client, coordinator = server), each on a bidirectional QUIC stream:
//! 1. site → [`Hello`]; coordinator → [`Welcome`] (or `Error(Refusal { kind: VersionMismatch | ... })`).
//! 2. site → `Heartbeat` (a long poll); coordinator → [`RoundStart`] | `Heartbeat` | [`Finished`].
//!    A site lacking the model with `model_digest` sends [`ModelRequest`] and receives the
//!    tensors on the same stream (see `tensor`).
//!    After a cut download, the request says what the site [`Held`] of it; the stream carries
//!    only the rest.
//! 3. site → [`UpdateHeader`] followed by the tensors on the same stream; coordinator → [`Ack`].
//!    Re-sending an update whose upload was cut, the site sets `resume`: the coordinator first
//!    answers [`Message::Resume`] (what it kept of that update), then the site streams the rest.
//! 4. `Admin`/`AdminReply` for the operator's CLI.
//!
//! With `[plan.privacy].secure_aggregation`, a round's `RoundStart` carries the site's
//! [`SecAggRound`], and the site's part of the round is: [`SecAggRequest`] `Keys` (answered
//! [`SecAggReply::Peers`] once every site advertised or the stage timed out), `Shares`
//! (answered `Relayed`: the ciphertexts addressed to it), local training, the update with the
//! masked backbone as one `I32` tensor [`MASKED_BACKBONE`] instead of the backbone tensors
//! (heads and decoders unmasked), `UnmaskPoll` (answered `Unmasking` once the round's inputs are
//! in) and `Unmask` (answered `Accepted`). A stage that cannot go on is answered
//! `Error(Refusal)`: the site drops out of the round and polls for the next.
//!
//! Each variant wraps a named struct, so that both sides pass the payload around as one value
//! instead of re-declaring its fields. The vocabulary inside (classes, histograms, the plan, the
//! normalization) is `fedtalent-vocab`'s, embedded as is.
//!
//! Field order matters for compatibility: `Hello` is variant 0 and `protocol_version` its first
//! field, so a peer speaking another version is recognised even if the rest of its `Hello`
//! differs (see [`crate::frame::decode_payload`]). bincode encodes a variant wrapping a struct
//! exactly as a variant with those fields inline.

use serde::{Deserialize, Serialize};

pub use crate::tensor::Held;

pub use fedtalent_secagg::{AdvertiseKeys, EncryptedShare, UnmaskShares};
pub use fedtalent_vocab::{
    ClassRegion, CtNormalization, DiceMode, GlobalClass, HuHistogram, InputChannels, LocalPolicy, OptimizerState, Plan,
    ServerOptimizer,
};

/// site → coordinator, first message of a connection: who the site is and what it trains on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field (see the module doc).
    pub protocol_version: u32,
    pub site: String,
    pub classes: Vec<ClassRegion>,
    pub n_train: u32,
    pub n_val: u32,
    pub hu_histogram: HuHistogram,
    pub device: String,
    /// The input channels its dataset declares, which must be the federation's.
    pub channels: InputChannels,
    /// Its classes are mutually exclusive and trained as one softmax
    /// (`[site].exclusive_classes`): every model of the federation predicts them by argmax.
    pub exclusive_classes: bool,
}

/// coordinator → site, reply to [`Hello`]: what registration fixed for the whole federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub federation: String,
    pub plan: Plan,
    pub classes: Vec<GlobalClass>,
    pub normalization: CtNormalization,
    /// Rounds completed so far.
    pub current_round: u32,
}

/// coordinator → site: train one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStart {
    pub round: u32,
    /// Wire digest of the site's part (backbone, its heads and decoder) of the global model
    /// this round starts from: the set digest its download must carry (the site checks).
    pub model_digest: String,
    pub local_steps: u32,
    /// Global step where this round's lr schedule starts.
    pub step_offset: u64,
    /// Total steps of the whole schedule.
    pub total_steps: u64,
    /// Whether the site evaluates the global model on its validation cases this round.
    pub evaluate: bool,
    /// With secure aggregation: the site's part in the round's protocol.
    pub secagg: Option<SecAggRound>,
}

/// A site's id and the threshold of a round's secure aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggRound {
    /// Its Shamir evaluation point, 1-based.
    pub id: u32,
    pub threshold: u32,
}

/// The name of the masked backbone in a secure-aggregation update: every backbone tensor
/// flattened in the model's order, encoded and masked, as one `I32` tensor (Z_2^32 words).
pub const MASKED_BACKBONE: &str = "secagg/masked_backbone";

/// site → coordinator: one stage of a round's secure aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggRequest {
    pub round: u32,
    pub stage: SecAggStage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecAggStage {
    /// Stage 0: its public keys.
    Keys(AdvertiseKeys),
    /// Stage 1: its shares, one encrypted to each other site.
    Shares(Vec<EncryptedShare>),
    /// Before stage 3: which sites survived (answered once the round's inputs are in).
    UnmaskPoll,
    /// Stage 3: its shares of the survivors' seeds and the dropped sites' keys.
    Unmask(UnmaskShares),
}

/// coordinator → site: the answer to a [`SecAggRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecAggReply {
    /// Every advertised site's keys (U1).
    Peers(Vec<AdvertiseKeys>),
    /// The ciphertexts addressed to the site.
    Relayed(Vec<EncryptedShare>),
    /// The sites whose masked input counts, and those that shared keys but sent none.
    Unmasking {
        survivors: Vec<u32>,
        dropped: Vec<u32>,
    },
    Accepted,
}

/// site → coordinator: ask for the model `digest` (sent back on the same stream); `full` asks
/// for every head (export, the operator only), otherwise backbone + the site's own heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRequest {
    pub digest: String,
    pub full: bool,
    /// What the site kept of an earlier, cut download of `digest` (empty: send everything).
    pub held: Held,
}

/// How long a site spent on each phase of a round, in milliseconds. The metrics log writes it
/// as `"durations_ms": {"download": .., "evaluate": .., "train": ..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseTimings {
    /// Fetching the round's global model (0 when the site already held it).
    pub download: u64,
    /// Evaluating the global model on the site's validation cases (0 when not asked to).
    pub evaluate: u64,
    /// Local training.
    pub train: u64,
}

impl PhaseTimings {
    /// The longest phase.
    pub fn max(&self) -> u64 {
        self.download.max(self.evaluate).max(self.train)
    }
}

/// site → coordinator: an update follows on the same stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    pub round: u32,
    pub n_cases: u32,
    pub train_loss: f32,
    /// Per-class validation Dice, by class id (`"<site>/<name>"`); empty when not evaluated.
    pub dice: Vec<(String, f32)>,
    /// Digest of the tensor payload that follows ([`crate::TensorSet::digest`] of what is sent).
    pub payload_digest: String,
    pub durations_ms: PhaseTimings,
    /// The same update (`payload_digest`) was cut in transit before: the coordinator answers
    /// [`Message::Resume`] with what it kept before the payload follows.
    pub resume: bool,
}

/// A refusal: what kind, and a reason naming the site and the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {reason}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub reason: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        Refusal { kind, reason: reason.into() }
    }

    /// Whether retrying cannot help: the site is not wanted, speaks another version, or its
    /// dataset does not fit the federation.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, ErrorKind::NotAllowed | ErrorKind::VersionMismatch | ErrorKind::BadDataset)
    }
}

/// coordinator → site: the answer to an [`UpdateHeader`] and its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub round: u32,
    /// `None`: the update counts in the round.
    pub refusal: Option<Refusal>,
}

/// coordinator → site, reply to a poll once the last round is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub rounds: u32,
    pub model_digest: String,
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
    /// The transport of its open connection (the newest, if several).
    pub transport: Option<crate::ConnKind>,
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
    /// Must stay variant 0 (see the module doc).
    Hello(Hello),
    Welcome(Welcome),
    RoundStart(RoundStart),
    ModelRequest(ModelRequest),
    UpdateHeader(UpdateHeader),
    Ack(Ack),
    /// A request refused as a whole.
    Error(Refusal),
    /// Liveness, and a site's long poll for work.
    Heartbeat,
    Admin(AdminRequest),
    AdminReply(AdminReply),
    Finished(Finished),
    SecAgg(SecAggRequest),
    SecAggReply(SecAggReply),
    /// coordinator → site, to an [`UpdateHeader`] with `resume`: send the payload, each tensor
    /// from where this says the coordinator's kept copy ends.
    Resume(Held),
}

impl Message {
    /// A short name of the variant, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::RoundStart(_) => "RoundStart",
            Message::ModelRequest(_) => "ModelRequest",
            Message::UpdateHeader(_) => "UpdateHeader",
            Message::Ack(_) => "Ack",
            Message::Error(_) => "Error",
            Message::Heartbeat => "Heartbeat",
            Message::Admin(_) => "Admin",
            Message::AdminReply(_) => "AdminReply",
            Message::Finished(_) => "Finished",
            Message::SecAgg(_) => "SecAgg",
            Message::SecAggReply(_) => "SecAggReply",
            Message::Resume(_) => "Resume",
        }
    }

    /// A refusal of `kind` with `reason`.
    pub fn refusal(kind: ErrorKind, reason: impl Into<String>) -> Message {
        Message::Error(Refusal::new(kind, reason))
    }
}
