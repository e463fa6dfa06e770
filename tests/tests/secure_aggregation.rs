//! Secure aggregation with differential privacy, end to end: real `coordinator` and
//! `site-agent` processes on loopback, the sites masking their backbone changes.

use std::time::Duration;

use fedtalent_tests::{one_federation_at_a_time, wait_child, Children, LocalFederation, Plan};

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
    let _machine = one_federation_at_a_time();
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

    let spent = fed.round_privacy();
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

/// Secure aggregation alone (no DP), with short key stages: a round's protocol stages close
/// once every site sent or after 10 s.
fn secagg_plan(rounds: u32, deadline_s: u64) -> Plan {
    let privacy =
        fedtalent_vocab::Privacy { secagg_stage_timeout_s: 10, ..fedtalent_vocab::Privacy::secure_aggregation_only() };
    Plan { rounds, local_steps: 5, deadline_s, privacy: Some(privacy), ..Plan::default() }
}

/// Whether `who`'s log has a line holding every one of `parts` (a tracing message and its
/// fields).
fn logged(fed: &LocalFederation, who: &str, parts: &[&str]) -> bool {
    fed.log(who).lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

/// A site killed in round 2 after the key stages, while it trains (before its masked input):
/// the round waits for its input until the deadline, then unmasks the sum of the two survivors
/// (they reveal the dead site's key shares, which remove its pairwise masks from theirs). The
/// global backbone is the round-1 one plus the survivors' sqrt(n)-weighted mean change to 1e-6
/// per coordinate (a mask left in would be as large as the 32-bit ring), the round record
/// names the two survivors, and round 3 runs without the dead site (dropped at its key
/// advertisement).
#[test]
fn site_killed_before_its_masked_input() {
    let _machine = one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], secagg_plan(3, 60));
    let mut procs = Children(vec![
        fed.spawn_coordinator(),
        fed.spawn_site("liver", &["--quiet"]),
        fed.spawn_site("pancreas", &["--quiet"]),
    ]);
    let mut victim = fed.spawn_site("multiorgan", &["--quiet"]);
    let keys_shared = |site: &str| logged(&fed, site, &["secure aggregation: keys shared", "round=2"]);
    fed.wait_until("multiorgan's round-2 key stages", Duration::from_secs(300), || keys_shared("multiorgan"));
    victim.kill().unwrap(); // SIGKILL, while it evaluates and trains round 2
    victim.wait().unwrap();
    assert!(!logged(&fed, "multiorgan", &["round done", "round=2"]), "the victim uploaded before it was killed");
    fed.wait_until("round 2 without the killed site", Duration::from_secs(300), || fed.completed_rounds().contains(&2));
    // The survivors' round-2 models: each saves it after its unmasking answer; round 3 keeps
    // them waiting 10 s for the dead site's keys before they train again.
    let saved = |site: &str| -> u64 {
        let path = fed.site_dir(site).join("state/site_state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        state["last_round"].as_u64().unwrap()
    };
    fed.wait_until("the survivors' round-2 models", Duration::from_secs(60), || {
        saved("liver") == 2 && saved("pancreas") == 2
    });
    let uploads = fed.round_uploads(2);
    for site in ["liver", "pancreas"] {
        assert!(
            !logged(&fed, site, &["round done", "round=3"]),
            "{site} trained round 3 before its round-2 model was read"
        );
    }
    let sites: Vec<&str> =
        uploads.record["contributions"].as_array().unwrap().iter().map(|c| c["site"].as_str().unwrap()).collect();
    assert_eq!(sites, ["liver", "pancreas"], "round 2 should close with the two survivors");
    let log = fed.log("coordinator");
    assert!(logged(&fed, "coordinator", &["secure aggregation: unmasking", "round=2", "dropped=[3]"]), "{log}");
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    let (residual, norms) = uploads.dp_residual(&before, f64::INFINITY);
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0), "{norms:?}");
    let worst = f64::try_from(residual.abs().max()).unwrap();
    assert!(worst < 1e-6, "the global backbone differs from the survivors' weighted mean change by {worst:e}");

    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3]);
    let r3: Vec<String> = fed.round_record(3)["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["site"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(r3, ["liver", "pancreas"]);
    for (i, site) in ["liver", "pancreas"].iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(60), "site");
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
}

