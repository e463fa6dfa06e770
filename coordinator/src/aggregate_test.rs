//! The arithmetic of [`super`] on tiny cases with known answers, in the shape of Flower's
//! `strategy/aggregate_test.py`: one behaviour per test, inputs small enough to check by hand.

use fedtalent_model::params::Role;
use fedtalent_model::wire::{self, Parts, Selection};
use fedtalent_model::{MultiTalentNet, Topology};
use fedtalent_protocol::{PhaseTimings, UpdateHeader};
use fedtalent_vocab::{ClassRegion, GlobalClass};
use tch::{Device, Kind, Tensor};

use super::{aggregate, sqrt_weights, validate, ServerState, ServerStep, Update};
use crate::config::ServerOptimizer;

/// The tiny preset with two classes, `a/x` (row 0) and `b/y` (row 1), no site decoders.
fn global() -> (MultiTalentNet, Selection) {
    let net = {
        let _rng = crate::torch_rng();
        tch::manual_seed(0);
        MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 2, Device::Cpu).unwrap()
    };
    let region = |name: &str| ClassRegion { name: name.into(), labels: vec![1] };
    let classes = [GlobalClass::new(0, "a", &region("x")), GlobalClass::new(1, "b", &region("y"))];
    (net, Selection::global(&classes, &[]))
}

/// `site`'s upload with every backbone value `backbone` and every head value `heads`.
fn upload(net: &MultiTalentNet, selection: &Selection, site: &str, backbone: f64, heads: f64) -> Parts {
    let mut parts = Parts::from_wire(&wire::parts_to_wire(net, &selection.of_site(site))).unwrap();
    for (_, t) in &mut parts.backbone {
        *t = t.full_like(backbone);
    }
    for rows in parts.heads.values_mut() {
        for (_, t) in rows {
            *t = t.full_like(heads);
        }
    }
    parts
}

/// An update of `site` with `n_cases` training cases (shared with `super::tests`).
pub(super) fn update(site: &str, n_cases: u32, parts: Parts) -> Update {
    let header = UpdateHeader {
        round: 1,
        n_cases,
        train_loss: 0.0,
        dice: Vec::new(),
        payload_digest: String::new(),
        durations_ms: PhaseTimings::default(),
        resume: false,
    };
    Update { site: site.into(), header, bytes: 0, upload_ms: 0, backbone_norm: 0.0, parts }
}

/// Plain FedAvg of `updates` into `net`; the weights.
fn fedavg(net: &mut MultiTalentNet, updates: &[&Update], selection: &Selection) -> Vec<f64> {
    let step = ServerStep { optimizer: &ServerOptimizer::default(), state: &mut ServerState::default(), privacy: None };
    aggregate(net, updates, step, selection).unwrap().weights
}

/// Every value of the global backbone, and of each class's head rows, if each is constant.
fn constant_values(net: &MultiTalentNet) -> (f64, [f64; 2]) {
    let backbone = net.params().backbone();
    let value = |t: &Tensor| {
        let (min, max) = (t.min().double_value(&[]), t.max().double_value(&[]));
        assert!((max - min).abs() < 1e-6, "not constant: {min}..{max}");
        min
    };
    let first = value(&backbone[0].1);
    for (name, t) in &backbone {
        assert!((value(t) - first).abs() < 1e-6, "{name} differs from the first backbone tensor");
    }
    let heads = net.params().iter().find(|p| matches!(p.role, Role::Head { .. })).expect("a head tensor");
    (first, [value(&heads.tensor.get(0)), value(&heads.tensor.get(1))])
}

#[test]
fn sqrt_weights_of_equal_sites_are_equal() {
    assert_eq!(sqrt_weights(&[3, 3]), vec![0.5, 0.5]);
    assert_eq!(sqrt_weights(&[7]), vec![1.0]);
}

#[test]
fn sqrt_weights_follow_the_root_of_the_case_counts() {
    // sqrt 1 : sqrt 4 = 1 : 2.
    let w = sqrt_weights(&[1, 4]);
    assert!((w[0] - 1.0 / 3.0).abs() < 1e-12 && (w[1] - 2.0 / 3.0).abs() < 1e-12, "{w:?}");
    // 1 : 2 : 4 over 7.
    let w = sqrt_weights(&[1, 4, 16]);
    for (got, want) in w.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
        assert!((got - want).abs() < 1e-12, "{w:?}");
    }
}

