//! `[plan] init_model`: a federation that starts from an exported model rather than a fresh
//! network (MultiTalent as a foundation model; a federation continuing an earlier one's model).
//!
//! The fresh global network of the setup's classes takes the model's backbone and, matched by
//! class id, the heads of the classes that continue; new classes keep their fresh heads. With
//! per-site decoders each site continues its own decoder where the model has one, and a model
//! with one shared decoder starts every site's decoder from it (FIRENet's whole-network
//! transfer); a model's per-site decoders cannot become one shared decoder (which site's?).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use fedtalent_model::wire::{self, Parts, Selection};
use fedtalent_model::{ModelManifest, MultiTalentNet};
use fedtalent_vocab::{CtNormalization, InitNormalization};
use tch::{Device, Tensor};
use tracing::info;

use crate::config::FederationConfig;
use crate::state::Setup;

/// The model's CT normalization when the federation keeps it (`init_normalization = "model"`).
pub(super) fn model_normalization(config: &FederationConfig) -> Result<Option<CtNormalization>> {
    match (&config.plan.init_model, config.plan.init_normalization) {
        (Some(dir), InitNormalization::Model) => {
            Ok(Some(ModelManifest::read(dir).context("[plan].init_model")?.normalization))
        }
        _ => Ok(None),
    }
}

/// Writes the model at `dir` into the fresh global network `net` of `setup`.
pub(super) fn load_into(dir: &Path, net: &mut MultiTalentNet, config: &FederationConfig, setup: &Setup) -> Result<()> {
    let context = || format!("[plan].init_model {}", dir.display());
    let (manifest, model) = ModelManifest::load_model(dir, Device::Cpu).with_context(context)?;
    let model_sites = manifest.decoder_sites();
    let mut parts =
        Parts::from_wire(&wire::parts_to_wire(&model, &Selection::global(&manifest.classes, &model_sites)))?;
    let selection = super::setup::global_selection(config, setup);
    parts.heads.retain(|id, _| selection.row_of(id).is_some());
    let own_stages = config.plan.site_encoder_stages as usize;
    ensure!(
        model_sites.is_empty() || manifest.topology.site_encoder_stages == own_stages,
        "{}: each site's decoder has {} encoder stages of its own in the model, [plan].site_encoder_stages = {own_stages}",
        context(),
        manifest.topology.site_encoder_stages
    );
    match (model_sites.is_empty(), config.plan.per_site_decoders) {
        (true, false) | (false, true) => parts.decoders.retain(|site, _| selection.decoder_of(site).is_some()),
        (true, true) => share_decoder(&mut parts, net, &setup.sites()),
        (false, false) => bail!(
            "{}: the model has per-site decoders ({}); a federation without per_site_decoders has one decoder, \
             which none of them is",
            context(),
            model_sites.join(", ")
        ),
    }
    parts.apply(net, &selection).with_context(context)?;
    let continuing: Vec<&str> = parts.heads.keys().map(String::as_str).collect();
    let decoders: Vec<&str> = parts.decoders.keys().map(String::as_str).collect();
    info!(
        model = %dir.display(),
        continuing = continuing.len(),
        fresh = setup.classes.len() - continuing.len(),
        decoders = %decoders.join(","),
        "the global model starts from an exported model"
    );
    Ok(())
}

type Named = Vec<(String, Tensor)>;

