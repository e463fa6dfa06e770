//! Network topologies as data: the paper's two CNNs (`unet`, `resenc`) and a `tiny` one for CPU.
//!
//! The builder in [`crate::network`] is generic over this description; a preset is a value of
//! [`Topology`], never a code path. The [`Layout`] picks the block type and the nnU-Net v1 state-dict
//! naming scheme that a PyTorch user needs to load our files into nnU-Net's own classes.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Which nnU-Net v1 network family the topology reproduces (block structure and tensor names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `Generic_UNet`: plain conv-IN-LReLU stacks, conv bias, heads without bias.
    GenericUnet,
    /// `FabiansUNet`: stem + residual encoder blocks, no conv bias, one decoder conv per level,
    /// heads with bias.
    ResidualEncoder,
    /// FIRENet (fabric image representation encoding network): residual encoder, fabric
    /// representation module (FRM) at the bottleneck, sum skips; see [`crate::firenet`]. Its
    /// hyper-parameters are in [`Topology::firenet`].
    #[serde(rename = "firenet")]
    FireNet,
}

/// FIRENet's hyper-parameters (the paper publishes no values; these defaults are ours).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FireNetSpec {
    /// B: FRM branches; branch b (1-based) works at 1/2^(b-1) of the bottleneck resolution with
    /// 2^(b-1) times the bottleneck width.
    pub branches: usize,
    /// N: FRM nodes per branch.
    pub nodes: usize,
    /// Dilations of ASPP3D's parallel 3x3x3 convolutions.
    pub dilations: Vec<i64>,
}

impl Default for FireNetSpec {
    /// Our defaults: B = 3, N = 3, dilations 1, 2, 4.
    fn default() -> Self {
        Self { branches: 3, nodes: 3, dilations: vec![1, 2, 4] }
    }
}

/// One resolution stage of the encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Output channels of the stage.
    pub width: i64,
    /// Stride (z, y, x) of the stage's first convolution; the decoder upsamples by the same factor.
    pub stride: [i64; 3],
    /// Kernel size (z, y, x) of every convolution of the stage (and of its decoder level).
    pub kernel: [i64; 3],
    /// Plain layout: convolutions in the stage. Residual layout: residual blocks in the stage.
    pub depth: usize,
}

