//! FIRENet (fabric image representation encoding network) as a MultiTalent backbone, with
//! MultiTalent's per-class sigmoid heads on every output level, and FIRENet's multi-decoder mode
//! (one decoder per site).
//!
//! What the paper fixes: a residual encoder of two blocks (32 and 64 filters) each downsampling by
//! 2, a mirrored decoder, skips through a 3x3x3 conv (channels unchanged) merged by element-wise
//! sum; the fabric representation module (FRM) at the bottleneck with B branches and N nodes per
//! branch, branch b at 1/2^(b-1) of the bottleneck resolution with 2^(b-1) times its channels;
//! node (n, b) fuses nodes (n-1, b-1), (n-1, b), (n-1, b+1) by feature alignment (conv to branch
//! b's channels, trilinear resampling to its size), a trainable feature sum (one sigmoid-squashed
//! scalar per input) and ASPP3D (parallel 3x3x3 convs with dilation 1, 2, 4); deep supervision on
//! the FRM and the intermediate decoder block.
//!
//! The paper publishes no code and leaves the following open; these choices are OURS, taken from
//! what nnU-Net-style networks do:
//! - Every conv is Conv3d without bias -> InstanceNorm3d (eps 1e-5, affine) [-> LeakyReLU(0.01)].
//! - Stem: one 3x3x3 conv at full resolution (stage 0 of the topology), so the full-resolution
//!   decoder level has a skip to sum with. Encoder stage s >= 1: residual blocks like nnU-Net's
//!   `FabiansUNet` (`LReLU(IN(conv2(LReLU(IN(conv1(x))))) + skip(x))`, conv1 carries the stride 2,
//!   skip = IN(1x1x1 conv) when stride or width change).
//! - Feature alignment = 1x1x1 conv + IN (no activation), then trilinear resampling
//!   (align_corners = false) to the target's exact size; an input from the node's own branch is
//!   already aligned and passes unchanged.
//! - FRM column 0: branch 1 is the bottleneck; branch b > 1 is the alignment of branch b-1's
//!   column 0 (so every node of column 1 has its three neighbours).
//! - Trainable feature sum: weights initialised to 0 (sigmoid 0.5 each).
//! - ASPP3D: each dilated conv -> IN -> LReLU, then concatenation and a 1x1x1 conv -> IN -> LReLU.
//! - Fold-back: the N-th node of every branch is resampled trilinearly to branch 1's size,
//!   concatenated and merged by a 1x1x1 conv -> IN -> LReLU to the bottleneck width.
//! - Decoder level l: upsampling = alignment of the deeper level to stage l's width and the skip's
//!   exact size; skip = 3x3x3 conv + IN; merged = LReLU(up + skip); then `decoder_convs` residual
//!   blocks (identity skip).
//! - Heads: 1x1x1 conv WITH bias per class on every level (level 0 = full resolution, the last
//!   level = the FRM output), named `seg_outputs.<level>`.
//! - Every resampling goes to an explicit size (strided convs give ceil(n/2)), so any input size
//!   works, odd ones included; there is no fixed patch.
//!
//! Per-site decoders: with `site_decoders` set in [`FireNetSpec`], site s has its own decoder
//! (`decoders.<s>.*`, [`Role::SiteDecoder`]) and class c's heads on the decoder levels read the
//! features of c's site's decoder. The FRM-level heads read the shared FRM output. The outputs
//! keep the `[B, C, ...]` layout, so the loss is unchanged.

use anyhow::Result;
use tch::Tensor;

use crate::blocks::{
    Activation, ConvNorm, ConvNormNames, ConvNormSpec, Head, HeadSpec, ResidualBlock, ResidualNames, ResidualSpec,
};
use crate::network::Outputs;
use crate::params::{Init, ParamId, ParamScope, ParamStore, Role};
use crate::routing::{check_site_partition, decoder_features, head_logits, SiteRouting};
use crate::topology::{FireNetSpec, Topology};

/// Every FIRENet conv: `<scope>.conv`, `<scope>.norm`.
fn conv_norm(scope: &ParamScope, spec: ConvNormSpec) -> ConvNorm {
    ConvNorm::new(scope, ConvNormNames::CONV_NORM, spec)
}

/// Feature alignment's conv: 1x1x1 to `cout` channels, no activation.
fn align_spec(cin: i64, cout: i64) -> ConvNormSpec {
    ConvNormSpec { activation: Activation::Linear, ..ConvNormSpec::new(cin, cout, [1; 3]) }
}

