//! A real coordinator in this process and protocol-level peers that send exactly what a test
//! needs (no training): how the coordinator answers faulty or hostile sites (issue 21), and
//! that the honest sites' round still completes.

mod peer;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtalent_certs::FederationCa;
use fedtalent_coordinator::{config, Coordinator, FederationConfig};
use fedtalent_protocol::{
    read_frame, AdminReply, AdminRequest, ClassRegion, ErrorKind, Hello, HuHistogram, InputChannels, Message,
    PhaseTimings, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use peer::{ack, assert_refused, hello, hello_of, Metrics, Peer, Upload, Work, TIMEOUT};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Federation {
    dir: tempfile::TempDir,
    ca: FederationCa,
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
}

/// A federation of the tiny preset, 2 rounds of 1 step, a round deadline of `deadline_s`.
fn federation_config(dir: &std::path::Path, sites: &[&str], min_sites: u32, deadline_s: u64) -> FederationConfig {
    let addr: SocketAddr = format!("127.0.0.1:{}", peer::free_port()).parse().unwrap();
    let names: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
    let mut config: FederationConfig = toml::from_str(&config::template("peers", addr, &names)).unwrap();
    config.federation.state_dir = dir.join("state");
    config.federation.pki_dir = dir.join("pki");
    let plan = &mut config.plan;
    (plan.preset, plan.rounds, plan.local_steps, plan.eval_every) = ("tiny".into(), 2, 1, 1);
    (plan.min_sites, plan.round_deadline_s) = (min_sites, deadline_s);
    config.validate().unwrap();
    config
}

impl Federation {
    /// A coordinator serving `sites` in this process, with a 30 s round deadline.
    async fn start(sites: &[&str], min_sites: u32) -> Federation {
        Self::start_with_deadline(sites, min_sites, 30).await
    }

    async fn start_with_deadline(sites: &[&str], min_sites: u32, deadline_s: u64) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let config = federation_config(dir.path(), sites, min_sites, deadline_s);
        let ca = FederationCa::create("peers CA").unwrap();
        let coordinator = Coordinator::open(config.clone()).unwrap();
        let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
        let server = fedtalent_certs::server_config(ca.cert_pem(), &cert, &key, coordinator.allowlist.clone()).unwrap();
        let serving = coordinator.clone();
        tokio::spawn(async move {
            if let Err(e) = serving.serve(server).await {
                panic!("serve failed: {e:#}");
            }
        });
        Federation { dir, ca, addr: config.federation.listen, coordinator }
    }

    /// A client endpoint presenting a fresh certificate of `site` from the federation CA.
    fn endpoint_of(&self, site: &str) -> quinn::Endpoint {
        peer::endpoint_of(&self.ca, site, LOOPBACK)
    }

    /// A connection of `site`, certified by the federation CA (retried while `serve` binds).
    async fn connect(&self, site: &str) -> Peer {
        peer::connect(&self.ca, self.addr, site, LOOPBACK).await
    }
}

/// Both sites join, concurrently: a Hello is answered once every listed site registered.
async fn join_both(a: &Peer, b: &Peer) {
    tokio::join!(a.join(), b.join());
}

/// Waits until the coordinator reports `round` complete.
async fn wait_completed(fed: &Federation, round: u32) {
    tokio::time::timeout(TIMEOUT, async {
        while fed.coordinator.status().current_round < round {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("round {round} did not complete"));
}

/// Issue 21 item 4: a Hello of another protocol version is answered VersionMismatch (final for
/// the site), not BadMessage (which the site retries forever); also when the rest of that
/// Hello does not decode with this version's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_of_another_protocol_version_is_answered_version_mismatch() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let peer = fed.connect("alpha").await;
    let other = Message::Hello(Hello { protocol_version: PROTOCOL_VERSION + 1, ..hello_of("alpha") });
    let ours = format!("version {PROTOCOL_VERSION}");
    assert_refused(&peer.request(&other).await, ErrorKind::VersionMismatch, &["alpha", &ours]);
    // Variant 0, version 7, then bytes this version cannot read as a Hello.
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    let payload = [0u8, 7, 0xff, 0xff, 0xff];
    send.write_all(&(payload.len() as u32).to_be_bytes()).await.unwrap();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let reply = read_frame(&mut recv, MAX_FRAME_BYTES).await.unwrap();
    assert_refused(&reply, ErrorKind::VersionMismatch, &["version 7"]);
    // Other garbage stays BadMessage.
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 2, 0x7f, 0x7f]).await.unwrap();
    send.finish().unwrap();
    assert_refused(&read_frame(&mut recv, MAX_FRAME_BYTES).await.unwrap(), ErrorKind::BadMessage, &["malformed"]);
}

