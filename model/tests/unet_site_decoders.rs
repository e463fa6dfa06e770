//! Per-site decoders on the nnU-Net layouts (`tiny`: Generic_UNet; its stages as FabiansUNet): counts and roles, the shared layout untouched, routing of each class to its
//! site's decoder, and gradients that never cross to another site's decoder.

use fedtalent_model::params::Role;
use fedtalent_model::{BatchTargets, ClassRegions, Layout, MultiTalentLoss, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

/// The tests seed libtorch's global RNG; running them one at a time keeps each deterministic.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn net(topo: &Topology, classes: i64) -> MultiTalentNet {
    MultiTalentNet::new(topo, classes, Device::Cpu).unwrap()
}

/// `tiny`, or `tiny`'s stages in the FabiansUNet layout (the `resenc` graph at CPU size).
fn topology(layout: &str) -> Topology {
    let tiny = Topology::preset("tiny").unwrap();
    match layout {
        "tiny" => tiny,
        "resenc-tiny" => {
            Topology { name: "resenc-tiny".into(), layout: Layout::ResidualEncoder, decoder_convs: 1, ..tiny }
        }
        other => panic!("{other}"),
    }
}

/// Sites: A = classes {0, 2}, B = class {1}.
fn two_sites(layout: &str) -> MultiTalentNet {
    two_sites_with_own_stages(layout, 0)
}

/// [`two_sites`] where each site also has the deepest `own_stages` encoder stages of its own.
fn two_sites_with_own_stages(layout: &str, own_stages: usize) -> MultiTalentNet {
    tch::manual_seed(11);
    let topo = topology(layout).with_site_decoders(vec![vec![0, 2], vec![1]]).with_site_encoder_stages(own_stages);
    net(&topo, 3)
}

/// Every (layout, own encoder stages) the routing tests run: the whole encoder shared, its
/// bottleneck per site, and all but its first stage per site.
const CASES: [(&str, usize); 6] =
    [("tiny", 0), ("tiny", 1), ("tiny", 3), ("resenc-tiny", 0), ("resenc-tiny", 1), ("resenc-tiny", 3)];

