//! The generic MultiTalent U-Net: builder (from a [`Topology`]) and forward pass.
//!
//! Mirrors nnU-Net v1's `Generic_UNet` (plain layout) and `FabiansUNet` (residual encoder), with
//! the same parameter names, so a saved state dict loads into those classes with `strict=True`.

use anyhow::{ensure, Context, Result};
use tch::{Device, Tensor};

use crate::params::{Init, Param, ParamId, ParamStore, Role};
use crate::topology::{Layout, Topology};

const IN_EPS: f64 = 1e-5;

/// Conv3d (+ optional bias) -> InstanceNorm3d (affine) [-> LeakyReLU(0.01)].
#[derive(Debug, Clone)]
struct ConvNorm {
    weight: ParamId,
    bias: Option<ParamId>,
    norm_weight: ParamId,
    norm_bias: ParamId,
    stride: [i64; 3],
    padding: [i64; 3],
}

/// `out = LReLU(IN2(conv2(LReLU(IN1(conv1(x))))) + skip(x))`.
#[derive(Debug, Clone)]
struct ResidualBlock {
    first: ConvNorm,
    second: ConvNorm,
    /// 1x1x1 conv (with the block's stride) + IN, when stride or width changes.
    skip: Option<ConvNorm>,
}

#[derive(Debug, Clone)]
enum EncoderStage {
    Plain(Vec<ConvNorm>),
    Residual(Vec<ResidualBlock>),
}

#[derive(Debug, Clone)]
struct DecoderLevel {
    /// ConvTranspose3d weight (kernel = stride, no bias).
    upsample: ParamId,
    stride: [i64; 3],
    convs: Vec<ConvNorm>,
    head_weight: ParamId,
    head_bias: Option<ParamId>,
}

/// A MultiTalent network: shared backbone and one sigmoid head per class on every decoder level.
#[derive(Debug)]
pub struct MultiTalentNet {
    topology: Topology,
    classes: i64,
    params: ParamStore,
    stem: Option<ConvNorm>,
    encoder: Vec<EncoderStage>,
    /// Decoder levels in execution order (deepest first).
    decoder: Vec<DecoderLevel>,
    /// The forward graph of the FIRENet layout (then `stem`, `encoder`, `decoder` are empty).
    firenet: Option<crate::firenet::FireGraph>,
}

/// InstanceNorm3d (affine, eps 1e-5, no running stats) [-> LeakyReLU(0.01)], shared by every
/// layout's conv blocks.
pub(crate) fn instance_norm_act(y: &Tensor, weight: &Tensor, bias: &Tensor, activate: bool) -> Tensor {
    let y = y.instance_norm(Some(weight), Some(bias), None, None, true, 0.1, IN_EPS, true);
    if activate {
        y.leaky_relu()
    } else {
        y
    }
}

fn padding_of(kernel: [i64; 3]) -> [i64; 3] {
    kernel.map(|k| (k - 1) / 2)
}