fn residual_block(scope: &ParamScope, cin: i64, cout: i64, kernel: [i64; 3], stride: [i64; 3]) -> ResidualBlock {
    let spec = ResidualSpec { cin, cout, kernel, stride, second_norm_scale: Init::Ones };
    ResidualBlock::new(scope, ResidualNames::FIRENET, spec)
}

/// One input of an FRM node: a branch of the previous column, aligned to the node's branch
/// unless it is the node's own.
#[derive(Debug, Clone)]
struct NodeInput {
    /// 0-based branch of the previous column.
    branch: usize,
    align: Option<ConvNorm>,
}

impl NodeInput {
    fn forward(&self, p: &ParamStore, column: &[Tensor], size: &[i64]) -> Tensor {
        let x = &column[self.branch];
        match &self.align {
            None => x.shallow_clone(),
            Some(align) => resize(&align.forward(p, x), size),
        }
    }
}

/// ASPP3D: parallel dilated 3x3x3 convs, concatenated and merged by a 1x1x1 conv.
#[derive(Debug, Clone)]
struct Aspp {
    branches: Vec<ConvNorm>,
    merge: ConvNorm,
}

impl Aspp {
    /// `<scope>.<k>` for dilation k, `<scope>.merge`.
    fn new(scope: &ParamScope, width: i64, dilations: &[i64]) -> Self {
        let branches = dilations
            .iter()
            .enumerate()
            .map(|(k, &dilation)| {
                conv_norm(&scope.pp(k), ConvNormSpec { dilation, ..ConvNormSpec::new(width, width, [3; 3]) })
            })
            .collect();
        let merged = dilations.len() as i64 * width;
        let merge = conv_norm(&scope.pp("merge"), ConvNormSpec::new(merged, width, [1; 3]));
        Self { branches, merge }
    }

    fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let branches: Vec<Tensor> = self.branches.iter().map(|conv| conv.forward(p, x)).collect();
        self.merge.forward(p, &Tensor::cat(&branches, 1))
    }
}

/// FRM node (n, b): the trainable feature sum of its inputs, then ASPP3D.
#[derive(Debug, Clone)]
struct Node {
    inputs: Vec<NodeInput>,
    /// `[inputs]` scalars, squashed by a sigmoid.
    fuse: ParamId,
    aspp: Aspp,
}

impl Node {
    /// The node of `branch` (0-based); `width(b)` is branch b's channels.
    fn new(scope: &ParamScope, spec: &FireNetSpec, branch: usize, width: impl Fn(usize) -> i64) -> Self {
        let neighbours = branch.saturating_sub(1)..=(branch + 1).min(spec.branches - 1);
        let inputs: Vec<NodeInput> = neighbours
            .map(|src| NodeInput {
                branch: src,
                align: (src != branch)
                    .then(|| conv_norm(&scope.pp("align").pp(src), align_spec(width(src), width(branch)))),
            })
            .collect();
        let fuse = scope.add("fuse", &[inputs.len() as i64], Init::Zeros);
        let aspp = Aspp::new(&scope.pp("aspp"), width(branch), &spec.dilations);
        Self { inputs, fuse, aspp }
    }

    /// `column`: the previous column's outputs; `size`: the spatial size of the node's branch.
    fn forward(&self, p: &ParamStore, column: &[Tensor], size: &[i64]) -> Tensor {
        let gates = p.get(self.fuse).sigmoid();
        let fused = self
            .inputs
            .iter()
            .enumerate()
            .map(|(k, input)| input.forward(p, column, size) * gates.get(k as i64))
            .reduce(|sum, term| sum + term)
            .expect("a node has at least its own branch as input");
        self.aspp.forward(p, &fused)
    }
}

/// The fabric representation module at the bottleneck, named `frm.*`.
#[derive(Debug, Clone)]
struct Frm {
    /// Column 0 of branches 1.. (alignment of the previous branch).
    entry: Vec<ConvNorm>,
    /// `nodes[n][b]`.
    nodes: Vec<Vec<Node>>,
    /// Fold-back of every branch's last node to the bottleneck width.
    exit: ConvNorm,
}

