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

use anyhow::{ensure, Result};
use tch::{Device, Tensor};

use crate::params::{Init, ParamId, ParamStore, Role};
use crate::topology::{FireNetSpec, Topology};

/// Conv3d (no bias) -> InstanceNorm3d (affine).
#[derive(Debug, Clone)]
struct ConvNorm {
    weight: ParamId,
    norm_weight: ParamId,
    norm_bias: ParamId,
    stride: [i64; 3],
    padding: [i64; 3],
    dilation: [i64; 3],
}

#[derive(Debug, Clone)]
struct ResBlock {
    first: ConvNorm,
    second: ConvNorm,
    skip: Option<ConvNorm>,
}

#[derive(Debug, Clone)]
struct Node {
    /// One per input, in the order of `sources`; `None` for the node's own branch.
    align: Vec<Option<ConvNorm>>,
    /// Branches (0-based) of the previous column this node reads.
    sources: Vec<usize>,
    /// `[inputs]` scalars, squashed by a sigmoid.
    fuse: ParamId,
    aspp: Vec<ConvNorm>,
    merge: ConvNorm,
}

#[derive(Debug, Clone)]
struct DecoderLevel {
    up: ConvNorm,
    skip: ConvNorm,
    blocks: Vec<ResBlock>,
}

/// One decoder: its levels deepest first (level `levels-2` down to 0).
#[derive(Debug, Clone)]
struct Decoder {
    levels: Vec<DecoderLevel>,
}

#[derive(Debug, Clone)]
struct Head {
    weight: ParamId,
    bias: ParamId,
}

/// The FIRENet forward graph over a [`ParamStore`].
#[derive(Debug)]
pub struct FireGraph {
    stem: ConvNorm,
    /// Encoder stages 1.. (residual blocks).
    encoder: Vec<Vec<ResBlock>>,
    /// Column 0 of branches 1.. (alignment of the previous branch).
    entry: Vec<ConvNorm>,
    /// `nodes[n][b]`.
    nodes: Vec<Vec<Node>>,
    exit: ConvNorm,
    /// One decoder, or one per site.
    decoders: Vec<Decoder>,
    /// Per-site decoders: class indices of each site, and the permutation putting the sites'
    /// concatenated logits back into class order.
    routing: Option<(Vec<Tensor>, Tensor)>,
    /// `heads[level]`, level 0 = full resolution, last = FRM.
    heads: Vec<Head>,
}

