//! A protocol-level site for the coordinator's integration tests: it sends exactly the
//! messages a test needs (no training), as an honest site would or not. Shared by `peers.rs`
//! (a coordinator in the test process) and `load.rs` (the `coordinator` binary).

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fedtalent_certs::{FederationCa, SiteKey};
use fedtalent_protocol::{
    quic, read_frame, recv_tensors_digest, send_tensors, write_frame, Ack, ClassRegion, ErrorKind, Hello, HuHistogram,
    Message, ModelRequest, PhaseTimings, RecvLimits, Refusal, RoundStart, TensorDigests, TensorSet, Transport,
    UpdateHeader, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

/// How long a peer waits for any one answer of the coordinator.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A UDP port free on loopback for the coordinator to listen on.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A client endpoint bound to `bind` presenting a fresh certificate of `site` from `ca`.
pub fn endpoint_of(ca: &FederationCa, site: &str, bind: IpAddr) -> quinn::Endpoint {
    let k = SiteKey::generate(site).unwrap();
    let cert = ca.sign_site_csr(&k.csr_pem, 1).unwrap();
    let cfg = fedtalent_certs::client_config(ca.cert_pem(), &cert, &k.key_pem).unwrap();
    let mut endpoint = fedtalent_certs::client_endpoint(SocketAddr::new(bind, 0)).unwrap();
    endpoint.set_default_client_config(cfg);
    endpoint
}

/// A connection of `site` (certified by `ca`, from address `bind`) to the coordinator at
/// `addr`, retried while `serve` binds.
pub async fn connect(ca: &FederationCa, addr: SocketAddr, site: &str, bind: IpAddr) -> Peer {
    let endpoint = endpoint_of(ca, site, bind);
    for _ in 0..20 {
        let connecting = endpoint.connect(addr, "localhost").unwrap();
        if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connecting).await {
            return Peer { site: site.into(), _endpoint: endpoint, conn };
        }
    }
    panic!("site {site} could not connect to the coordinator at {addr}");
}

/// One connection of a site; its endpoint lives as long as it.
pub struct Peer {
    pub site: String,
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// What an honest site of one class would register.
pub fn hello_of(site: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        site: site.into(),
        classes: vec![ClassRegion { name: "organ".into(), labels: vec![1] }],
        n_train: 4,
        n_val: 1,
        hu_histogram: HuHistogram { min_hu: -100, counts: vec![5; 300] },
        device: "cpu".into(),
        channels: fedtalent_vocab::InputChannels::ct(),
        exclusive_classes: false,
    }
}

pub fn hello(site: &str) -> Message {
    Message::Hello(hello_of(site))
}

/// The metrics fields of an update header.
#[derive(Default)]
pub struct Metrics {
    pub dice: Vec<(String, f32)>,
    pub durations_ms: PhaseTimings,
}

/// A round's work as announced to a site.
pub struct Work {
    pub round: u32,
    pub digest: String,
}

impl Peer {
    pub async fn request(&self, message: &Message) -> Message {
        tokio::time::timeout(TIMEOUT, quic::request(&self.conn, message))
            .await
            .unwrap_or_else(|_| panic!("site {}: no answer to {}", self.site, message.kind()))
            .unwrap_or_else(|e| panic!("site {}: {} failed: {e}", self.site, message.kind()))
    }

    pub async fn join(&self) {
        let reply = self.request(&hello(&self.site)).await;
        assert!(matches!(reply, Message::Welcome(_)), "site {}: {reply:?}", self.site);
    }

    /// Polls until the coordinator hands out a round.
    pub async fn work(&self) -> Work {
        let site = &self.site;
        self.next_work().await.unwrap_or_else(|| panic!("site {site}: polled for work, the federation finished"))
    }

    /// Polls until the coordinator hands out a round (`Some`) or says the federation finished.
    pub async fn next_work(&self) -> Option<Work> {
        loop {
            match self.request(&Message::Heartbeat).await {
                Message::Heartbeat => continue,
                Message::RoundStart(RoundStart { round, model_digest, .. }) => {
                    return Some(Work { round, digest: model_digest })
                }
                Message::Finished(_) => return None,
                other => panic!("site {}: polled, got {other:?}", self.site),
            }
        }
    }

    /// Downloads the global model (`full`: all of it) or the coordinator's refusal.
    pub async fn download(&self, digest: &str, full: bool) -> Result<TensorSet, Message> {
        self.download_digest(digest, full).await.map(|(set, _)| set)
    }