impl Frm {
    /// `bottleneck`: the bottleneck width (branch 0's).
    fn new(scope: &ParamScope, spec: &FireNetSpec, bottleneck: i64) -> Self {
        let width = |b: usize| bottleneck << b;
        let entry = (1..spec.branches)
            .map(|b| conv_norm(&scope.pp("entry").pp(b), align_spec(width(b - 1), width(b))))
            .collect();
        let nodes = (0..spec.nodes)
            .map(|n| (0..spec.branches).map(|b| Node::new(&scope.pp("nodes").pp(n).pp(b), spec, b, width)).collect())
            .collect();
        let all: i64 = (0..spec.branches).map(width).sum();
        let exit = conv_norm(&scope.pp("exit"), ConvNormSpec::new(all, bottleneck, [1; 3]));
        Self { entry, nodes, exit }
    }

    fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let size0 = x.size()[2..].to_vec();
        let mut sizes = vec![size0.clone()];
        let mut column = vec![x.shallow_clone()];
        for entry in &self.entry {
            let size = half(sizes.last().expect("branch 1"));
            let prev = column.last().expect("branch 1");
            column.push(resize(&entry.forward(p, prev), &size));
            sizes.push(size);
        }
        for nodes in &self.nodes {
            column = nodes.iter().enumerate().map(|(b, node)| node.forward(p, &column, &sizes[b])).collect();
        }
        let back: Vec<Tensor> = column.iter().map(|t| resize(t, &size0)).collect();
        self.exit.forward(p, &Tensor::cat(&back, 1))
    }
}

/// Decoder level l: the deeper level aligned to stage l's width and the skip's size, plus the
/// skip's conv, activated; then residual blocks.
#[derive(Debug, Clone)]
struct SumDecoderLevel {
    up: ConvNorm,
    skip: ConvNorm,
    blocks: Vec<ResidualBlock>,
}

/// One decoder: its levels deepest first (level `levels-2` down to 0).
#[derive(Debug, Clone)]
struct Decoder {
    levels: Vec<SumDecoderLevel>,
}

impl Decoder {
    /// Levels `n-2` down to 0 under `<scope>.levels.<l>`; their tensors get the scope's role.
    fn new(scope: &ParamScope, topo: &Topology) -> Self {
        let stages = &topo.stages;
        let levels = (0..stages.len() - 1)
            .rev()
            .map(|l| {
                let (w, k) = (stages[l].width, stages[l].kernel);
                let scope = scope.pp("levels").pp(l);
                let up = conv_norm(&scope.pp("up"), align_spec(stages[l + 1].width, w));
                let skip = conv_norm(
                    &scope.pp("skip"),
                    ConvNormSpec { activation: Activation::Linear, ..ConvNormSpec::new(w, w, k) },
                );
                let blocks = (0..topo.decoder_convs)
                    .map(|j| residual_block(&scope.pp("blocks").pp(j), w, w, k, [1; 3]))
                    .collect();
                SumDecoderLevel { up, skip, blocks }
            })
            .collect();
        Self { levels }
    }

    /// Features by level (`None` for levels not needed and for the FRM level).
    fn forward(&self, p: &ParamStore, frm: &Tensor, skips: &[Tensor], outputs: Outputs) -> Vec<Option<Tensor>> {
        let mut out: Vec<Option<Tensor>> = (0..skips.len()).map(|_| None).collect();
        let mut x = frm.shallow_clone();
        for (i, level) in self.levels.iter().enumerate() {
            let l = skips.len() - 1 - i;
            let skip = &skips[l];
            let up = resize(&level.up.forward(p, &x), &skip.size()[2..]);
            let merged = (up + level.skip.forward(p, skip)).leaky_relu();
            x = level.blocks.iter().fold(merged, |x, block| block.forward(p, &x));
            if outputs == Outputs::AllLevels || l == 0 {
                out[l] = Some(x.shallow_clone());
            }
        }
        out
    }
}

/// The FIRENet forward graph over a [`ParamStore`].
#[derive(Debug, Clone)]
pub struct FireGraph {
    stem: ConvNorm,
    /// Encoder stages 1.. (residual blocks).
    encoder: Vec<Vec<ResidualBlock>>,
    frm: Frm,
    /// One decoder, or one per site.
    decoders: Vec<Decoder>,
    /// `Some` exactly with per-site decoders.
    routing: Option<SiteRouting>,
    /// `heads[level]`, level 0 = full resolution, last = FRM.
    heads: Vec<Head>,
}

