//! The presets' exact parameter counts and nnU-Net v1 tensor names, and the head split.

mod common;

use fedtalent_model::{MultiTalentNet, Topology};
use tch::{Device, Tensor};

fn count(preset: &str, classes: i64) -> i64 {
    let net = MultiTalentNet::new(&Topology::preset(preset).unwrap(), classes, Device::Cpu).unwrap();
    net.parameter_counts().0
}

#[test]
fn unet_parameter_count_is_the_papers() {
    for c in [1, 3, 47] {
        assert_eq!(count("unet", c), 29_283_370 + 770 * c, "unet, C = {c}");
    }
}

#[test]
fn resenc_parameter_count_is_the_papers() {
    for c in [1, 3, 47] {
        assert_eq!(count("resenc", c), 69_299_050 + 775 * c, "resenc, C = {c}");
    }
}

#[test]
fn per_class_difference_and_split() {
    for (preset, per_class) in [("unet", 770), ("resenc", 775)] {
        assert_eq!(count(preset, 48) - count(preset, 47), per_class);
        let net = MultiTalentNet::new(&Topology::preset(preset).unwrap(), 5, Device::Cpu).unwrap();
        let (total, backbone, heads_per_class) = net.parameter_counts();
        assert_eq!(heads_per_class, per_class);
        assert_eq!(total, backbone + 5 * per_class);
    }
}

/// Names, shapes and registration order equal nnU-Net v1's own state dict (reference JSON).
#[test]
fn tensor_names_match_nnunet_v1() {
    for preset in ["unet", "resenc"] {
        let path = common::reference_dir().join(format!("nnunet_v1_{preset}_c47.json"));
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let expected: Vec<(String, Vec<i64>, bool)> = reference["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (t["name"].as_str().unwrap().to_string(), shape, t["parameter"].as_bool().unwrap())
            })
            .collect();
        let net = MultiTalentNet::new(&Topology::preset(preset).unwrap(), 47, Device::Cpu).unwrap();
        let ours: Vec<(String, Vec<i64>)> = net.params().iter().map(|p| (p.name.clone(), p.tensor.size())).collect();
        let theirs: Vec<(String, Vec<i64>)> =
            expected.iter().filter(|e| e.2).map(|(n, s, _)| (n.clone(), s.clone())).collect();
        assert_eq!(ours, theirs, "{preset}: parameters differ from nnU-Net v1's");
        // Second names: every non-parameter entry is one of our aliases with the same shape.
        let with_aliases = net.params().named_tensors(true);
        assert_eq!(with_aliases.len(), expected.len(), "{preset}: alias count");
        for (name, shape, _) in &expected {
            let found = with_aliases.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(&found.1.size(), shape, "{name}");
        }
        assert_eq!(reference["total_parameters"].as_i64().unwrap(), net.parameter_counts().0);
    }
}

#[test]
fn forward_shapes_full_resolution_first() {
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 1, 16, 32, 32], (tch::Kind::Float, Device::Cpu));
    let outs = tch::no_grad(|| net.forward_ds(&x));
    let shapes: Vec<Vec<i64>> = outs.iter().map(|o| o.size()).collect();
    assert_eq!(shapes, vec![vec![2, 3, 16, 32, 32], vec![2, 3, 8, 16, 16], vec![2, 3, 4, 8, 8]]);
    let full = tch::no_grad(|| net.forward(&x));
    assert_eq!(full.size(), vec![2, 3, 16, 32, 32]);
    assert!(f64::try_from((full - &outs[0]).abs().max()).unwrap() == 0.0, "inference = first DS output");
}

#[test]
fn resenc_forward_runs_with_residual_blocks() {
    let mut topo = Topology::preset("resenc").unwrap();
    for s in &mut topo.stages {
        s.width = (s.width / 10).max(2);
    }
    topo.patch = [16, 32, 32];
    let net = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    let x = Tensor::randn([1, 1, 16, 32, 32], (tch::Kind::Float, Device::Cpu));
    let outs = tch::no_grad(|| net.forward_ds(&x));
    assert_eq!(outs.len(), 5);
    assert_eq!(outs[0].size(), vec![1, 2, 16, 32, 32]);
    assert_eq!(outs[1].size(), vec![1, 2, 16, 16, 16]);
    assert_eq!(outs[4].size(), vec![1, 2, 2, 2, 2]);
}

/// Replacing site A's head rows leaves site B's rows (and the backbone) bit-identical.
#[test]
fn replacing_one_sites_heads_leaves_the_others_untouched() {
    let topo = Topology::preset("tiny").unwrap();
    let mut net = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
    let site_a = [0i64, 3];
    let site_b = [1i64, 2, 4];
    let before_b = net.params().head_rows(&site_b);
    let before_backbone = net.params().backbone();
    let new_a: Vec<(String, Tensor)> =
        net.params().head_rows(&site_a).into_iter().map(|(n, t)| (n, t.randn_like())).collect();
    net.params_mut().set_head_rows(&site_a, &new_a).unwrap();
    for ((n1, t1), (_, t2)) in before_b.iter().zip(net.params().head_rows(&site_b)) {
        assert!(t1.equal(&t2), "{n1}: site B's rows changed");
    }
    for ((n1, t1), (_, t2)) in before_backbone.iter().zip(net.params().backbone()) {
        assert!(t1.equal(&t2), "{n1}: backbone changed");
    }
    for ((n1, t1), (_, t2)) in new_a.iter().zip(net.params().head_rows(&site_a)) {
        assert!(t1.equal(&t2), "{n1}: site A's rows not written");
    }
    // A head set of the wrong shape is refused by name.
    let bad: Vec<(String, Tensor)> = new_a.iter().map(|(n, t)| (n.clone(), t.narrow(0, 0, 1))).collect();
    let err = net.params_mut().set_head_rows(&site_a, &bad).unwrap_err().to_string();
    assert!(err.contains("seg_outputs"), "{err}");
}
