//! Bad peers and bad updates are refused with a logged reason while the federation goes on:
//! a certificate from another CA, a site not on the allowlist (over QUIC and over the
//! TLS-over-TCP fallback), and uploads with NaN, a wrong shape, another site's heads, or a stale
//! round number.

use std::fs;
use std::process::Command;
use std::time::Duration;

use fedtalent_protocol::TransportChoice;
use fedtalent_tests::{binary, phantom_site, run_ok, wait_child, Children, LocalFederation, Plan};

/// A site config for `name`, reusing the liver phantom's data, with its own key and certificate.
fn impostor(
    fed: &LocalFederation,
    name: &str,
    cert_dir: &std::path::Path,
    transport: TransportChoice,
) -> std::path::PathBuf {
    let dir = fed.dir.join(format!("{name}-{transport:?}"));
    fs::create_dir_all(&dir).unwrap();
    let (dataset, classes) = phantom_site(&fed.dir.join("data"), "liver");
    let mut config = fed.site_config(name, &dataset, classes);
    config.site.cert = cert_dir.join(format!("{name}.crt"));
    config.site.key = cert_dir.join(format!("{name}.key"));
    config.site.transport = transport;
    config.write(&dir.join("site.toml")).unwrap();
    dir.join("site.toml")
}

#[test]
fn foreign_ca_and_unlisted_sites_are_refused_while_others_train() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 2, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver", "pancreas"], plan);
    // "intruder": certificate from another federation's CA. "stranger": our CA, not listed.
    let other = dir.path().join("other");
    run_ok(Command::new(binary("coordinator")).args(["init", "--dir"]).arg(&other).args(["--sites", "intruder"]));
    run_ok(Command::new(binary("site-agent")).args(["keygen", "--site", "intruder", "--dir"]).arg(&other));
    run_ok(
        Command::new(binary("coordinator"))
            .args(["sign", "--config"])
            .arg(other.join("federation.toml"))
            .arg("--csr")
            .arg(other.join("intruder.csr")),
    );
    let ours = dir.path().join("stranger-pki");
    fs::create_dir_all(&ours).unwrap();
    run_ok(Command::new(binary("site-agent")).args(["keygen", "--site", "stranger", "--dir"]).arg(&ours));
    // `sign` refuses a name that is not listed; the stranger was listed once (a copy of the
    // config with it), was certified, and is not listed any more.
    let sign = |config: &std::path::Path| {
        Command::new(binary("coordinator"))
            .args(["sign", "--config"])
            .arg(config)
            .arg("--csr")
            .arg(ours.join("stranger.csr"))
            .output()
            .unwrap()
    };
    let refused = sign(&fed.config_path());
    assert!(!refused.status.success(), "an unlisted site was signed");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("\"stranger\" is not in [federation].sites"), "{stderr}");
    let listed = fed.config_path().with_file_name("with-stranger.toml");
    let text = fs::read_to_string(fed.config_path()).unwrap();
    let sites_line = text.lines().find(|l| l.starts_with("sites = [")).unwrap().to_string();
    fs::write(&listed, text.replace(&sites_line, &sites_line.replace("sites = [", "sites = [\"stranger\", "))).unwrap();
    assert!(sign(&listed).status.success(), "signing a listed site failed");

    // The impostors try while the coordinator waits for its sites, so the federation cannot have
    // finished (and stopped answering) before an impostor is done preprocessing its data.
    let mut procs = Children(vec![fed.spawn_coordinator()]);
    for transport in [TransportChoice::Quic, TransportChoice::Tcp] {
        for (name, certs) in [("intruder", &other), ("stranger", &ours)] {
            let config = impostor(&fed, name, certs, transport);
            let out = Command::new(binary("site-agent")).args(["run", "--config"]).arg(&config).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name} was let in over {transport:?}:\n{stderr}");
            assert!(stderr.contains("refused"), "{name} over {transport:?}: no refusal reason:\n{stderr}");
        }
    }
    procs.0.push(fed.spawn_site("liver", &[]));
    procs.0.push(fed.spawn_site("pancreas", &[]));
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    let log = fed.log("coordinator");
    assert!(log.contains("stranger"), "the refusal of the unlisted site is not logged by name:\n{log}");
    assert!(log.contains("handshake refused"), "no handshake refusal logged:\n{log}");
    for transport in ["quic", "tcp"] {
        assert!(
            log.lines().any(|l| l.contains("handshake refused") && l.contains(&format!("transport=\"{transport}\""))),
            "no handshake refusal over {transport} logged:\n{log}"
        );
    }
}

#[test]
fn broken_updates_are_refused_and_rounds_go_on() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let sites = ["liver", "pancreas", "multiorgan", "kidney", "liver_novessels", "liver_wide"];
    let plan = Plan { rounds: 2, local_steps: 2, cases: 3, deadline_s: 120, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &sites, plan);
    let faults = [
        ("multiorgan", "nan"),
        ("kidney", "shape"),
        ("liver_novessels", "foreign-heads"),
        ("liver_wide", "stale-round"),
    ];
    let mut procs =
        Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[]), fed.spawn_site("pancreas", &[])]);
    for (site, fault) in faults {
        procs.0.push(fed.spawn_site(site, &["--inject-fault", fault]));
    }
    let status = wait_child(&mut procs.0[0], Duration::from_secs(600), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    for round in [1, 2] {
        let sites = fed.round_sites(round);
        assert_eq!(sites, vec!["liver", "pancreas"], "round {round} took a broken update");
    }
    let log = fed.log("coordinator");
    for (site, reason) in [
        ("multiorgan", "NaN"),
        ("kidney", "shape"),
        ("liver_novessels", "owned by site"),
        ("liver_wide", "not the open round"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("update refused") && l.contains(site) && l.contains(reason)),
            "no refusal of {site}'s update mentioning {reason:?}:\n{log}"
        );
    }
    // The metrics log's participation records each refusal with its reason (the report's
    // refusals table and participation figure read it), and every site as expected.
    let rounds: Vec<serde_json::Value> = fed.metrics().into_iter().filter(|m| m["kind"] == "round").collect();
    let refusals: Vec<(String, String)> = rounds
        .iter()
        .flat_map(|r| r["participation"]["refusals"].as_array().cloned().unwrap_or_default())
        .map(|f| (f["site"].as_str().unwrap().to_string(), f["reason"].as_str().unwrap().to_string()))
        .collect();
    for (site, reason) in [("multiorgan", "NaN"), ("kidney", "shape"), ("liver_novessels", "owned by site")] {
        assert!(
            refusals.iter().any(|(s, r)| s == site && r.contains(reason)),
            "no refusal of {site} ({reason:?}) in the metrics: {refusals:?}"
        );
    }
    for r in &rounds {
        assert_eq!(r["participation"]["expected"].as_array().unwrap().len(), sites.len(), "{r}");
    }
}
