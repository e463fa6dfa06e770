//! `site-agent train --init MODEL`: fine-tuning an exported model on local data (MultiTalent's
//! transfer setting, and a site personalising the federation's model).
//!
//! The new network takes the model's backbone and, matched by class id, the heads of the
//! classes it continues; classes the model does not have get fresh heads. With `--keep-heads`
//! the model's other classes stay in the network (untrained, so the exported model still
//! predicts them). A model with per-site decoders gives the network one decoder: the training
//! site's own, or the one `--decoder-from` names. The model's preset, target spacing and CT
//! normalization are kept: the backbone's features were learned on them.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_model::manifest::ModelManifest;
use fedtalent_model::wire::{self, Parts, Selection};
use fedtalent_model::{MultiTalentNet, Topology};
use fedtalent_vocab::GlobalClass;
use tch::Device;

/// An exported model to start from.
pub struct InitModel {
    pub manifest: ModelManifest,
    net: MultiTalentNet,
    /// The site whose decoder the new network starts from (models with per-site decoders).
    pub decoder_site: Option<String>,
}

/// What [`InitModel::transfer`] took from the model.
#[derive(Debug)]
pub struct Transferred {
    /// Class ids whose heads came from the model.
    pub heads: Vec<String>,
    /// Class ids that start with fresh heads.
    pub fresh: Vec<String>,
}

impl InitModel {
    /// Loads `dir`; `training_sites` are the datasets' sites (per-site-decoder models need
    /// exactly one).
    pub fn load(dir: &Path, device: Device, training_sites: &[String], decoder_from: Option<&str>) -> Result<Self> {
        let (manifest, net) =
            ModelManifest::load_model(dir, device).with_context(|| format!("--init {}", dir.display()))?;
        // The local trainer builds the preset's network: the model must be one.
        let mut preset = Topology::preset(&manifest.preset).with_context(|| format!("{}", dir.display()))?;
        preset.site_decoders = manifest.topology.site_decoders.clone();
        preset.site_encoder_stages = manifest.topology.site_encoder_stages;
        ensure!(
            preset == manifest.topology,
            "the model {} is not a plain {:?} network (its topology differs from the preset's)",
            dir.display(),
            manifest.preset
        );
        let sites = manifest.decoder_sites();
        let decoder_site = if sites.is_empty() {
            ensure!(decoder_from.is_none(), "--decoder-from: the model {} has no per-site decoders", dir.display());
            None
        } else {
            let [site] = training_sites else {
                bail!(
                    "the model {} has per-site decoders: fine-tune it on one dataset (the network gets one decoder)",
                    dir.display()
                )
            };
            let wanted = decoder_from.unwrap_or(site);
            ensure!(
                sites.iter().any(|s| s == wanted),
                "the model {} has no decoder of site {wanted:?} (its decoders: {}); choose one with --decoder-from",
                dir.display(),
                sites.join(", ")
            );
            Some(wanted.to_string())
        };
        Ok(InitModel { manifest, net, decoder_site })
    }

    /// The class list of the new network: with `keep_heads`, the model's classes first (in its
    /// order), then the datasets' classes it lacks; without, the datasets' classes alone.
    pub fn class_list(&self, dataset_classes: Vec<GlobalClass>, keep_heads: bool) -> Vec<GlobalClass> {
        let mut classes: Vec<GlobalClass> = if keep_heads { self.manifest.classes.clone() } else { Vec::new() };
        for c in dataset_classes {
            // A continuing class takes the dataset's definition (its label region).
            match classes.iter_mut().find(|k| k.id == c.id) {
                Some(kept) => *kept = c,
                None => classes.push(c),
            }
        }
        for (i, c) in classes.iter_mut().enumerate() {
            c.index = i as u32;
        }
        classes
    }

    /// Writes the model's backbone, the heads of the classes both networks have and the chosen
    /// decoder into `net` (laid out as `selection`, whose decoder, if any, is `decoder_owner`'s).
    pub fn transfer(
        &self,
        net: &mut MultiTalentNet,
        selection: &Selection,
        decoder_owner: Option<&str>,
    ) -> Result<Transferred> {
        let source = Selection::global(&self.manifest.classes, &self.manifest.decoder_sites());
        let mut parts = Parts::from_wire(&wire::parts_to_wire(&self.net, &source))?;
        let (heads, fresh): (Vec<String>, Vec<String>) =
            selection.class_ids().map(str::to_string).partition(|id| parts.heads.contains_key(id));
        parts.heads.retain(|id, _| heads.contains(id));
        let decoder = self.decoder_site.as_ref().and_then(|site| parts.decoders.remove(site));
        parts.decoders.clear();
        if let (Some(tensors), Some(owner)) = (decoder, decoder_owner) {
            parts.decoders.insert(owner.to_string(), tensors);
        }
        parts.apply(net, selection).context("loading the --init model into the new network")?;
        Ok(Transferred { heads, fresh })
    }
}
