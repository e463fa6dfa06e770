//! Channels-last inference (InferOptions::channels_last, the CPU default): the same
//! probabilities as the plain layout, and the network's weights back to contiguous afterwards.

use fedtalent_model::infer::{sliding_window_probabilities, InferOptions};
use fedtalent_model::{MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

fn probabilities(net: &MultiTalentNet, image: &Tensor, channels_last: bool, mirror: bool) -> Tensor {
    let opts = InferOptions {
        mirror,
        tile_batch: 3,
        progress: false,
        channels_last: Some(channels_last),
        ..InferOptions::default()
    };
    sliding_window_probabilities(net, image, net.topology().patch, &opts).unwrap()
}

#[test]
fn channels_last_gives_the_plain_layouts_probabilities_and_restores_the_weights() {
    tch::manual_seed(3);
    let net = MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 4, Device::Cpu).unwrap();
    let before: Vec<(String, Tensor)> = net.params().trainable().into_iter().map(|(n, t)| (n, t.copy())).collect();
    // Two input channels are not needed: the first convolution's weight [30, 1, ...] still gets
    // the channels-last strides, and every later activation has many channels.
    let image = Tensor::randn([1, 20, 70, 60], (Kind::Float, Device::Cpu));
    for mirror in [false, true] {
        let plain = probabilities(&net, &image, false, mirror);
        let last = probabilities(&net, &image, true, mirror);
        let diff = (&plain - &last).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "mirror {mirror}: channels-last differs by {diff}");
    }
    for ((name, saved), (_, now)) in before.iter().zip(net.params().trainable()) {
        assert!(now.is_contiguous(), "{name} is not contiguous after inference");
        assert!(saved.equal(&now), "{name} changed");
    }
    // The default on the CPU is channels-last, and gives the same.
    let default = sliding_window_probabilities(
        &net,
        &image,
        net.topology().patch,
        &InferOptions { progress: false, ..Default::default() },
    )
    .unwrap();
    let diff = (&default - probabilities(&net, &image, false, false)).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "default differs by {diff}");
}