impl MultiTalentNet {
    /// Builds a freshly initialised network with `classes` output channels on `device`.
    pub fn new(topology: &Topology, classes: i64, device: Device) -> Result<Self> {
        topology.validate()?;
        ensure!(classes >= 1, "a MultiTalent network needs at least one class, got {classes}");
        let builder = Builder { topo: topology, classes, device, store: ParamStore::new() };
        Ok(match topology.layout {
            Layout::GenericUnet => builder.generic_unet(),
            Layout::ResidualEncoder => builder.residual_encoder(),
            Layout::FireNet => builder.firenet()?,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn classes(&self) -> i64 {
        self.classes
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    pub fn device(&self) -> Device {
        self.params.iter().next().map(|p| p.tensor.device()).unwrap_or(Device::Cpu)
    }

    /// Training forward: the logits of every decoder level, full resolution first.
    pub fn forward_ds(&self, x: &Tensor) -> Vec<Tensor> {
        if let Some(graph) = &self.firenet {
            return graph.forward(&self.params, x, true);
        }
        let mut outputs = self.run(x, true);
        outputs.reverse();
        outputs
    }

    /// Inference forward: only the full-resolution logits (no other head is computed).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(graph) = &self.firenet {
            return graph.forward(&self.params, x, false).swap_remove(0);
        }
        self.run(x, false).pop().expect("the full-resolution head always runs")
    }

    /// Runs encoder and decoder; returns head outputs deepest first (or only the last one).
    fn run(&self, x: &Tensor, all_heads: bool) -> Vec<Tensor> {
        let mut x = match &self.stem {
            Some(stem) => self.conv_norm_act(x, stem, true),
            None => x.shallow_clone(),
        };
        let mut skips = Vec::with_capacity(self.encoder.len());
        for stage in &self.encoder {
            x = self.encoder_stage(&x, stage);
            skips.push(x.shallow_clone());
        }
        skips.pop(); // the bottleneck is no skip
        let mut outputs = Vec::new();
        let last = self.decoder.len() - 1;
        for (i, level) in self.decoder.iter().enumerate() {
            let up =
                x.conv_transpose3d::<Tensor>(self.p(level.upsample), None, level.stride, [0; 3], [0; 3], 1, [1; 3]);
            x = Tensor::cat(&[up, skips.pop().expect("one skip per decoder level")], 1);
            for conv in &level.convs {
                x = self.conv_norm_act(&x, conv, true);
            }
            if all_heads || i == last {
                let bias = level.head_bias.map(|b| self.p(b));
                outputs.push(x.conv3d(self.p(level.head_weight), bias, [1; 3], [0; 3], [1; 3], 1));
            }
        }
        outputs
    }

    fn encoder_stage(&self, x: &Tensor, stage: &EncoderStage) -> Tensor {
        match stage {
            EncoderStage::Plain(convs) => {
                convs.iter().fold(x.shallow_clone(), |x, conv| self.conv_norm_act(&x, conv, true))
            }
            EncoderStage::Residual(blocks) => {
                blocks.iter().fold(x.shallow_clone(), |x, block| self.residual_block(&x, block))
            }
        }
    }

    fn residual_block(&self, x: &Tensor, block: &ResidualBlock) -> Tensor {
        let y = self.conv_norm_act(x, &block.first, true);
        let y = self.conv_norm_act(&y, &block.second, false);
        let skip = match &block.skip {
            Some(skip) => self.conv_norm_act(x, skip, false),
            None => x.shallow_clone(),
        };
        (y + skip).leaky_relu()
    }

    fn conv_norm_act(&self, x: &Tensor, cn: &ConvNorm, activate: bool) -> Tensor {
        let bias = cn.bias.map(|b| self.p(b));
        let y = x.conv3d(self.p(cn.weight), bias, cn.stride, cn.padding, [1; 3], 1);
        instance_norm_act(&y, self.p(cn.norm_weight), self.p(cn.norm_bias), activate)
    }

    fn p(&self, id: ParamId) -> &Tensor {
        self.params.get(id)
    }

    /// Saves every tensor under its nnU-Net v1 name, aliases included (atomic write).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::io::write_tensors_atomic(path, &self.params.named_tensors(true))
    }

    /// Loads a file written by [`MultiTalentNet::save`] or by nnU-Net v1 (strict: every tensor).
    pub fn load(&mut self, path: &std::path::Path) -> Result<()> {
        let tensors = crate::io::read_tensors(path)?;
        self.params.load_named(&tensors, true).with_context(|| format!("loading {}", path.display()))
    }

    /// Parameter counts: (total, backbone, per class). Per-site decoders (FIRENet) are in the
    /// total only.
    pub fn parameter_counts(&self) -> (i64, i64, i64) {
        let total = self.params.count(|_| true);
        let backbone = self.params.count(|p: &Param| p.role == Role::Backbone);
        let heads = self.params.count(|p: &Param| matches!(p.role, Role::Head { .. }));
        (total, backbone, heads / self.classes)
    }

    /// The class indices of each site's own decoder (FIRENet's per-site decoders); empty when
    /// every class shares one decoder.
    pub fn site_decoders(&self) -> &[Vec<i64>] {
        self.topology.firenet.as_ref().map_or(&[], |f| f.site_decoders.as_slice())
    }
}

/// Builds parameters in nnU-Net v1 registration order and wires the forward graph.
struct Builder<'a> {
    topo: &'a Topology,
    classes: i64,
    device: Device,
    store: ParamStore,
}