/// Issue 21 item 3: an absurd HU histogram is refused with BadDataset naming the site and the
/// field, before it is stored; the federation still sets up and runs with honest Hellos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_histograms_are_refused_and_the_federation_sets_up() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta) = (fed.connect("alpha").await, fed.connect("beta").await);
    let absurd = [
        (HuHistogram { min_hu: i32::MAX, counts: vec![1, 1] }, "hu_histogram.min_hu"),
        (HuHistogram { min_hu: 0, counts: vec![u64::MAX, u64::MAX] }, "hu_histogram.counts"),
        (HuHistogram { min_hu: -2048, counts: vec![1; 20_000] }, "hu_histogram.counts"),
    ];
    for (histogram, field) in absurd {
        let bad = Message::Hello(Hello { hu_histogram: histogram, ..hello_of("alpha") });
        assert_refused(&alpha.request(&bad).await, ErrorKind::BadDataset, &["site alpha", field]);
    }
    join_both(&alpha, &beta).await;
    for peer in [&alpha, &beta] {
        let work = peer.work().await;
        assert_eq!(peer.honest_update(&work).await, (true, String::new()));
    }
    wait_completed(&fed, 1).await;
}

/// A site whose dataset has other input channels than the federation's (one CT channel here) is
/// refused at registration, naming the channel; with the federation's channels it joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_other_input_channels_is_refused_naming_the_channel() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let (alpha, beta) = (fed.connect("alpha").await, fed.connect("beta").await);
    let refusals = [
        (
            InputChannels::named(["T1", "T2"]),
            "the dataset has 2 input channel(s) (T1 (zscore), T2 (zscore)) but the federation declares 1 (CT)",
        ),
        (
            InputChannels::named(["MR"]),
            "input channel 0: the dataset has \"MR\" (zscore) where the federation declares \"CT\" (CT)",
        ),
    ];
    for (channels, reason) in refusals {
        let other = Message::Hello(Hello { channels, ..hello_of("alpha") });
        assert_refused(&alpha.request(&other).await, ErrorKind::BadDataset, &["site alpha", reason]);
    }
    join_both(&alpha, &beta).await;
}

/// Two sites joined and round 1 announced to both.
async fn round_one(fed: &Federation) -> (Peer, Peer, Work) {
    let (alpha, beta) = (fed.connect("alpha").await, fed.connect("beta").await);
    join_both(&alpha, &beta).await;
    let work = alpha.work().await;
    assert_eq!(work.round, 1);
    (alpha, beta, work)
}

/// The sites (and case counts) of a completed round, from its checkpoint.
fn contributions(fed: &Federation, round: u32) -> Vec<(String, u32, f32)> {
    let path = fed.dir.path().join(format!("state/rounds/round-{round:06}/round.json"));
    let record: fedtalent_coordinator::state::RoundRecord =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    record.contributions.into_iter().map(|c| (c.site, c.n_cases, c.train_loss)).collect()
}

/// Closes round 1 with beta's honest update, checks that alpha's accepted update counted once.
async fn finish_round_one(fed: &Federation, beta: &Peer) {
    let work = beta.work().await;
    assert_eq!(beta.honest_update(&work).await, (true, String::new()));
    wait_completed(fed, 1).await;
    assert_eq!(contributions(fed, 1), vec![("alpha".into(), 4, 0.5), ("beta".into(), 4, 0.5)]);
}

/// Issue 21 item 6: a site asking for the full model (every site's heads) is refused; its own
/// part is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_model_requests_from_sites_are_refused() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let Err(refusal) = alpha.download(&work.digest, true).await else { panic!("a site got the full model") };
    assert_refused(&refusal, ErrorKind::NotAllowed, &["site alpha", "full"]);
    let own = alpha.download(&work.digest, false).await.expect("its own part");
    assert!(own.tensors.iter().all(|t| !t.name.starts_with("head/beta/")), "alpha received beta's heads");
    assert_eq!(alpha.upload(work.round, 4, 0.5, &own).await, (true, String::new()));
    finish_round_one(&fed, &beta).await;
}