/// Backbones 1.0 (1 case) and 3.0 (4 cases): 1/3 · 1 + 2/3 · 3 = 7/3; each class's heads are
/// its owner's, unweighted.
#[test]
fn the_backbone_is_the_weighted_mean_and_heads_are_the_owners() {
    let (mut net, selection) = global();
    let a = update("a", 1, upload(&net, &selection, "a", 1.0, 5.0));
    let b = update("b", 4, upload(&net, &selection, "b", 3.0, 7.0));
    let weights = fedavg(&mut net, &[&a, &b], &selection);
    assert!((weights[0] - 1.0 / 3.0).abs() < 1e-12 && (weights[1] - 2.0 / 3.0).abs() < 1e-12);
    let (backbone, heads) = constant_values(&net);
    assert!((backbone - 7.0 / 3.0).abs() < 1e-6, "{backbone}");
    assert_eq!(heads, [5.0, 7.0]);
}

/// Partial participation: the sites that reported share the whole weight; a site that did not
/// report keeps its heads from the previous global model.
#[test]
fn a_partial_round_renormalises_and_keeps_the_absent_sites_heads() {
    let (mut net, selection) = global();
    let a = update("a", 1, upload(&net, &selection, "a", 2.0, 5.0));
    let b = update("b", 1, upload(&net, &selection, "b", 2.0, 7.0));
    fedavg(&mut net, &[&a, &b], &selection);
    let b_only = update("b", 9, upload(&net, &selection, "b", 4.0, 1.0));
    let weights = fedavg(&mut net, &[&b_only], &selection);
    assert_eq!(weights, vec![1.0]);
    let (backbone, heads) = constant_values(&net);
    assert!((backbone - 4.0).abs() < 1e-6, "{backbone}");
    assert_eq!(heads, [5.0, 1.0], "site a's heads must stay those of its last upload");
}

#[test]
fn an_honest_upload_validates() {
    let (net, selection) = global();
    validate(&net, &selection, "a", &upload(&net, &selection, "a", 0.0, 0.0), 1e9).unwrap();
}

#[test]
fn heads_of_another_sites_class_are_refused_naming_the_owner() {
    let (net, selection) = global();
    let mut parts = upload(&net, &selection, "a", 0.0, 0.0);
    let rows = parts.heads.remove("a/x").unwrap();
    parts.heads.insert("b/y".into(), rows);
    let err = format!("{:#}", validate(&net, &selection, "a", &parts, 1e9).unwrap_err());
    assert!(err.contains("site a") && err.contains("b/y") && err.contains("owned by site b"), "{err}");
}

#[test]
fn heads_of_an_unknown_class_are_refused() {
    let (net, selection) = global();
    let mut parts = upload(&net, &selection, "a", 0.0, 0.0);
    let rows: Vec<(String, Tensor)> = parts.heads["a/x"].iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    parts.heads.insert("a/ghost".into(), rows);
    let err = format!("{:#}", validate(&net, &selection, "a", &parts, 1e9).unwrap_err());
    assert!(err.contains("unknown class \"a/ghost\""), "{err}");
}

#[test]
fn a_non_finite_backbone_is_refused() {
    let (net, selection) = global();
    let parts = upload(&net, &selection, "a", 0.0, 0.0);
    let _ = parts.backbone[0].1.get(0).fill_(f64::NAN);
    let err = format!("{:#}", validate(&net, &selection, "a", &parts, 1e9).unwrap_err());
    assert!(err.contains("NaN or infinite"), "{err}");
}

/// The update norm is the L2 distance of the whole backbone to the global one.
#[test]
fn an_update_farther_than_the_bound_is_refused() {
    let (net, selection) = global();
    let parts = upload(&net, &selection, "a", 1.0, 0.0);
    let squared: f64 = parts
        .backbone
        .iter()
        .zip(net.params().backbone())
        .map(|((_, theirs), (_, ours))| f64::try_from((theirs - ours).square().sum(Kind::Double)).unwrap())
        .sum();
    let norm = squared.sqrt();
    let reported = validate(&net, &selection, "a", &parts, norm * 1.001).unwrap();
    assert!((reported - norm).abs() <= 1e-9 * norm, "validate reported {reported}, the norm is {norm}");
    let err = format!("{:#}", validate(&net, &selection, "a", &parts, norm * 0.999).unwrap_err());
    assert!(err.contains("exceeds the bound"), "{err}");
}