/// Builds the graph, registering its parameters under `root` (encoder, FRM, decoders, heads).
pub(crate) fn build(topo: &Topology, classes: i64, root: &ParamScope) -> Result<FireGraph> {
    let spec = topo.firenet.clone().unwrap_or_default();
    let sites = &topo.site_decoders;
    check_site_partition(sites, classes)?;
    let stages = &topo.stages;
    let n = stages.len();
    let stem =
        conv_norm(&root.pp("encoder.stem"), ConvNormSpec::new(topo.in_channels, stages[0].width, stages[0].kernel));
    let mut encoder = Vec::with_capacity(n - 1);
    let mut cin = stages[0].width;
    for (s, stage) in stages.iter().enumerate().skip(1) {
        let scope = root.pp("encoder.stages").pp(s).pp("blocks");
        let blocks = (0..stage.depth)
            .map(|j| {
                let stride = if j == 0 { stage.stride } else { [1; 3] };
                let block = residual_block(&scope.pp(j), cin, stage.width, stage.kernel, stride);
                cin = stage.width;
                block
            })
            .collect();
        encoder.push(blocks);
    }
    let frm = Frm::new(&root.pp("frm"), &spec, stages[n - 1].width);
    let decoders = if sites.is_empty() {
        vec![Decoder::new(&root.pp("decoder"), topo)]
    } else {
        (0..sites.len())
            .map(|s| Decoder::new(&root.pp("decoders").pp(s).with_role(Role::SiteDecoder { site: s }), topo))
            .collect()
    };
    let heads = (0..n)
        .map(|level| {
            Head::new(
                &root.pp("seg_outputs").pp(level),
                HeadSpec { width: stages[level].width, classes, level, bias: true },
            )
        })
        .collect();
    let routing = (!sites.is_empty()).then(|| SiteRouting::new(sites, root.device()));
    Ok(FireGraph { stem, encoder, frm, decoders, routing, heads })
}

fn resize(x: &Tensor, size: &[i64]) -> Tensor {
    if &x.size()[2..] == size {
        x.shallow_clone()
    } else {
        x.upsample_trilinear3d(size, false, None, None, None)
    }
}

/// Size of a strided 3x3x3 conv's (or a downsampling alignment's) output: ceil(n / 2).
fn half(size: &[i64]) -> Vec<i64> {
    size.iter().map(|&s| (s + 1) / 2).collect()
}

impl FireGraph {
    /// Number of decoders (1, or one per site).
    pub fn decoders(&self) -> usize {
        self.decoders.len()
    }

    /// Head outputs, full resolution first (every level's, or only the full-resolution one).
    pub(crate) fn forward(&self, p: &ParamStore, x: &Tensor, outputs: Outputs) -> Vec<Tensor> {
        let mut x = self.stem.forward(p, x);
        let mut skips = vec![x.shallow_clone()];
        for blocks in &self.encoder {
            x = blocks.iter().fold(x, |x, block| block.forward(p, &x));
            skips.push(x.shallow_clone());
        }
        skips.pop(); // the bottleneck feeds the FRM
        let frm = self.frm.forward(p, &x);
        // Per decoder, the features of every decoder level, index = level.
        let features = decoder_features(self.routing.as_ref(), self.decoders.len(), outputs, |s| {
            self.decoders[s].forward(p, &frm, &skips, outputs)
        });
        let frm_level = self.heads.len() - 1;
        let decoded = match outputs {
            Outputs::AllLevels => frm_level,
            Outputs::FullResolution | Outputs::Classes(_) => 1,
        };
        let mut logits: Vec<Tensor> =
            (0..decoded).map(|level| self.decoded_logits(p, &features, level, outputs)).collect();
        if outputs == Outputs::AllLevels {
            logits.push(self.heads[frm_level].forward(p, &frm));
        }
        logits
    }

    /// The logits of decoder level `level`, from the shared decoder or each site's own.
    fn decoded_logits(
        &self,
        p: &ParamStore,
        features: &[Vec<Option<Tensor>>],
        level: usize,
        outputs: Outputs,
    ) -> Tensor {
        let per_decoder: Vec<Option<&Tensor>> =
            features.iter().map(|f| f.get(level).and_then(Option::as_ref)).collect();
        head_logits(p, &self.heads[level], self.routing.as_ref(), &per_decoder, outputs).expect("decoded level")
    }
}
