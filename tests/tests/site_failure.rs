//! A site killed mid-federation: the round completes with the others (min_sites) once its
//! deadline passes, and the site rejoins later, resuming its heads and optimizer state. This
//! federation moves its models as bf16 both ways.

use std::time::Duration;

use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

#[test]
fn killed_site_is_left_out_then_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let plan =
        Plan { rounds: 4, local_steps: 10, deadline_s: 20, eval_every: 4, bf16_transport: true, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas", "multiorgan"], plan);
    let mut procs =
        Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[]), fed.spawn_site("pancreas", &[])]);
    let mut victim = fed.spawn_site("multiorgan", &[]);
    fed.wait_until("round 1", Duration::from_secs(300), || fed.completed_rounds().contains(&1));
    victim.kill().unwrap(); // SIGKILL, while round 2 is running
    victim.wait().unwrap();
    fed.wait_until("round 2 without the killed site", Duration::from_secs(300), || fed.completed_rounds().contains(&2));
    let sites_of = |round: u32| -> Vec<String> {
        let r = fed.round_record(round);
        r["contributions"].as_array().unwrap().iter().map(|c| c["site"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(sites_of(2), vec!["liver", "pancreas"], "round 2 should close with the two live sites");
    procs.0.push(fed.spawn_site("multiorgan", &[]));
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3, 4]);
    assert!(
        [3, 4].iter().any(|&r| sites_of(r).contains(&"multiorgan".to_string())),
        "the restarted site never contributed again:\n{}",
        fed.log("multiorgan")
    );
    assert!(fed.log("multiorgan").contains("resumed local heads"), "the site did not resume its state");
}