/// Moves the shared decoder out of the model's backbone into every site's decoder: the tensors
/// whose names the global network has under `decoders.0.`.
fn share_decoder(parts: &mut Parts, net: &MultiTalentNet, sites: &[String]) {
    let per_site = |name: &str| net.params().resolve(&format!("decoders.0.{name}")).is_some();
    let (decoder, backbone): (Named, Named) =
        std::mem::take(&mut parts.backbone).into_iter().partition(|(n, _)| per_site(n));
    parts.backbone = backbone;
    for site in sites {
        let copy = decoder.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        parts.decoders.insert(site.clone(), copy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtalent_model::Topology;
    use fedtalent_vocab::{ClassRegion, GlobalClass};

    fn class(index: u32, id: &str) -> GlobalClass {
        let (site, name) = id.split_once('/').unwrap();
        GlobalClass::new(index, site, &ClassRegion { name: name.into(), labels: vec![1] })
    }

    /// A tiny federation of `sites` starting from `model`.
    fn federation(dir: &Path, sites: &[&str], per_site_decoders: bool, model: &Path) -> FederationConfig {
        let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        let text = crate::config::template("t", "127.0.0.1:7443".parse().unwrap(), &sites)
            .replace("preset = \"unet\"", "preset = \"tiny\"")
            .replace("min_sites = 2", "min_sites = 1")
            .replace("per_site_decoders = false", &format!("per_site_decoders = {per_site_decoders}"))
            .replace("# init_model = \"model/\"", &format!("init_model = {:?}", model.display().to_string()));
        let path = dir.join("federation.toml");
        std::fs::write(&path, text).unwrap();
        FederationConfig::load(&path).unwrap()
    }

    fn tensors(net: &MultiTalentNet) -> std::collections::BTreeMap<String, Tensor> {
        net.params().named_tensors(false).into_iter().collect()
    }

    #[test]
    fn continuing_classes_keep_their_heads_and_new_ones_start_fresh() {
        let _rng = crate::torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let topo = Topology::preset("tiny").unwrap();
        tch::manual_seed(7);
        let model = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
        let model_classes = vec![class(0, "liver/liver"), class(1, "pancreas/pancreas")];
        let norm = CtNormalization { clip_low: -100.0, clip_high: 200.0, mean: 50.0, std: 40.0 };
        ModelManifest::of(&model, "tiny", norm, model_classes).save(&model, &dir.path().join("m")).unwrap();
        let config = federation(dir.path(), &["liver", "kidney"], false, &dir.path().join("m"));
        assert_eq!(model_normalization(&config).unwrap(), Some(norm));
        let setup = Setup {
            classes: vec![class(0, "liver/liver"), class(1, "kidney/kidney")],
            normalization: norm,
            site_cases: vec![("liver".into(), 3), ("kidney".into(), 3)],
            channels: Default::default(),
            exclusive_sites: Vec::new(),
        };
        tch::manual_seed(0);
        let mut global = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
        let fresh = tensors(&global);
        load_into(&dir.path().join("m"), &mut global, &config, &setup).unwrap();
        let (got, source) = (tensors(&global), tensors(&model));
        let mut heads = 0;
        for (name, t) in &got {
            if name.starts_with("seg_outputs.") {
                heads += 1;
                // row 0: liver/liver continues (the model's row 0); row 1: kidney is new
                assert!(t.get(0).equal(&source[name].get(0)), "{name}: liver/liver head not the model's");
                assert!(t.get(1).equal(&fresh[name].get(1)), "{name}: the new kidney head is not fresh");
            } else {
                assert!(t.equal(&source[name]), "{name}: backbone tensor not the model's");
            }
        }
        assert!(heads > 0);
    }

    #[test]
    fn a_shared_decoder_starts_every_sites_decoder_and_site_decoders_cannot_merge() {
        let _rng = crate::torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let topo = Topology::preset("tiny").unwrap();
        let model = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
        let classes = vec![class(0, "a/x"), class(1, "b/y")];
        ModelManifest::of(&model, "tiny", CtNormalization::PAPER, classes.clone())
            .save(&model, &dir.path().join("m"))
            .unwrap();
        let config = federation(dir.path(), &["a", "b"], true, &dir.path().join("m"));
        let setup = Setup {
            classes: classes.clone(),
            normalization: CtNormalization::PAPER,
            site_cases: vec![("a".into(), 3), ("b".into(), 3)],
            channels: Default::default(),
            exclusive_sites: Vec::new(),
        };
        let site_topo = topo.clone().with_site_decoders(vec![vec![0], vec![1]]);
        let mut global = MultiTalentNet::new(&site_topo, 2, Device::Cpu).unwrap();
        load_into(&dir.path().join("m"), &mut global, &config, &setup).unwrap();
        let (got, source) = (tensors(&global), tensors(&model));
        let mut decoder_tensors = 0;
        for (name, t) in &got {
            if let Some(rest) = name.strip_prefix("decoders.") {
                let shared = rest.split_once('.').unwrap().1;
                assert!(t.equal(&source[shared]), "{name}: not the model's shared decoder tensor {shared}");
                decoder_tensors += 1;
            }
        }
        assert!(decoder_tensors > 0);

        // The per-site model as the start of a federation with one shared decoder: refused.
        let manifest = ModelManifest::of(&global, "tiny", CtNormalization::PAPER, classes);
        manifest.save(&global, &dir.path().join("sited")).unwrap();
        let shared = federation(dir.path(), &["a", "b"], false, &dir.path().join("sited"));
        let mut net = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
        let err = format!("{:#}", load_into(&dir.path().join("sited"), &mut net, &shared, &setup).unwrap_err());
        assert!(err.contains("per-site decoders (a, b)"), "{err}");
    }
}
