//! Resumable transfers end to end (issue 18): a site on TLS over TCP through the link emulator
//! (16 Mbit/s, 10 ms round trip) has its connection broken by the relay (a middlebox dropping
//! its state) in the middle of its round-1 upload and in the middle of its round-2 download. It
//! reconnects, and each transfer resumes from what the other side kept and checked: only the
//! rest travels, the digests are checked over the whole set, and each round counts the site's
//! update once. And rounds over QUIC through an emulated WAN link with delay and loss.

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedtalent_link::{LinkSpec, Relay, TcpRelay};
use fedtalent_tests::{wait_child, Children, LocalFederation, Plan};

/// The `key=<integer>` field of a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The first line of `log` with `message` and `field=value` for each of `with`.
fn line_of<'a>(log: &'a str, message: &str, with: &[(&str, u64)]) -> Option<&'a str> {
    log.lines().find(|l| l.contains(message) && with.iter().all(|(k, v)| field(l, k) == Some(*v)))
}

/// Replaces `from` by `to` in `site`'s config.
fn edit_site_config(fed: &LocalFederation, site: &str, from: &str, to: &str) {
    let path = fed.site_dir(site).join("site.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{text}");
    fs::write(&path, text.replace(from, to)).unwrap();
}

/// Points `site` at the coordinator over TLS over TCP only, through `relay`.
fn tcp_through(fed: &LocalFederation, site: &str, relay: SocketAddr) {
    edit_site_config(fed, site, "transport = \"auto\"", &format!("transport = \"tcp\"\ncoordinator_tcp = \"{relay}\""));
}

/// Waits until `counter()` grew by `bytes` from now, then resets the relay's connections.
fn reset_after(relay: &TcpRelay, counter: impl Fn(&TcpRelay) -> u64, bytes: u64, what: &str) {
    let (from, start) = (counter(relay), Instant::now());
    while counter(relay) < from + bytes {
        assert!(start.elapsed() < Duration::from_secs(120), "{what}: the relay never carried {bytes} bytes");
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.reset();
}

#[test]
fn a_cut_upload_and_a_cut_download_resume_and_count_once() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 2, min_sites: 1, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver"], plan);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let link = LinkSpec::wan(Duration::from_millis(10), 0.0, 16.0);
    let coordinator: SocketAddr = format!("127.0.0.1:{}", fed.port).parse().unwrap();
    let relay = runtime.block_on(TcpRelay::start(coordinator, link.clone(), link, 18)).unwrap();
    tcp_through(&fed, "liver", relay.addr());
    let mut procs = Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[])]);

    // Round 1: the model's size from its (whole) download, then the upload cut halfway.
    let mut model_bytes = 0;
    fed.wait_until("the first download", Duration::from_secs(300), || {
        let log = fed.log("liver");
        model_bytes = line_of(&log, "global model downloaded", &[]).and_then(|l| field(l, "model_bytes")).unwrap_or(0);
        model_bytes > 0
    });
    reset_after(&relay, |r| r.stats().up_bytes, model_bytes / 2, "the round-1 upload");
    // Round 2: its download cut halfway.
    fed.wait_until("round 1", Duration::from_secs(300), || fed.completed_rounds().contains(&1));
    reset_after(&relay, |r| r.stats().down_bytes, model_bytes / 2, "the round-2 download");

    let status = wait_child(&mut procs.0[0], Duration::from_secs(300), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    let (coordinator_log, site_log) = (fed.log("coordinator"), fed.log("liver"));
    let logs = || format!("--- coordinator ---\n{coordinator_log}\n--- liver ---\n{site_log}");
    let at_most = |bytes: u64, share: f64| bytes as f64 <= model_bytes as f64 * share;

    // The upload resumed from what the coordinator kept (about half), and counted once.
    let resuming =
        line_of(&coordinator_log, "resuming a cut update", &[("round", 1)]).unwrap_or_else(|| panic!("{}", logs()));
    let kept = field(resuming, "held_bytes").unwrap();
    assert!(kept as f64 > model_bytes as f64 * 0.25, "the coordinator kept {kept} of {model_bytes} bytes\n{}", logs());
    let resumed = line_of(&site_log, "resumed the cut upload", &[("round", 1)]).unwrap_or_else(|| panic!("{}", logs()));
    let resent = field(resumed, "sent_bytes").unwrap();
    assert_eq!(resent + kept, model_bytes, "only what the coordinator lacked was sent again\n{}", logs());
    let accepted: Vec<&str> = coordinator_log.lines().filter(|l| l.contains("update accepted")).collect();
    assert_eq!(accepted.len(), 2, "one update per round\n{}", logs());
    let round1 = line_of(&coordinator_log, "update accepted", &[("round", 1), ("attempts", 2)])
        .unwrap_or_else(|| panic!("round 1's update did not arrive in two attempts\n{}", logs()));
    let received = field(round1, "received_bytes").unwrap();
    assert!(at_most(received, 1.15), "{received} bytes received for a {model_bytes}-byte update\n{}", logs());

    // The download resumed from what the site kept: the model crossed the link about once.
    let download = line_of(&site_log, "global model downloaded", &[("attempts", 2)])
        .unwrap_or_else(|| panic!("no download took two attempts\n{}", logs()));
    assert_eq!(field(download, "model_bytes"), Some(model_bytes));
    let (held, received) = (field(download, "held_bytes").unwrap(), field(download, "received_bytes").unwrap());
    assert!(held as f64 > model_bytes as f64 * 0.25, "the site held {held} of {model_bytes} bytes\n{}", logs());
    assert!(at_most(received, 1.15), "{received} bytes received for a {model_bytes}-byte model\n{}", logs());
    let sent = line_of(&coordinator_log, "resumed a cut model download", &[("held_bytes", held)])
        .and_then(|l| field(l, "sent_bytes"))
        .unwrap_or_else(|| panic!("{}", logs()));
    assert_eq!(sent + held, model_bytes, "the coordinator resent only what the site lacked\n{}", logs());

    // Each round aggregated the site's update once.
    for round in [1, 2] {
        assert_eq!(fed.round_sites(round), vec!["liver"], "round {round}");
        let metrics = fed.metrics();
        let site_lines = metrics.iter().filter(|m| m["round"] == round && m["n_cases"].is_number()).count();
        assert_eq!(site_lines, 1, "round {round}: {site_lines} site lines in the metrics");
        let summary = metrics.iter().find(|m| m["round"] == round && m["kind"] == "round").unwrap();
        assert_eq!(summary["sites"], 1, "round {round}: {summary}");
    }
}

