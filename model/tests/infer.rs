//! Sliding-window inference: Gaussian weights, tiling, padding, mirroring, batching.

use fedtalent_model::infer::{
    gaussian_importance, sliding_window_probabilities, sliding_window_with, tile_starts, Accumulate, InferOptions,
};
use fedtalent_model::{MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

fn opts(mirror: bool, tile_batch: usize) -> InferOptions {
    InferOptions { mirror, tile_batch, progress: false, ..InferOptions::default() }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn gaussian_is_nnunets() {
    let patch = [16i64, 32, 24];
    let g = gaussian_importance(patch);
    assert_eq!(g.size(), patch.to_vec());
    // Maximum 1 at the centre voxel patch / 2.
    assert!((g.double_value(&[8, 16, 12]) - 1.0).abs() < 1e-7);
    assert!((g.max().double_value(&[]) - 1.0).abs() < 1e-7);
    // One σ = patch/8 away along each axis: exp(-1/2).
    let e = (-0.5f64).exp();
    for v in [g.double_value(&[10, 16, 12]), g.double_value(&[8, 20, 12]), g.double_value(&[8, 16, 15])] {
        assert!((v - e).abs() < 1e-6, "{v} vs {e}");
    }
    // Separable product: corner voxel = product of the three axis values (4σ on each axis).
    let corner = g.double_value(&[0, 0, 0]);
    assert!((corner - (-8.0f64 * 3.0).exp()).abs() < 1e-12, "{corner}");
    assert!(g.min().double_value(&[]) > 0.0, "no zero weights");
}

#[test]
fn tile_starts_follow_nnunet() {
    // ceil((200 - 96) / 48) + 1 = 4 tiles, step 104 / 3 = 34.67 rounded.
    assert_eq!(tile_starts(200, 96, 0.5), vec![0, 35, 69, 104]);
    assert_eq!(tile_starts(96, 96, 0.5), vec![0]);
    // ceil(1 / 96) + 1 = 2 tiles: the last tile ends at the border.
    assert_eq!(tile_starts(193, 192, 0.5), vec![0, 1]);
    // ceil(320 / 96) + 1 = 5 tiles, step 80.
    assert_eq!(tile_starts(512, 192, 0.5), vec![0, 80, 160, 240, 320]);
}

/// A "network" with constant per-channel logits: the weighted average is that constant's sigmoid
/// everywhere, borders and padded volumes included.
#[test]
fn constant_logits_stay_flat() {
    let logits = [-2.0f64, 0.3, 1.7];
    let forward = |x: &Tensor| {
        let b = x.size()[0];
        let s = x.size();
        Tensor::from_slice(&logits)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1, 1])
            .expand([b, 3, s[2], s[3], s[4]], false)
            .contiguous()
    };
    let patch = [16, 32, 24];
    for shape in [[37i64, 50, 45], [10, 20, 70], [16, 32, 24], [5, 7, 9]] {
        let image = Tensor::randn([1, shape[0], shape[1], shape[2]], (Kind::Float, Device::Cpu));
        for acc in [Accumulate::Auto, Accumulate::Cpu] {
            let mut o = opts(false, 3);
            o.accumulate = acc;
            let p = sliding_window_with(forward, 3, &image, patch, &o).unwrap();
            assert_eq!(p.size(), vec![3, shape[0], shape[1], shape[2]]);
            for (c, l) in logits.iter().enumerate() {
                let want = 1.0 / (1.0 + (-l).exp());
                let ch = p.get(c as i64);
                let err = (ch - want).abs().max().double_value(&[]);
                assert!(err < 1e-6, "shape {shape:?} channel {c}: off by {err}");
            }
        }
    }
}

/// A pointwise "network" (logit = voxel value): every tile, wherever it lies, must give back
/// sigmoid(image) exactly; a misplaced tile or a wrong weight would show.
#[test]
fn pointwise_network_gives_pointwise_probabilities() {
    let forward = |x: &Tensor| x * 1.0;
    let patch = [16, 32, 24];
    for shape in [[37i64, 50, 45], [5, 7, 9], [16, 40, 10]] {
        let image = Tensor::randn([1, shape[0], shape[1], shape[2]], (Kind::Float, Device::Cpu)) * 3.0;
        for batch in [1, 4] {
            let p = sliding_window_with(forward, 1, &image, patch, &opts(false, batch)).unwrap();
            let err = max_abs(&p, &image.sigmoid());
            assert!(err < 1e-6, "shape {shape:?} batch {batch}: off by {err}");
        }
    }
}