/// A complete description of a MultiTalent network, minus the class count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub name: String,
    pub layout: Layout,
    pub in_channels: i64,
    pub stages: Vec<Stage>,
    /// Convolutions per decoder level (2 for Generic_UNet, 1 for FabiansUNet).
    pub decoder_convs: usize,
    /// Deep-supervision loss weights, full resolution first, one per decoder level.
    pub ds_weights: Vec<f64>,
    /// Training patch (z, y, x) in voxels.
    pub patch: [i64; 3],
    /// Target spacing (z, y, x) in mm.
    pub spacing: [f64; 3],
    /// FIRENet hyper-parameters; `Some` exactly when `layout` is [`Layout::FireNet`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firenet: Option<FireNetSpec>,
    /// Per-site decoders (FIRENet's multi-decoder mode, for every layout): the class indices of
    /// each site, a partition of `0..classes`; site s's classes read the features of decoder s.
    /// Empty: one decoder shared by every class. In a federation each site trains and keeps its
    /// own decoder like its heads, so the features only its classes need are not averaged away.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site_decoders: Vec<Vec<i64>>,
    /// With per-site decoders: how many of the deepest encoder stages each site has of its own,
    /// in front of its decoder (personalised upper layers, as LG-FedAvg keeps its upper layers
    /// local): the shallow stages, whose features every site's images share, are averaged; the
    /// deep, semantic ones are trained and kept by their site like its decoder. 0: the whole
    /// encoder is shared.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub site_encoder_stages: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Topology {
    /// Number of decoder levels = number of head levels = number of deep-supervision outputs.
    /// FIRENet has one more: its FRM output at the bottleneck resolution carries heads too.
    pub fn levels(&self) -> usize {
        match self.layout {
            Layout::FireNet => self.stages.len(),
            _ => self.stages.len() - 1,
        }
    }

    /// This topology taking `channels` input channels (a preset takes one).
    pub fn with_in_channels(mut self, channels: usize) -> Topology {
        self.in_channels = channels as i64;
        self
    }

    /// This topology with one decoder per site (`sites[s]`: the class indices of site s,
    /// together a partition of the network's classes; checked when the network is built).
    pub fn with_site_decoders(mut self, sites: Vec<Vec<i64>>) -> Topology {
        self.site_decoders = sites;
        self
    }

    /// This topology with the deepest `stages` encoder stages per site (see
    /// [`Topology::site_encoder_stages`]; needs per-site decoders, checked by `validate`).
    pub fn with_site_encoder_stages(mut self, stages: usize) -> Topology {
        self.site_encoder_stages = stages;
        self
    }

    /// Total downsampling factor per axis; a patch must be divisible by it.
    pub fn total_stride(&self) -> [i64; 3] {
        let mut total = [1i64; 3];
        for stage in &self.stages {
            for (t, s) in total.iter_mut().zip(stage.stride) {
                *t *= s;
            }
        }
        total
    }

    /// Width of decoder level `level` (0 = full resolution).
    pub fn level_width(&self, level: usize) -> i64 {
        self.stages[level].width
    }

    /// Looks a preset up by name.
    pub fn preset(name: &str) -> anyhow::Result<Topology> {
        match name {
            "unet" => Ok(unet()),
            "resenc" => Ok(resenc()),
            "tiny" => Ok(tiny()),
            "small" => Ok(small()),
            "firenet" => Ok(firenet()),
            "firenet-tiny" => Ok(firenet_tiny()),
            other => {
                anyhow::bail!("unknown preset {other:?} (known: unet, resenc, tiny, small, firenet, firenet-tiny)")
            }
        }
    }

    /// Checks the invariants the builder relies on, naming the offending field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.stages.len() >= 2, "topology {}: needs at least 2 stages", self.name);
        anyhow::ensure!(
            self.ds_weights.len() == self.levels(),
            "topology {}: ds_weights has {} entries, expected one per decoder level ({})",
            self.name,
            self.ds_weights.len(),
            self.levels()
        );
        for (i, stage) in self.stages.iter().enumerate() {
            anyhow::ensure!(stage.width > 0 && stage.depth > 0, "topology {}: stage {i} is empty", self.name);
            anyhow::ensure!(
                stage.kernel.iter().all(|k| k % 2 == 1),
                "topology {}: stage {i} kernel {:?} must be odd",
                self.name,
                stage.kernel
            );
        }
        self.validate_site_encoder_stages()?;
        if self.layout == Layout::FireNet {
            return self.validate_firenet();
        }
        anyhow::ensure!(
            self.firenet.is_none(),
            "topology {}: firenet parameters on a {:?} layout",
            self.name,
            self.layout
        );
        let total = self.total_stride();
        for axis in 0..3 {
            anyhow::ensure!(
                self.patch[axis] % total[axis] == 0,
                "topology {}: patch {:?} is not divisible by the total stride {:?}",
                self.name,
                self.patch,
                total
            );
        }
        Ok(())
    }
}

