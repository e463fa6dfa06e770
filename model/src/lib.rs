//! fedtalent's scientific core: the MultiTalent networks (a generic 3D U-Net builder with the
//! paper's presets), the per-class heads the federation moves around, the masked BCE + Dice loss,
//! the training step (SGD Nesterov, poly lr, clipping, mixed precision) and model files.

mod blocks;
pub mod firenet;
pub mod infer;
pub mod io;
pub mod loss;
pub mod manifest;
pub mod metrics;
pub mod network;
mod nnunet;
pub mod nnunet_import;
pub mod noise;
pub mod optim;
pub mod params;
pub mod postprocess;
pub mod predict;
mod routing;
pub mod topology;
pub mod torch_pickle;
pub mod train;
pub mod wire;

pub use loss::{BatchTargets, ClassRegions, DiceMode, MultiTalentLoss};
pub use manifest::ModelManifest;
pub use network::MultiTalentNet;
pub use topology::{FireNetSpec, Layout, Stage, Topology};
