//! The nnU-Net v1 graphs: `Generic_UNet` (plain layout) and `FabiansUNet` (residual encoder), with
//! the same parameter names and registration order, so a saved state dict loads into those classes
//! with `strict=True`.
//!
//! Both are an encoder of stages, and a decoder whose level upsamples by a transposed conv,
//! concatenates the encoder's skip and runs its convs; a head per level. They differ in the encoder
//! blocks, the names and the order in which nnU-Net registers the modules.
//!
//! Per-site decoders ([`Topology::site_decoders`]): one decoder per site under
//! `decoders.<s>.<nnU-Net's decoder names>` with [`Role::SiteDecoder`], in nnU-Net's registration
//! order; the heads stay shared modules whose rows read their site's decoder
//! ([`crate::routing`]). Such a network is no nnU-Net v1 state dict. With
//! [`Topology::site_encoder_stages`] each site's decoder also has the deepest encoder stages of
//! its own, under the same `decoders.<s>.` prefix with nnU-Net's encoder names, so one site's
//! part of the model (`ModelManifest::site_model`) is again a plain network.

use anyhow::Result;
use tch::Tensor;

use crate::blocks::{
    ConvNorm, ConvNormNames, ConvNormSpec, Head, HeadSpec, ResidualBlock, ResidualNames, ResidualSpec, Upsample,
};
use crate::network::Outputs;
use crate::params::{Init, ParamScope, ParamStore, Role};
use crate::routing::{check_site_partition, decoder_features, head_logits, SiteRouting};
use crate::topology::{Stage, Topology};

#[derive(Debug, Clone)]
enum EncoderStage {
    Plain(Vec<ConvNorm>),
    Residual(Vec<ResidualBlock>),
}

impl EncoderStage {
    fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        match self {
            Self::Plain(convs) => convs.iter().fold(x.shallow_clone(), |x, conv| conv.forward(p, &x)),
            Self::Residual(blocks) => blocks.iter().fold(x.shallow_clone(), |x, block| block.forward(p, &x)),
        }
    }
}

/// Upsample, concatenate the skip, convs.
#[derive(Debug, Clone)]
struct ConcatDecoderLevel {
    upsample: Upsample,
    convs: Vec<ConvNorm>,
}

/// A decoder's levels in execution order (deepest first).
#[derive(Debug, Clone)]
struct Decoder {
    levels: Vec<ConcatDecoderLevel>,
}

impl Decoder {
    /// The features of every level in execution order (deepest first); `None` where `outputs`
    /// needs no head.
    fn forward(&self, p: &ParamStore, bottleneck: &Tensor, skips: &[Tensor], outputs: Outputs) -> Vec<Option<Tensor>> {
        let last = self.levels.len() - 1;
        let mut x = bottleneck.shallow_clone();
        let mut features = Vec::with_capacity(self.levels.len());
        for (u, level) in self.levels.iter().enumerate() {
            let up = level.upsample.forward(p, &x);
            x = Tensor::cat(&[up, skips[skips.len() - 1 - u].shallow_clone()], 1);
            x = level.convs.iter().fold(x, |x, conv| conv.forward(p, &x));
            features.push((outputs == Outputs::AllLevels || u == last).then(|| x.shallow_clone()));
        }
        features
    }
}

/// One decoder with the encoder stages only it reads (empty unless
/// [`Topology::site_encoder_stages`]): a site's own branch of the network.
#[derive(Debug, Clone)]
struct Branch {
    /// The deepest encoder stages of this branch, continuing the shared ones.
    encoder: Vec<EncoderStage>,
    decoder: Decoder,
}

impl Branch {
    /// The decoder's features from the shared encoder's output `x` and its `skips` (every shared
    /// stage's output, the last one included).
    fn forward(&self, p: &ParamStore, x: &Tensor, skips: &[Tensor], outputs: Outputs) -> Vec<Option<Tensor>> {
        let mut skips: Vec<Tensor> = skips.iter().map(Tensor::shallow_clone).collect();
        let mut x = x.shallow_clone();
        for stage in &self.encoder {
            x = stage.forward(p, &x);
            skips.push(x.shallow_clone());
        }
        skips.pop(); // the bottleneck is no skip
        self.decoder.forward(p, &x, &skips, outputs)
    }
}

