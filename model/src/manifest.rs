//! `model.json`: what a consumer of an exported model needs besides the weights (DESIGN.md §2.5):
//! topology, patch, spacing, input channels, CT normalization, and the classes with their sites
//! and label sets.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use fedtalent_vocab::{CtNormalization, GlobalClass, InputChannels};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::network::MultiTalentNet;
use crate::topology::Topology;
use crate::wire::{self, Selection};

pub const MANIFEST_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FORMAT: &str = "fedtalent-model/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub format: String,
    pub preset: String,
    pub topology: Topology,
    pub patch: [i64; 3],
    pub spacing: [f64; 3],
    /// The input channels in order, each with its normalization: `topology.in_channels` of them.
    /// Absent in models from before channels were declared, which took one CT channel.
    #[serde(default)]
    pub channels: InputChannels,
    /// Applied to the CT channels.
    pub normalization: CtNormalization,
    pub classes: Vec<GlobalClass>,
    /// Federation round that produced the weights.
    pub round: u32,
    /// SHA-256 of the weights as the federation names them.
    pub digest: String,
    pub weights: String,
    /// Classes (ids) whose masks keep only their largest connected component: nnU-Net's
    /// post-processing, decided per class on its site's validation cases (`site-agent
    /// postprocess`, [`crate::postprocess`]). Absent in models no site has decided for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub largest_component: Vec<String>,
    /// Sites whose classes are mutually exclusive and were trained as one softmax over
    /// background + them (`[site].exclusive_classes`): predicted by argmax among them, not by
    /// thresholding each. Recorded by the site (`site-agent train`, `site-agent postprocess`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclusive_sites: Vec<String>,
}

impl ModelManifest {
    /// The manifest of `net` as exported from `preset`: its topology, patch and spacing, the
    /// given normalization and classes; round 0 and no digest until the caller sets them.
    pub fn of(net: &MultiTalentNet, preset: &str, normalization: CtNormalization, classes: Vec<GlobalClass>) -> Self {
        let topology = net.topology().clone();
        ModelManifest {
            format: MANIFEST_FORMAT.into(),
            preset: preset.into(),
            patch: topology.patch,
            spacing: topology.spacing,
            topology,
            channels: InputChannels::ct(),
            normalization,
            classes,
            round: 0,
            digest: String::new(),
            weights: WEIGHTS_FILE.into(),
            largest_component: Vec::new(),
            exclusive_sites: Vec::new(),
        }
    }

    /// The softmax groups among the output classes `outputs` (class indices): for each
    /// exclusive site with a class there, the positions in `outputs` of its classes. `outputs`
    /// must hold all classes of such a site (a softmax over part of a group would be another
    /// distribution).
    pub fn softmax_groups(&self, outputs: &[usize]) -> Vec<Vec<usize>> {
        self.exclusive_sites
            .iter()
            .map(|site| {
                (0..outputs.len()).filter(|&i| self.classes.get(outputs[i]).is_some_and(|c| &c.site == site)).collect()
            })
            .filter(|group: &Vec<usize>| !group.is_empty())
            .collect()
    }

    /// `classes` followed by the other classes of the exclusive sites among them: what must be
    /// computed to predict `classes` (see [`ModelManifest::softmax_groups`]).
    pub fn with_whole_groups(&self, classes: &[usize]) -> Vec<usize> {
        let mut all = classes.to_vec();
        for c in &self.classes {
            let exclusive = self.exclusive_sites.contains(&c.site);
            let touched = classes.iter().any(|&i| self.classes.get(i).is_some_and(|s| s.site == c.site));
            if exclusive && touched && !all.contains(&(c.index as usize)) {
                all.push(c.index as usize);
            }
        }
        all
    }

    /// This manifest with the network's input `channels` ([`ModelManifest::of`] assumes one CT
    /// channel).
    pub fn with_channels(mut self, channels: InputChannels) -> Self {
        self.channels = channels;
        self
    }

    /// The declared channels must be the network's: one per input filter.
    fn check_channels(&self) -> Result<()> {
        ensure!(
            self.channels.len() as i64 == self.topology.in_channels,
            "model.json declares {} input channel(s) ({}) but its network takes {}",
            self.channels.len(),
            self.channels,
            self.topology.in_channels
        );
        Ok(())
    }

