//! A real coordinator in this process and protocol-level peers that send exactly what a test
//! needs (no training): how the coordinator answers faulty or hostile sites (issue 21), and
//! that the honest sites' round still completes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedtalent_certs::{FederationCa, SiteKey};
use fedtalent_coordinator::{config, Coordinator, FederationConfig};
use fedtalent_protocol::{
    quic, read_frame, recv_tensors_digest, write_frame, ClassSpec, ErrorKind, HuHistogram, Message, RecvLimits,
    TensorDigests, TensorSet, Transport, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

const TIMEOUT: Duration = Duration::from_secs(60);

struct Federation {
    dir: tempfile::TempDir,
    ca: FederationCa,
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A federation of the tiny preset, 2 rounds of 1 step, a 30 s round deadline.
fn federation_config(dir: &std::path::Path, sites: &[&str], min_sites: u32) -> FederationConfig {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let names: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
    let mut config: FederationConfig = toml::from_str(&config::template("peers", addr, &names)).unwrap();
    config.federation.state_dir = dir.join("state");
    config.federation.pki_dir = dir.join("pki");
    let plan = &mut config.plan;
    (plan.preset, plan.rounds, plan.local_steps, plan.eval_every) = ("tiny".into(), 2, 1, 1);
    (plan.min_sites, plan.round_deadline_s) = (min_sites, 30);
    config.validate().unwrap();
    config
}

impl Federation {
    async fn start(sites: &[&str], min_sites: u32) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let config = federation_config(dir.path(), sites, min_sites);
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

    /// A connection of `site`, certified by the federation CA (retried while `serve` binds).
    async fn connect(&self, site: &str) -> Peer {
        let k = SiteKey::generate(site).unwrap();
        let cert = self.ca.sign_site_csr(&k.csr_pem, 1).unwrap();
        let cfg = fedtalent_certs::client_config(self.ca.cert_pem(), &cert, &k.key_pem).unwrap();
        let mut endpoint = fedtalent_certs::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(cfg);
        for _ in 0..20 {
            let connecting = endpoint.connect(self.addr, "localhost").unwrap();
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connecting).await {
                return Peer { site: site.into(), _endpoint: endpoint, conn };
            }
        }
        panic!("site {site} could not connect to the coordinator at {}", self.addr);
    }
}

struct Peer {
    site: String,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// What an honest site of one class would register.
fn hello(site: &str) -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        site: site.into(),
        classes: vec![ClassSpec { name: "organ".into(), labels: vec![1] }],
        n_train: 4,
        n_val: 1,
        hu_histogram: HuHistogram { min_hu: -100, counts: vec![5; 300] },
        device: "cpu".into(),
    }
}

/// A round's work as announced to a site.
struct Work {
    round: u32,
    digest: String,
}

impl Peer {
    async fn request(&self, message: &Message) -> Message {
        tokio::time::timeout(TIMEOUT, quic::request(&self.conn, message))
            .await
            .unwrap_or_else(|_| panic!("site {}: no answer to {}", self.site, message.kind()))
            .unwrap_or_else(|e| panic!("site {}: {} failed: {e}", self.site, message.kind()))
    }

    async fn join(&self) {
        let reply = self.request(&hello(&self.site)).await;
        assert!(matches!(reply, Message::Welcome { .. }), "site {}: {reply:?}", self.site);
    }

    /// Polls until the coordinator hands out a round.
    async fn work(&self) -> Work {
        loop {
            match self.request(&Message::Heartbeat).await {
                Message::Heartbeat => continue,
                Message::RoundStart { round, model_digest, .. } => return Work { round, digest: model_digest },
                other => panic!("site {}: polled, got {other:?}", self.site),
            }
        }
    }