/// The forward graph of both nnU-Net layouts.
#[derive(Debug, Clone)]
pub(crate) struct UnetGraph {
    /// FabiansUNet's initial conv; Generic_UNet has none.
    stem: Option<ConvNorm>,
    /// The shared encoder stages (all of them unless sites have their own deepest ones).
    encoder: Vec<EncoderStage>,
    /// One decoder, or one per site (each with its own deepest encoder stages, if any).
    branches: Vec<Branch>,
    /// `heads[u]`: decoder level `u`'s (deepest first).
    heads: Vec<Head>,
    /// `Some` exactly with per-site decoders.
    routing: Option<SiteRouting>,
}

impl UnetGraph {
    /// Head outputs full resolution first (or only the full-resolution one).
    pub fn forward(&self, p: &ParamStore, x: &Tensor, outputs: Outputs) -> Vec<Tensor> {
        let mut x = match &self.stem {
            Some(stem) => stem.forward(p, x),
            None => x.shallow_clone(),
        };
        let mut skips = Vec::with_capacity(self.encoder.len());
        for stage in &self.encoder {
            x = stage.forward(p, &x);
            skips.push(x.shallow_clone());
        }
        let features = decoder_features(self.routing.as_ref(), self.branches.len(), outputs, |s| {
            self.branches[s].forward(p, &x, &skips, outputs)
        });
        let mut logits: Vec<Tensor> = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(u, head)| {
                let per_decoder: Vec<Option<&Tensor>> =
                    features.iter().map(|f| f.get(u).and_then(Option::as_ref)).collect();
                head_logits(p, head, self.routing.as_ref(), &per_decoder, outputs)
            })
            .collect();
        logits.reverse();
        logits
    }
}

/// The stage a decoder level `u` (0 = deepest) upsamples from, and the stage it upsamples to (whose
/// skip it concatenates, whose width and kernel it has).
fn level_stages(stages: &[Stage], u: usize) -> (&Stage, &Stage) {
    let n = stages.len();
    (&stages[n - 1 - u], &stages[n - 2 - u])
}

/// One transposed convolution per decoder level (deepest first), named `<scope>.<u>.weight`.
fn upsamplers(topo: &Topology, scope: &ParamScope) -> Vec<Upsample> {
    (0..topo.stages.len() - 1)
        .map(|u| {
            let (from, to) = level_stages(&topo.stages, u);
            Upsample::new(&scope.pp(u), from.width, to.width, from.stride)
        })
        .collect()
}

/// The stride of a stage's block `j`: the stage's own on its first block, 1 after.
fn block_stride(stage: &Stage, j: usize) -> [i64; 3] {
    if j == 0 {
        stage.stride
    } else {
        [1; 3]
    }
}

/// Zips each level's convs (deepest first) with its upsampler.
fn decoder(convs: Vec<Vec<ConvNorm>>, upsample: Vec<Upsample>) -> Decoder {
    Decoder {
        levels: convs
            .into_iter()
            .zip(upsample)
            .map(|(convs, upsample)| ConcatDecoderLevel { upsample, convs })
            .collect(),
    }
}

/// The scope of each decoder: `root` for the shared one, `decoders.<s>` (role
/// [`Role::SiteDecoder`]) for each site's.
fn decoder_scopes<'a>(topo: &Topology, root: &ParamScope<'a>) -> Vec<ParamScope<'a>> {
    if topo.site_decoders.is_empty() {
        vec![root.clone()]
    } else {
        (0..topo.site_decoders.len())
            .map(|s| root.pp("decoders").pp(s).with_role(Role::SiteDecoder { site: s }))
            .collect()
    }
}

