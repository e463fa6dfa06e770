//! The vocabulary every fedtalent crate speaks: one type per concept, defined here once and
//! embedded as-is in the wire messages (`fedtalent-protocol`), the checkpoints and `model.json`
//! (`fedtalent-model`, the coordinator) and the site's data pipeline (`fedtalent-data`).
//!
//! * [`channels`]: the network's input channels ([`InputChannels`]) and the normalization each
//!   channel name selects ([`NormalizationScheme`], nnU-Net v2's mapping).
//! * [`class`]: a site's class as a label region ([`ClassRegion`]), a class of the global model
//!   ([`GlobalClass`]) and its id `<site>/<name>` ([`class_id`], [`parse_class_id`]).
//! * [`norm`]: the CT normalization ([`CtNormalization`]) and the paper's fixed values.
//! * [`histogram`]: the foreground HU histogram a site shares ([`HuHistogram`]) and the CT
//!   statistics derived from merged ones.
//! * [`plan`]: the federation plan ([`Plan`], `[plan]` of `federation.toml`), which every site
//!   receives in `Welcome`, with its policies and modes as enums.
//! * [`privacy`]: `[plan.privacy]`, client-level differential privacy ([`Privacy`]) and its
//!   accountant.
//!
//! Only serde and thiserror: the data crate depends on this without pulling in QUIC or torch.

pub mod channels;
pub mod class;
pub mod histogram;
pub mod norm;
pub mod plan;
pub mod privacy;

pub use channels::{ChannelMismatch, InputChannel, InputChannels, NormalizationScheme};
pub use class::{class_id, parse_class_id, ClassRegion, GlobalClass};
pub use histogram::{HistogramError, HuHistogram, HU_RANGE, MAX_VOXELS};
pub use norm::CtNormalization;
pub use plan::{
    DiceMode, InitNormalization, LocalOptimizer, LocalPolicy, OptimizerState, Plan, ServerOptimizer, Transport,
};
pub use privacy::{NoiseAt, Privacy};

/// ALPN protocol identifier of the federation protocol (TLS), `fedtalent/1`: the coordinator
/// offers only this one and a site asks for only this one.
pub const ALPN: &[u8] = b"fedtalent/1";