/// Issue 21 item 8: n_cases must be the site's registered case count (its weight); a forged
/// one is refused, the honest one accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_case_counts_are_refused() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let set = alpha.download(&work.digest, false).await.unwrap();
    for forged in [u32::MAX, 5, 0] {
        let (accepted, reason) = alpha.upload(work.round, forged, 0.5, &set).await;
        assert!(!accepted, "n_cases {forged} was accepted");
        assert!(reason.contains("site alpha") && reason.contains(&format!("n_cases {forged}")), "{reason}");
    }
    assert_eq!(alpha.upload(work.round, 4, 0.5, &set).await, (true, String::new()));
    finish_round_one(&fed, &beta).await;
}

/// Issue 21 item 9: a non-finite train_loss is refused (it would be stored as null and make the
/// checkpoint unreadable); the site's finite retry is accepted and the round record parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_losses_are_refused() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let set = alpha.download(&work.digest, false).await.unwrap();
    for loss in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (accepted, reason) = alpha.upload(work.round, 4, loss, &set).await;
        assert!(!accepted, "train_loss {loss} was accepted");
        assert!(reason.contains("site alpha") && reason.contains("train_loss"), "{reason}");
    }
    assert_eq!(alpha.upload(work.round, 4, 0.5, &set).await, (true, String::new()));
    finish_round_one(&fed, &beta).await;
}

/// Issue 21 item 11: two uploads of one site in one round, both headers in before either
/// payload: exactly one is acknowledged, and a third after it is refused as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_uploads_are_accepted_once() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let set = alpha.download(&work.digest, false).await.unwrap();
    let first = alpha.begin_upload(work.round, 4, 0.5, &set).await;
    let second = alpha.begin_upload(work.round, 4, 0.5, &set).await;
    // Let the coordinator read both headers before any payload arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, b) = tokio::join!(first.send(), second.send());
    let (a, b) = (ack(&a), ack(&b));
    assert!(a.0 ^ b.0, "both or neither of two concurrent uploads were accepted: {a:?} {b:?}");
    let refused = if a.0 { b.1 } else { a.1 };
    assert!(refused.contains("site alpha") && refused.contains("already"), "{refused}");
    let (accepted, reason) = alpha.upload(work.round, 4, 0.5, &set).await;
    assert!(!accepted && reason.contains("already sent"), "{reason}");
    finish_round_one(&fed, &beta).await;
}

/// An update refused for its tensors answers the round for its site, as a failed client result
/// in Flower: the site may not send another one, and the round closes once the other site
/// reported, long before its 30 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_answers_the_round_for_its_site() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let honest = alpha.download(&work.digest, false).await.unwrap();
    let mut broken = honest.clone();
    broken.tensors[0].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let (accepted, reason) = alpha.upload(work.round, 4, 0.5, &broken).await;
    assert!(!accepted && reason.contains("NaN"), "{reason}");
    let (accepted, reason) = alpha.upload(work.round, 4, 0.5, &honest).await;
    assert!(!accepted && reason.contains("refused already"), "{reason}");
    close_round_one_with_beta_alone(&fed, &beta).await;
}

/// A payload whose stream header declares a wrong shape is the sender's doing, not the link's:
/// it answers the round too (a stream cut in transit would not). Here it is the round's last
/// answer, and the round closes at once on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_of_the_wrong_shape_answers_the_round_for_its_site() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let beta_work = beta.work().await;
    assert_eq!(beta.honest_update(&beta_work).await, (true, String::new()));
    let started = std::time::Instant::now();
    let mut broken = alpha.download(&work.digest, false).await.unwrap();
    broken.tensors[0].shape = vec![1];
    broken.tensors[0].data.truncate(4);
    let (accepted, reason) = alpha.upload(work.round, 4, 0.5, &broken).await;
    assert!(!accepted && reason.contains("payload") && reason.contains("shape"), "{reason}");
    wait_completed(&fed, 1).await;
    assert!(started.elapsed() < Duration::from_secs(20), "round 1 waited for its deadline: {:?}", started.elapsed());
    assert_eq!(contributions(&fed, 1), vec![("beta".into(), 4, 0.5)]);
}

