//! End-to-end federation on loopback: real `coordinator` and `site-agent` processes, real QUIC
//! with mutual TLS, real (tiny, CPU) training on phantom sites with overlapping class sets.

use std::time::Duration;

use fedtalent_tests::{tensor as get, wait_child, Children, LocalFederation, Plan};

/// Three sites, four rounds: the aggregate is the sqrt(n)-weighted mean of the uploads, every
/// class's heads are its owner's upload, and the global model's Dice rises over the rounds.
#[test]
fn three_sites_four_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 4, local_steps: 20, cases: 5, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], plan);
    let mut procs = Children(vec![fed.spawn_coordinator()]);
    for site in ["liver", "pancreas", "multiorgan"] {
        procs.0.push(fed.spawn_site(site, &[]));
    }
    let status = wait_child(&mut procs.0[0], Duration::from_secs(900), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    for i in 1..4 {
        let status = wait_child(&mut procs.0[i], Duration::from_secs(60), "site");
        assert!(status.success(), "site {i} failed:\n{}", fed.log(&fed.sites[i - 1]));
    }
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3, 4]);

    // Recompute the last round's aggregate from what each site uploaded (its saved local model).
    let uploads = fed.round_uploads(4);
    let (record, global, locals) = (&uploads.record, &uploads.global, &uploads.locals);
    let contributions = record["contributions"].as_array().unwrap();
    assert_eq!(contributions.len(), 3);
    for (c, w) in contributions.iter().zip(&uploads.weights) {
        assert!((c["weight"].as_f64().unwrap() - w).abs() < 1e-12, "weight of {}", c["site"]);
    }
    let checked = uploads.assert_weighted_mean(|name| !name.starts_with("seg_outputs"));
    assert!(checked > 40, "only {checked} backbone tensors compared");
    // Every class's heads are its owner's upload, at the class's index.
    let classes = record["classes"].as_array().unwrap();
    let sites: Vec<&str> = contributions.iter().map(|c| c["site"].as_str().unwrap()).collect();
    for class in classes {
        let site = class["site"].as_str().unwrap();
        let local = &locals[sites.iter().position(|s| *s == site).unwrap()];
        let local_row =
            classes.iter().filter(|c| c["site"] == site).position(|c| c["id"] == class["id"]).unwrap() as i64;
        for level in 0..3 {
            let name = format!("seg_outputs.{level}.weight");
            let ours = get(global, &name).get(class["index"].as_i64().unwrap());
            assert!(ours.equal(&get(local, &name).get(local_row)), "{name} of {}", class["id"]);
        }
    }

    // The round-time breakdown covers every round.
    let report = fedtalent_tests::run_ok(
        std::process::Command::new(fedtalent_tests::binary("coordinator"))
            .args(["report", "--config"])
            .arg(fed.config_path()),
    );
    let table = String::from_utf8_lossy(&report.stdout);
    assert_eq!(table.lines().filter(|l| l.trim_end().ends_with('%')).count(), 4, "{table}");

    // Dice of the global model, reported by the sites at the start of each round, rises from the
    // initial model (reported in round 1) to round 3's model (reported in round 4).
    let metrics = fed.metrics();
    let mean_dice = |round: u64| {
        let v: Vec<f64> =
            metrics.iter().filter(|m| m["round"].as_u64() == Some(round)).filter_map(|m| m["dice"].as_f64()).collect();
        assert!(!v.is_empty(), "no Dice reported in round {round}");
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (first, last) = (mean_dice(1), mean_dice(4));
    eprintln!("mean Dice of the global model: {first:.3} (initial) -> {last:.3} (round 3's model)");
    assert!(last > first + 0.02, "mean Dice did not rise: {first:.3} (initial model) -> {last:.3} (round 3's model)");
}