    /// Downloads the global model (`full`: all of it) or the coordinator's refusal.
    async fn download(&self, digest: &str, full: bool) -> Result<TensorSet, Message> {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        write_frame(&mut send, &Message::ModelRequest { digest: digest.into(), full }).await.unwrap();
        send.finish().unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 1 << 16];
        while let Some(n) = tokio::time::timeout(TIMEOUT, recv.read(&mut buf)).await.unwrap().unwrap() {
            reply.extend_from_slice(&buf[..n]);
        }
        // A refusal is one control frame; anything else must be the tensor stream.
        if let Ok(message) = fedtalent_protocol::decode_frame(&reply, MAX_FRAME_BYTES) {
            return Err(message);
        }
        let (set, _) = recv_tensors_digest(&mut reply.as_slice(), &RecvLimits::default())
            .await
            .unwrap_or_else(|e| panic!("site {}: the model stream is broken: {e}", self.site));
        Ok(set)
    }

    /// Opens an upload of `set` as this site's update of `round`: the header is sent, the
    /// payload not yet (see [`Upload::send`]).
    async fn begin_upload(&self, round: u32, n_cases: u32, train_loss: f32, set: &TensorSet) -> Upload {
        let mut digests = TensorDigests::new(Transport::Native);
        let header = Message::UpdateHeader {
            round,
            n_cases,
            train_loss,
            dice: Vec::new(),
            payload_digest: set.wire_digest_cached(&mut digests),
            durations_ms: Vec::new(),
        };
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        write_frame(&mut send, &header).await.unwrap();
        Upload { send, recv, digests, set: Arc::new(set.clone()) }
    }

    /// Uploads `set` as this site's update of `round`; returns (accepted, reason).
    async fn upload(&self, round: u32, n_cases: u32, train_loss: f32, set: &TensorSet) -> (bool, String) {
        ack(&self.begin_upload(round, n_cases, train_loss, set).await.send().await)
    }

    /// Takes this round's model and sends it back unchanged (an honest update of norm 0).
    async fn honest_update(&self, work: &Work) -> (bool, String) {
        let set = self.download(&work.digest, false).await.expect("the site's model");
        self.upload(work.round, 4, 0.5, &set).await
    }
}

struct Upload {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    digests: TensorDigests,
    set: Arc<TensorSet>,
}

impl Upload {
    /// Streams the payload and returns the coordinator's answer.
    async fn send(mut self) -> Message {
        // The coordinator may refuse before reading the payload: then sending fails.
        let _ = quic::send_tensors_shared(&mut self.send, self.set.clone(), &mut self.digests).await;
        let _ = self.send.finish();
        tokio::time::timeout(TIMEOUT, read_frame(&mut self.recv, MAX_FRAME_BYTES))
            .await
            .expect("no answer to an update")
            .expect("a readable answer to an update")
    }
}

/// (accepted, reason) of an `Ack`.
fn ack(reply: &Message) -> (bool, String) {
    match reply {
        Message::Ack { accepted, reason, .. } => (*accepted, reason.clone().unwrap_or_default()),
        other => panic!("expected an Ack, got {other:?}"),
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

fn assert_refused(reply: &Message, kind: ErrorKind, needles: &[&str]) {
    let Message::Error { kind: got, reason } = reply else { panic!("expected a {kind:?} refusal, got {reply:?}") };
    assert_eq!(*got, kind, "{reason}");
    for needle in needles {
        assert!(reason.contains(needle), "refusal {reason:?} does not mention {needle:?}");
    }
}

/// Issue 21 item 4: a Hello of another protocol version is answered VersionMismatch (final for
/// the site), not BadMessage (which the site retries forever); also when the rest of that
/// Hello does not decode with this version's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_of_another_protocol_version_is_answered_version_mismatch() {
    let fed = Federation::start(&["alpha", "beta"], 1).await;
    let peer = fed.connect("alpha").await;
    let Message::Hello { classes, n_train, n_val, hu_histogram, device, site, .. } = hello("alpha") else {
        unreachable!()
    };
    let other =
        Message::Hello { protocol_version: PROTOCOL_VERSION + 1, site, classes, n_train, n_val, hu_histogram, device };
    assert_refused(&peer.request(&other).await, ErrorKind::VersionMismatch, &["alpha", "version 2"]);
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
        let Message::Hello { protocol_version, site, classes, n_train, n_val, device, .. } = hello("alpha") else {
            unreachable!()
        };
        let bad = Message::Hello { protocol_version, site, classes, n_train, n_val, hu_histogram: histogram, device };
        assert_refused(&alpha.request(&bad).await, ErrorKind::BadDataset, &["site alpha", field]);
    }
    join_both(&alpha, &beta).await;
    for peer in [&alpha, &beta] {
        let work = peer.work().await;
        assert_eq!(peer.honest_update(&work).await, (true, String::new()));
    }
    wait_completed(&fed, 1).await;
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
