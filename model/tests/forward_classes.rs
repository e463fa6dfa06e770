//! `MultiTalentNet::forward_classes`: the full-resolution logits of some classes, equal to the
//! same channels of `forward`, and with per-site decoders only the decoders of those classes'
//! sites run (a site predicting its own classes with a federation's model pays for its decoder
//! alone). Every layout: Generic_UNet, FabiansUNet, FIRENet; decoders shared or per site.

use fedtalent_model::params::Role;
use fedtalent_model::{Layout, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

/// The tests seed libtorch's global RNG; running them one at a time keeps each deterministic.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sites of the 5-class networks: 0 = {0, 3}, 1 = {1}, 2 = {2, 4}.
fn sites() -> Vec<Vec<i64>> {
    vec![vec![0, 3], vec![1], vec![2, 4]]
}

/// (name, topology) of every layout, with per-site decoders (`own_stages` encoder stages of
/// their own where the layout has them) or one shared decoder.
fn topologies() -> Vec<(String, Topology)> {
    let tiny = Topology::preset("tiny").unwrap();
    let resenc =
        Topology { name: "resenc-tiny".into(), layout: Layout::ResidualEncoder, decoder_convs: 1, ..tiny.clone() };
    let firenet = Topology::preset("firenet-tiny").unwrap();
    let mut all = Vec::new();
    for base in [tiny, resenc, firenet] {
        all.push((format!("{} shared decoder", base.name), base.clone()));
        all.push((format!("{} per-site decoders", base.name), base.clone().with_site_decoders(sites())));
        if base.layout != Layout::FireNet {
            let own = base.clone().with_site_decoders(sites()).with_site_encoder_stages(1);
            all.push((format!("{} per-site decoders + bottleneck", base.name), own));
        }
    }
    all
}

fn input(topo: &Topology) -> Tensor {
    let [z, y, x] = topo.patch;
    Tensor::randn([2, 1, z, y, x], (Kind::Float, Device::Cpu))
}

#[test]
fn forward_classes_equals_the_same_channels_of_forward() {
    let _serial = serial();
    for (name, topo) in topologies() {
        tch::manual_seed(5);
        let net = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
        let x = input(&topo);
        let all = tch::no_grad(|| net.forward(&x));
        // One site's classes, classes of two sites out of order, one class, every class reversed.
        for classes in [vec![0, 3], vec![4, 1], vec![2], vec![4, 3, 2, 1, 0]] {
            let some = tch::no_grad(|| net.forward_classes(&x, &classes).unwrap());
            let expected = all.index_select(1, &Tensor::from_slice(&classes));
            assert_eq!(some.size(), expected.size(), "{name} {classes:?}");
            let diff = (&some - &expected).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} {classes:?}: differs from forward's channels by {diff}");
        }
    }
}

/// The decoders of sites whose classes were not asked for never run: no gradient reaches
/// their parameters (through `forward` + `index_select` every decoder would get one, of zeros).
#[test]
fn only_the_selected_classes_decoders_run() {
    let _serial = serial();
    for (name, topo) in topologies().into_iter().filter(|(_, t)| !t.site_decoders.is_empty()) {
        // Site 2's classes, then sites 0 and 1's; a fresh network each time (no gradient yet).
        for (classes, running) in [(vec![4, 2], vec![2]), (vec![1, 3], vec![0, 1])] {
            tch::manual_seed(5);
            let net = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
            net.forward_classes(&input(&topo), &classes).unwrap().sum(Kind::Float).backward();
            for site in 0..3 {
                let decoder: Vec<_> = net.params().iter().filter(|p| p.role == Role::SiteDecoder { site }).collect();
                assert!(!decoder.is_empty(), "{name}: site {site} has no decoder parameter");
                let reached = decoder.iter().filter(|p| p.tensor.grad().defined()).count();
                let expected = if running.contains(&site) { decoder.len() } else { 0 };
                assert_eq!(reached, expected, "{name} {classes:?}: decoder of site {site}, parameters with a gradient");
            }
        }
    }
}

#[test]
fn forward_classes_refuses_a_class_the_network_lacks() {
    let _serial = serial();
    let topo = Topology::preset("tiny").unwrap().with_site_decoders(sites());
    let net = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
    let x = input(&topo);
    let err = net.forward_classes(&x, &[1, 5]).unwrap_err().to_string();
    assert!(err.contains("class 5 does not exist (the network has 5)"), "{err}");
    assert!(net.forward_classes(&x, &[-1]).is_err());
    assert!(net.forward_classes(&x, &[]).unwrap_err().to_string().contains("no class selected"));
}

/// `runs`, not only the routing of the heads: with every tensor of site 0's decoder replaced by
/// one of the wrong shape, a forward of every class fails, and one of sites 1 and 2's classes
/// does not touch it.
#[test]
fn a_decoder_that_cannot_run_is_not_needed_for_other_sites_classes() {
    let _serial = serial();
    for (name, topo) in topologies().into_iter().filter(|(_, t)| !t.site_decoders.is_empty()) {
        tch::manual_seed(5);
        let net = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
        for p in net.params().iter().filter(|p| p.role == Role::SiteDecoder { site: 0 }) {
            // Shares the parameter's TensorImpl, so set_data replaces the parameter's own data.
            let mut shared = p.tensor.shallow_clone();
            tch::no_grad(|| shared.set_data(&Tensor::zeros([3], (Kind::Float, Device::Cpu))));
        }
        let x = input(&topo);
        let every_class = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tch::no_grad(|| net.forward(&x))));
        assert!(every_class.is_err(), "{name}: the broken decoder ran without error");
        let others = tch::no_grad(|| net.forward_classes(&x, &[1, 2, 4]).unwrap());
        assert_eq!(others.size()[1], 3, "{name}");
    }
}