/// With the deepest stages per site, each site's decoder scope holds those stages under the
/// encoder's own names; the backbone keeps the rest; nothing is added but the stages' copies.
#[test]
fn a_sites_own_encoder_stages_move_from_the_backbone_into_its_decoder() {
    let _serial = serial();
    for layout in ["tiny", "resenc-tiny"] {
        let shared_encoder = two_sites(layout);
        let own = two_sites_with_own_stages(layout, 1);
        let deepest = if layout == "tiny" { "conv_blocks_context.3." } else { "encoder.stages.3." };
        let bottleneck = shared_encoder.params().count(|p| p.name.starts_with(deepest));
        assert!(bottleneck > 0, "{layout}: no bottleneck tensor named {deepest}*");
        let (total, backbone, per_class) = own.parameter_counts();
        let (total0, backbone0, per_class0) = shared_encoder.parameter_counts();
        assert_eq!(backbone, backbone0 - bottleneck, "{layout}: the bottleneck left the backbone");
        assert_eq!(total, total0 + bottleneck, "{layout}: one more bottleneck (two sites, one was shared)");
        assert_eq!(per_class, per_class0);
        for s in 0..2 {
            let prefix = format!("decoders.{s}.{deepest}");
            let stage: Vec<_> = own.params().iter().filter(|p| p.name.starts_with(&prefix)).collect();
            assert!(!stage.is_empty(), "{layout}: site {s} has no {prefix}*");
            assert!(stage.iter().all(|p| p.role == fedtalent_model::params::Role::SiteDecoder { site: s }));
        }
    }
    // Refused: without per-site decoders, for FireNet, and the first stage (or more) per site.
    let tiny = Topology::preset("tiny").unwrap();
    for (topo, expected) in [
        (tiny.clone().with_site_encoder_stages(1), "needs per-site decoders"),
        (tiny.clone().with_site_decoders(vec![vec![0, 1, 2]]).with_site_encoder_stages(4), "its first stays shared"),
        (
            Topology::preset("firenet-tiny")
                .unwrap()
                .with_site_decoders(vec![vec![0, 1, 2]])
                .with_site_encoder_stages(1),
            "FireNet",
        ),
    ] {
        let err = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn each_site_has_one_whole_decoder_and_the_backbone_is_the_encoder() {
    let _serial = serial();
    for preset in ["tiny", "resenc-tiny"] {
        let shared = net(&topology(preset), 3);
        let per_site = two_sites(preset);
        let site = |s: usize| per_site.params().count(|p| p.role == Role::SiteDecoder { site: s });
        let decoder_of_shared = shared.params().count(|p| {
            p.role == Role::Backbone
                && ["conv_blocks_localization", "tu.", "decoder.tus", "decoder.stages"]
                    .iter()
                    .any(|n| p.name.starts_with(n))
        });
        assert!(decoder_of_shared > 0, "{preset}: no decoder tensors found by name");
        assert_eq!(site(0), decoder_of_shared, "{preset}: site A's decoder is one decoder");
        assert_eq!(site(1), decoder_of_shared, "{preset}: site B's decoder is one decoder");
        let (total, backbone, per_class) = per_site.parameter_counts();
        assert_eq!(total, shared.parameter_counts().0 + decoder_of_shared, "{preset}: total");
        assert_eq!(backbone, shared.parameter_counts().1 - decoder_of_shared, "{preset}: backbone = encoder");
        assert_eq!(per_class, shared.parameter_counts().2, "{preset}: heads are unchanged");
        assert!(per_site.params().backbone().iter().all(|(name, _)| !name.starts_with("decoders.")));
        assert_eq!(per_site.site_decoders(), &[vec![0, 2], vec![1]]);
        // Heads keep their nnU-Net names; only the decoders move under `decoders.<s>`.
        for p in per_site.params().iter() {
            match p.role {
                Role::SiteDecoder { site } => assert!(p.name.starts_with(&format!("decoders.{site}.")), "{}", p.name),
                Role::Head { .. } => assert!(shared.params().id(&p.name).is_some(), "{}: renamed head", p.name),
                Role::Backbone => assert!(shared.params().id(&p.name).is_some(), "{}: not in the shared net", p.name),
            }
        }
    }
}

#[test]
fn bad_partitions_are_refused_for_the_unet_too() {
    let _serial = serial();
    let topo = Topology::preset("tiny").unwrap().with_site_decoders(vec![vec![0, 1], vec![1, 2]]);
    let err = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("listed twice"), "{err}");
    let topo = Topology::preset("tiny").unwrap().with_site_decoders(vec![vec![0], vec![2]]);
    let err = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("class 1 belongs to no site"), "{err}");
}

#[test]
fn each_class_reads_its_own_sites_decoder_on_every_level() {
    let _serial = serial();
    for (preset, own_stages) in CASES {
        let mut n = two_sites_with_own_stages(preset, own_stages);
        let preset = format!("{preset} with {own_stages} own encoder stages");
        let patch = [16, 48, 48];
        let x = Tensor::randn([1, 1, patch[0], patch[1], patch[2]], (Kind::Float, Device::Cpu));
        let before = tch::no_grad(|| n.forward_ds(&x));
        assert_eq!(before.len(), n.topology().levels(), "{preset}: one output per level");
        assert_eq!(before[0].size(), vec![1, 3, patch[0], patch[1], patch[2]], "{preset}: full resolution first");
        let full = tch::no_grad(|| n.forward(&x));
        assert!(full.equal(&before[0]), "{preset}: inference output = first deep-supervision output");
        let new_a: Vec<(String, Tensor)> =
            n.params().site_decoder(0).into_iter().map(|(name, t)| (name, t.randn_like())).collect();
        n.params_mut().set_site_decoder(0, &new_a).unwrap();
        let after = tch::no_grad(|| n.forward_ds(&x));
        for level in 0..before.len() {
            assert!(
                before[level].select(1, 1).equal(&after[level].select(1, 1)),
                "{preset} level {level}: site B's class moved with site A's decoder"
            );
            for c in [0, 2] {
                assert!(
                    !before[level].select(1, c).equal(&after[level].select(1, c)),
                    "{preset} level {level}: class {c} ignores its site's decoder"
                );
            }
        }
    }
}

#[test]
fn gradients_of_site_a_never_reach_site_b_decoder() {
    let _serial = serial();
    for own_stages in [0, 1, 3] {
        gradients_of_site_a_stay_in_its_branch(own_stages);
    }
}