/// The encoder's stages built by `stage(scope, d)`: the shared ones under `root`, then each
/// decoder's own deepest [`Topology::site_encoder_stages`] under its scope (none by default, so
/// the registration order is nnU-Net's).
fn split_encoder(
    topo: &Topology,
    root: &ParamScope,
    decoder_scopes: &[ParamScope],
    stage: impl Fn(&ParamScope, usize) -> EncoderStage,
) -> (Vec<EncoderStage>, Vec<Vec<EncoderStage>>) {
    let n = topo.stages.len();
    let shared = n - topo.site_encoder_stages;
    let own = decoder_scopes.iter().map(|scope| (shared..n).map(|d| stage(scope, d)).collect()).collect();
    ((0..shared).map(|d| stage(root, d)).collect(), own)
}

/// Pairs each decoder with its own encoder stages.
fn branches(own_stages: Vec<Vec<EncoderStage>>, decoders: impl Iterator<Item = Decoder>) -> Vec<Branch> {
    own_stages.into_iter().zip(decoders).map(|(encoder, decoder)| Branch { encoder, decoder }).collect()
}

/// The heads' routing to per-site decoders, after checking the partition.
fn routing(topo: &Topology, classes: i64, root: &ParamScope) -> Result<Option<SiteRouting>> {
    check_site_partition(&topo.site_decoders, classes)?;
    Ok((!topo.site_decoders.is_empty()).then(|| SiteRouting::new(&topo.site_decoders, root.device())))
}

/// nnU-Net v1 `Generic_UNet`: registers `conv_blocks_localization`, `conv_blocks_context`, `tu`,
/// `seg_outputs`, in that order (with per-site decoders, each decoder's localization and `tu`
/// where the one decoder's are).
pub(crate) fn generic_unet(topo: &Topology, classes: i64, root: &ParamScope) -> Result<UnetGraph> {
    let stages = &topo.stages;
    let n = stages.len();
    let levels = n - 1;
    let scopes = decoder_scopes(topo, root);
    let localization = |decoder: &ParamScope| -> Vec<Vec<ConvNorm>> {
        (0..levels)
            .map(|u| {
                let (_, skip) = level_stages(stages, u);
                let scope = decoder.pp("conv_blocks_localization").pp(u);
                (0..topo.decoder_convs)
                    .map(|j| {
                        let cin = if j == 0 { 2 * skip.width } else { skip.width };
                        let spec = ConvNormSpec { bias: true, ..ConvNormSpec::new(cin, skip.width, skip.kernel) };
                        ConvNorm::new(&scope.pp(j).pp("blocks.0"), ConvNormNames::CONV_INSTNORM, spec)
                    })
                    .collect()
            })
            .collect()
    };
    let localizations: Vec<Vec<Vec<ConvNorm>>> = scopes.iter().map(localization).collect();
    let stage = |scope: &ParamScope, d: usize| {
        let stage = &stages[d];
        let scope = scope.pp("conv_blocks_context").pp(d);
        let convs = (0..stage.depth)
            .map(|j| {
                // The bottleneck is a Sequential of one-conv StackedConvLayers: other names.
                let conv_scope = if d == n - 1 { scope.pp(j).pp("blocks.0") } else { scope.pp("blocks").pp(j) };
                let cin = match (d, j) {
                    (0, 0) => topo.in_channels,
                    (_, 0) => stages[d - 1].width,
                    _ => stage.width,
                };
                let spec = ConvNormSpec {
                    stride: block_stride(stage, j),
                    bias: true,
                    ..ConvNormSpec::new(cin, stage.width, stage.kernel)
                };
                ConvNorm::new(&conv_scope, ConvNormNames::CONV_INSTNORM, spec)
            })
            .collect();
        EncoderStage::Plain(convs)
    };
    let (encoder, own_stages) = split_encoder(topo, root, &scopes, stage);
    let decoders =
        localizations.into_iter().zip(&scopes).map(|(convs, scope)| decoder(convs, upsamplers(topo, &scope.pp("tu"))));
    let branches = branches(own_stages, decoders);
    let heads = (0..levels)
        .map(|u| {
            let level = levels - 1 - u;
            let spec = HeadSpec { width: stages[level].width, classes, level, bias: false };
            Head::new(&root.pp("seg_outputs").pp(u), spec)
        })
        .collect();
    Ok(UnetGraph { stem: None, encoder, branches, heads, routing: routing(topo, classes, root)? })
}

