//! The MultiTalent network: a forward graph of one of the layouts ([`Layout`]) over a
//! [`ParamStore`] of nnU-Net v1-named parameters; shared backbone, one sigmoid head per class on
//! every decoder level.
//!
//! The graphs live with their layout: [`crate::nnunet`] (`Generic_UNet`, `FabiansUNet`) and
//! [`crate::firenet`]; the blocks they are made of in [`crate::blocks`].

use std::cell::RefCell;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Tensor};

use crate::firenet::FireGraph;
use crate::nnunet::UnetGraph;
use crate::params::{Param, ParamScope, ParamStore, Role};
use crate::topology::{Layout, Topology};

/// Which head outputs a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outputs<'a> {
    /// Every level's, full resolution first (training with deep supervision).
    AllLevels,
    /// Only the full-resolution one (inference; no other head runs).
    FullResolution,
    /// The full-resolution logits of these classes only, in this order (each below the network's
    /// class count): with per-site decoders only the decoders of their sites run.
    Classes(&'a [i64]),
}

/// The forward graph of a layout.
#[derive(Debug, Clone)]
enum Graph {
    /// [`Layout::GenericUnet`] and [`Layout::ResidualEncoder`]. Both variants are boxed: the
    /// graphs differ in size by hundreds of bytes (clippy's `large_enum_variant`).
    Unet(Box<UnetGraph>),
    FireNet(Box<FireGraph>),
}

/// A MultiTalent network: shared backbone and one sigmoid head per class on every decoder level.
#[derive(Debug)]
pub struct MultiTalentNet {
    topology: Topology,
    classes: i64,
    params: ParamStore,
    graph: Graph,
}

impl MultiTalentNet {
    /// Builds a freshly initialised network with `classes` output channels on `device`.
    pub fn new(topology: &Topology, classes: i64, device: Device) -> Result<Self> {
        topology.validate()?;
        ensure!(classes >= 1, "a MultiTalent network needs at least one class, got {classes}");
        let store = RefCell::new(ParamStore::new());
        let root = ParamScope::root(&store, device);
        let graph = match topology.layout {
            Layout::GenericUnet => Graph::Unet(Box::new(crate::nnunet::generic_unet(topology, classes, &root)?)),
            Layout::ResidualEncoder => {
                Graph::Unet(Box::new(crate::nnunet::residual_encoder(topology, classes, &root)?))
            }
            Layout::FireNet => Graph::FireNet(Box::new(crate::firenet::build(topology, classes, &root)?)),
        };
        Ok(Self { topology: topology.clone(), classes, params: store.into_inner(), graph })
    }

    /// A deep copy: the same topology and graph, every parameter's values copied into storage
    /// of its own (no fresh initialisation to overwrite, as `new` + `load_named` would do).
    pub fn deep_copy(&self) -> Self {
        Self {
            topology: self.topology.clone(),
            classes: self.classes,
            params: self.params.deep_copy(),
            graph: self.graph.clone(),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn classes(&self) -> i64 {
        self.classes
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    pub fn device(&self) -> Device {
        self.params.iter().next().map(|p| p.tensor.device()).unwrap_or(Device::Cpu)
    }

    /// Training forward: the logits of every decoder level, full resolution first.
    pub fn forward_ds(&self, x: &Tensor) -> Vec<Tensor> {
        self.run(x, Outputs::AllLevels)
    }

    /// Inference forward: only the full-resolution logits (no other head is computed).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.run(x, Outputs::FullResolution).swap_remove(0)
    }

    /// Inference forward of `classes` only (indices, in that order): `forward(x)`'s channels
    /// `classes`, but with per-site decoders only the decoders of those classes' sites run, so
    /// a site that predicts its own classes with a federation's model pays for one decoder, not
    /// every site's.
    pub fn forward_classes(&self, x: &Tensor, classes: &[i64]) -> Result<Tensor> {
        self.check_classes(classes)?;
        Ok(self.run(x, Outputs::Classes(classes)).swap_remove(0))
    }

    /// Refuses an empty selection and any class index the network lacks.
    pub fn check_classes(&self, classes: &[i64]) -> Result<()> {
        ensure!(!classes.is_empty(), "no class selected");
        if let Some(bad) = classes.iter().find(|&&c| c < 0 || c >= self.classes) {
            bail!("class {bad} does not exist (the network has {})", self.classes);
        }
        Ok(())
    }

    fn run(&self, x: &Tensor, outputs: Outputs) -> Vec<Tensor> {
        match &self.graph {
            Graph::Unet(graph) => graph.forward(&self.params, x, outputs),
            Graph::FireNet(graph) => graph.forward(&self.params, x, outputs),
        }
    }

    /// Saves every tensor under its nnU-Net v1 name, aliases included (atomic write).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::io::write_tensors_atomic(path, &self.params.named_tensors(true))
    }

    /// Loads a file written by [`MultiTalentNet::save`] or by nnU-Net v1 (strict: every tensor).
    pub fn load(&mut self, path: &std::path::Path) -> Result<()> {
        let tensors = crate::io::read_tensors(path)?;
        self.load_tensors(&tensors).with_context(|| format!("loading {}", path.display()))
    }

    /// Sets every parameter from `tensors` (nnU-Net v1 names; strict: each one, with its shape).
    pub fn load_tensors(&mut self, tensors: &[(String, tch::Tensor)]) -> Result<()> {
        self.params.load_named(tensors, true)
    }

    /// Parameter counts: (total, backbone, per class). Per-site decoders are in the total only.
    pub fn parameter_counts(&self) -> (i64, i64, i64) {
        let total = self.params.count(|_| true);
        let backbone = self.params.count(|p: &Param| p.role == Role::Backbone);
        let heads = self.params.count(|p: &Param| matches!(p.role, Role::Head { .. }));
        (total, backbone, heads / self.classes)
    }

    /// The class indices of each site's own decoder (per-site decoders); empty when every class
    /// shares one decoder.
    pub fn site_decoders(&self) -> &[Vec<i64>] {
        &self.topology.site_decoders
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    /// A deep copy holds every parameter (names, aliases, values, grad flag) in storage of its
    /// own and computes what the original computes.
    #[test]
    fn a_deep_copy_is_equal_and_independent() {
        let net = MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 2, Device::Cpu).unwrap();
        let copy = net.deep_copy();
        let (ours, theirs) = (net.params().named_tensors(true), copy.params().named_tensors(true));
        assert_eq!(ours.len(), theirs.len());
        for ((a, x), (b, y)) in ours.iter().zip(&theirs) {
            assert_eq!(a, b);
            assert!(x.equal(y), "{a}: values differ");
            assert_eq!(x.requires_grad(), y.requires_grad(), "{a}");
        }
        let x = Tensor::rand([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| net.forward(&x).equal(&copy.forward(&x))), "the copy computes otherwise");
        let first = copy.params().iter().next().unwrap().tensor.shallow_clone();
        tch::no_grad(|| {
            let _ = first.shallow_clone().fill_(7.0);
        });
        let original = &net.params().iter().next().unwrap().tensor;
        assert!(!original.equal(&first), "writing the copy wrote the original");
    }
}
