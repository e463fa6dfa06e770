//! Secure aggregation with differential privacy, end to end: real `coordinator` and
//! `site-agent` processes on loopback, the sites masking their backbone changes.

use std::time::Duration;

use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

/// Three sites, two rounds, `[plan.privacy]` with secure aggregation and DP (the sites clip
/// their changes to C = 0.05, the coordinator adds noise to the unmasked sum). The last global
/// backbone is the previous one plus the sqrt(n)-weighted sum of the sites' clipped changes
/// (recomputed from what each site trained) plus noise of the stated std: the residual has that
/// std to 5 % and mean zero. A wrong unmasking leaves masks of the size of the whole 32-bit
/// ring in the sum, and a missing clip changes the residual's std.
/// The round records name the three sites, each with a backbone norm of 0 (not visible to the
/// coordinator), and the metrics carry ε with no site named as clipped (only the sites know).
#[test]
fn secure_aggregation_with_dp() {
    let dir = tempfile::tempdir().unwrap();
    let privacy = fedtalent_vocab::Privacy { secure_aggregation: true, ..fedtalent_vocab::Privacy::dp(0.05, 1.0) };
    let plan = Plan { rounds: 2, local_steps: 5, cases: 4, privacy: Some(privacy), ..Plan::default() };
    let sites = ["liver", "pancreas", "multiorgan"];
    let fed = LocalFederation::create(dir.path(), &sites, plan);
    let mut procs = Children(vec![fed.spawn_coordinator_with(&[])]);
    for site in &fed.sites {
        procs.0.push(fed.spawn_site(site, &["--quiet"]));
    }
    let status = wait_child(&mut procs.0[0], Duration::from_secs(900), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    for (i, site) in fed.sites.iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(60), "site");
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    let log = fed.log("coordinator");
    assert!(log.contains("secure aggregation: sum unmasked"), "{log}");

    let metrics = fed.metrics();
    let spent: Vec<&serde_json::Value> =
        metrics.iter().filter(|m| m["kind"] == "round").map(|m| &m["privacy"]).collect();
    assert_eq!(spent.len(), 2);
    for (round, p) in spent.iter().enumerate() {
        let epsilon = p["epsilon"].as_f64().unwrap_or_else(|| panic!("round {} has no ε: {p}", round + 1));
        assert!((epsilon - privacy.epsilon(round as u32 + 1)).abs() < 1e-9);
        assert_eq!(p["clipped"].as_array().map(Vec::len), Some(0), "{p}");
    }
    let noise_std = spent[1]["noise_std"].as_f64().unwrap();
    let uploads = fed.round_uploads(2);
    let contributions = uploads.record["contributions"].as_array().unwrap();
    assert_eq!(contributions.len(), 3);
    assert!(contributions.iter().all(|c| c["backbone_norm"].as_f64() == Some(0.0)), "{contributions:?}");
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    // The sites clipped their changes (C = 0.05) as the coordinator would have.
    uploads.assert_dp_noise(&before, 0.05, noise_std);
}
