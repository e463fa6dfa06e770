//! The network's named parameters, in nnU-Net v1 registration order, split into backbone and heads.
//!
//! A class's heads are row `c` (dim 0) of every head parameter. The federation moves the backbone
//! and head rows around; this module is the one place that knows which tensor is which.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// What a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Shared by all classes; aggregated across sites.
    Backbone,
    /// A per-class 1x1x1 head (weight or bias) of decoder `level` (0 = full resolution); dim 0 is
    /// the class.
    Head { level: usize },
    /// A tensor of site `site`'s own decoder (FIRENet's per-site decoders, a form of personalised
    /// federated learning). The federation treats it like that site's heads: only Backbone
    /// tensors are averaged; a site decoder is trained and kept by its site, uploaded by it
    /// (whole, see [`ParamStore::site_decoder`]) and written into the global model at export
    /// ([`ParamStore::set_site_decoder`]); no other site ever receives or changes it.
    SiteDecoder { site: usize },
}

/// One named parameter. `aliases` are second names under which nnU-Net v1 also lists the same
/// tensor (FabiansUNet's `all.0.weight`); exports write them, imports accept them.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub role: Role,
    pub aliases: Vec<String>,
}

/// How a freshly created parameter is initialised (DESIGN.md §1.2).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Kaiming normal, negative slope 0.01, fan-in from dim 1 times the kernel (PyTorch's rule,
    /// also for transposed convolutions).
    KaimingNormal,
    Zeros,
    Ones,
}

/// Ordered named parameters.
#[derive(Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
}