/// Builds the graph, registering its parameters in `store` (encoder, FRM, decoders, heads).
pub(crate) fn build(topo: &Topology, classes: i64, store: &mut ParamStore, device: Device) -> Result<FireGraph> {
    let spec = topo.firenet.clone().unwrap_or_default();
    let sites = &spec.site_decoders;
    if !sites.is_empty() {
        let mut seen = vec![false; classes as usize];
        for (s, site) in sites.iter().enumerate() {
            ensure!(!site.is_empty(), "firenet per-site decoders: site {s} has no class");
            for &c in site {
                ensure!(
                    c >= 0 && c < classes,
                    "firenet per-site decoders: site {s} lists class {c}, the network has {classes}"
                );
                ensure!(!seen[c as usize], "firenet per-site decoders: class {c} is listed twice");
                seen[c as usize] = true;
            }
        }
        if let Some(c) = seen.iter().position(|s| !s) {
            anyhow::bail!("firenet per-site decoders: class {c} belongs to no site");
        }
    }
    let mut b = Builder { store, device };
    let stages = &topo.stages;
    let n = stages.len();
    let stem =
        b.conv_norm("encoder.stem", topo.in_channels, stages[0].width, stages[0].kernel, [1; 3], 1, Role::Backbone);
    let mut encoder = Vec::with_capacity(n - 1);
    let mut cin = stages[0].width;
    for (s, stage) in stages.iter().enumerate().skip(1) {
        let blocks = (0..stage.depth)
            .map(|j| {
                let stride = if j == 0 { stage.stride } else { [1; 3] };
                let block = b.res_block(
                    &format!("encoder.stages.{s}.blocks.{j}"),
                    cin,
                    stage.width,
                    stage.kernel,
                    stride,
                    Role::Backbone,
                );
                cin = stage.width;
                block
            })
            .collect();
        encoder.push(blocks);
    }
    let (entry, nodes, exit) = b.frm(&spec, stages[n - 1].width);
    let decoders = if sites.is_empty() {
        vec![b.decoder("decoder", topo, Role::Backbone)]
    } else {
        (0..sites.len()).map(|s| b.decoder(&format!("decoders.{s}"), topo, Role::SiteDecoder { site: s })).collect()
    };
    let heads = (0..n)
        .map(|level| {
            let role = Role::Head { level };
            let width = stages[level].width;
            let weight = b.store.add(
                format!("seg_outputs.{level}.weight"),
                &[classes, width, 1, 1, 1],
                Init::KaimingNormal,
                role,
                device,
            );
            let bias = b.store.add(format!("seg_outputs.{level}.bias"), &[classes], Init::Zeros, role, device);
            Head { weight, bias }
        })
        .collect();
    let routing = (!sites.is_empty()).then(|| {
        let order: Vec<i64> = sites.iter().flatten().copied().collect();
        let mut inverse = vec![0i64; order.len()];
        for (pos, &c) in order.iter().enumerate() {
            inverse[c as usize] = pos as i64;
        }
        let per_site = sites.iter().map(|s| Tensor::from_slice(s).to_device(device)).collect();
        (per_site, Tensor::from_slice(&inverse).to_device(device))
    });
    Ok(FireGraph { stem, encoder, entry, nodes, exit, decoders, routing, heads })
}

struct Builder<'a> {
    store: &'a mut ParamStore,
    device: Device,
}

