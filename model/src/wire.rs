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
pub const DECODER_PREFIX: &str = "decoder/";

/// What of a network goes on the wire besides the backbone: head rows of some classes
/// (`(class id, row in the network)`) and, for FIRENet's per-site decoders, whole decoders of some
/// sites (`(site name, decoder index in the network)`).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub classes: Vec<(String, i64)>,
    pub decoders: Vec<(String, usize)>,
}

/// `decoder/<site>/<tensor>`, where `<tensor>` is the decoder tensor's name after its
/// `decoders.<index>.` prefix, so that a site's one local decoder (index 0) and its place in the
/// global model (index = the site's position) share wire names.
fn decoder_tensor_name(site: &str, tensor: &str) -> String {
    let suffix = tensor.strip_prefix("decoders.").and_then(|t| t.split_once('.')).map_or(tensor, |(_, rest)| rest);
    format!("{DECODER_PREFIX}{site}/{suffix}")
}

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

/// The backbone plus the selected head rows and site decoders, as wire tensors.
pub fn parts_to_wire(net: &MultiTalentNet, selection: &Selection) -> TensorSet {
    let mut set = TensorSet::default();
    for (name, t) in net.params().backbone() {
        set.push(to_wire(&name, &t));
    }
    for p in net.params().iter().filter(|p| matches!(p.role, Role::Head { .. })) {
        for (id, row) in &selection.classes {
            set.push(to_wire(&head_tensor_name(id, &p.name), &p.tensor.get(*row).unsqueeze(0)));
        }
    }
    for (site, index) in &selection.decoders {
        for (name, t) in net.params().site_decoder(*index) {
            set.push(to_wire(&decoder_tensor_name(site, &name), &t));
        }
    }
    set
}

/// The names, dtypes and shapes [`parts_to_wire`] produces for `class_ids` and the decoders of
/// `decoder_sites` (`(site, decoder index)`), for receivers to refuse anything else before
/// allocating.
pub fn parts_manifest(net: &MultiTalentNet, class_ids: &[String], decoder_sites: &[(String, usize)]) -> Manifest {
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
            Role::SiteDecoder { site: index } => {
                for (site, _) in decoder_sites.iter().filter(|(_, i)| *i == index) {
                    m.insert(decoder_tensor_name(site, &p.name), (DType::F32, shape(&p.tensor)));
                }
            }
        }
    }
    m
}

/// Backbone tensors and head rows by class id, decoded from a wire set.
pub struct Parts {
    pub backbone: Vec<(String, Tensor)>,
    /// class id → (head tensor name → row `[1, ...]`).
    pub heads: BTreeMap<String, Vec<(String, Tensor)>>,
    /// site → (decoder tensor name without `decoders.<i>.` → tensor), FIRENet per-site decoders.
    pub decoders: BTreeMap<String, Vec<(String, Tensor)>>,
}

impl Parts {
    pub fn from_wire(set: &TensorSet) -> Result<Parts> {
        let mut parts = Parts { backbone: Vec::new(), heads: BTreeMap::new(), decoders: BTreeMap::new() };
        for w in &set.tensors {
            let t = from_wire(w)?;
            if let Some(rest) = w.name.strip_prefix(DECODER_PREFIX) {
                let (site, tensor) =
                    rest.split_once('/').with_context(|| format!("tensor {:?}: malformed decoder name", w.name))?;
                parts.decoders.entry(site.to_string()).or_default().push((tensor.to_string(), t));
                continue;
            }
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

    /// Writes the backbone, the head rows and the site decoders into `net`; `row_of` maps class
    /// ids to rows of `net`, `decoder_of` site names to its decoder indices. Every head tensor of
    /// a class and every tensor of a decoder must be present; unknown classes and sites are
    /// refused by name.
    pub fn apply(
        &self,
        net: &mut MultiTalentNet,
        row_of: &dyn Fn(&str) -> Option<i64>,
        decoder_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<()> {
        net.params_mut().load_named(&self.backbone, false)?;
        self.apply_owned(net, row_of, decoder_of)
    }

    /// Writes only what has an owner (head rows, site decoders), not the backbone: how the
    /// coordinator takes each class's heads from the site that owns it.
    pub fn apply_owned(
        &self,
        net: &mut MultiTalentNet,
        row_of: &dyn Fn(&str) -> Option<i64>,
        decoder_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<()> {
        let params = net.params_mut();
        for (class, rows) in &self.heads {
            let row = row_of(class).with_context(|| format!("heads for unknown class {class:?}"))?;
            params.set_head_rows(&[row], rows).with_context(|| format!("heads of class {class:?}"))?;
        }
        for (site, tensors) in &self.decoders {
            let index = decoder_of(site).with_context(|| format!("decoder of unknown site {site:?}"))?;
            let named: Vec<(String, Tensor)> =
                tensors.iter().map(|(n, t)| (format!("decoders.{index}.{n}"), t.shallow_clone())).collect();
            params.set_site_decoder(index, &named).with_context(|| format!("decoder of site {site:?}"))?;
        }
        Ok(())
    }
}

/// Digest naming a model version: the wire digest of its full tensor set.
pub fn model_digest(net: &MultiTalentNet, selection: &Selection) -> String {
    parts_to_wire(net, selection).digest()
}