    /// Writes an exported model folder: `net`'s weights (nnU-Net names) and this manifest.
    pub fn save(&self, net: &MultiTalentNet, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        net.save(&dir.join(&self.weights))?;
        self.write(dir)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let manifest: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            manifest.format == MANIFEST_FORMAT,
            "{}: format {:?} is not {MANIFEST_FORMAT:?}",
            path.display(),
            manifest.format
        );
        manifest.check_channels().with_context(|| path.display().to_string())?;
        Ok(manifest)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        self.check_channels()?;
        let json = serde_json::to_string_pretty(self)?;
        crate::io::write_bytes_atomic(&dir.join(MANIFEST_FILE), json.as_bytes())
    }

    /// The sites whose decoders the model holds, at their positions: the owner of each
    /// decoder's classes (empty without per-site decoders).
    pub fn decoder_sites(&self) -> Vec<String> {
        self.topology
            .site_decoders
            .iter()
            .filter_map(|rows| rows.first())
            .filter_map(|&row| self.classes.get(row as usize))
            .map(|c| c.site.clone())
            .collect()
    }

    /// One site's model out of a model with per-site decoders: the shared encoder, that site's
    /// decoder in the place of the one decoder, and the heads of its classes only. It is a plain
    /// network of the preset's layout, so for `unet`/`tiny`/`small`/`resenc` its weights are an
    /// nnU-Net v1 state dict again (which the model with every site's decoder is not), and its
    /// outputs are the site's channels of the full model.
    pub fn site_model(&self, net: &MultiTalentNet, site: &str) -> Result<(Self, MultiTalentNet)> {
        let sites = self.decoder_sites();
        ensure!(!sites.is_empty(), "the model has no per-site decoders: it is one network already");
        ensure!(
            sites.iter().any(|s| s == site),
            "the model has no decoder of site {site:?} (its decoders: {})",
            sites.join(", ")
        );
        let classes: Vec<GlobalClass> = self
            .classes
            .iter()
            .filter(|c| c.site == site)
            .enumerate()
            .map(|(i, c)| GlobalClass { index: i as u32, ..c.clone() })
            .collect();
        let topology = Topology { site_decoders: Vec::new(), site_encoder_stages: 0, ..self.topology.clone() };
        let mut plain = MultiTalentNet::new(&topology, classes.len() as i64, net.device())?;
        let own = Selection::global(&self.classes, &sites).of_site(site);
        let mut parts = wire::Parts::from_wire(&wire::parts_to_wire(net, &own))?;
        // The site's decoder tensors carry the plain network's decoder names after their
        // `decoders.<i>.` prefix: in the plain network they are backbone tensors.
        let decoder = parts.decoders.remove(site).expect("the site has a decoder (checked above)");
        parts.backbone.extend(decoder);
        parts.decoders.clear();
        let expected: BTreeSet<String> = plain.params().backbone().into_iter().map(|(name, _)| name).collect();
        let given: BTreeSet<String> = parts.backbone.iter().map(|(name, _)| name.clone()).collect();
        ensure!(
            expected == given,
            "site {site:?}'s encoder and decoder do not make the plain network: missing {:?}, unexpected {:?}",
            expected.difference(&given).collect::<Vec<_>>(),
            given.difference(&expected).collect::<Vec<_>>()
        );
        let ids: Vec<String> = classes.iter().map(|c| c.id.clone()).collect();
        parts.apply(&mut plain, &Selection::local(&ids, None)).with_context(|| format!("site {site:?}'s model"))?;
        let largest_component =
            self.largest_component.iter().filter(|id| classes.iter().any(|c| &c.id == *id)).cloned().collect();
        let manifest = ModelManifest { topology, classes, largest_component, ..self.clone() };
        Ok((manifest, plain))
    }

    /// Loads an exported model directory (`model.json` + weights) onto `device`.
    pub fn load_model(dir: &Path, device: Device) -> Result<(Self, MultiTalentNet)> {
        let manifest = Self::read(dir)?;
        let mut net = MultiTalentNet::new(&manifest.topology, manifest.classes.len() as i64, device)?;
        net.load(&dir.join(&manifest.weights))?;
        Ok((manifest, net))
    }
}
