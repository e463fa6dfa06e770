//! Secure aggregation with differential privacy, end to end: real `coordinator` and
//! `site-agent` processes on loopback, the sites masking their backbone changes.

use std::time::Duration;

use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

/// Three sites, two rounds, `[plan.privacy]` with secure aggregation and DP (the sites clip
/// their changes to C = 0.002, below every site's change, the coordinator adds noise of σ = 1e-6
/// to the unmasked sum: negligible, so that what is left is checkable). The last global backbone
/// is the previous one plus the sqrt(n)-weighted sum of the sites' clipped changes (recomputed
/// from what each site trained) to 1e-6 per coordinate (the fixed-point precision is ~2.5e-7,
/// the noise 1.2e-9): a site that did not clip, or a wrong unmasking (masks as large as the
/// 32-bit ring), fails it. The round records name the three sites, each with a backbone norm of
/// 0 (not visible to the coordinator), and the metrics carry ε with no site named as clipped
/// (only the sites know).
#[test]
fn secure_aggregation_with_dp() {
    const CLIP: f64 = 0.002;
    let dir = tempfile::tempdir().unwrap();
    let privacy = fedtalent_vocab::Privacy { secure_aggregation: true, ..fedtalent_vocab::Privacy::dp(CLIP, 1e-6) };
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
    assert!(noise_std < 1e-8, "{noise_std}");
    let uploads = fed.round_uploads(2);
    let contributions = uploads.record["contributions"].as_array().unwrap();
    assert_eq!(contributions.len(), 3);
    assert!(contributions.iter().all(|c| c["backbone_norm"].as_f64() == Some(0.0)), "{contributions:?}");
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    let (residual, norms) = uploads.dp_residual(&before, CLIP);
    assert!(norms.iter().all(|&n| n > 2.0 * CLIP), "every site's change is clipped: {norms:?}");
    let worst = f64::try_from(residual.abs().max()).unwrap();
    assert!(worst < 1e-6, "the global backbone differs from the clipped weighted sum by {worst:e}");
}
