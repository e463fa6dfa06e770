//! The building blocks every network layout is made of: conv + instance norm, the residual block,
//! the per-class head and the transposed-conv upsampler.
//!
//! A block is a struct of [`ParamId`]s, a spec with named fields saying what to build, `new`
//! (registers the block's tensors in a [`ParamScope`], in nnU-Net v1's order: conv weight, conv
//! bias, norm weight, norm bias) and `forward` (reads the tensors from the [`ParamStore`]). Where
//! the layouts name a block's layers differently, the names are data ([`ConvNormNames`],
//! [`ResidualNames`]) next to the layout that uses them, so the block itself is written once.

use tch::Tensor;

use crate::params::{Init, ParamId, ParamScope, ParamStore, Role};

/// InstanceNorm3d's eps (PyTorch's default, nnU-Net's setting).
const IN_EPS: f64 = 1e-5;

/// What follows a [`ConvNorm`]'s instance norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// LeakyReLU with slope 0.01 (nnU-Net's nonlinearity).
    LeakyRelu,
    /// Nothing: the output feeds a sum (residual or skip) that is activated afterwards.
    Linear,
}

/// What a [`ConvNorm`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvNormSpec {
    pub cin: i64,
    pub cout: i64,
    pub kernel: [i64; 3],
    pub stride: [i64; 3],
    /// The same dilation on every axis; the padding keeps the size (`(k - 1) / 2 * dilation`).
    pub dilation: i64,
    /// Generic_UNet's convs carry a bias (redundant before the norm, but in its state dict).
    pub bias: bool,
    /// Initial norm scale; [`Init::Zeros`] makes a residual block start as its skip path.
    pub norm_scale: Init,
    pub activation: Activation,
}

impl ConvNormSpec {
    /// A `kernel` conv from `cin` to `cout` channels: stride 1, no dilation, no bias, norm scale
    /// one, LeakyReLU. Override fields with struct update syntax.
    pub fn new(cin: i64, cout: i64, kernel: [i64; 3]) -> Self {
        Self {
            cin,
            cout,
            kernel,
            stride: [1; 3],
            dilation: 1,
            bias: false,
            norm_scale: Init::Ones,
            activation: Activation::LeakyRelu,
        }
    }
}

/// The names of a [`ConvNorm`]'s two layers inside its scope.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvNormNames {
    pub conv: &'static str,
    pub norm: &'static str,
}

impl ConvNormNames {
    /// `conv` + `norm`: FabiansUNet's decoder convs and every FIRENet conv.
    pub const CONV_NORM: Self = Self { conv: "conv", norm: "norm" };
    /// `conv` + `instnorm`: Generic_UNet's `ConvDropoutNormNonlin`.
    pub const CONV_INSTNORM: Self = Self { conv: "conv", norm: "instnorm" };
}

/// Conv3d (+ optional bias) -> InstanceNorm3d (affine, no running stats) [-> LeakyReLU].
#[derive(Debug, Clone)]
pub(crate) struct ConvNorm {
    pub weight: ParamId,
    bias: Option<ParamId>,
    pub norm_weight: ParamId,
    pub norm_bias: ParamId,
    stride: [i64; 3],
    padding: [i64; 3],
    dilation: [i64; 3],
    activation: Activation,
}

impl ConvNorm {
    pub fn new(scope: &ParamScope, names: ConvNormNames, spec: ConvNormSpec) -> Self {
        let (conv, norm) = (scope.pp(names.conv), scope.pp(names.norm));
        let [kz, ky, kx] = spec.kernel;
        let weight = conv.add("weight", &[spec.cout, spec.cin, kz, ky, kx], Init::KaimingNormal);
        let bias = spec.bias.then(|| conv.add("bias", &[spec.cout], Init::Zeros));
        let norm_weight = norm.add("weight", &[spec.cout], spec.norm_scale);
        let norm_bias = norm.add("bias", &[spec.cout], Init::Zeros);
        Self {
            weight,
            bias,
            norm_weight,
            norm_bias,
            stride: spec.stride,
            padding: spec.kernel.map(|k| (k - 1) / 2 * spec.dilation),
            dilation: [spec.dilation; 3],
            activation: spec.activation,
        }
    }

    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let bias = self.bias.map(|b| p.get(b));
        let y = x.conv3d(p.get(self.weight), bias, self.stride, self.padding, self.dilation, 1);
        let y = y.instance_norm(
            Some(p.get(self.norm_weight)),
            Some(p.get(self.norm_bias)),
            None,
            None,
            true,
            0.1,
            IN_EPS,
            true,
        );
        match self.activation {
            Activation::LeakyRelu => y.leaky_relu(),
            Activation::Linear => y,
        }
    }
}

/// What a [`ResidualBlock`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResidualSpec {
    pub cin: i64,
    pub cout: i64,
    pub kernel: [i64; 3],
    /// Stride of the first conv (and of the skip conv).
    pub stride: [i64; 3],
    /// Initial scale of the second norm (FabiansUNet zeroes it).
    pub second_norm_scale: Init,
}

