//! `model.json`: what a consumer of an exported model needs besides the weights (DESIGN.md §2.5):
//! topology, patch, spacing, CT normalization, and the classes with their sites and label sets.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::network::MultiTalentNet;
use crate::topology::Topology;

pub const MANIFEST_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FORMAT: &str = "fedtalent-model/1";

/// One output channel of the global model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassInfo {
    pub index: u32,
    /// `<site>/<name>`: classes of different sites are never merged.
    pub id: String,
    pub site: String,
    pub name: String,
    /// Label values of the site's label maps that form this class (a region).
    pub labels: Vec<u32>,
}

/// CT intensity normalization: clip, then z-score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtNormalization {
    pub clip_low: f32,
    pub clip_high: f32,
    pub mean: f32,
    pub std: f32,
}

impl CtNormalization {
    /// The paper's fixed values (MultiTalent, Ulrich et al. 2023).
    pub const PAPER: CtNormalization =
        CtNormalization { clip_low: -927.0, clip_high: 275.0, mean: 63.436882, std: 175.48094 };

    /// The statistics as the federation stores and sends them (f32) from the data crate's f64.
    pub fn from_data(n: &fedtalent_data::Normalization) -> Self {
        CtNormalization {
            clip_low: n.clip_low as f32,
            clip_high: n.clip_high as f32,
            mean: n.mean as f32,
            std: n.std as f32,
        }
    }

    /// The data crate's form, which preprocessing and the batch loader apply.
    pub fn to_data(&self) -> fedtalent_data::Normalization {
        fedtalent_data::Normalization {
            clip_low: self.clip_low as f64,
            clip_high: self.clip_high as f64,
            mean: self.mean as f64,
            std: self.std as f64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub format: String,
    pub preset: String,
    pub topology: Topology,
    pub patch: [i64; 3],
    pub spacing: [f64; 3],
    pub normalization: CtNormalization,
    pub classes: Vec<ClassInfo>,
    /// Federation round that produced the weights.
    pub round: u32,
    /// SHA-256 of the weights as the federation names them.
    pub digest: String,
    pub weights: String,
}

impl ModelManifest {
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
        Ok(manifest)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        crate::io::write_bytes_atomic(&dir.join(MANIFEST_FILE), json.as_bytes())
    }

    /// Loads an exported model directory (`model.json` + weights) onto `device`.
    pub fn load_model(dir: &Path, device: Device) -> Result<(Self, MultiTalentNet)> {
        let manifest = Self::read(dir)?;
        let mut net = MultiTalentNet::new(&manifest.topology, manifest.classes.len() as i64, device)?;
        net.load(&dir.join(&manifest.weights))?;
        Ok((manifest, net))
    }
}