/// A site works one round at a time, so an update of an older round from a site that was
/// handed the open round is a broken site, not a late arrival: it answers the round too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_round_from_a_site_handed_the_open_one_answers_it() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let set = alpha.download(&work.digest, false).await.unwrap();
    let (accepted, reason) = alpha.upload(work.round - 1, 4, 0.5, &set).await;
    assert!(!accepted && reason.contains("not the open round") && reason.contains("handed"), "{reason}");
    close_round_one_with_beta_alone(&fed, &beta).await;
}

/// beta's honest update closes round 1 at once (alpha answered already), with beta alone in it.
async fn close_round_one_with_beta_alone(fed: &Federation, beta: &Peer) {
    let started = std::time::Instant::now();
    let work = beta.work().await;
    assert_eq!(beta.honest_update(&work).await, (true, String::new()));
    wait_completed(fed, 1).await;
    assert!(started.elapsed() < Duration::from_secs(20), "round 1 waited for its deadline: {:?}", started.elapsed());
    assert_eq!(contributions(fed, 1), vec![("beta".into(), 4, 0.5)]);
}

/// Issue 21 item 7: a name on the allowlist that never joined (here not a site of the
/// federation at all) can neither poll, download nor upload; the round is the members'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_joined_sites_poll_download_and_upload() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    fed.coordinator.allowlist.insert("gamma");
    let gamma = fed.connect("gamma").await;
    let (alpha, beta, work) = round_one(&fed).await;
    let not_joined = ["site gamma", "has not joined"];
    assert_refused(&gamma.request(&Message::Heartbeat).await, ErrorKind::NotAllowed, &not_joined);
    let Err(refusal) = gamma.download(&work.digest, false).await else { panic!("gamma downloaded the model") };
    assert_refused(&refusal, ErrorKind::NotAllowed, &not_joined);
    let set = alpha.download(&work.digest, false).await.unwrap();
    let reply = gamma.begin_upload(work.round, 4, 0.5, &set).await.send().await;
    assert_refused(&reply, ErrorKind::NotAllowed, &not_joined);
    assert_refused(&gamma.request(&hello("gamma")).await, ErrorKind::NotAllowed, &["gamma"]);
    assert_eq!(alpha.upload(work.round, 4, 0.5, &set).await, (true, String::new()));
    finish_round_one(&fed, &beta).await;
}

/// Sends the operator's `SetAllowlist` (what the federation.toml watcher applies too).
async fn set_sites(fed: &Federation, sites: &[&str]) {
    let admin = fed.connect(config::ADMIN_IDENTITY).await;
    let sites = sites.iter().map(|s| s.to_string()).collect();
    let reply = admin.request(&Message::Admin(AdminRequest::SetAllowlist { sites })).await;
    assert!(matches!(reply, Message::AdminReply(AdminReply::Done { .. })), "{reply:?}");
}

/// Waits (briefly) until the coordinator closed `peer`'s connection; returns the close reason.
async fn closed_by_coordinator(peer: &Peer) -> String {
    let closed = tokio::time::timeout(Duration::from_secs(10), peer.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("site {}: its connection stayed open after its removal", peer.site));
    closed.to_string()
}

/// Issue 21 item 5: removing a site closes its open connection (keep-alive would otherwise keep
/// it in for days), drops the update it already sent from the open round (it does not count
/// toward min_sites), and later rounds do not wait for it (they close long before the 30 s
/// deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_site_is_disconnected_and_dropped_from_the_rounds() {
    let fed = Federation::start(&["alpha", "beta", "gamma"], 2).await;
    let (alpha, beta, gamma) = (fed.connect("alpha").await, fed.connect("beta").await, fed.connect("gamma").await);
    tokio::join!(alpha.join(), beta.join(), gamma.join());
    for peer in [&alpha, &gamma] {
        let work = peer.work().await;
        assert_eq!(peer.honest_update(&work).await, (true, String::new()));
    }
    set_sites(&fed, &["alpha", "beta"]).await;
    let reason = closed_by_coordinator(&gamma).await;
    assert!(reason.contains("gamma") && reason.contains("removed"), "{reason}");
    // alpha's update alone is below min_sites = 2: the round stays open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fed.coordinator.status().current_round, 0, "round 1 closed with the removed site's update");
    let work = beta.work().await;
    assert_eq!(beta.honest_update(&work).await, (true, String::new()));
    wait_completed(&fed, 1).await;
    let sites: Vec<String> = contributions(&fed, 1).into_iter().map(|c| c.0).collect();
    assert_eq!(sites, ["alpha", "beta"]);
    let started = std::time::Instant::now();
    for peer in [&alpha, &beta] {
        let work = peer.work().await;
        assert_eq!(work.round, 2);
        assert_eq!(peer.honest_update(&work).await, (true, String::new()));
    }
    wait_completed(&fed, 2).await;
    assert!(started.elapsed() < Duration::from_secs(15), "round 2 waited {:?} for the removed site", started.elapsed());
    let status = fed.coordinator.status();
    let gamma_status = status.sites.iter().find(|s| s.site == "gamma").unwrap();
    assert!(!gamma_status.allowed && !gamma_status.connected, "{gamma_status:?}");
}