/// The names of a [`ResidualBlock`]'s three [`ConvNorm`]s inside its scope.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResidualNames {
    pub first: ConvNormNames,
    pub second: ConvNormNames,
    pub skip: ConvNormNames,
}

impl ResidualNames {
    /// nnU-Net v1's `BasicResidualBlock`: `conv1`/`norm1`, `conv2`/`norm2`, `downsample_skip.{0,1}`.
    pub const FABIANS_UNET: Self = Self {
        first: ConvNormNames { conv: "conv1", norm: "norm1" },
        second: ConvNormNames { conv: "conv2", norm: "norm2" },
        skip: ConvNormNames { conv: "downsample_skip.0", norm: "downsample_skip.1" },
    };
    /// FIRENet's (ours): `conv1.{conv,norm}`, `conv2.{conv,norm}`, `skip.{conv,norm}`.
    pub const FIRENET: Self = Self {
        first: ConvNormNames { conv: "conv1.conv", norm: "conv1.norm" },
        second: ConvNormNames { conv: "conv2.conv", norm: "conv2.norm" },
        skip: ConvNormNames { conv: "skip.conv", norm: "skip.norm" },
    };
}

/// `out = LReLU(IN2(conv2(LReLU(IN1(conv1(x))))) + skip(x))`, skip = IN(1x1x1 conv) with the
/// block's stride when stride or width change, else the identity.
#[derive(Debug, Clone)]
pub(crate) struct ResidualBlock {
    first: ConvNorm,
    second: ConvNorm,
    skip: Option<ConvNorm>,
}

impl ResidualBlock {
    pub fn new(scope: &ParamScope, names: ResidualNames, spec: ResidualSpec) -> Self {
        let ResidualSpec { cin, cout, kernel, stride, second_norm_scale } = spec;
        let first = ConvNorm::new(scope, names.first, ConvNormSpec { stride, ..ConvNormSpec::new(cin, cout, kernel) });
        let second = ConvNorm::new(
            scope,
            names.second,
            ConvNormSpec {
                norm_scale: second_norm_scale,
                activation: Activation::Linear,
                ..ConvNormSpec::new(cout, cout, kernel)
            },
        );
        let skip = (stride != [1; 3] || cin != cout).then(|| {
            let spec = ConvNormSpec { stride, activation: Activation::Linear, ..ConvNormSpec::new(cin, cout, [1; 3]) };
            ConvNorm::new(scope, names.skip, spec)
        });
        Self { first, second, skip }
    }

    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let y = self.second.forward(p, &self.first.forward(p, x));
        let skip = match &self.skip {
            Some(skip) => skip.forward(p, x),
            None => x.shallow_clone(),
        };
        (y + skip).leaky_relu()
    }
}

/// What a [`Head`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadSpec {
    /// Channels of the decoder level it reads.
    pub width: i64,
    pub classes: i64,
    /// The decoder level (0 = full resolution); its tensors get [`Role::Head`] of this level.
    pub level: usize,
    /// Generic_UNet's heads have no bias, FabiansUNet's and FIRENet's do.
    pub bias: bool,
}

/// The per-class 1x1x1 sigmoid heads of one level: output channel (row) `c` is class `c`.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    weight: ParamId,
    bias: Option<ParamId>,
}

impl Head {
    pub fn new(scope: &ParamScope, spec: HeadSpec) -> Self {
        let scope = scope.with_role(Role::Head { level: spec.level });
        let weight = scope.add("weight", &[spec.classes, spec.width, 1, 1, 1], Init::KaimingNormal);
        let bias = spec.bias.then(|| scope.add("bias", &[spec.classes], Init::Zeros));
        Self { weight, bias }
    }

    /// The logits of every class.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        let bias = self.bias.map(|b| p.get(b));
        x.conv3d(p.get(self.weight), bias, [1; 3], [0; 3], [1; 3], 1)
    }

    /// The logits of the classes `rows` only, in that order.
    pub fn forward_rows(&self, p: &ParamStore, x: &Tensor, rows: &Tensor) -> Tensor {
        let bias = self.bias.map(|b| p.get(b).index_select(0, rows));
        x.conv3d(&p.get(self.weight).index_select(0, rows), bias, [1; 3], [0; 3], [1; 3], 1)
    }
}

/// ConvTranspose3d without bias, kernel = stride (nnU-Net's decoder upsampling), named
/// `<scope>.weight`.
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    weight: ParamId,
    stride: [i64; 3],
}

impl Upsample {
    pub fn new(scope: &ParamScope, from: i64, to: i64, stride: [i64; 3]) -> Self {
        let [sz, sy, sx] = stride;
        Self { weight: scope.add("weight", &[from, to, sz, sy, sx], Init::KaimingNormal), stride }
    }

    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Tensor {
        x.conv_transpose3d::<Tensor>(p.get(self.weight), None, self.stride, [0; 3], [0; 3], 1, [1; 3])
    }
}