impl Builder<'_> {
    fn conv_norm(
        &mut self,
        prefix: (&str, &str),
        shape: [i64; 5],
        stride: [i64; 3],
        bias: bool,
        norm_zero: bool,
    ) -> ConvNorm {
        let (conv, norm) = prefix;
        let width = shape[0];
        let weight = self.store.add(format!("{conv}.weight"), &shape, Init::KaimingNormal, Role::Backbone, self.device);
        let bias =
            bias.then(|| self.store.add(format!("{conv}.bias"), &[width], Init::Zeros, Role::Backbone, self.device));
        let gamma = if norm_zero { Init::Zeros } else { Init::Ones };
        let norm_weight = self.store.add(format!("{norm}.weight"), &[width], gamma, Role::Backbone, self.device);
        let norm_bias = self.store.add(format!("{norm}.bias"), &[width], Init::Zeros, Role::Backbone, self.device);
        let kernel = [shape[2], shape[3], shape[4]];
        ConvNorm { weight, bias, norm_weight, norm_bias, stride, padding: padding_of(kernel) }
    }

    fn head(&mut self, name: &str, width: i64, level: usize, bias: bool) -> (ParamId, Option<ParamId>) {
        let role = Role::Head { level };
        let shape = [self.classes, width, 1, 1, 1];
        let weight = self.store.add(format!("{name}.weight"), &shape, Init::KaimingNormal, role, self.device);
        let bias =
            bias.then(|| self.store.add(format!("{name}.bias"), &[self.classes], Init::Zeros, role, self.device));
        (weight, bias)
    }

    /// One transposed convolution per decoder level (deepest first), named `<prefix>.<u>.weight`.
    fn upsamplers(&mut self, prefix: &str) -> Vec<ParamId> {
        let stages = self.topo.stages.clone();
        let n = stages.len();
        (0..n - 1)
            .map(|u| {
                let (from, to) = (&stages[n - 1 - u], &stages[n - 2 - u]);
                self.upsample(format!("{prefix}.{u}.weight"), from.width, to.width, from.stride)
            })
            .collect()
    }

    fn upsample(&mut self, name: String, from: i64, to: i64, stride: [i64; 3]) -> ParamId {
        let shape = [from, to, stride[0], stride[1], stride[2]];
        self.store.add(name, &shape, Init::KaimingNormal, Role::Backbone, self.device)
    }

    fn finish(self, stem: Option<ConvNorm>, encoder: Vec<EncoderStage>, decoder: Vec<DecoderLevel>) -> MultiTalentNet {
        MultiTalentNet {
            topology: self.topo.clone(),
            classes: self.classes,
            params: self.store,
            stem,
            encoder,
            decoder,
            firenet: None,
        }
    }

    /// FIRENet (see [`crate::firenet`]).
    fn firenet(mut self) -> Result<MultiTalentNet> {
        let graph = crate::firenet::build(self.topo, self.classes, &mut self.store, self.device)?;
        let mut net = self.finish(None, Vec::new(), Vec::new());
        net.firenet = Some(graph);
        Ok(net)
    }

    /// nnU-Net v1 `Generic_UNet`: registers `conv_blocks_localization`, `conv_blocks_context`, `tu`,
    /// `seg_outputs`, in that order.
    fn generic_unet(mut self) -> MultiTalentNet {
        let stages = self.topo.stages.clone();
        let n = stages.len();
        let levels = n - 1;
        // Decoder convolutions first (registration order of Generic_UNet).
        let mut localization = Vec::with_capacity(levels);
        for u in 0..levels {
            let skip = &stages[n - 2 - u];
            let mut convs = Vec::new();
            for j in 0..self.topo.decoder_convs {
                let cin = if j == 0 { 2 * skip.width } else { skip.width };
                let p = format!("conv_blocks_localization.{u}.{j}.blocks.0");
                let shape = [skip.width, cin, skip.kernel[0], skip.kernel[1], skip.kernel[2]];
                convs.push(self.conv_norm(
                    (&format!("{p}.conv"), &format!("{p}.instnorm")),
                    shape,
                    [1; 3],
                    true,
                    false,
                ));
            }
            localization.push(convs);
        }
        let mut encoder = Vec::with_capacity(n);
        let mut cin = self.topo.in_channels;
        for (d, stage) in stages.iter().enumerate() {
            let mut convs = Vec::new();
            for j in 0..stage.depth {
                // The bottleneck is a Sequential of one-conv StackedConvLayers: other names.
                let p = if d == n - 1 {
                    format!("conv_blocks_context.{d}.{j}.blocks.0")
                } else {
                    format!("conv_blocks_context.{d}.blocks.{j}")
                };
                let stride = if j == 0 { stage.stride } else { [1; 3] };
                let shape = [stage.width, cin, stage.kernel[0], stage.kernel[1], stage.kernel[2]];
                convs.push(self.conv_norm(
                    (&format!("{p}.conv"), &format!("{p}.instnorm")),
                    shape,
                    stride,
                    true,
                    false,
                ));
                cin = stage.width;
            }
            encoder.push(EncoderStage::Plain(convs));
        }
        let ups = self.upsamplers("tu");
        let mut decoder = Vec::with_capacity(levels);
        for (u, convs) in localization.into_iter().enumerate() {
            let width = stages[n - 2 - u].width;
            let (head_weight, head_bias) = self.head(&format!("seg_outputs.{u}"), width, n - 2 - u, false);
            decoder.push(DecoderLevel {
                upsample: ups[u],
                stride: stages[n - 1 - u].stride,
                convs,
                head_weight,
                head_bias,
            });
        }
        self.finish(None, encoder, decoder)
    }

    /// nnU-Net v1 `FabiansUNet`: `encoder.initial_*`, `encoder.stages`, then the decoder's
    /// `segmentation_output`, `tus`, `stages`, `deep_supervision_outputs`.
    fn residual_encoder(mut self) -> MultiTalentNet {
        let stages = self.topo.stages.clone();
        let n = stages.len();
        let levels = n - 1;
        let w0 = stages[0].width;
        let stem_shape = [w0, self.topo.in_channels, 3, 3, 3];
        let stem = self.conv_norm(("encoder.initial_conv", "encoder.initial_norm"), stem_shape, [1; 3], false, false);
        let mut encoder = Vec::with_capacity(n);
        let mut cin = w0;
        for (s, stage) in stages.iter().enumerate() {
            let mut blocks = Vec::new();
            for b in 0..stage.depth {
                let p = format!("encoder.stages.{s}.convs.{b}");
                let stride = if b == 0 { stage.stride } else { [1; 3] };
                let k = stage.kernel;
                let first = self.conv_norm(
                    (&format!("{p}.conv1"), &format!("{p}.norm1")),
                    [stage.width, cin, k[0], k[1], k[2]],
                    stride,
                    false,
                    false,
                );
                let second = self.conv_norm(
                    (&format!("{p}.conv2"), &format!("{p}.norm2")),
                    [stage.width, stage.width, k[0], k[1], k[2]],
                    [1; 3],
                    false,
                    true,
                );
                let needs_skip = stride != [1; 3] || cin != stage.width;
                let skip = needs_skip.then(|| {
                    let shape = [stage.width, cin, 1, 1, 1];
                    self.conv_norm(
                        (&format!("{p}.downsample_skip.0"), &format!("{p}.downsample_skip.1")),
                        shape,
                        stride,
                        false,
                        false,
                    )
                });
                blocks.push(ResidualBlock { first, second, skip });
                cin = stage.width;
            }
            encoder.push(EncoderStage::Residual(blocks));
        }
        let full_res_head = self.head("decoder.segmentation_output", w0, 0, true);
        let ups = self.upsamplers("decoder.tus");
        let mut level_convs = Vec::with_capacity(levels);
        for u in 0..levels {
            let skip = &stages[n - 2 - u];
            let p = format!("decoder.stages.{u}.convs.0");
            let k = skip.kernel;
            let conv = self.conv_norm(
                (&format!("{p}.conv"), &format!("{p}.norm")),
                [skip.width, 2 * skip.width, k[0], k[1], k[2]],
                [1; 3],
                false,
                false,
            );
            self.store.add_alias(conv.weight, format!("{p}.all.0.weight"));
            self.store.add_alias(conv.norm_weight, format!("{p}.all.2.weight"));
            self.store.add_alias(conv.norm_bias, format!("{p}.all.2.bias"));
            level_convs.push(vec![conv]);
        }
        let mut decoder = Vec::with_capacity(levels);
        for (u, convs) in level_convs.into_iter().enumerate() {
            let level = n - 2 - u;
            let (head_weight, head_bias) = if level == 0 {
                full_res_head
            } else {
                self.head(&format!("decoder.deep_supervision_outputs.{u}"), stages[level].width, level, true)
            };
            decoder.push(DecoderLevel {
                upsample: ups[u],
                stride: stages[n - 1 - u].stride,
                convs,
                head_weight,
                head_bias,
            });
        }
        self.finish(Some(stem), encoder, decoder)
    }
}
