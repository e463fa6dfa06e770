//! FIRENet preset: hand-counted parameters, shapes at odd sizes, per-site decoders (count,
//! isolation, gradients, routing, export) and an overfit run.

use fedtalent_model::loss::hard_dice;
use fedtalent_model::params::Role;
use fedtalent_model::train::{TrainConfig, Trainer};
use fedtalent_model::{BatchTargets, ClassRegions, FireNetSpec, Layout, MultiTalentLoss, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

/// The tests seed libtorch's global RNG; running them one at a time keeps each deterministic.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Conv (no bias) + InstanceNorm (affine): `cin·cout·k + 2·cout`.
fn cn(cin: i64, cout: i64, k: i64) -> i64 {
    cin * cout * k + 2 * cout
}

/// Independent count: stem, two strided residual blocks, FRM, `decoders` decoders, heads with bias
/// on three levels. `w = [stem, block 1, block 2 (= FRM branch 1)]`, `dil` = ASPP branches.
fn hand_count(w: [i64; 3], branches: u32, nodes: i64, dil: i64, classes: i64, decoders: i64) -> i64 {
    let [w0, w1, c] = w;
    let encoder = cn(1, w0, 27)
        + (cn(w0, w1, 27) + cn(w1, w1, 27) + cn(w0, w1, 1))
        + (cn(w1, c, 27) + cn(c, c, 27) + cn(w1, c, 1));
    let cb = |i: u32| c * 2i64.pow(i);
    let entry: i64 = (1..branches).map(|i| cn(cb(i - 1), cb(i), 1)).sum();
    let node = |i: u32| {
        let mut p = 0;
        let mut inputs = 1;
        if i > 0 {
            p += cn(cb(i - 1), cb(i), 1);
            inputs += 1;
        }
        if i + 1 < branches {
            p += cn(cb(i + 1), cb(i), 1);
            inputs += 1;
        }
        p + inputs + dil * cn(cb(i), cb(i), 27) + cn(dil * cb(i), cb(i), 1)
    };
    let column: i64 = (0..branches).map(node).sum();
    let frm = entry + nodes * column + cn(c * (2i64.pow(branches) - 1), c, 1);
    let level = |from: i64, w: i64| cn(from, w, 1) + cn(w, w, 27) + 2 * cn(w, w, 27);
    let decoder = level(c, w1) + level(w1, w0);
    let heads = classes * ((w0 + 1) + (w1 + 1) + (c + 1));
    encoder + frm + decoders * decoder + heads
}

fn net(topo: &Topology, classes: i64) -> MultiTalentNet {
    MultiTalentNet::new(topo, classes, Device::Cpu).unwrap()
}

fn spec(topo: &mut Topology) -> &mut FireNetSpec {
    topo.firenet.as_mut().unwrap()
}

#[test]
fn parameter_count_equals_the_hand_count() {
    let _serial = serial();
    let full = Topology::preset("firenet").unwrap();
    assert_eq!(full.layout, Layout::FireNet);
    for c in [1, 3, 47] {
        assert_eq!(net(&full, c).parameter_counts().0, hand_count([32, 32, 64], 3, 3, 3, c, 1), "firenet, C = {c}");
    }
    let tiny = Topology::preset("firenet-tiny").unwrap();
    assert_eq!(net(&tiny, 5).parameter_counts().0, hand_count([8, 8, 16], 3, 2, 3, 5, 1));
    // B and N are configurable and the count follows.
    for (b, n) in [(1usize, 1i64), (2, 4), (4, 2)] {
        let mut t = tiny.clone();
        spec(&mut t).branches = b;
        spec(&mut t).nodes = n as usize;
        assert_eq!(net(&t, 2).parameter_counts().0, hand_count([8, 8, 16], b as u32, n, 3, 2, 1), "B = {b}, N = {n}");
    }
    // Backbone / heads split: per class = one head row with bias on each of the 3 levels.
    let (total, backbone, per_class) = net(&full, 4).parameter_counts();
    assert_eq!(per_class, 33 + 33 + 65);
    assert_eq!(total, backbone + 4 * per_class);
}

#[test]
fn site_decoder_parameter_count_equals_the_hand_count() {
    let _serial = serial();
    let topo = Topology::preset("firenet-tiny").unwrap().with_site_decoders(vec![vec![0, 3], vec![1], vec![2, 4]]);
    let n = net(&topo, 5);
    assert_eq!(n.parameter_counts().0, hand_count([8, 8, 16], 3, 2, 3, 5, 3));
    // The backbone is encoder + FRM only; each site's decoder is one decoder's worth.
    let shared = net(&Topology::preset("firenet-tiny").unwrap(), 5);
    let one_decoder = n.parameter_counts().0 - shared.parameter_counts().0;
    let site = |s: usize| n.params().count(|p| p.role == Role::SiteDecoder { site: s });
    assert_eq!(site(0), one_decoder / 2);
    assert_eq!((site(0), site(1), site(2)), (site(1), site(2), site(0)));
    assert_eq!(n.parameter_counts().1, shared.parameter_counts().1 - site(0));
    assert!(n.params().backbone().iter().all(|(name, _)| !name.starts_with("decoder")));
}

#[test]
fn bad_site_partitions_are_refused() {
    let _serial = serial();
    let base = Topology::preset("firenet-tiny").unwrap();
    for (sites, needle) in [
        (vec![vec![0, 1], vec![1, 2]], "twice"),
        (vec![vec![0], vec![1]], "no site"),
        (vec![vec![0, 1, 2, 3]], "lists class 3"),
        (vec![vec![0, 1, 2], vec![]], "no class"),
    ] {
        let topo = base.clone().with_site_decoders(sites);
        let err = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn forward_shapes_at_odd_and_variable_sizes() {
    let _serial = serial();
    tch::manual_seed(0);
    let topo = Topology::preset("firenet-tiny").unwrap();
    let n = net(&topo, 3);
    for (size, down1, down2) in [
        ([13i64, 21, 19], [7i64, 11, 10], [4i64, 6, 5]),
        ([16, 32, 32], [8, 16, 16], [4, 8, 8]),
        ([9, 5, 30], [5, 3, 15], [3, 2, 8]),
    ] {
        let x = Tensor::randn([2, 1, size[0], size[1], size[2]], (Kind::Float, Device::Cpu));
        let outs = tch::no_grad(|| n.forward_ds(&x));
        let shapes: Vec<Vec<i64>> = outs.iter().map(|o| o.size()).collect();
        let want = |s: [i64; 3]| vec![2, 3, s[0], s[1], s[2]];
        assert_eq!(shapes, vec![want(size), want(down1), want(down2)], "input {size:?}");
        let full = tch::no_grad(|| n.forward(&x));
        assert!(full.equal(&outs[0]), "inference output = first deep-supervision output");
        assert!(bool::try_from(full.isfinite().all()).unwrap());
    }
    // Deep-supervision weights: one per level, full resolution first, summing to 1.
    assert_eq!(topo.ds_weights.len(), 3);
    assert!((topo.ds_weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

/// Sites: A = classes {0, 2}, B = class {1}.
fn two_site_net() -> MultiTalentNet {
    tch::manual_seed(7);
    let topo = Topology::preset("firenet-tiny").unwrap().with_site_decoders(vec![vec![0, 2], vec![1]]);
    net(&topo, 3)
}

#[test]
fn replacing_one_sites_decoder_leaves_the_others_bit_identical() {
    let _serial = serial();
    let mut n = two_site_net();
    let x = Tensor::randn([1, 1, 12, 20, 20], (Kind::Float, Device::Cpu));
    let before = tch::no_grad(|| n.forward_ds(&x));
    let (b_before, backbone_before, heads_before) =
        (n.params().site_decoder(1), n.params().backbone(), n.params().head_rows(&[0, 1, 2]));
    let new_a: Vec<(String, Tensor)> =
        n.params().site_decoder(0).into_iter().map(|(name, t)| (name, t.randn_like())).collect();
    n.params_mut().set_site_decoder(0, &new_a).unwrap();
    let same = |a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str| {
        assert_eq!(a.len(), b.len());
        for ((n1, t1), (n2, t2)) in a.iter().zip(b) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{what}: {n1} changed");
        }
    };
    same(&b_before, &n.params().site_decoder(1), "site B's decoder");
    same(&backbone_before, &n.params().backbone(), "backbone");
    same(&heads_before, &n.params().head_rows(&[0, 1, 2]), "heads");
    same(&new_a, &n.params().site_decoder(0), "site A's decoder (written)");
    // Routing: class 1 reads site B's decoder only, classes 0 and 2 site A's; the FRM level is shared.
    let after = tch::no_grad(|| n.forward_ds(&x));
    for level in 0..2 {
        assert!(before[level].select(1, 1).equal(&after[level].select(1, 1)), "level {level}: site B's class moved");
        for c in [0, 2] {
            assert!(
                !before[level].select(1, c).equal(&after[level].select(1, c)),
                "level {level}: class {c} ignores its decoder"
            );
        }
    }
    assert!(before[2].equal(&after[2]), "the FRM level has no site decoder");
    // Wrong sets are refused by name and change nothing.
    let err = n.params_mut().set_site_decoder(0, &new_a[1..]).unwrap_err().to_string();
    assert!(err.contains("tensors given"), "{err}");
    let mut foreign: Vec<(String, Tensor)> = new_a.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    foreign[0] = n.params().site_decoder(1).swap_remove(0);
    let err = n.params_mut().set_site_decoder(0, &foreign).unwrap_err().to_string();
    assert!(err.contains("not part of site 0"), "{err}");
    let err = n.params_mut().set_site_decoder(2, &new_a).unwrap_err().to_string();
    assert!(err.contains("no decoder of site 2"), "{err}");
    same(&b_before, &n.params().site_decoder(1), "site B's decoder after refused writes");
}

#[test]
fn gradients_of_site_a_never_reach_site_b_decoder() {
    let _serial = serial();
    let n = two_site_net();
    let labels = Tensor::zeros([2, 1, 12, 16, 16], (Kind::Int64, Device::Cpu));
    let _ = labels.narrow(2, 3, 6).narrow(3, 4, 8).narrow(4, 4, 8).fill_(1);
    let image = labels.to_kind(Kind::Float) + Tensor::randn([2, 1, 12, 16, 16], (Kind::Float, Device::Cpu)) * 0.3;
    // Site A's dataset annotates classes 0 and 2, not site B's class 1.
    let regions = ClassRegions { regions: vec![Some(vec![1]), None, Some(vec![1])], exclusive: false };
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    let loss = MultiTalentLoss { ds_weights: n.topology().ds_weights.clone(), dice: Default::default() };
    let l = loss.compute(&n.forward_ds(&image), &labels, &targets).unwrap();
    l.backward();
    let mut a_norm = 0f64;
    let mut b_tensors = 0;
    for p in n.params().iter() {
        let g = p.tensor.grad();
        let norm = if g.defined() { f64::try_from(g.abs().sum(Kind::Double)).unwrap() } else { 0.0 };
        match p.role {
            Role::SiteDecoder { site: 1 } => {
                b_tensors += 1;
                assert_eq!(norm, 0.0, "{}: site B's decoder got gradient {norm}", p.name);
            }
            Role::SiteDecoder { site: 0 } => a_norm += norm,
            Role::Head { .. } if g.defined() => {
                let row = f64::try_from(g.get(1).abs().sum(Kind::Double)).unwrap();
                assert_eq!(row, 0.0, "{}: class 1's head row got gradient", p.name);
            }
            _ => {}
        }
    }
    assert!(b_tensors > 0);
    assert!(a_norm > 0.0, "site A's decoder got no gradient");
}

#[test]
fn export_carries_every_sites_decoder() {
    let _serial = serial();
    let n = two_site_net();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    n.save(&file).unwrap();
    // The topology (with its site partition) travels as JSON in model.json.
    let json = serde_json::to_string(n.topology()).unwrap();
    let topo: Topology = serde_json::from_str(&json).unwrap();
    assert_eq!(&topo, n.topology());
    tch::manual_seed(99);
    let mut m = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap();
    assert_eq!(m.site_decoders(), &[vec![0, 2], vec![1]]);
    m.load(&file).unwrap();
    let x = Tensor::randn([1, 1, 11, 14, 17], (Kind::Float, Device::Cpu));
    assert!(tch::no_grad(|| n.forward(&x)).equal(&tch::no_grad(|| m.forward(&x))));
    // A shared-decoder file does not load into a per-site network (names differ).
    let shared = net(&Topology::preset("firenet-tiny").unwrap(), 3);
    shared.save(&file).unwrap();
    assert!(m.load(&file).is_err());
    // Older topology JSON without the firenet field still parses (the field defaults to None).
    let mut v: serde_json::Value = serde_json::to_value(Topology::preset("tiny").unwrap()).unwrap();
    assert!(v.get("firenet").is_none());
    v.as_object_mut().unwrap().remove("firenet");
    let t: Topology = serde_json::from_value(v).unwrap();
    assert_eq!(t.firenet, None);
}

/// Two samples with a bright box (label 1) holding a brighter core (label 2) on noise.
fn synthetic_batch() -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let labels = Tensor::zeros([2, 1, 12, 24, 24], (Kind::Int64, Device::Cpu));
    let _ = labels.get(0).get(0).narrow(0, 2, 7).narrow(1, 4, 12).narrow(2, 6, 11).fill_(1);
    let _ = labels.get(0).get(0).narrow(0, 4, 3).narrow(1, 7, 5).narrow(2, 9, 5).fill_(2);
    let _ = labels.get(1).get(0).narrow(0, 4, 6).narrow(1, 9, 11).narrow(2, 3, 14).fill_(1);
    let _ = labels.get(1).get(0).narrow(0, 6, 3).narrow(1, 12, 5).narrow(2, 7, 5).fill_(2);
    let image = labels.to_kind(Kind::Float) + Tensor::randn([2, 1, 12, 24, 24], (Kind::Float, Device::Cpu)) * 0.3;
    (image, labels)
}

fn overfit(topo: &Topology, regions: &[&ClassRegions], steps: usize) -> (f64, f64, Vec<f64>) {
    let classes = regions[0].regions.len() as i64;
    let targets = BatchTargets::new(regions, Device::Cpu).unwrap();
    let config = TrainConfig { total_steps: 2000, ..TrainConfig::default() };
    let mut trainer = Trainer::new(net(topo, classes), config).unwrap();
    let (image, labels) = synthetic_batch();
    let losses: Vec<f64> = (0..steps).map(|_| trainer.train_step(&image, &labels, &targets).unwrap().loss).collect();
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[steps - 5..].iter().sum::<f64>() / 5.0;
    let logits = tch::no_grad(|| trainer.net.forward(&image));
    let dice = hard_dice(&targets.select(&logits), &targets.targets(&labels).unwrap());
    (first, last, dice)
}

#[test]
fn firenet_tiny_overfits_a_small_batch() {
    let _serial = serial();
    tch::manual_seed(0);
    // liver = {1, 2}, tumour = {2}: overlapping regions.
    let regions = ClassRegions::all_annotated(&[vec![1, 2], vec![2]]);
    let steps = std::env::var("FIRENET_OVERFIT_STEPS").map_or(130, |s| s.parse().unwrap());
    let (first, last, dice) = overfit(&Topology::preset("firenet-tiny").unwrap(), &[&regions, &regions], steps);
    eprintln!("firenet-tiny overfit: loss {first} -> {last}, Dice {dice:?}");
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    for (c, d) in dice.iter().enumerate() {
        assert!(*d > 0.8, "class {c}: Dice {d} after overfitting (all: {dice:?}, losses {first} -> {last})");
    }
}

#[test]
fn per_site_decoders_train_each_sites_classes() {
    let _serial = serial();
    tch::manual_seed(0);
    // Sample 0 from site A (classes 0 = {1,2}), sample 1 from site B (class 1 = {2}).
    let a = ClassRegions { regions: vec![Some(vec![1, 2]), None], exclusive: false };
    let b = ClassRegions { regions: vec![None, Some(vec![2])], exclusive: false };
    let topo = Topology::preset("firenet-tiny").unwrap().with_site_decoders(vec![vec![0], vec![1]]);
    let (first, last, _) = overfit(&topo, &[&a, &b], 20);
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
}