impl Topology {
    fn validate_site_encoder_stages(&self) -> anyhow::Result<()> {
        let k = self.site_encoder_stages;
        if k == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            !self.site_decoders.is_empty(),
            "topology {}: site_encoder_stages = {k} needs per-site decoders (the stages lie in front of them)",
            self.name
        );
        anyhow::ensure!(
            self.layout != Layout::FireNet,
            "topology {}: site_encoder_stages is not available for the FireNet layout (its fabric module is the \
             shared part)",
            self.name
        );
        anyhow::ensure!(
            k < self.stages.len(),
            "topology {}: site_encoder_stages = {k}, but the encoder has {} stages and its first stays shared",
            self.name,
            self.stages.len()
        );
        Ok(())
    }

    /// FIRENet needs no fixed patch (every resampling is to an explicit size), so only the
    /// structure is checked.
    fn validate_firenet(&self) -> anyhow::Result<()> {
        let spec = self
            .firenet
            .as_ref()
            .with_context(|| format!("topology {}: firenet layout without firenet parameters", self.name))?;
        anyhow::ensure!(
            spec.branches >= 1 && spec.nodes >= 1,
            "topology {}: firenet needs B >= 1 and N >= 1",
            self.name
        );
        anyhow::ensure!(
            !spec.dilations.is_empty() && spec.dilations.iter().all(|&d| d >= 1),
            "topology {}: firenet dilations {:?} must be >= 1",
            self.name,
            spec.dilations
        );
        anyhow::ensure!(
            self.stages[0].stride == [1; 3],
            "topology {}: the firenet stem (stage 0) must keep the resolution",
            self.name
        );
        anyhow::ensure!(
            self.decoder_convs >= 1,
            "topology {}: firenet needs >= 1 residual block per decoder level",
            self.name
        );
        Ok(())
    }
}

fn stage(width: i64, stride: [i64; 3], kernel: [i64; 3], depth: usize) -> Stage {
    Stage { width, stride, kernel, depth }
}

