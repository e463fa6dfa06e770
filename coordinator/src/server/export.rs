//! The global model for its users: `model.safetensors` (nnU-Net v1 names) + `model.json`
//! (DESIGN.md §2.5), written from the running coordinator or offline from the state dir.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedtalent_model::wire;
use fedtalent_model::{ModelManifest, MultiTalentNet};

use super::setup::{global_selection, load_global};
use super::Coordinator;
use crate::config::FederationConfig;
use crate::state::{Setup, StateDir};

impl Coordinator {
    /// Exports the current global model into `dir` (the operator's `Export` request).
    pub(super) fn export(&self, dir: &Path) -> Result<String> {
        let inner = self.lock();
        let federation = inner.running().context("the federation is not set up yet")?;
        let (round, digest) = (federation.completed, &federation.digest);
        export_model(&federation.global, &federation.setup, &self.config.plan.preset, round, digest, dir)?;
        Ok(format!("round {round} exported to {} (digest {digest})", dir.display()))
    }
}

/// Writes `model.safetensors` (nnU-Net names, aliases included) + `model.json` into `dir`.
pub fn export_model(
    net: &MultiTalentNet,
    setup: &Setup,
    preset: &str,
    round: u32,
    digest: &str,
    dir: &Path,
) -> Result<PathBuf> {
    manifest_of(net, setup, preset, round, digest).save(net, dir)?;
    Ok(dir.to_path_buf())
}

/// The global model's manifest at `round`.
fn manifest_of(net: &MultiTalentNet, setup: &Setup, preset: &str, round: u32, digest: &str) -> ModelManifest {
    ModelManifest {
        round,
        digest: digest.into(),
        exclusive_sites: setup.exclusive_sites.clone(),
        ..ModelManifest::of(net, preset, setup.normalization, setup.classes.clone())
            .with_channels(setup.channels.clone())
    }
}

/// Offline export from the newest checkpoint in the state dir (the coordinator may be stopped);
/// with `site`, that site's own plain network ([`ModelManifest::site_model`]).
pub fn export_from_state(config: &FederationConfig, dir: &Path, site: Option<&str>) -> Result<String> {
    let state = StateDir::open(&config.federation.state_dir)?;
    let setup = state.read_setup()?.context("no federation set up in the state dir yet")?;
    let (net, round, _) = load_global(config, &state, &setup)?;
    anyhow::ensure!(round > 0, "no round completed yet: nothing to export");
    let digest = wire::model_digest(&net, &global_selection(config, &setup));
    let Some(site) = site else {
        export_model(&net, &setup, &config.plan.preset, round, &digest, dir)?;
        return Ok(format!("round {round} exported to {} (digest {digest})", dir.display()));
    };
    let global = manifest_of(&net, &setup, &config.plan.preset, round, &digest);
    let (manifest, plain) = global.site_model(&net, site).context("--site")?;
    manifest.save(&plain, dir)?;
    Ok(format!(
        "round {round}: site {site}'s model ({} classes, its own decoder) exported to {} (global digest {digest})",
        manifest.classes.len(),
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use fedtalent_model::Topology;
    use fedtalent_vocab::{ClassRegion, CtNormalization};

    use super::*;

    /// The export says which sites' classes are one softmax: predict takes their argmax.
    #[test]
    fn the_export_names_the_sites_whose_classes_are_exclusive() {
        let organ = |name: &str| ClassRegion { name: name.into(), labels: vec![1] };
        let empty = Setup::empty(CtNormalization::PAPER, Default::default());
        let setup = empty.with_site("a", &[organ("x")], 3, false).with_site("b", &[organ("y"), organ("z")], 3, true);
        let net = {
            let _rng = crate::torch_rng(); // it draws from the generator other tests seed
            MultiTalentNet::new(&Topology::preset("tiny").unwrap(), 3, tch::Device::Cpu).unwrap()
        };
        let manifest = manifest_of(&net, &setup, "tiny", 1, "d");
        assert_eq!(manifest.exclusive_sites, vec!["b"]);
        assert_eq!(manifest.classes.len(), 3);
    }
}
