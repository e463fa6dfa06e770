//! What the federation moves: a network's backbone and per-class head rows as named wire tensors.
//!
//! Backbone tensors keep their nnU-Net names. A class's heads travel as one row per head tensor,
//! named `head/<class id>/<tensor>` (e.g. `head/liver/tumour/seg_outputs.4.weight`, shape
//! `[1, 30, 1, 1, 1]`), so the coordinator can check that a site only sends the heads it owns and
//! place each row at the class's index of the global model.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_protocol::{DType, Manifest, TensorSet, WireTensor};
use fedtalent_vocab::{parse_class_id, GlobalClass};
use tch::{Device, Kind, Tensor};

use crate::network::MultiTalentNet;
use crate::params::Role;

pub const HEAD_PREFIX: &str = "head/";
pub const DECODER_PREFIX: &str = "decoder/";

/// Which parts of a network travel besides the backbone, and where each lands: the head rows
/// of some classes and, with FIRENet's per-site decoders, whole decoders of some sites. One value
/// serves both directions: what [`parts_to_wire`] sends, what [`parts_manifest`] lets a receiver
/// accept, and where [`Parts::apply`] writes what arrived. A class's owner is the site of its id
/// ([`parse_class_id`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// `(class id, row in the network)`.
    classes: Vec<(String, i64)>,
    /// `(site, decoder index in the network)`.
    decoders: Vec<(String, usize)>,
}

impl Selection {
    /// The whole global model: every class at its index and, with per-site decoders, the
    /// decoder of each of `decoder_sites` at its position in that list (empty: no decoders).
    pub fn global(classes: &[GlobalClass], decoder_sites: &[String]) -> Self {
        Selection {
            classes: classes.iter().map(|c| (c.id.clone(), c.index as i64)).collect(),
            decoders: decoder_sites.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect(),
        }
    }

    /// A local network (a site's, or a pooled one): its classes at rows 0.. in the order given
    /// and, with FIRENet's per-site decoders, `decoder_site`'s one decoder at index 0.
    pub fn local(class_ids: &[String], decoder_site: Option<&str>) -> Self {
        Selection {
            classes: class_ids.iter().enumerate().map(|(i, id)| (id.clone(), i as i64)).collect(),
            decoders: decoder_site.map(|site| (site.to_string(), 0)).into_iter().collect(),
        }
    }

    /// What of this selection `site` owns: its classes' rows and its decoder (what it
    /// downloads and uploads).
    pub fn of_site(&self, site: &str) -> Self {
        Selection {
            classes: self.classes.iter().filter(|(id, _)| owner_of(id) == Some(site)).cloned().collect(),
            decoders: self.decoders.iter().filter(|(s, _)| s == site).cloned().collect(),
        }
    }

    /// The row of class `id` in the network.
    pub fn row_of(&self, id: &str) -> Option<i64> {
        self.classes.iter().find(|(c, _)| c == id).map(|&(_, row)| row)
    }

    /// The decoder index of `site` in the network.
    pub fn decoder_of(&self, site: &str) -> Option<usize> {
        self.decoders.iter().find(|(s, _)| s == site).map(|&(_, index)| index)
    }

    /// Ids of the selected classes, in row order of the selection.
    pub fn class_ids(&self) -> impl Iterator<Item = &str> {
        self.classes.iter().map(|(id, _)| id.as_str())
    }
}