/// Issue 21 item 5: removing a site from federation.toml (the watcher of `serve`) applies even
/// though the edited file is invalid otherwise (min_sites = 3 with 2 sites left): the removed
/// site is disconnected, the others stay connected and allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_in_federation_toml_applies_despite_other_errors() {
    let fed = Federation::start(&["alpha", "beta", "gamma"], 3).await;
    let (alpha, beta, gamma) = (fed.connect("alpha").await, fed.connect("beta").await, fed.connect("gamma").await);
    tokio::join!(alpha.join(), beta.join(), gamma.join());
    let path = fed.dir.path().join("federation.toml");
    let sites = ["alpha".to_string(), "beta".to_string()];
    let text = config::template("peers", fed.addr, &sites).replace("min_sites = 2", "min_sites = 3");
    std::fs::write(&path, text).unwrap();
    assert!(FederationConfig::load(&path).is_err(), "the edited file should be invalid");
    tokio::spawn(fed.coordinator.clone().watch_config(path, Duration::from_millis(100)));
    let reason = closed_by_coordinator(&gamma).await;
    assert!(reason.contains("removed"), "{reason}");
    let status = fed.coordinator.status();
    let allowed: Vec<(&str, bool, bool)> =
        status.sites.iter().map(|s| (s.site.as_str(), s.allowed, s.connected)).collect();
    assert_eq!(allowed, [("alpha", true, true), ("beta", true, true), ("gamma", false, false)]);
    assert!(alpha.conn.close_reason().is_none() && beta.conn.close_reason().is_none());
}

/// Issue 21 item 15: metrics are validated like the rest of an update: Dice of a class the
/// sender does not own (or twice), and absurd durations (which overflowed `coordinator report`)
/// are refused naming the site and the field; honest metrics are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_dice_and_absurd_durations_are_refused() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let set = alpha.download(&work.digest, false).await.unwrap();
    let dice = |pairs: &[(&str, f32)]| pairs.iter().map(|(c, d)| (c.to_string(), *d)).collect::<Vec<_>>();
    let forged = [
        (Metrics { dice: dice(&[("beta/organ", 0.9)]), ..Default::default() }, "beta/organ"),
        (Metrics { dice: dice(&[("alpha/organ", 0.5), ("alpha/organ", 0.9)]), ..Default::default() }, "twice"),
        (
            Metrics { durations_ms: PhaseTimings { train: u64::MAX, ..Default::default() }, ..Default::default() },
            "durations_ms",
        ),
    ];
    for (metrics, needle) in forged {
        let reply = alpha.begin_upload_with(work.round, 4, 0.5, metrics, &set).await.send().await;
        let (accepted, reason) = ack(&reply);
        assert!(!accepted && reason.contains("site alpha") && reason.contains(needle), "{needle}: {reason}");
    }
    let honest = Metrics {
        dice: dice(&[("alpha/organ", 0.7)]),
        durations_ms: PhaseTimings { download: 20, evaluate: 300, train: 1200 },
    };
    let reply = alpha.begin_upload_with(work.round, 4, 0.5, honest, &set).await.send().await;
    assert_eq!(ack(&reply), (true, String::new()));
    finish_round_one(&fed, &beta).await;
}

/// Issue 21 item 15: a Hello listing one class name twice is refused naming the site and class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_class_names_are_refused_at_hello() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let alpha = fed.connect("alpha").await;
    let organ = |labels| ClassRegion { name: "organ".into(), labels };
    let twice = Message::Hello(Hello { classes: vec![organ(vec![1]), organ(vec![2])], ..hello_of("alpha") });
    assert_refused(&alpha.request(&twice).await, ErrorKind::BadDataset, &["site alpha", "\"organ\""]);
}

