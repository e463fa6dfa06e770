//! Import of nnU-Net v1 checkpoints: `model_final_checkpoint.model` and its siblings, a
//! `torch.save` of a dict whose `state_dict` holds the network (as nnU-Net's trainers save, and
//! as the published MultiTalent weights are), into a model folder that predict, fine-tuning and
//! a federation accept. The network's tensor names are nnU-Net v1's, so the state dict loads as
//! it is; the class list (one sigmoid head per output channel) comes from the user.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_vocab::{CtNormalization, GlobalClass, InputChannels};
use tch::{Device, Kind, Tensor};

use crate::manifest::ModelManifest;
use crate::network::MultiTalentNet;
use crate::topology::Topology;
use crate::torch_pickle::{Checkpoint, Value};

/// The network tensors of an nnU-Net v1 checkpoint (or of a bare `torch.save(state_dict)`), in
/// the file's order, as f32; `module.` prefixes (a DataParallel network) are removed, as
/// nnU-Net's own `load_checkpoint` does.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let Checkpoint { root, tensors } = Checkpoint::read(path)?;
    let dict = match root.get("state_dict") {
        Some(d) => d,
        None if matches!(&root, Value::Dict(items) if items.iter().all(|(_, v)| matches!(v, Value::Tensor(_)))) => {
            &root
        }
        None => bail!("{}: no \"state_dict\" in the checkpoint: not an nnU-Net v1 checkpoint", path.display()),
    };
    let Value::Dict(items) = dict else { bail!("{}: \"state_dict\" is not a dict", path.display()) };
    ensure!(!items.is_empty(), "{}: the state dict is empty", path.display());
    items
        .iter()
        .map(|(key, value)| {
            let Value::Str(name) = key else { bail!("{}: a state dict key is not a string", path.display()) };
            let Value::Tensor(i) = value else {
                bail!("{}: state dict entry {name:?} is not a tensor", path.display())
            };
            let tensor = &tensors[*i];
            ensure!(
                tensor.is_floating_point(),
                "{}: tensor {name:?} is {:?}, not floating point",
                path.display(),
                tensor.kind()
            );
            let name = name.strip_prefix("module.").unwrap_or(name).to_string();
            Ok((name, tensor.to_kind(Kind::Float)))
        })
        .collect()
}

/// The first convolution's input filters must be the channels given: a network trained on T1
/// and T2 cannot read one CT channel, and its first weights say how many it took. Said here in
/// those words rather than as the shape mismatch the load would report.
fn check_input_channels(
    checkpoint: &Path,
    tensors: &[(String, Tensor)],
    net: &MultiTalentNet,
    channels: &InputChannels,
) -> Result<()> {
    // The convolution reading the image is the one with the fewest input filters (every other
    // one reads >= 32 feature maps), in both nnU-Net v1 layouts.
    let stem =
        net.params().named_tensors(false).into_iter().filter(|(_, t)| t.dim() == 5).min_by_key(|(_, t)| t.size()[1]);
    let Some((name, first)) = stem.and_then(|(name, _)| tensors.iter().find(|(n, _)| *n == name)) else {
        return Ok(()); // absent: the load names the missing tensor
    };
    let taken = first.size()[1];
    ensure!(
        taken == channels.len() as i64,
        "{}: {name} takes {taken} input channels, but {} were given ({channels}); name each with --channel",
        checkpoint.display(),
        channels.len()
    );
    Ok(())
}

/// What to import a checkpoint as.
pub struct ImportSpec<'a> {
    /// Preset whose network the checkpoint holds (its layout, widths and strides).
    pub preset: &'a str,
    /// One class per output channel, in channel order.
    pub classes: Vec<GlobalClass>,
    pub normalization: CtNormalization,
    /// The network's input channels in order (nnU-Net's `modalities` of its plans; one CT channel
    /// for the published MultiTalent weights).
    pub channels: InputChannels,
}

/// Imports `checkpoint` into the model folder `out`; returns its manifest. Every tensor of the
/// preset's network must be in the checkpoint with its shape, and nothing else (deep-supervision
/// outputs included: nnU-Net v1 keeps them in the state dict).
pub fn import(checkpoint: &Path, spec: ImportSpec, out: &Path) -> Result<ModelManifest> {
    let topology = Topology::preset(spec.preset)?.with_in_channels(spec.channels.len());
    let tensors = read_state_dict(checkpoint)?;
    if let Some((name, t)) = tensors.iter().find(|(n, _)| n == "seg_outputs.0.weight") {
        ensure!(
            t.size()[0] == spec.classes.len() as i64,
            "{}: {name} has {} output channels, but {} classes were given (one per channel)",
            checkpoint.display(),
            t.size()[0],
            spec.classes.len()
        );
    }
    let mut net = MultiTalentNet::new(&topology, spec.classes.len() as i64, Device::Cpu)?;
    check_input_channels(checkpoint, &tensors, &net, &spec.channels)?;
    net.load_tensors(&tensors)
        .with_context(|| format!("{} is not a {:?} network", checkpoint.display(), spec.preset))?;
    let digest = crate::wire::model_digest(&net, &crate::wire::Selection::global(&spec.classes, &[]));
    let manifest = ModelManifest { digest, ..ModelManifest::of(&net, spec.preset, spec.normalization, spec.classes) }
        .with_channels(spec.channels);
    manifest.save(&net, out)?;
    Ok(manifest)
}