fn gradients_of_site_a_stay_in_its_branch(own_stages: usize) {
    let n = two_sites_with_own_stages("tiny", own_stages);
    let labels = Tensor::zeros([2, 1, 16, 48, 48], (Kind::Int64, Device::Cpu));
    let _ = labels.narrow(2, 4, 8).narrow(3, 10, 20).narrow(4, 10, 20).fill_(1);
    let image = labels.to_kind(Kind::Float) + Tensor::randn([2, 1, 16, 48, 48], (Kind::Float, Device::Cpu)) * 0.3;
    // Site A's dataset annotates classes 0 and 2, not site B's class 1.
    let regions = ClassRegions { regions: vec![Some(vec![1]), None, Some(vec![1])], exclusive: false };
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    let loss = MultiTalentLoss { ds_weights: n.topology().ds_weights.clone(), dice: Default::default() };
    loss.compute(&n.forward_ds(&image), &labels, &targets).unwrap().backward();
    let (mut a_norm, mut encoder_norm, mut b_tensors) = (0f64, 0f64, 0);
    for p in n.params().iter() {
        let g = p.tensor.grad();
        let norm = if g.defined() { f64::try_from(g.abs().sum(Kind::Double)).unwrap() } else { 0.0 };
        match p.role {
            Role::SiteDecoder { site: 1 } => {
                b_tensors += 1;
                assert_eq!(norm, 0.0, "{}: site B's decoder got gradient {norm}", p.name);
            }
            Role::SiteDecoder { .. } => a_norm += norm,
            Role::Backbone => encoder_norm += norm,
            Role::Head { .. } => {}
        }
    }
    assert!(b_tensors > 0);
    assert!(a_norm > 0.0, "site A's decoder got no gradient");
    assert!(encoder_norm > 0.0, "the shared encoder got no gradient");
}

/// A site's plain model (`coordinator export --site`) is the full model's encoder, that site's
/// decoder and its heads: its outputs are the site's channels of the full model, and it is a
/// network of the shared layout (nnU-Net v1 names). A model without per-site decoders, or a
/// site without a decoder, is refused by name.
#[test]
fn a_sites_plain_model_predicts_its_channels_of_the_full_model() {
    use fedtalent_model::ModelManifest;
    use fedtalent_vocab::{ClassRegion, CtNormalization, GlobalClass};
    let _serial = serial();
    let region = |name: &str| ClassRegion { name: name.into(), labels: vec![1] };
    // Rows as in `two_sites`: A = {0, 2}, B = {1}.
    let classes = vec![
        GlobalClass::new(0, "a", &region("x")),
        GlobalClass::new(1, "b", &region("y")),
        GlobalClass::new(2, "a", &region("z")),
    ];
    for (layout, own_stages) in CASES {
        let full = two_sites_with_own_stages(layout, own_stages);
        let manifest = ModelManifest::of(&full, "tiny", CtNormalization::PAPER, classes.clone());
        tch::manual_seed(3);
        let x = Tensor::randn([1, 1, 16, 48, 48], (Kind::Float, Device::Cpu));
        let all = tch::no_grad(|| full.forward(&x));
        for (site, rows) in [("a", vec![0i64, 2]), ("b", vec![1])] {
            let (m, plain) = manifest.site_model(&full, site).unwrap();
            assert!(m.topology.site_decoders.is_empty(), "{layout}/{site}: one decoder");
            assert_eq!(m.topology.site_encoder_stages, 0, "{layout}/{site}: its encoder is the plain one");
            assert_eq!(
                m.classes.iter().map(|c| c.index).collect::<Vec<_>>(),
                (0..rows.len() as u32).collect::<Vec<_>>()
            );
            assert!(m.classes.iter().all(|c| c.site == site));
            let shared = net(&topology(layout), rows.len() as i64);
            for p in plain.params().iter() {
                assert!(
                    shared.params().id(&p.name).is_some(),
                    "{layout}/{site}: {} is no name of the shared layout",
                    p.name
                );
            }
            let mine = tch::no_grad(|| plain.forward(&x));
            let expected = all.index_select(1, &Tensor::from_slice(&rows));
            let diff = (mine - expected).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{layout}/{site}: outputs differ by {diff}");
        }
        let err = manifest.site_model(&full, "c").unwrap_err().to_string();
        assert!(err.contains("no decoder of site \"c\""), "{err}");
    }
    let shared = net(&topology("tiny"), 3);
    let manifest = ModelManifest::of(&shared, "tiny", CtNormalization::PAPER, classes);
    let err = manifest.site_model(&shared, "a").unwrap_err().to_string();
    assert!(err.contains("no per-site decoders"), "{err}");
}