    /// As [`Peer::download`], also returning the set digest the stream carried.
    pub async fn download_digest(&self, digest: &str, full: bool) -> Result<(TensorSet, String), Message> {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        write_frame(
            &mut send,
            &Message::ModelRequest(ModelRequest { digest: digest.into(), full, held: Default::default() }),
        )
        .await
        .unwrap();
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
        let received = recv_tensors_digest(&mut reply.as_slice(), &RecvLimits::default())
            .await
            .unwrap_or_else(|e| panic!("site {}: the model stream is broken: {e}", self.site));
        Ok(received)
    }

    /// Opens an upload of `set` as this site's update of `round`: the header is sent, the
    /// payload not yet (see [`Upload::send`]).
    pub async fn begin_upload(&self, round: u32, n_cases: u32, train_loss: f32, set: &TensorSet) -> Upload {
        self.begin_upload_with(round, n_cases, train_loss, Metrics::default(), set).await
    }

    /// As [`Peer::begin_upload`] with the header's metrics.
    pub async fn begin_upload_with(
        &self,
        round: u32,
        n_cases: u32,
        train_loss: f32,
        m: Metrics,
        set: &TensorSet,
    ) -> Upload {
        let mut digests = TensorDigests::new(Transport::Native);
        let header = Message::UpdateHeader(UpdateHeader {
            round,
            n_cases,
            train_loss,
            dice: m.dice,
            payload_digest: set.wire_digest_cached(&mut digests),
            durations_ms: m.durations_ms,
            resume: false,
        });
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        write_frame(&mut send, &header).await.unwrap();
        Upload { send, recv, digests, set: Arc::new(set.clone()) }
    }

    /// Uploads `set` as this site's update of `round`; returns (accepted, reason).
    pub async fn upload(&self, round: u32, n_cases: u32, train_loss: f32, set: &TensorSet) -> (bool, String) {
        ack(&self.begin_upload(round, n_cases, train_loss, set).await.send().await)
    }

    /// Takes this round's model and sends it back unchanged (an honest update of norm 0).
    pub async fn honest_update(&self, work: &Work) -> (bool, String) {
        let set = self.download(&work.digest, false).await.expect("the site's model");
        self.upload(work.round, 4, 0.5, &set).await
    }
}

pub struct Upload {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    digests: TensorDigests,
    set: Arc<TensorSet>,
}

impl Upload {
    /// Streams the payload and returns the coordinator's answer.
    pub async fn send(mut self) -> Message {
        // The coordinator may refuse before reading the payload: then sending fails.
        let _ = quic::send_tensors_shared(&mut self.send, self.set.clone(), &mut self.digests).await;
        let _ = self.send.finish();
        self.answer().await
    }

    /// Sends the first `bytes` of the payload's tensor stream and stops there, the stream left
    /// open: a stalled upload.
    pub async fn send_part(&mut self, bytes: usize) {
        let mut stream = Vec::new();
        send_tensors(&mut stream, &self.set, self.digests.transport()).await.unwrap();
        assert!(bytes < stream.len(), "{bytes} bytes are the whole payload of {} bytes", stream.len());
        self.send.write_all(&stream[..bytes]).await.unwrap();
    }

    /// The coordinator's answer to this upload, however much of it was sent.
    pub async fn answer(&mut self) -> Message {
        tokio::time::timeout(TIMEOUT, read_frame(&mut self.recv, MAX_FRAME_BYTES))
            .await
            .expect("no answer to an update")
            .expect("a readable answer to an update")
    }
}

/// (accepted, reason) of an `Ack`.
pub fn ack(reply: &Message) -> (bool, String) {
    match reply {
        Message::Ack(Ack { refusal, .. }) => {
            (refusal.is_none(), refusal.as_ref().map(Refusal::to_string).unwrap_or_default())
        }
        other => panic!("expected an Ack, got {other:?}"),
    }
}

pub fn assert_refused(reply: &Message, kind: ErrorKind, needles: &[&str]) {
    let Message::Error(Refusal { kind: got, reason }) = reply else {
        panic!("expected a {kind:?} refusal, got {reply:?}")
    };
    assert_eq!(*got, kind, "{reason}");
    for needle in needles {
        assert!(reason.contains(needle), "refusal {reason:?} does not mention {needle:?}");
    }
}
