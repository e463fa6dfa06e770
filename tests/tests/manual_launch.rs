//! The operator's manual path end to end (issue 21): `launch = "manual"` in federation.toml,
//! real `coordinator` and `site-agent` processes on loopback.

use std::process::{Command, Output};
use std::time::Duration;

use fedtalent_coordinator::config::Launch;
use fedtalent_tests::{binary, run_ok, wait_child, Children, LocalFederation, Plan};

/// `coordinator <command> --config <federation.toml> <extra>`, which must succeed.
fn coordinator(fed: &LocalFederation, command: &str, extra: &[&str]) -> Output {
    run_ok(Command::new(binary("coordinator")).args([command, "--config"]).arg(fed.config_path()).args(extra))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// With `launch = "manual"` the sites register and wait: no round opens until `coordinator
/// launch`. `coordinator status` answers live while the federation waits (both sites
/// connected, no round complete or open) and from disk once `serve` exited (both rounds, both
/// sites' contributions); `coordinator export` writes the last round's model.
#[test]
fn manual_launch_status_and_export() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 2, launch: Launch::Manual, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], plan);
    let mut procs = Children(vec![fed.spawn_coordinator()]);
    for site in &fed.sites {
        procs.0.push(fed.spawn_site(site, &["--quiet"]));
    }
    fed.wait_until("both sites registered", Duration::from_secs(180), || {
        fed.log("coordinator").contains("federation set up")
    });

    // Set up, not launched: the sites poll, nothing opens (given a few of their polls).
    std::thread::sleep(Duration::from_secs(3));
    let live = stdout(&coordinator(&fed, "status", &[]));
    assert!(live.contains("round 0/2 complete\n"), "a round opened or completed before launch:\n{live}");
    for site in &fed.sites {
        let row = live.lines().find(|l| l.starts_with(site.as_str())).unwrap_or_else(|| panic!("{site}:\n{live}"));
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(columns[1..3], ["true", "true"], "{site} not connected and allowed:\n{live}");
    }
    assert!(!fed.log("coordinator").contains("round opened"), "{}", fed.log("coordinator"));
    assert!(fed.completed_rounds().is_empty());

    assert!(stdout(&coordinator(&fed, "launch", &[])).contains("rounds launched"));
    let status = wait_child(&mut procs.0[0], Duration::from_secs(300), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    for (i, site) in fed.sites.iter().enumerate() {
        let status = wait_child(&mut procs.0[i + 1], Duration::from_secs(60), "site");
        assert!(status.success(), "site {site} failed:\n{}", fed.log(site));
    }
    assert_eq!(fed.completed_rounds(), vec![1, 2]);

    let offline = coordinator(&fed, "status", &[]);
    let (text, note) = (stdout(&offline), String::from_utf8_lossy(&offline.stderr).into_owned());
    assert!(note.contains("coordinator not reachable"), "{note}");
    assert!(text.contains("round 2/2 complete"), "{text}");
    for site in &fed.sites {
        assert!(text.lines().any(|l| l.trim_start().starts_with(&format!("{site} "))), "{site}:\n{text}");
    }

    let model = dir.path().join("model");
    let exported = stdout(&coordinator(&fed, "export", &["--out", model.to_str().unwrap()]));
    assert!(exported.contains("round 2 exported"), "{exported}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(manifest["round"], 2);
    assert_eq!(manifest["digest"], fed.round_record(2)["digest"], "the export is not round 2's model");
    let weights = fedtalent_tests::read_tensors(&model.join("model.safetensors"));
    let heads = manifest["classes"].as_array().unwrap().len() as i64;
    assert!(heads >= 4, "{manifest}");
    assert_eq!(fedtalent_tests::tensor(&weights, "seg_outputs.0.weight").size()[0], heads);
}