/// Issue 21 item 13: a checkpoint that cannot be written (here `state/rounds` is a file, which
/// stops root too) neither stops `serve` nor changes the global model in memory ahead of the
/// disk; once the state dir is writable again the same round's updates are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_keeps_serving_and_the_model_unchanged() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let rounds = fed.dir.path().join("state/rounds");
    std::fs::remove_dir_all(&rounds).unwrap();
    std::fs::write(&rounds, b"not a directory").unwrap();
    let before = fed.coordinator.status().model_digest;
    assert_eq!(alpha.honest_update(&work).await, (true, String::new()));
    let work = beta.work().await;
    assert_eq!(beta.honest_update(&work).await, (true, String::new()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = fed.coordinator.status();
    assert_eq!((status.current_round, status.model_digest.as_str()), (0, before.as_str()));
    std::fs::remove_file(&rounds).unwrap();
    std::fs::create_dir(&rounds).unwrap();
    wait_completed(&fed, 1).await;
    assert_eq!(contributions(&fed, 1), vec![("alpha".into(), 4, 0.5), ("beta".into(), 4, 0.5)]);
}

/// Issue 21 item 17: the digest a site's RoundStart announces is the digest its download
/// carries, so that the site can bind the download to it (site-agent refuses any other); a
/// request naming another model is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_announced_digest_is_the_downloads_digest() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let (_, carried) = alpha.download_digest(&work.digest, false).await.expect("alpha's part");
    assert_eq!(carried, work.digest, "alpha's RoundStart announced another model than it downloads");
    let beta_work = beta.work().await;
    assert_ne!(beta_work.digest, work.digest, "beta's part (its heads) is another set than alpha's");
    let (_, carried) = beta.download_digest(&beta_work.digest, false).await.expect("beta's part");
    assert_eq!(carried, beta_work.digest);
    let Err(refusal) = alpha.download(&beta_work.digest, false).await else { panic!("served another digest") };
    assert_refused(&refusal, ErrorKind::BadMessage, &[&beta_work.digest]);
}

/// Issue 21 item 12: one address gets a burst of handshakes, then is refused (before any TLS
/// work) until its bucket refills (1 a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_from_one_address_are_rate_limited() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    // The first one may race `serve` binding its socket.
    drop(fed.connect("alpha").await);
    // 40 at once: the burst (20, one spent above) gets in, the rest is refused.
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (endpoint, addr) = (fed.endpoint_of("alpha"), fed.addr);
        attempts.spawn(async move {
            let connecting = endpoint.connect(addr, "localhost").unwrap();
            let accepted = matches!(tokio::time::timeout(TIMEOUT, connecting).await, Ok(Ok(_)));
            endpoint.close(0u32.into(), b"done");
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(outcome) = attempts.join_next().await {
        accepted += usize::from(outcome.unwrap());
    }
    assert!(accepted >= 15, "only {accepted} of 40 handshakes accepted: the burst is refused");
    assert!(accepted < 40, "40 concurrent handshakes from one address were all accepted");
}

/// Issue 21 item 10: a site's concurrent requests are capped over all its connections: with 8
/// stalled requests open (a partial frame each), the next one is refused at once, naming the
/// site, instead of pinning another task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_concurrent_requests_are_capped() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let stalled = fed.connect("alpha").await;
    let mut streams = Vec::new();
    for _ in 0..8 {
        let (mut send, recv) = stalled.conn.open_bi().await.unwrap();
        send.write_all(&[0, 0]).await.unwrap();
        streams.push((send, recv));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = fed.connect("alpha").await;
    assert_refused(&other.request(&Message::Heartbeat).await, ErrorKind::BadMessage, &["site alpha", "concurrent"]);
    drop(streams);
}

/// Issue 21, a stalled stream: two sites open their update and stop sending without closing
/// the stream, one after the header, one inside its tensor stream. The coordinator keeps
/// serving the honest site at once, and the stalled uploads hold each round only until its
/// deadline, the payload's timeout: a stalled upload is an absent site, which a round waits for
/// as for one still training (a shorter stall timeout could not close the round sooner
/// without also dropping slow honest links). At the deadline they are refused naming the
/// site, they do not count, and the honest site finishes both rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_hold_a_round_only_until_its_deadline() {
    const DEADLINE: Duration = Duration::from_secs(6);
    let fed = Federation::start_with_deadline(&["alpha", "beta", "gamma"], 1, DEADLINE.as_secs()).await;
    let (alpha, beta, gamma) = (fed.connect("alpha").await, fed.connect("beta").await, fed.connect("gamma").await);
    tokio::join!(alpha.join(), beta.join(), gamma.join());
    for round in 1..=2 {
        let work = alpha.work().await;
        let opened = Instant::now();
        assert_eq!(work.round, round);
        let mut stalled = [(stalled_upload(&beta, 0).await, "beta"), (stalled_upload(&gamma, 1000).await, "gamma")];
        assert_eq!(alpha.honest_update(&work).await, (true, String::new()));
        let honest = opened.elapsed();
        assert!(honest < DEADLINE / 2, "alpha's round {round} took {honest:?} next to the stalled uploads");
        wait_completed(&fed, round).await;
        let closed = opened.elapsed();
        assert!(
            closed < DEADLINE + Duration::from_secs(3),
            "round {round} closed after {closed:?}, its deadline is {DEADLINE:?}"
        );
        for (upload, site) in &mut stalled {
            let (accepted, reason) = ack(&upload.answer().await);
            assert!(!accepted && reason.contains(&format!("site {site}:")) && reason.contains("deadline"), "{reason}");
        }
        assert_eq!(contributions(&fed, round), vec![("alpha".into(), 4, 0.5)]);
    }
}