/// nnU-Net v1's weights: 1/2^i, the lowest-resolution output masked to 0, normalized.
fn nnunet_v1_ds_weights(levels: usize, mask_lowest: bool) -> Vec<f64> {
    let mut w: Vec<f64> = (0..levels).map(|i| 0.5f64.powi(i as i32)).collect();
    if mask_lowest && levels > 1 {
        w[levels - 1] = 0.0;
    }
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

const K3: [i64; 3] = [3, 3, 3];

/// MultiTalent's plain 3D U-Net (nnU-Net v1 `Generic_UNet` layout).
pub fn unet() -> Topology {
    Topology {
        name: "unet".into(),
        layout: Layout::GenericUnet,
        in_channels: 1,
        stages: vec![
            stage(30, [1, 1, 1], K3, 2),
            stage(60, [2, 2, 2], K3, 2),
            stage(120, [2, 2, 2], K3, 2),
            stage(240, [2, 2, 2], K3, 2),
            stage(320, [2, 2, 2], K3, 2),
            stage(320, [1, 2, 2], K3, 2),
        ],
        decoder_convs: 2,
        ds_weights: nnunet_v1_ds_weights(5, true),
        patch: [96, 192, 192],
        spacing: [1.5, 1.0, 1.0],
        firenet: None,
        site_decoders: Vec::new(),
        site_encoder_stages: 0,
    }
}

/// MultiTalent's residual-encoder U-Net (nnU-Net v1 `FabiansUNet` layout).
pub fn resenc() -> Topology {
    Topology {
        name: "resenc".into(),
        layout: Layout::ResidualEncoder,
        in_channels: 1,
        stages: vec![
            stage(30, [1, 1, 1], [1, 3, 3], 1),
            stage(60, [1, 2, 2], K3, 2),
            stage(120, [2, 2, 2], K3, 3),
            stage(240, [2, 2, 2], K3, 4),
            stage(320, [2, 2, 2], K3, 4),
            stage(320, [2, 2, 2], K3, 4),
        ],
        decoder_convs: 1,
        ds_weights: nnunet_v1_ds_weights(5, false),
        patch: [96, 192, 192],
        spacing: [1.5, 1.0, 1.0],
        firenet: None,
        site_decoders: Vec::new(),
        site_encoder_stages: 0,
    }
}

/// A small `Generic_UNet`-layout network for CPU tests and the demo.
pub fn tiny() -> Topology {
    Topology {
        name: "tiny".into(),
        layout: Layout::GenericUnet,
        in_channels: 1,
        stages: vec![
            stage(8, [1, 1, 1], K3, 2),
            stage(16, [2, 2, 2], K3, 2),
            stage(32, [2, 2, 2], K3, 2),
            stage(48, [1, 2, 2], K3, 2),
        ],
        decoder_convs: 2,
        ds_weights: nnunet_v1_ds_weights(3, true),
        patch: [16, 48, 48],
        spacing: [5.0, 4.0, 4.0],
        firenet: None,
        site_decoders: Vec::new(),
        site_encoder_stages: 0,
    }
}

/// `tiny` at twice its widths (16..96 features): the CPU preset of the demo and the quality
/// benchmark. One encoder serves every site's classes there, and tiny's 8..48 features were too
/// few for them: at the same 1,000 steps per site the federation's held-out Dice rose from 0.57
/// (tiny) to 0.79 (small), for 1.5x the CPU time per step (README, Benchmarks).
pub fn small() -> Topology {
    let mut topo = tiny();
    topo.name = "small".into();
    for stage in &mut topo.stages {
        stage.width *= 2;
    }
    topo
}

/// FIRENet: a full-resolution stem (ours), two residual blocks of 32 and 64 filters each
/// downsampling by 2 (the paper's), the FRM with B = 3, N = 3 (ours) at 1/4 resolution, a mirrored
/// decoder. Deep supervision on the full-resolution output, the intermediate decoder block and the
/// FRM, equally weighted (the paper sums the three losses; we scale the sum to 1 like the other
/// presets so the same lr and clipping apply).
pub fn firenet() -> Topology {
    Topology {
        name: "firenet".into(),
        layout: Layout::FireNet,
        in_channels: 1,
        stages: vec![stage(32, [1, 1, 1], K3, 1), stage(32, [2, 2, 2], K3, 1), stage(64, [2, 2, 2], K3, 1)],
        decoder_convs: 1,
        ds_weights: vec![1.0 / 3.0; 3],
        patch: [96, 192, 192],
        spacing: [1.5, 1.0, 1.0],
        firenet: Some(FireNetSpec::default()),
        site_decoders: Vec::new(),
        site_encoder_stages: 0,
    }
}

/// `firenet` with small widths (8, 8, 16; FRM branches 16, 32, 64) and N = 2 for CPU tests and
/// the demo.
pub fn firenet_tiny() -> Topology {
    Topology {
        firenet: Some(FireNetSpec { nodes: 2, ..FireNetSpec::default() }),
        name: "firenet-tiny".into(),
        stages: vec![stage(8, [1, 1, 1], K3, 1), stage(8, [2, 2, 2], K3, 1), stage(16, [2, 2, 2], K3, 1)],
        patch: [16, 48, 48],
        spacing: [5.0, 4.0, 4.0],
        ..firenet()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_deep_supervision_weights() {
        let unet = unet().ds_weights;
        let expected: Vec<f64> = [8.0, 4.0, 2.0, 1.0, 0.0].iter().map(|x| x / 15.0).collect();
        assert_eq!(unet.len(), 5);
        for (a, b) in unet.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-12);
        }
        let resenc = resenc().ds_weights;
        for (a, b) in resenc.iter().zip([16.0, 8.0, 4.0, 2.0, 1.0]) {
            assert!((a - b / 31.0).abs() < 1e-12);
        }
    }

    #[test]
    fn presets_validate_and_bad_patch_is_named() {
        for p in ["unet", "resenc", "tiny", "small", "firenet", "firenet-tiny"] {
            Topology::preset(p).unwrap().validate().unwrap();
        }
        // `small` is `tiny` at twice the widths: same depth, strides, patch and spacing.
        let (wide, narrow) = (small(), tiny());
        assert_eq!(wide.stages.iter().map(|s| s.width).collect::<Vec<_>>(), [16, 32, 64, 96]);
        assert_eq!((wide.patch, wide.spacing, wide.stages.len()), (narrow.patch, narrow.spacing, narrow.stages.len()));
        let mut t = tiny();
        t.patch = [30, 64, 64];
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
        assert!(Topology::preset("vnet").is_err());
    }
}