/// Index of a parameter in its store (cheap handle used by the forward pass).
pub type ParamId = usize;

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a trainable parameter. Panics on a duplicate name: that is a builder bug.
    pub fn add(&mut self, name: impl Into<String>, shape: &[i64], init: Init, role: Role, device: Device) -> ParamId {
        let name = name.into();
        let tensor = tch::no_grad(|| match init {
            Init::KaimingNormal => kaiming_normal(shape, device),
            Init::Zeros => Tensor::zeros(shape, (Kind::Float, device)),
            Init::Ones => Tensor::ones(shape, (Kind::Float, device)),
        })
        .set_requires_grad(true);
        assert!(!self.by_name.contains_key(&name), "duplicate parameter name {name}");
        self.by_name.insert(name.clone(), self.params.len());
        self.params.push(Param { name, tensor, role, aliases: Vec::new() });
        self.params.len() - 1
    }

    /// Every parameter with its values copied into storage of its own (names, roles, aliases
    /// and whether it requires grad as they are).
    pub fn deep_copy(&self) -> Self {
        let params = self
            .params
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                tensor: tch::no_grad(|| p.tensor.detach().copy()).set_requires_grad(p.tensor.requires_grad()),
                role: p.role,
                aliases: p.aliases.clone(),
            })
            .collect();
        Self { params, by_name: self.by_name.clone() }
    }

    pub fn add_alias(&mut self, id: ParamId, alias: impl Into<String>) {
        self.params[id].aliases.push(alias.into());
    }

    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.params[id].tensor
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The tensors an optimizer steps, in registration order.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    pub fn count(&self, filter: impl Fn(&Param) -> bool) -> i64 {
        self.params.iter().filter(|p| filter(p)).map(|p| p.tensor.numel() as i64).sum()
    }

    /// Copies `value` into the named parameter after checking its shape; the parameter keeps its
    /// device, dtype and identity (the optimizer's handles stay valid).
    pub fn copy_into(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let id = self.resolve(name).with_context(|| format!("unknown tensor {name:?}"))?;
        let param = &mut self.params[id];
        ensure!(
            param.tensor.size() == value.size(),
            "tensor {name:?}: shape {:?} does not match the network's {:?}",
            value.size(),
            param.tensor.size()
        );
        tch::no_grad(|| param.tensor.copy_(value));
        Ok(())
    }

    /// Looks a name up, accepting aliases and a DDP `module.` prefix.
    pub fn resolve(&self, name: &str) -> Option<ParamId> {
        let name = name.strip_prefix("module.").unwrap_or(name);
        self.id(name).or_else(|| self.params.iter().position(|p| p.aliases.iter().any(|a| a == name)))
    }

    /// Every tensor under its nnU-Net name; with `aliases`, also under its second names (what
    /// nnU-Net v1's `load_state_dict(strict=True)` wants).
    pub fn named_tensors(&self, aliases: bool) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            out.push((p.name.clone(), p.tensor.detach()));
            if aliases {
                out.extend(p.aliases.iter().map(|a| (a.clone(), p.tensor.detach())));
            }
        }
        out
    }

    /// The backbone tensors (what sites upload and the coordinator averages).
    pub fn backbone(&self) -> Vec<(String, Tensor)> {
        self.params.iter().filter(|p| p.role == Role::Backbone).map(|p| (p.name.clone(), p.tensor.detach())).collect()
    }

    /// Rows `classes` of every head tensor, named like the tensors.
    pub fn head_rows(&self, classes: &[i64]) -> Vec<(String, Tensor)> {
        let index = Tensor::from_slice(classes);
        self.params
            .iter()
            .filter(|p| matches!(p.role, Role::Head { .. }))
            .map(|p| (p.name.clone(), p.tensor.detach().index_select(0, &index.to_device(p.tensor.device()))))
            .collect()
    }

    /// Loads named tensors (aliases and `module.` accepted). `strict`: every parameter must be
    /// given. Unknown names and wrong shapes are refused by name; nothing is changed on error.
    pub fn load_named(&mut self, tensors: &[(String, Tensor)], strict: bool) -> Result<()> {
        let mut seen = vec![false; self.params.len()];
        for (name, value) in tensors {
            let id = self.resolve(name).with_context(|| format!("unknown tensor {name:?}"))?;
            let want = self.params[id].tensor.size();
            ensure!(value.size() == want, "tensor {name:?}: shape {:?}, the network's is {:?}", value.size(), want);
            seen[id] = true;
        }
        if strict {
            if let Some(missing) = seen.iter().position(|s| !s) {
                bail!("tensor {:?} is missing", self.params[missing].name);
            }
        }
        for (name, value) in tensors {
            self.copy_into(name, value)?;
        }
        Ok(())
    }

    /// Writes rows `classes` of every head parameter from `rows` (named like the parameters,
    /// with `classes.len()` rows each). Other rows stay bit-identical.
    pub fn set_head_rows(&mut self, classes: &[i64], rows: &[(String, Tensor)]) -> Result<()> {
        let index = Tensor::from_slice(classes);
        let expected: Vec<&Param> = self.params.iter().filter(|p| matches!(p.role, Role::Head { .. })).collect();
        ensure!(
            rows.len() == expected.len(),
            "head set has {} tensors, the network has {} head tensors",
            rows.len(),
            expected.len()
        );
        for (name, value) in rows {
            let id = self.resolve(name).with_context(|| format!("unknown head tensor {name:?}"))?;
            let param = &self.params[id];
            let Role::Head { .. } = param.role else { bail!("tensor {name:?} is not a head") };
            let mut want = param.tensor.size();
            want[0] = classes.len() as i64;
            ensure!(value.size() == want, "head tensor {name:?}: shape {:?}, expected {:?}", value.size(), want);
            let index = index.to_device(param.tensor.device());
            let value = value.to_device(param.tensor.device()).to_kind(param.tensor.kind());
            tch::no_grad(|| {
                let _ = param.tensor.shallow_clone().index_copy_(0, &index, &value);
            });
        }
        Ok(())
    }
}