#[test]
fn rounds_complete_over_quic_through_a_link_with_delay_and_loss() {
    let _machine = fedtalent_tests::one_federation_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan { rounds: 2, local_steps: 2, min_sites: 1, ..Plan::default() };
    let fed = LocalFederation::create(dir.path(), &["liver"], plan);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // 80 ms round trip, 1 % loss each way, 50 Mbit/s.
    let link = LinkSpec::wan(Duration::from_millis(80), 0.01, 50.0);
    let coordinator: SocketAddr = format!("127.0.0.1:{}", fed.port).parse().unwrap();
    let relay = runtime.block_on(Relay::start(coordinator, link.clone(), link, 7)).unwrap();
    let direct = format!("coordinator = \"{coordinator}\"");
    let through = format!("coordinator = \"{}\"", relay.addr());
    edit_site_config(&fed, "liver", &direct, &through);
    edit_site_config(&fed, "liver", "transport = \"auto\"", "transport = \"quic\"");
    let mut procs = Children(vec![fed.spawn_coordinator(), fed.spawn_site("liver", &[])]);
    let status = wait_child(&mut procs.0[0], Duration::from_secs(300), "coordinator");
    assert!(status.success(), "coordinator failed:\n{}", fed.log("coordinator"));
    assert_eq!(fed.completed_rounds(), vec![1, 2]);
    for round in [1, 2] {
        assert_eq!(fed.round_sites(round), vec!["liver"], "round {round}");
    }
    let stats = relay.stats();
    assert!(stats.down.dropped_loss > 0 && stats.up.dropped_loss > 0, "the link lost nothing: {stats:?}");
    assert!(stats.down.delivered_bytes > 0, "{stats:?}");
}