/// nnU-Net v1 `FabiansUNet`: `encoder.initial_*`, `encoder.stages`, then the decoder's
/// `segmentation_output`, `tus`, `stages`, `deep_supervision_outputs` (with per-site decoders,
/// each decoder's `tus` and `stages` under `decoders.<s>.decoder`).
pub(crate) fn residual_encoder(topo: &Topology, classes: i64, root: &ParamScope) -> Result<UnetGraph> {
    let stages = &topo.stages;
    let n = stages.len();
    let levels = n - 1;
    let w0 = stages[0].width;
    let stem_names = ConvNormNames { conv: "initial_conv", norm: "initial_norm" };
    let stem = ConvNorm::new(&root.pp("encoder"), stem_names, ConvNormSpec::new(topo.in_channels, w0, [3; 3]));
    let scopes = decoder_scopes(topo, root);
    let stage = |scope: &ParamScope, d: usize| {
        let stage = &stages[d];
        let scope = scope.pp("encoder.stages").pp(d).pp("convs");
        let blocks = (0..stage.depth)
            .map(|b| {
                let cin = match (d, b) {
                    (0, 0) => w0,
                    (_, 0) => stages[d - 1].width,
                    _ => stage.width,
                };
                let spec = ResidualSpec {
                    cin,
                    cout: stage.width,
                    kernel: stage.kernel,
                    stride: block_stride(stage, b),
                    second_norm_scale: Init::Zeros,
                };
                ResidualBlock::new(&scope.pp(b), ResidualNames::FABIANS_UNET, spec)
            })
            .collect();
        EncoderStage::Residual(blocks)
    };
    let (encoder, own_stages) = split_encoder(topo, root, &scopes, stage);
    let heads_scope = root.pp("decoder");
    let head = |scope: &ParamScope, level: usize| {
        Head::new(scope, HeadSpec { width: stages[level].width, classes, level, bias: true })
    };
    let full_res_head = head(&heads_scope.pp("segmentation_output"), 0);
    let level_convs = |decoder_scope: &ParamScope| -> Vec<Vec<ConvNorm>> {
        (0..levels)
            .map(|u| {
                let (_, skip) = level_stages(stages, u);
                let scope = decoder_scope.pp("stages").pp(u).pp("convs.0");
                let conv = ConvNorm::new(
                    &scope,
                    ConvNormNames::CONV_NORM,
                    ConvNormSpec::new(2 * skip.width, skip.width, skip.kernel),
                );
                // FabiansUNet also lists the conv and norm under its Sequential `all`.
                scope.alias(conv.weight, "all.0.weight");
                scope.alias(conv.norm_weight, "all.2.weight");
                scope.alias(conv.norm_bias, "all.2.bias");
                vec![conv]
            })
            .collect()
    };
    let decoders = scopes.iter().map(|scope| {
        let scope = scope.pp("decoder");
        let upsample = upsamplers(topo, &scope.pp("tus"));
        decoder(level_convs(&scope), upsample)
    });
    let branches = branches(own_stages, decoders);
    // Deepest first, like the decoder levels; the full-resolution head was registered first.
    let mut heads: Vec<Head> =
        (0..levels - 1).map(|u| head(&heads_scope.pp("deep_supervision_outputs").pp(u), levels - 1 - u)).collect();
    heads.push(full_res_head);
    Ok(UnetGraph { stem: Some(stem), encoder, branches, heads, routing: routing(topo, classes, root)? })
}