/// The site owning class `id` (the site part of `<site>/<name>`).
pub fn owner_of(id: &str) -> Option<&str> {
    parse_class_id(id).map(|(site, _)| site)
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

/// Splits `head/<class id>/<tensor>` (tensor names contain no `/`); `None` unless the class id
/// parses ([`parse_class_id`]).
pub fn parse_head_name(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(HEAD_PREFIX)?.rsplit_once('/').filter(|(class, _)| parse_class_id(class).is_some())
}

/// A CPU f32 copy of `t` as a wire tensor. On a little-endian host the tensor's bytes are the
/// wire's (f32 little-endian) and are copied once; elsewhere value by value.
pub fn to_wire(name: &str, t: &Tensor) -> WireTensor {
    let cpu = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape: Vec<u64> = cpu.size().iter().map(|&d| d as u64).collect();
    if cfg!(target_endian = "little") {
        let numel = cpu.numel();
        let mut data = vec![0u8; numel * 4];
        cpu.copy_data_u8(&mut data, numel);
        return WireTensor { name: name.to_string(), dtype: DType::F32, shape, data };
    }
    let values = Vec::<f32>::try_from(cpu.flatten(0, -1)).expect("f32 tensor converts");
    WireTensor::from_f32(name, shape, &values)
}

/// A CPU f32 tensor from a wire tensor (refuses other dtypes and inconsistent lengths by name).
pub fn from_wire(w: &WireTensor) -> Result<Tensor> {
    ensure!(w.dtype == DType::F32, "tensor {:?}: dtype {:?}, expected F32", w.name, w.dtype);
    ensure!(w.data.len().is_multiple_of(4), "tensor {:?}: byte length does not fit f32", w.name);
    let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
    let numel = w.data.len() / 4;
    ensure!(
        numel as i64 == shape.iter().product::<i64>(),
        "tensor {:?}: {} values for shape {:?}",
        w.name,
        numel,
        shape
    );
    if cfg!(target_endian = "little") {
        // The wire's f32 little-endian bytes are the tensor's: one copy.
        return Ok(Tensor::from_data_size(&w.data, &shape, Kind::Float));
    }
    let values = w.to_f32().with_context(|| format!("tensor {:?}: byte length does not fit f32", w.name))?;
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

/// The names, dtypes and shapes [`parts_to_wire`] produces for `selection`, for receivers to
/// refuse anything else before allocating.
pub fn parts_manifest(net: &MultiTalentNet, selection: &Selection) -> Manifest {
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
                for id in selection.class_ids() {
                    m.insert(head_tensor_name(id, &p.name), (DType::F32, row.clone()));
                }
            }
            Role::SiteDecoder { site: index } => {
                for (site, _) in selection.decoders.iter().filter(|(_, i)| *i == index) {
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

    /// Writes the backbone, the head rows and the site decoders into `net`, each at its place in
    /// `selection` (`net`'s layout). Every head tensor of a class and every tensor of a decoder
    /// must be present; classes and sites `selection` does not hold are refused by name.
    pub fn apply(&self, net: &mut MultiTalentNet, selection: &Selection) -> Result<()> {
        net.params_mut().load_named(&self.backbone, false)?;
        self.apply_owned(net, selection)
    }

    /// Writes only what has an owner (head rows, site decoders), not the backbone: how the
    /// coordinator takes each class's heads from the site that owns it.
    pub fn apply_owned(&self, net: &mut MultiTalentNet, selection: &Selection) -> Result<()> {
        let params = net.params_mut();
        for (class, rows) in &self.heads {
            let row = selection.row_of(class).with_context(|| format!("heads for unknown class {class:?}"))?;
            params.set_head_rows(&[row], rows).with_context(|| format!("heads of class {class:?}"))?;
        }
        for (site, tensors) in &self.decoders {
            let index = selection.decoder_of(site).with_context(|| format!("decoder of unknown site {site:?}"))?;
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

#[cfg(test)]
mod tests {
    use fedtalent_vocab::ClassRegion;

    use super::*;

    /// The global selection places each class at its index and each decoder at its site's
    /// position; a site's part is its own classes and decoder; a local network's rows start at 0.
    #[test]
    fn selections_place_classes_and_decoders() {
        let region = |name: &str| ClassRegion { name: name.into(), labels: vec![1] };
        let classes = [
            GlobalClass::new(0, "a", &region("x")),
            GlobalClass::new(1, "b", &region("y")),
            GlobalClass::new(2, "a", &region("z")),
        ];
        let global = Selection::global(&classes, &["a".into(), "b".into()]);
        assert_eq!((global.row_of("a/z"), global.row_of("b/x")), (Some(2), None));
        assert_eq!((global.decoder_of("b"), global.decoder_of("c")), (Some(1), None));
        let a = global.of_site("a");
        assert_eq!(a.class_ids().collect::<Vec<_>>(), ["a/x", "a/z"]);
        assert_eq!(
            (a.row_of("a/z"), a.row_of("b/y"), a.decoder_of("a"), a.decoder_of("b")),
            (Some(2), None, Some(0), None)
        );
        let local = Selection::local(&["a/x".into(), "a/z".into()], Some("a"));
        assert_eq!((local.row_of("a/z"), local.decoder_of("a")), (Some(1), Some(0)));
    }

    #[test]
    fn head_names_round_trip_and_need_a_class_id() {
        let name = head_tensor_name("liver/liver_tumour", "seg_outputs.4.weight");
        assert_eq!(name, "head/liver/liver_tumour/seg_outputs.4.weight");
        assert_eq!(parse_head_name(&name), Some(("liver/liver_tumour", "seg_outputs.4.weight")));
        assert_eq!(parse_head_name("head/liver/seg_outputs.4.weight"), None, "a class id has a site part");
        assert_eq!(parse_head_name("conv.weight"), None);
    }

    /// A tensor's wire bytes are its f32 values little-endian (as `WireTensor::from_f32` writes
    /// them), whatever its layout, and come back bit for bit (NaN payloads, -0.0, subnormals).
    #[test]
    fn wire_tensors_are_little_endian_f32_and_round_trip_bit_exactly() {
        let values =
            [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE / 4.0, f32::from_bits(0x7fc0_1234), f32::INFINITY, -3.25, 7e30];
        let t = Tensor::from_slice(&values).view([2, 4]);
        let w = to_wire("x", &t);
        assert_eq!(w, WireTensor::from_f32("x", vec![2, 4], &values));
        let back = from_wire(&w).unwrap();
        assert_eq!(back.size(), [2, 4]);
        let bits: Vec<u32> = Vec::<f32>::try_from(back.flatten(0, -1)).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        // A transposed (non-contiguous) tensor travels in its logical order.
        let transposed = to_wire("y", &t.tr());
        let logical: Vec<f32> = (0..4).flat_map(|c| [values[c], values[4 + c]]).collect();
        assert_eq!(transposed, WireTensor::from_f32("y", vec![4, 2], &logical));
        // A byte length that is no whole number of f32 values, or not the shape's, is refused.
        let mut short = w.clone();
        short.data.pop();
        assert!(from_wire(&short).is_err());
        let mut wrong = w;
        wrong.shape = vec![3, 3];
        assert!(from_wire(&wrong).is_err());
    }
}