/// Two of three sites killed once round 1 is done: round 2's secure aggregation has one site
/// left, below its threshold of 2, so the round aborts (logged, no checkpoint, no metrics line)
/// and is repeated with fresh keys until the two sites are back; then round 2 completes with at
/// least the threshold and the federation finishes.
#[test]
fn below_threshold_round_aborts_then_repeats() {
    let _machine = one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], secagg_plan(2, 40));
    let mut procs = Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &["--quiet"])]);
    let mut victims =
        Children(vec![fed.spawn_site("pancreas", &["--quiet"]), fed.spawn_site("multiorgan", &["--quiet"])]);
    fed.wait_until("round 1", Duration::from_secs(300), || fed.completed_rounds().contains(&1));
    for v in &mut victims.0 {
        v.kill().unwrap();
        v.wait().unwrap();
    }
    let aborted = || logged(&fed, "coordinator", &["round aborted, it will be repeated", "round=2"]);
    fed.wait_until("round 2 aborted below the threshold", Duration::from_secs(120), aborted);
    assert_eq!(fed.completed_rounds(), vec![1], "a round below the threshold must not complete");
    procs.0.push(fed.spawn_site("pancreas", &["--quiet"]));
    procs.0.push(fed.spawn_site("multiorgan", &["--quiet"]));
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    let log = fed.log("coordinator");
    assert!(status.success(), "coordinator failed:\n{log}");
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    let opened = log.lines().filter(|l| l.contains("round opened") && l.contains("round=2")).count();
    assert!(opened >= 2, "round 2 was not repeated:\n{log}");
    let rounds: Vec<u64> =
        fed.metrics().iter().filter(|m| m["kind"] == "round").map(|m| m["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [1, 2], "an aborted round is not counted");
    let contributions = fed.round_record(2)["contributions"].as_array().unwrap().len();
    assert!(contributions >= 2, "round 2 completed below the threshold: {contributions} sites");
}

/// Sends `signal` (`STOP`, `CONT`) to a child.
fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status();
    assert!(status.unwrap().success(), "kill -{signal} {}", child.id());
}

/// A site killed in round 2 after its masked input was accepted, before its unmasking answer:
/// the round's sum holds its input, and its self-mask is removed with the others' shares. To
/// time it, liver is stopped (SIGSTOP) once its round-2 keys are shared, so that the victim
/// uploads before it; the victim then waits for the unmasking request and is killed there,
/// and liver resumes. The round completes with the three updates; what the global backbone
/// holds beyond the survivors' weighted changes is the victim's weighted change, within the
/// clamp range per coordinate (a self-mask left in would be as large as the 32-bit ring).
#[test]
fn site_killed_after_its_masked_input() {
    let _machine = one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = secagg_plan(2, 60);
    let clip_range = f64::from(plan.privacy.unwrap().secagg_clip_range);
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], plan);
    let mut procs = Children(vec![
        fed.spawn_coordinator(),
        fed.spawn_site("liver", &["--quiet"]),
        fed.spawn_site("pancreas", &["--quiet"]),
    ]);
    let mut victim = fed.spawn_site("multiorgan", &["--quiet"]);
    fed.wait_until("liver's round-2 key stages", Duration::from_secs(300), || {
        logged(&fed, "liver", &["secure aggregation: keys shared", "round=2"])
    });
    signal(&procs.0[1], "STOP");
    let accepted = |site: &str| logged(&fed, "coordinator", &["update accepted", &format!("site={site}"), "round=2"]);
    fed.wait_until("the victim's round-2 masked input", Duration::from_secs(120), || accepted("multiorgan"));
    assert!(!accepted("liver"), "liver uploaded before it was stopped");
    victim.kill().unwrap(); // SIGKILL, while it waits for the unmasking request
    victim.wait().unwrap();
    signal(&procs.0[1], "CONT");
    assert!(
        !logged(&fed, "multiorgan", &["secure aggregation: unmasking shares sent", "round=2"]),
        "the victim answered"
    );

    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    assert!(logged(&fed, "coordinator", &["secure aggregation: unmasking", "round=2", "dropped=[]"]));
    let mut uploads = fed.round_uploads(2);
    let sites: Vec<String> = uploads.record["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["site"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sites, ["liver", "multiorgan", "pancreas"], "round 2 holds the victim's masked input");
    // The victim's saved model is its round-1 one: leave it out of the expected sum.
    let v = sites.iter().position(|s| s == "multiorgan").unwrap();
    uploads.locals.remove(v);
    let w = uploads.weights.remove(v);
    let before = fedtalent_tests::read_tensors(&fed.state_dir().join("rounds/round-000001/model.safetensors"));
    let (residual, _) = uploads.dp_residual(&before, f64::INFINITY);
    let change = residual / w;
    let worst = f64::try_from(change.abs().max()).unwrap();
    assert!(worst.is_finite() && worst <= clip_range + 1e-5, "the victim's change is {worst:e} at most");
    let norm = f64::try_from(change.norm()).unwrap();
    assert!(norm > 0.0, "the victim's change is missing from the sum");
    for (i, site) in ["liver", "pancreas"].iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(60), "site");
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
}