impl Builder<'_> {
    #[allow(clippy::too_many_arguments)]
    fn conv_norm(
        &mut self,
        prefix: &str,
        cin: i64,
        cout: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
        dilation: i64,
        role: Role,
    ) -> ConvNorm {
        let d = self.device;
        let shape = [cout, cin, kernel[0], kernel[1], kernel[2]];
        let weight = self.store.add(format!("{prefix}.conv.weight"), &shape, Init::KaimingNormal, role, d);
        let norm_weight = self.store.add(format!("{prefix}.norm.weight"), &[cout], Init::Ones, role, d);
        let norm_bias = self.store.add(format!("{prefix}.norm.bias"), &[cout], Init::Zeros, role, d);
        let padding = kernel.map(|k| (k - 1) / 2 * dilation);
        ConvNorm { weight, norm_weight, norm_bias, stride, padding, dilation: [dilation; 3] }
    }

    fn res_block(
        &mut self,
        prefix: &str,
        cin: i64,
        cout: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
        role: Role,
    ) -> ResBlock {
        let first = self.conv_norm(&format!("{prefix}.conv1"), cin, cout, kernel, stride, 1, role);
        let second = self.conv_norm(&format!("{prefix}.conv2"), cout, cout, kernel, [1; 3], 1, role);
        let skip = (stride != [1; 3] || cin != cout)
            .then(|| self.conv_norm(&format!("{prefix}.skip"), cin, cout, [1; 3], stride, 1, role));
        ResBlock { first, second, skip }
    }

    fn frm(&mut self, spec: &FireNetSpec, c: i64) -> (Vec<ConvNorm>, Vec<Vec<Node>>, ConvNorm) {
        let bb = spec.branches;
        let width = |b: usize| c << b;
        let role = Role::Backbone;
        let entry = (1..bb)
            .map(|b| self.conv_norm(&format!("frm.entry.{b}"), width(b - 1), width(b), [1; 3], [1; 3], 1, role))
            .collect();
        let mut nodes = Vec::with_capacity(spec.nodes);
        for n in 0..spec.nodes {
            let mut column = Vec::with_capacity(bb);
            for b in 0..bb {
                let p = format!("frm.nodes.{n}.{b}");
                let sources: Vec<usize> = (b.saturating_sub(1)..=(b + 1).min(bb - 1)).collect();
                let align = sources
                    .iter()
                    .map(|&src| {
                        (src != b).then(|| {
                            self.conv_norm(&format!("{p}.align.{src}"), width(src), width(b), [1; 3], [1; 3], 1, role)
                        })
                    })
                    .collect();
                let fuse = self.store.add(format!("{p}.fuse"), &[sources.len() as i64], Init::Zeros, role, self.device);
                let aspp = spec
                    .dilations
                    .iter()
                    .enumerate()
                    .map(|(k, &d)| {
                        self.conv_norm(&format!("{p}.aspp.{k}"), width(b), width(b), [3; 3], [1; 3], d, role)
                    })
                    .collect();
                let k = spec.dilations.len() as i64;
                let merge = self.conv_norm(&format!("{p}.aspp.merge"), k * width(b), width(b), [1; 3], [1; 3], 1, role);
                column.push(Node { align, sources, fuse, aspp, merge });
            }
            nodes.push(column);
        }
        let all: i64 = (0..bb).map(width).sum();
        let exit = self.conv_norm("frm.exit", all, c, [1; 3], [1; 3], 1, role);
        (entry, nodes, exit)
    }

    /// Decoder levels `n-2` down to 0 (deepest first).
    fn decoder(&mut self, prefix: &str, topo: &Topology, role: Role) -> Decoder {
        let stages = &topo.stages;
        let n = stages.len();
        let levels = (0..n - 1)
            .rev()
            .map(|l| {
                let (w, k) = (stages[l].width, stages[l].kernel);
                let p = format!("{prefix}.levels.{l}");
                let up = self.conv_norm(&format!("{p}.up"), stages[l + 1].width, w, [1; 3], [1; 3], 1, role);
                let skip = self.conv_norm(&format!("{p}.skip"), w, w, k, [1; 3], 1, role);
                let blocks = (0..topo.decoder_convs)
                    .map(|j| self.res_block(&format!("{p}.blocks.{j}"), w, w, k, [1; 3], role))
                    .collect();
                DecoderLevel { up, skip, blocks }
            })
            .collect();
        Decoder { levels }
    }
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

    /// Head outputs, full resolution first (`all_heads`), or only the full-resolution one.
    pub(crate) fn forward(&self, p: &ParamStore, x: &Tensor, all_heads: bool) -> Vec<Tensor> {
        let mut x = self.conv_norm(p, x, &self.stem, true);
        let mut skips = vec![x.shallow_clone()];
        for blocks in &self.encoder {
            x = blocks.iter().fold(x, |x, blk| self.res_block(p, &x, blk));
            skips.push(x.shallow_clone());
        }
        skips.pop(); // the bottleneck feeds the FRM
        let frm = self.frm(p, &x);
        let levels = self.heads.len();
        // Per decoder, the features of every decoder level, index = level.
        let feats: Vec<Vec<Option<Tensor>>> =
            self.decoders.iter().map(|d| self.decode(p, &frm, &skips, d, all_heads)).collect();
        let mut outputs = Vec::with_capacity(levels);
        for level in 0..levels - 1 {
            if !all_heads && level > 0 {
                break;
            }
            let head = &self.heads[level];
            let out = match &self.routing {
                None => self.head(p, feats[0][level].as_ref().expect("decoded level"), head, None),
                Some((sites, inverse)) => {
                    let per_site: Vec<Tensor> = sites
                        .iter()
                        .zip(&feats)
                        .map(|(classes, f)| {
                            self.head(p, f[level].as_ref().expect("decoded level"), head, Some(classes))
                        })
                        .collect();
                    Tensor::cat(&per_site, 1).index_select(1, inverse)
                }
            };
            outputs.push(out);
        }
        if all_heads {
            outputs.push(self.head(p, &frm, &self.heads[levels - 1], None));
        }
        outputs
    }

    fn head(&self, p: &ParamStore, x: &Tensor, head: &Head, classes: Option<&Tensor>) -> Tensor {
        let (w, b) = (p.get(head.weight), p.get(head.bias));
        match classes {
            None => x.conv3d(w, Some(b), [1; 3], [0; 3], [1; 3], 1),
            Some(idx) => x.conv3d(&w.index_select(0, idx), Some(b.index_select(0, idx)), [1; 3], [0; 3], [1; 3], 1),
        }
    }

    /// Decoder features by level (`None` for levels not needed and for the FRM level).
    fn decode(
        &self,
        p: &ParamStore,
        frm: &Tensor,
        skips: &[Tensor],
        dec: &Decoder,
        all_levels: bool,
    ) -> Vec<Option<Tensor>> {
        let mut out: Vec<Option<Tensor>> = (0..skips.len()).map(|_| None).collect();
        let mut x = frm.shallow_clone();
        for (i, level) in dec.levels.iter().enumerate() {
            let l = skips.len() - 1 - i;
            let skip = &skips[l];
            let up = resize(&self.conv_norm(p, &x, &level.up, false), &skip.size()[2..]);
            let merged = (up + self.conv_norm(p, skip, &level.skip, false)).leaky_relu();
            x = level.blocks.iter().fold(merged, |x, blk| self.res_block(p, &x, blk));
            if all_levels || l == 0 {
                out[l] = Some(x.shallow_clone());
            }
        }
        out
    }

    fn frm(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let size0 = x.size()[2..].to_vec();
        let mut sizes = vec![size0.clone()];
        let mut column = vec![x.shallow_clone()];
        for entry in &self.entry {
            let size = half(sizes.last().expect("branch 1"));
            let prev = column.last().expect("branch 1");
            column.push(resize(&self.conv_norm(p, prev, entry, false), &size));
            sizes.push(size);
        }
        for nodes in &self.nodes {
            column = nodes
                .iter()
                .enumerate()
                .map(|(b, node)| {
                    let gates = p.get(node.fuse).sigmoid();
                    let mut fused: Option<Tensor> = None;
                    for (k, (&src, align)) in node.sources.iter().zip(&node.align).enumerate() {
                        let input = match align {
                            None => column[src].shallow_clone(),
                            Some(a) => resize(&self.conv_norm(p, &column[src], a, false), &sizes[b]),
                        };
                        let term = input * gates.get(k as i64);
                        fused = Some(match fused {
                            Some(f) => f + term,
                            None => term,
                        });
                    }
                    let fused = fused.expect("a node has at least its own branch as input");
                    let branches: Vec<Tensor> =
                        node.aspp.iter().map(|cn| self.conv_norm(p, &fused, cn, true)).collect();
                    self.conv_norm(p, &Tensor::cat(&branches, 1), &node.merge, true)
                })
                .collect();
        }
        let back: Vec<Tensor> = column.iter().map(|t| resize(t, &size0)).collect();
        self.conv_norm(p, &Tensor::cat(&back, 1), &self.exit, true)
    }

    fn res_block(&self, p: &ParamStore, x: &Tensor, blk: &ResBlock) -> Tensor {
        let y = self.conv_norm(p, x, &blk.first, true);
        let y = self.conv_norm(p, &y, &blk.second, false);
        let skip = match &blk.skip {
            Some(s) => self.conv_norm(p, x, s, false),
            None => x.shallow_clone(),
        };
        (y + skip).leaky_relu()
    }

    fn conv_norm(&self, p: &ParamStore, x: &Tensor, cn: &ConvNorm, activate: bool) -> Tensor {
        let y = x.conv3d::<Tensor>(p.get(cn.weight), None, cn.stride, cn.padding, cn.dilation, 1);
        crate::network::instance_norm_act(&y, p.get(cn.norm_weight), p.get(cn.norm_bias), activate)
    }
}