/// `site`'s upload whose backbone is the global one moved by uniform noise of `spread`.
fn jittered(net: &MultiTalentNet, selection: &Selection, site: &str, spread: f64) -> Parts {
    let mut parts = Parts::from_wire(&wire::parts_to_wire(net, &selection.of_site(site))).unwrap();
    let _rng = crate::torch_rng();
    for (_, t) in &mut parts.backbone {
        *t = &*t + (t.rand_like() - 0.5) * spread;
    }
    parts
}

/// The FedAvg step taken in one pass over the float32 values is the tensor formula in f64
/// (`old + lr · Σ w_k (x_k − old)`, rounded to f32 once) to the bit, also for an update whose
/// tensors are not laid out contiguously (which takes the tensor path).
#[test]
fn the_one_pass_fedavg_step_is_the_f64_tensor_formula_to_the_bit() {
    for contiguous in [true, false] {
        let (mut net, selection) = global();
        let before: Vec<Tensor> = net.params().backbone().iter().map(|(_, t)| t.copy()).collect();
        let mut c = jittered(&net, &selection, "a", 0.3);
        if !contiguous {
            for (_, t) in &mut c.backbone {
                let last = t.dim() as i64 - 1;
                *t = t.transpose(0, last).contiguous().transpose(0, last);
            }
        }
        let (a, b, c) = (
            update("a", 1, jittered(&net, &selection, "a", 0.1)),
            update("b", 4, jittered(&net, &selection, "b", 2.0)),
            update("a", 9, c),
        );
        let updates = [&a, &b, &c];
        let optimizer = ServerOptimizer { lr: 0.7, momentum: 0.0 };
        let step = ServerStep { optimizer: &optimizer, state: &mut ServerState::default(), privacy: None };
        let weights = aggregate(&mut net, &updates, step, &selection).unwrap().weights;
        for (i, ((name, after), old)) in net.params().backbone().iter().zip(&before).enumerate() {
            let old = old.to_kind(Kind::Double);
            let mut change = (updates[0].parts.backbone[i].1.to_kind(Kind::Double) - &old) * weights[0];
            for (u, w) in updates.iter().zip(&weights).skip(1) {
                change += (u.parts.backbone[i].1.to_kind(Kind::Double) - &old) * *w;
            }
            let expected = (old + change * optimizer.lr).to_kind(Kind::Float);
            assert!(after.equal(&expected), "{name} (contiguous {contiguous}) differs from the tensor formula");
        }
    }
}

/// The update norm measured in one pass is the f64 distance; an infinite value anywhere in
/// the backbone is refused naming its tensor.
#[test]
fn the_update_norm_is_the_f64_distance_and_an_infinity_anywhere_is_refused() {
    let (net, selection) = global();
    let parts = jittered(&net, &selection, "a", 0.5);
    let squared: f64 = parts
        .backbone
        .iter()
        .zip(net.params().backbone())
        .map(|((_, theirs), (_, ours))| {
            f64::try_from((theirs.to_kind(Kind::Double) - ours.to_kind(Kind::Double)).square().sum(Kind::Double))
                .unwrap()
        })
        .sum();
    let reported = validate(&net, &selection, "a", &parts, 1e9).unwrap();
    assert!((reported - squared.sqrt()).abs() <= 1e-12 * reported, "{reported} vs {}", squared.sqrt());
    let middle = parts.backbone.len() / 2;
    let name = parts.backbone[middle].0.clone();
    let _ = parts.backbone[middle].1.flatten(0, -1).get(-1).fill_(f64::NEG_INFINITY);
    let err = format!("{:#}", validate(&net, &selection, "a", &parts, 1e9).unwrap_err());
    assert!(err.contains("NaN or infinite") && err.contains(&name), "{err}");
}
