//! A growing federation (issue 16): a site listed after two rounds joins with classes nobody
//! had. The operator signs its certificate, adds it to `[federation].sites` and restarts
//! `serve`; its classes are appended with fresh heads and the next rounds include it.

use std::process::Command;
use std::time::Duration;

use fedtalent_coordinator::config::Launch;
use fedtalent_tests::{binary, run_ok, tensor, wait_child, Children, LocalFederation, Plan};
use tch::Tensor;

/// Rounds 1-2 with liver and pancreas; then multiorgan is listed, the coordinator restarted
/// (launch manual, so that the test knows where the join lands), multiorgan joins, rounds 3-4
/// run with all three. The round-4 checkpoint holds every class; the old heads equal their
/// owners' uploads, the new site's heads its own, the backbone the sqrt-weighted mean of all
/// three; the export carries every class.
#[test]
fn a_site_listed_later_joins_with_new_classes() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 4, local_steps: 3, eval_every: 4, ..Plan::default() };
    let mut fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], plan);
    let first: Vec<String> = fed.sites[..2].to_vec();
    fed.write_federation_toml(&first);
    let mut coordinator = fed.spawn_coordinator();
    let mut procs = Children(vec![fed.spawn_site("liver", &["--quiet"]), fed.spawn_site("pancreas", &["--quiet"])]);
    fed.wait_until("round 2", Duration::from_secs(300), || fed.completed_rounds().contains(&2));
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let before = fed.completed_rounds();
    let classes_before = fed.round_record(*before.last().unwrap())["classes"].as_array().unwrap().len();

    fed.plan.launch = Launch::Manual;
    fed.write_federation_toml(&fed.sites.clone());
    procs.0.push(fed.spawn_coordinator());
    procs.0.push(fed.spawn_site("multiorgan", &["--quiet"]));
    fed.wait_until("multiorgan joined", Duration::from_secs(180), || {
        fed.log("coordinator").contains("site joined the federation")
    });
    let setup: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fed.state_dir().join("federation.json")).unwrap()).unwrap();
    let classes = setup["classes"].as_array().unwrap();
    assert!(classes.len() > classes_before, "{setup}");
    for (i, class) in classes.iter().enumerate() {
        assert_eq!(class["index"], i as u64, "{setup}");
        assert_eq!(class["site"] == "multiorgan", i >= classes_before, "the new classes are not appended: {setup}");
    }
    run_ok(Command::new(binary("coordinator")).args(["launch", "--config"]).arg(fed.config_path()));
    let status = wait_child(&mut procs.0[2], Duration::from_secs(600), "restarted coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    for (i, site) in [(0, "liver"), (1, "pancreas"), (3, "multiorgan")] {
        let status = wait_child(&mut procs.0[i], Duration::from_secs(60), site);
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3, 4], "rounds before the restart: {before:?}");
    for round in [3, 4] {
        let record = fed.round_record(round);
        let mut sites: Vec<&str> =
            record["contributions"].as_array().unwrap().iter().map(|c| c["site"].as_str().unwrap()).collect();
        sites.sort();
        assert_eq!(sites, ["liver", "multiorgan", "pancreas"], "round {round}");
        assert_eq!(record["classes"].as_array().unwrap().len(), classes.len(), "round {round}");
    }

    // Round 4: heads by owner, the backbone the sqrt-weighted mean of the three uploads.
    let uploads = fed.round_uploads(4);
    let record_classes = uploads.record["classes"].as_array().unwrap();
    let mut head_rows = 0;
    for (contribution, local) in uploads.record["contributions"].as_array().unwrap().iter().zip(&uploads.locals) {
        let site = contribution["site"].as_str().unwrap();
        let own: Vec<i64> =
            record_classes.iter().filter(|c| c["site"] == site).map(|c| c["index"].as_i64().unwrap()).collect();
        for (name, global) in uploads.global.iter().filter(|(n, _)| n.starts_with("seg_outputs.")) {
            let local = tensor(local, name);
            for (row, &index) in own.iter().enumerate() {
                assert!(global.get(index).equal(&local.get(row as i64)), "{name} row {index}: not {site}'s upload");
                head_rows += 1;
            }
        }
    }
    assert!(head_rows > 0);
    let shared = uploads.assert_weighted_mean(|n| !n.starts_with("seg_outputs."));
    assert!(shared > 10, "only {shared} backbone tensors compared");
    assert_eq!(uploads.weights.len(), 3);

    let model = dir.path().join("model");
    fed.export(&model);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(manifest["classes"].as_array().unwrap().len(), classes.len(), "{manifest}");
    let weights = fedtalent_tests::read_tensors(&model.join("model.safetensors"));
    let head: &Tensor = tensor(&weights, "seg_outputs.0.weight");
    assert_eq!(head.size()[0], classes.len() as i64);
}
