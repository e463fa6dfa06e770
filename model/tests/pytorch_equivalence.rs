//! A saved `Generic_UNet`-layout network loads into the PyTorch reference (nnU-Net v1's names,
//! `strict=True`) and computes the same deep-supervision outputs on the same input.

mod common;

use fedtalent_model::{MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
from torch_reference import MultiTalentUNet
weights, io = load_file(sys.argv[1]), load_file(sys.argv[2])
net = MultiTalentUNet(3, feats=(8, 16, 32, 48), pools=((2, 2, 2), (2, 2, 2), (1, 2, 2)))
net.load_state_dict(weights, strict=True)
with torch.no_grad():
    outs = net(io["x"])
diffs = [float((o - io[f"out{i}"]).abs().max()) for i, o in enumerate(outs)]
scale = [float(io[f"out{i}"].abs().max()) for i in range(len(outs))]
print(json.dumps({"max_abs_diff": diffs, "scale": scale}))
"#;

#[test]
fn tiny_unet_equals_the_pytorch_reference() {
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 1, 16, 32, 32], (Kind::Float, Device::Cpu));
    let outs = tch::no_grad(|| net.forward_ds(&x));
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    net.save(&weights).unwrap();
    let mut io: Vec<(String, Tensor)> = vec![("x".into(), x)];
    io.extend(outs.iter().enumerate().map(|(i, o)| (format!("out{i}"), o.shallow_clone())));
    let io_file = dir.path().join("io.safetensors");
    fedtalent_model::io::write_tensors_atomic(&io_file, &io).unwrap();
    let out = common::run_python(ORACLE, &[weights.to_str().unwrap(), io_file.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let diffs = report["max_abs_diff"].as_array().unwrap();
    assert_eq!(diffs.len(), 3);
    for (i, d) in diffs.iter().enumerate() {
        let scale = report["scale"][i].as_f64().unwrap();
        assert!(d.as_f64().unwrap() <= 1e-4 * scale.max(1.0), "level {i}: max |diff| {d} (scale {scale})");
    }
}

#[test]
fn save_load_round_trip_and_refusals() {
    let topo = Topology::preset("tiny").unwrap();
    let a = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    let mut b = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    a.save(&path).unwrap();
    b.load(&path).unwrap();
    for ((n, ta), (_, tb)) in a.params().named_tensors(false).iter().zip(b.params().named_tensors(false)) {
        assert!(ta.equal(&tb), "{n}");
    }
    // A model with another class count is refused, naming the tensor.
    let mut c = MultiTalentNet::new(&topo, 5, Device::Cpu).unwrap();
    let err = format!("{:#}", c.load(&path).unwrap_err());
    assert!(err.contains("seg_outputs") && err.contains("shape"), "{err}");
    // A truncated file is refused, naming the file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", b.load(&cut).unwrap_err());
    assert!(err.contains("cut.safetensors"), "{err}");
}