/// `peer` takes its round's model and opens its update, then stops after `payload_bytes` of
/// the tensor stream without closing it.
async fn stalled_upload(peer: &Peer, payload_bytes: usize) -> Upload {
    let work = peer.work().await;
    let set = peer.download(&work.digest, false).await.unwrap();
    let mut upload = peer.begin_upload(work.round, 4, 0.5, &set).await;
    upload.send_part(payload_bytes).await;
    upload
}

/// Issue 21, a stream flood: alpha opens request streams on two more connections as fast as
/// the coordinator lets it, each a partial frame left open (8 of them hold alpha's request
/// slots, the rest are refused at once). Meanwhile beta's poll, download and upload are served
/// at once; once the flood ends, alpha's own update closes the round with both sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_does_not_hold_up_the_honest_site() {
    let fed = Federation::start(&["alpha", "beta"], 2).await;
    let (alpha, beta, work) = round_one(&fed).await;
    let flooders = vec![fed.connect("alpha").await, fed.connect("alpha").await];
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = tokio::spawn(flood(flooders, opened.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let beta_work = beta.work().await;
    assert_eq!(beta.honest_update(&beta_work).await, (true, String::new()));
    let honest = started.elapsed();
    let during = opened.load(Ordering::Relaxed);
    eprintln!("beta's round took {honest:?} while alpha opened {during} streams");
    assert!(during >= 50, "only {during} streams opened: no flood to speak of");
    assert!(honest < Duration::from_secs(5), "beta's round took {honest:?} during a flood of {during} streams");
    flood.abort();
    // The flood's connections are gone with the task; their stalled requests end with them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alpha.honest_update(&work).await, (true, String::new()));
    wait_completed(&fed, 1).await;
    assert_eq!(contributions(&fed, 1), vec![("alpha".into(), 4, 0.5), ("beta".into(), 4, 0.5)]);
}

/// Opens request streams on every connection of `peers` as fast as QUIC's stream limit allows,
/// each with a partial frame, counting them in `opened`; a stream is let go once the
/// coordinator answered it (a refusal), so that the next can be opened. Runs until aborted.
async fn flood(peers: Vec<Peer>, opened: Arc<AtomicUsize>) {
    let mut streams = tokio::task::JoinSet::new();
    for peer in peers {
        let opened = opened.clone();
        streams.spawn(async move {
            let mut answered = tokio::task::JoinSet::new();
            while let Ok((mut send, mut recv)) = peer.conn.open_bi().await {
                let _ = send.write_all(&[0, 0]).await;
                opened.fetch_add(1, Ordering::Relaxed);
                while answered.try_join_next().is_some() {}
                answered.spawn(async move {
                    let _ = recv.read_to_end(MAX_FRAME_BYTES).await;
                    drop(send);
                });
            }
        });
    }
    streams.join_all().await;
}
