//! Per-site decoders in a real federation: the encoder (and FIRENet's fabric module) is
//! averaged with sqrt(n) weights, each site's decoder (like its heads) is taken from its owner;
//! with `site_encoder_stages`, the deepest encoder stages travel with the decoder.

use std::time::Duration;

use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};
use tch::Tensor;

#[test]
fn per_site_decoders_stay_with_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 8, preset: "firenet-tiny", per_site_decoders: true, ..Plan::default() };
    let (fed, _, out) = federate_and_export(dir.path(), plan);
    let get = |set: &[(String, Tensor)], name: &str| fedtalent_tests::tensor(set, name).shallow_clone();
    // Fine-tuning it on one site (heads only, so nothing else moves) starts the network from
    // that site's decoder, or from the one --decoder-from names; the encoder is the shared one.
    let exported = fedtalent_tests::read_tensors(&out.join("model.safetensors"));
    let pancreas = fed.site_dir("pancreas").join("site.toml");
    for (decoder_from, index) in [(None, 1), (Some("liver"), 0)] {
        let tuned = dir.path().join(format!("tuned-{index}"));
        let mut cmd = std::process::Command::new(fedtalent_tests::binary("site-agent"));
        cmd.args(["train", "--site"]).arg(&pancreas).args(["--device", "cpu", "--steps", "2", "--head-steps", "2"]);
        cmd.arg("--init").arg(&out).arg("--out").arg(&tuned);
        if let Some(site) = decoder_from {
            cmd.args(["--decoder-from", site]);
        }
        fedtalent_tests::run_ok(&mut cmd);
        let tuned = fedtalent_tests::read_tensors(&tuned.join("model/model.safetensors"));
        let mut compared = 0;
        for (name, t) in tuned.iter().filter(|(n, _)| !n.starts_with("seg_outputs.")) {
            let source = match name.strip_prefix("decoders.0.") {
                Some(rest) => format!("decoders.{index}.{rest}"),
                None => name.clone(),
            };
            assert!(get(&exported, &source).equal(t), "{name} is not the model's {source}");
            compared += 1;
        }
        assert!(compared > 20, "only {compared} tensors compared");
    }
}

/// Two sites (liver, pancreas) federate by `plan`; checks that each site's decoder in the global
/// model is its own upload and the rest the weighted mean, exports the model and checks it loads.
/// Returns the federation, the last round's global tensors and the export folder.
fn federate_and_export(
    dir: &std::path::Path,
    plan: Plan,
) -> (LocalFederation, Vec<(String, Tensor)>, std::path::PathBuf) {
    let sites = ["liver", "pancreas"];
    let fed = LocalFederation::create(dir, &sites, plan);
    let mut procs =
        Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[]), fed.spawn_site("pancreas", &[])]);
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);

    let uploads = fed.round_uploads(2);
    let (global, locals) = (&uploads.global, &uploads.locals);
    let contributions = uploads.record["contributions"].as_array().unwrap();
    let get = |set: &[(String, Tensor)], name: &str| fedtalent_tests::tensor(set, name).shallow_clone();
    // Each site's decoder in the global model is exactly its own upload (local decoder 0).
    let mut decoder_tensors = 0;
    for (c, local) in contributions.iter().zip(locals) {
        let index = sites.iter().position(|s| *s == c["site"].as_str().unwrap()).unwrap();
        for (name, t) in local.iter().filter(|(n, _)| n.starts_with("decoders.0.")) {
            let global_name = format!("decoders.{index}.{}", &name["decoders.0.".len()..]);
            assert!(get(global, &global_name).equal(t), "{global_name} is not its owner's upload");
            decoder_tensors += 1;
        }
    }
    assert!(decoder_tensors > 10, "only {decoder_tensors} decoder tensors compared");
    // The shared part is the sqrt-weighted mean of the uploads.
    let shared = uploads.assert_weighted_mean(|n| !n.starts_with("decoders.") && !n.starts_with("seg_outputs."));
    assert!(shared > 10, "only {shared} shared tensors compared");
    // The export carries every site's decoder and loads back.
    let out = dir.join("model");
    fed.export(&out);
    let (manifest, net) = fedtalent_model::ModelManifest::load_model(&out, tch::Device::Cpu).unwrap();
    assert!(net.params().iter().any(|p| p.name.starts_with("decoders.1.")), "the export lacks site 1's decoder");
    assert_eq!(manifest.classes.len(), 4);

    (fed, uploads.global, out)
}

/// The deepest encoder stage of each site (`site_encoder_stages = 1`, tiny U-Net) is trained and
/// kept by its owner like its decoder; the shallower stages are averaged; each site's part of
/// the export is a plain network.
#[test]
fn a_sites_own_encoder_stages_stay_with_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan {
        rounds: 2,
        local_steps: 4,
        preset: "tiny",
        per_site_decoders: true,
        site_encoder_stages: 1,
        ..Plan::default()
    };
    let (_fed, global, out) = federate_and_export(dir.path(), plan);
    for site in 0..2 {
        let own = format!("decoders.{site}.conv_blocks_context.3.");
        assert!(global.iter().any(|(n, _)| n.starts_with(&own)), "no {own}* in the global model");
    }
    assert!(!global.iter().any(|(n, _)| n.starts_with("conv_blocks_context.3.")), "the bottleneck is still shared");
    let (manifest, net) = fedtalent_model::ModelManifest::load_model(&out, tch::Device::Cpu).unwrap();
    assert_eq!(manifest.topology.site_encoder_stages, 1);
    let (plain_manifest, plain) = manifest.site_model(&net, "pancreas").unwrap();
    assert_eq!(plain_manifest.topology.site_encoder_stages, 0);
    assert!(plain.params().iter().any(|p| p.name.starts_with("conv_blocks_context.3.")));
}
