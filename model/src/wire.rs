//! What the federation moves: a network's backbone and per-class head rows as named wire tensors.
//!
//! Backbone tensors keep their nnU-Net names. A class's heads travel as one row per head tensor,
//! named `head/<class id>/<tensor>` (e.g. `head/liver/tumour/seg_outputs.4.weight`, shape
//! `[1, 30, 1, 1, 1]`), so the coordinator can check that a site only sends the heads it owns and
//! place each row at the class's index of the global model.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_protocol::{DType, Manifest, TensorSet, WireTensor};
use tch::{Device, Kind, Tensor};

use crate::network::MultiTalentNet;
use crate::params::Role;

pub const HEAD_PREFIX: &str = "head/";

pub fn head_tensor_name(class_id: &str, tensor: &str) -> String {
    format!("{HEAD_PREFIX}{class_id}/{tensor}")
}

/// Splits `head/<class id>/<tensor>` (class ids contain one `/`, tensor names none).
pub fn parse_head_name(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(HEAD_PREFIX)?.rsplit_once('/')
}

/// A CPU f32 copy of `t` as a wire tensor.
pub fn to_wire(name: &str, t: &Tensor) -> WireTensor {
    let cpu = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape: Vec<u64> = cpu.size().iter().map(|&d| d as u64).collect();
    let values = Vec::<f32>::try_from(cpu.flatten(0, -1)).expect("f32 tensor converts");
    WireTensor::from_f32(name, shape, &values)
}

/// A CPU f32 tensor from a wire tensor (refuses other dtypes and inconsistent lengths by name).
pub fn from_wire(w: &WireTensor) -> Result<Tensor> {
    ensure!(w.dtype == DType::F32, "tensor {:?}: dtype {:?}, expected F32", w.name, w.dtype);
    let values = w.to_f32().with_context(|| format!("tensor {:?}: byte length does not fit f32", w.name))?;
    let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
    ensure!(
        values.len() as i64 == shape.iter().product::<i64>(),
        "tensor {:?}: {} values for shape {:?}",
        w.name,
        values.len(),
        shape
    );
    Ok(Tensor::from_slice(&values).view(shape.as_slice()))
}

/// The backbone plus the head rows of `classes` (`(class id, row in net)`), as wire tensors.
pub fn parts_to_wire(net: &MultiTalentNet, classes: &[(String, i64)]) -> TensorSet {
    let mut set = TensorSet::default();
    for (name, t) in net.params().backbone() {
        set.push(to_wire(&name, &t));
    }
    for p in net.params().iter().filter(|p| matches!(p.role, Role::Head { .. })) {
        for (id, row) in classes {
            set.push(to_wire(&head_tensor_name(id, &p.name), &p.tensor.get(*row).unsqueeze(0)));
        }
    }
    set
}

/// The names, dtypes and shapes [`parts_to_wire`] produces for `class_ids`, for receivers to
/// refuse anything else before allocating.
pub fn parts_manifest(net: &MultiTalentNet, class_ids: &[String]) -> Manifest {
    let mut m = BTreeMap::new();
    let shape = |t: &Tensor| t.size().iter().map(|&d| d as u64).collect::<Vec<u64>>();
    for p in net.params().iter() {
        match p.role {
            Role::Backbone => {
                m.insert(p.name.clone(), (DType::F32, shape(&p.tensor)));
            }
            Role::Head { .. } => {
                let mut row = shape(&p.tensor);
                row[0] = 1;
                for id in class_ids {
                    m.insert(head_tensor_name(id, &p.name), (DType::F32, row.clone()));
                }
            }
            // FIRENet per-site decoders are not on the wire yet (see params::Role::SiteDecoder).
            Role::SiteDecoder { .. } => {}
        }
    }
    m
}

/// Backbone tensors and head rows by class id, decoded from a wire set.
pub struct Parts {
    pub backbone: Vec<(String, Tensor)>,
    /// class id → (head tensor name → row `[1, ...]`).
    pub heads: BTreeMap<String, Vec<(String, Tensor)>>,
}

impl Parts {
    pub fn from_wire(set: &TensorSet) -> Result<Parts> {
        let mut parts = Parts { backbone: Vec::new(), heads: BTreeMap::new() };
        for w in &set.tensors {
            let t = from_wire(w)?;
            match parse_head_name(&w.name) {
                Some((class, tensor)) => {
                    parts.heads.entry(class.to_string()).or_default().push((tensor.to_string(), t))
                }
                None if w.name.starts_with(HEAD_PREFIX) => bail!("tensor {:?}: malformed head name", w.name),
                None => parts.backbone.push((w.name.clone(), t)),
            }
        }
        Ok(parts)
    }

    /// Writes the backbone and the head rows into `net`; `row_of` maps class ids to rows of `net`.
    /// Every head tensor of a class must be present; unknown classes are refused by id.
    pub fn apply(&self, net: &mut MultiTalentNet, row_of: &dyn Fn(&str) -> Option<i64>) -> Result<()> {
        let params = net.params_mut();
        params.load_named(&self.backbone, false)?;
        for (class, rows) in &self.heads {
            let row = row_of(class).with_context(|| format!("heads for unknown class {class:?}"))?;
            params.set_head_rows(&[row], rows).with_context(|| format!("heads of class {class:?}"))?;
        }
        Ok(())
    }
}

/// Digest naming a model version: the wire digest of its full tensor set.
pub fn model_digest(net: &MultiTalentNet, classes: &[(String, i64)]) -> String {
    parts_to_wire(net, classes).digest()
}