/// Mirroring a flip-equivariant (pointwise) setup changes nothing; mirroring a network that
/// depends on the position within the tile does change the result (the test can fail).
#[test]
fn mirroring_symmetric_setup_equals_no_mirroring() {
    let patch = [16, 32, 24];
    let image = Tensor::randn([1, 30, 40, 50], (Kind::Float, Device::Cpu));
    let pointwise = |x: &Tensor| x * 2.0;
    let a = sliding_window_with(pointwise, 1, &image, patch, &opts(false, 2)).unwrap();
    let b = sliding_window_with(pointwise, 1, &image, patch, &opts(true, 2)).unwrap();
    assert!(max_abs(&a, &b) < 1e-6);

    // Logit = z position in the tile: mirrored over z, the average is no longer that ramp.
    let ramp = |x: &Tensor| {
        let s = x.size();
        Tensor::arange(s[2], (Kind::Float, Device::Cpu)).view([1, 1, s[2], 1, 1]).expand(s.as_slice(), false) * 0.5
            + x * 0.0
    };
    let a = sliding_window_with(ramp, 1, &image, patch, &opts(false, 2)).unwrap();
    let b = sliding_window_with(ramp, 1, &image, patch, &opts(true, 2)).unwrap();
    assert!(max_abs(&a, &b) > 0.1);
}

/// With a real network and a volume of one patch, mirroring equals the hand-made average of the
/// 8 flipped predictions; batching tiles does not change the result.
#[test]
fn mirroring_real_network_is_the_flip_average_and_batching_is_neutral() {
    tch::manual_seed(0);
    let net = MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 2, Device::Cpu).unwrap();
    let patch = [32, 64, 64];
    let image = Tensor::randn([1, 32, 64, 64], (Kind::Float, Device::Cpu));
    let got = sliding_window_probabilities(&net, &image, patch, &opts(true, 1)).unwrap();
    let x = image.unsqueeze(0);
    let mut sum = Tensor::zeros([2, 32, 64, 64], (Kind::Float, Device::Cpu));
    for dims in [vec![], vec![2i64], vec![3], vec![4], vec![2, 3], vec![2, 4], vec![3, 4], vec![2, 3, 4]] {
        let p = tch::no_grad(|| net.forward(&x.flip(dims.as_slice())).sigmoid().flip(dims.as_slice()));
        sum += p.get(0);
    }
    let want = sum / 8.0;
    assert!(max_abs(&got, &want) < 1e-5);
    let plain = sliding_window_probabilities(&net, &image, patch, &opts(false, 1)).unwrap();
    assert!(max_abs(&got, &plain) > 1e-3, "mirroring did something");

    let big = Tensor::randn([1, 40, 70, 66], (Kind::Float, Device::Cpu));
    let one = sliding_window_probabilities(&net, &big, patch, &opts(false, 1)).unwrap();
    let three = sliding_window_probabilities(&net, &big, patch, &opts(false, 3)).unwrap();
    assert!(max_abs(&one, &three) < 1e-5);
    let mut sel = opts(false, 3);
    sel.channels = Some(vec![1]);
    let only1 = sliding_window_probabilities(&net, &big, patch, &sel).unwrap();
    let err = max_abs(&only1.get(0), &one.get(1));
    assert!(err < 1e-5, "channel selection off by {err}");
}

/// A volume smaller than the patch on every axis: padded, predicted, cut back.
#[test]
fn volume_smaller_than_patch() {
    tch::manual_seed(1);
    let net = MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 3, Device::Cpu).unwrap();
    let image = Tensor::randn([1, 9, 20, 33], (Kind::Float, Device::Cpu));
    let p = sliding_window_probabilities(&net, &image, [32, 64, 64], &opts(false, 2)).unwrap();
    assert_eq!(p.size(), vec![3, 9, 20, 33]);
    // Equal to the network on the zero-padded patch, cut back (padding: half below).
    let padded = image.constant_pad_nd([15, 16, 22, 22, 11, 12]).unsqueeze(0);
    let full = tch::no_grad(|| net.forward(&padded).sigmoid()).get(0);
    let want = full.narrow(1, 11, 9).narrow(2, 22, 20).narrow(3, 15, 33);
    assert!(max_abs(&p, &want) < 1e-5);
}