impl ParamStore {
    /// Every tensor of site `site`'s own decoder, in registration order (empty when the network
    /// has no per-site decoders).
    pub fn site_decoder(&self, site: usize) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|p| p.role == Role::SiteDecoder { site })
            .map(|p| (p.name.clone(), p.tensor.detach()))
            .collect()
    }

    /// Replaces site `site`'s decoder with `tensors` (named like [`ParamStore::site_decoder`]
    /// returns them, all of them). Other sites' decoders, the backbone and the heads stay
    /// bit-identical; nothing is changed on error.
    pub fn set_site_decoder(&mut self, site: usize, tensors: &[(String, Tensor)]) -> Result<()> {
        let role = Role::SiteDecoder { site };
        let expected = self.params.iter().filter(|p| p.role == role).count();
        ensure!(expected > 0, "the network has no decoder of site {site}");
        ensure!(
            tensors.len() == expected,
            "decoder of site {site}: {} tensors given, the network has {expected}",
            tensors.len()
        );
        for (name, value) in tensors {
            let id = self.resolve(name).with_context(|| format!("unknown tensor {name:?}"))?;
            let p = &self.params[id];
            ensure!(p.role == role, "tensor {name:?} is not part of site {site}'s decoder");
            ensure!(
                value.size() == p.tensor.size(),
                "tensor {name:?}: shape {:?}, the network's is {:?}",
                value.size(),
                p.tensor.size()
            );
        }
        for (name, value) in tensors {
            self.copy_into(name, &value.to_kind(Kind::Float))?;
        }
        Ok(())
    }
}

/// `torch.nn.init.kaiming_normal_(w, a=0.01)`: std = gain / sqrt(fan_in), gain = sqrt(2 / (1 + a²)),
/// fan_in = size(1) · receptive field.
fn kaiming_normal(shape: &[i64], device: Device) -> Tensor {
    let receptive: i64 = shape[2..].iter().product();
    let fan_in = (shape[1] * receptive) as f64;
    let gain = (2.0 / (1.0 + 0.01f64 * 0.01)).sqrt();
    Tensor::randn(shape, (Kind::Float, device)) * (gain / fan_in.sqrt())
}

/// A scope in the parameter namespace (candle's `VarBuilder::pp`): it knows the dotted path of
/// the module being built, the [`Role`] its tensors get and the device, and creates parameters
/// under `<path>.<leaf>` in the store's registration order. Blocks take a scope instead of
/// formatting names, so a module's name is written once, where the module is placed.
///
/// Cheap to clone; every clone of one builder writes into the same store.
#[derive(Clone)]
pub(crate) struct ParamScope<'a> {
    store: &'a std::cell::RefCell<ParamStore>,
    device: Device,
    role: Role,
    path: String,
}

impl<'a> ParamScope<'a> {
    /// The empty path: backbone tensors on `device`.
    pub(crate) fn root(store: &'a std::cell::RefCell<ParamStore>, device: Device) -> Self {
        Self { store, device, role: Role::Backbone, path: String::new() }
    }

    /// The sub-scope `<path>.<part>`; `part` may itself be dotted (`"downsample_skip.0"`).
    pub(crate) fn pp(&self, part: impl std::fmt::Display) -> Self {
        Self { path: self.name(part), ..self.clone() }
    }

    /// The same path, whose tensors get `role`.
    pub(crate) fn with_role(&self, role: Role) -> Self {
        Self { role, ..self.clone() }
    }

    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// The full name of `leaf` in this scope.
    fn name(&self, leaf: impl std::fmt::Display) -> String {
        if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.path)
        }
    }

    /// Creates the parameter `<path>.<leaf>` (see [`ParamStore::add`]).
    pub(crate) fn add(&self, leaf: &str, shape: &[i64], init: Init) -> ParamId {
        self.store.borrow_mut().add(self.name(leaf), shape, init, self.role, self.device)
    }

    /// Lists parameter `id` also as `<path>.<leaf>` (see [`Param::aliases`]).
    pub(crate) fn alias(&self, id: ParamId, leaf: &str) {
        self.store.borrow_mut().add_alias(id, self.name(leaf));
    }
}
