//! The coordinator killed mid-round and restarted: the federation resumes from the last complete
//! round and finishes; no checkpoint on disk is ever partial.

use std::time::Duration;

use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

fn assert_checkpoints_complete(fed: &LocalFederation) {
    for round in fed.completed_rounds() {
        let record = fed.round_record(round);
        assert_eq!(record["round"].as_u64(), Some(round as u64));
        let model = fed.state_dir().join(format!("rounds/round-{round:06}/model.safetensors"));
        tch::Tensor::read_safetensors(&model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    }
}

#[test]
fn coordinator_restart_resumes_from_last_complete_round() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 4, local_steps: 10, eval_every: 4, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], plan);
    let mut coordinator = fed.spawn_coordinator();
    let mut procs = Children(vec![fed.spawn_site("liver", &[]), fed.spawn_site("pancreas", &[])]);
    fed.wait_until("round 1", Duration::from_secs(300), || fed.completed_rounds().contains(&1));
    std::thread::sleep(Duration::from_millis(1500)); // into round 2
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let done_before = fed.completed_rounds();
    assert_checkpoints_complete(&fed);
    procs.0.push(fed.spawn_coordinator());
    let status = wait_child(procs.0.last_mut().unwrap(), Duration::from_secs(600), "restarted coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2, 3, 4], "rounds before the kill: {done_before:?}");
    assert_checkpoints_complete(&fed);
    assert!(fed.log("coordinator").contains("resumed federation"), "no resume logged:\n{}", fed.log("coordinator"));
    for i in 0..2 {
        let status = wait_child(&mut procs.0[i], Duration::from_secs(60), "site");
        assert!(status.success(), "site failed:\n{}", fed.log(&fed.sites[i]));
    }
}
