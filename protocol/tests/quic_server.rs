//! A miniature coordinator over real quinn endpoints (mutual TLS from fedtalent-certs): broken
//! peers are refused with a specific reason, and an honest site still completes a full round
//! trip (Hello/Welcome, model download, update upload + Ack) afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedtalent_certs::{client_config, server_config, Allowlist, FederationCa, SiteKey};
use fedtalent_protocol::quic::{recv_tensors_uni, request, send_tensors_uni};
use fedtalent_protocol::*;
use tokio::sync::mpsc;

fn model() -> TensorSet {
    let w: Vec<f32> = (0..64 * 32).map(|i| (i as f32).sin()).collect();
    TensorSet::new(vec![
        WireTensor::from_f32("backbone.w", vec![64, 32], &w),
        WireTensor::from_f32("head.alpha.w", vec![2, 32], &w[..64]),
    ])
}

fn hello(version: u32) -> Message {
    Message::Hello(Hello {
        protocol_version: version,
        site: "alpha".into(),
        classes: vec![ClassRegion { name: "liver".into(), labels: vec![1] }],
        n_train: 10,
        n_val: 2,
        hu_histogram: HuHistogram { min_hu: -1024, counts: vec![0; 8] },
        device: "cpu".into(),
        channels: fedtalent_vocab::InputChannels::ct(),
        exclusive_classes: false,
    })
}

fn welcome() -> Message {
    Message::Welcome(Welcome {
        federation: "test".into(),
        plan: Plan { round_deadline_s: 60, ..Plan::new("tiny", 2, 5) },
        classes: vec![],
        normalization: CtNormalization { clip_low: -1.0, clip_high: 1.0, mean: 0.0, std: 1.0 },
        current_round: 0,
    })
}

/// Handles one bidirectional stream: one request frame, one reply frame. Reports refusals.
async fn handle_stream(
    conn: quinn::Connection,
    site: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    log: mpsc::UnboundedSender<String>,
) {
    let reply = match read_frame(&mut recv, MAX_FRAME_BYTES).await {
        Err(e) => {
            let kind = match e {
                FrameError::VersionMismatch { .. } => ErrorKind::VersionMismatch,
                _ => ErrorKind::BadMessage,
            };
            let reason = format!("site '{site}': {e}");
            let _ = log.send(reason.clone());
            Message::refusal(kind, reason)
        }
        Ok(Message::Hello(_)) => welcome(),
        Ok(Message::ModelRequest(_)) => {
            let c = conn.clone();
            tokio::spawn(async move {
                let _ = send_tensors_uni(&c, Arc::new(model()), &mut TensorDigests::new(Transport::Bf16)).await;
            });
            Message::Ack(Ack { round: 0, refusal: None })
        }
        Ok(Message::UpdateHeader(UpdateHeader { round, payload_digest, .. })) => {
            let mut limits = RecvLimits::for_manifest(model().manifest());
            limits.expected_digest = Some(payload_digest);
            match recv_tensors_uni(&conn, &limits).await {
                Ok(_) => Message::Ack(Ack { round, refusal: None }),
                Err(e) => {
                    let reason = format!("site '{site}': update refused: {e}");
                    let _ = log.send(reason.clone());
                    Message::Ack(Ack { round, refusal: Some(Refusal::new(ErrorKind::BadUpdate, reason)) })
                }
            }
        }
        Ok(other) => Message::refusal(ErrorKind::BadMessage, format!("unexpected {}", other.kind())),
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
}

struct Fixture {
    ca: FederationCa,
    addr: SocketAddr,
    log: mpsc::UnboundedReceiver<String>,
    _endpoint: quinn::Endpoint,
}

fn start() -> Fixture {
    let ca = FederationCa::create("ca").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(["alpha", "beta"])).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, log) = mpsc::unbounded_channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let site = fedtalent_certs::peer_site_name(&conn).unwrap();
                while let Ok((s, r)) = conn.accept_bi().await {
                    tokio::spawn(handle_stream(conn.clone(), site.clone(), s, r, tx.clone()));
                }
            });
        }
    });
    Fixture { ca, addr, log, _endpoint: endpoint }
}

impl Fixture {
    async fn connect(&self, site: &str) -> (quinn::Endpoint, quinn::Connection) {
        let k = SiteKey::generate(site).unwrap();
        let cert = self.ca.sign_site_csr(&k.csr_pem, 1).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(client_config(self.ca.cert_pem(), &cert, &k.key_pem).unwrap());
        let conn = ep.connect(self.addr, "localhost").unwrap().await.unwrap();
        (ep, conn)
    }
    async fn logged(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.log.recv()).await.unwrap().unwrap()
    }
}

/// Sends raw bytes as a request and returns the reply frame.
async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Message {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.finish().unwrap();
    read_frame(&mut r, MAX_FRAME_BYTES).await.unwrap()
}

/// A full honest round trip of a site.
async fn honest_site(f: &Fixture, site: &str) {
    let (_ep, conn) = f.connect(site).await;
    assert_eq!(request(&conn, &hello(PROTOCOL_VERSION)).await.unwrap(), welcome());
    // Model download (bf16 transport), checked against the expected digest.
    let reply = request(
        &conn,
        &Message::ModelRequest(ModelRequest { digest: model().digest(), full: false, held: Default::default() }),
    )
    .await
    .unwrap();
    assert!(matches!(reply, Message::Ack(Ack { refusal: None, .. })));
    let limits = RecvLimits {
        expected_digest: Some(model().wire_digest(Transport::Bf16)),
        ..RecvLimits::for_manifest(model().manifest())
    };
    let (got, _) = recv_tensors_uni(&conn, &limits).await.unwrap();
    assert_eq!(got.manifest(), model().manifest());
    // Update upload.
    let update = model();
    let digest = update.digest();
    let up = {
        let c = conn.clone();
        let u = update.clone();
        tokio::spawn(async move {
            send_tensors_uni(&c, Arc::new(u), &mut TensorDigests::new(Transport::Native)).await.unwrap()
        })
    };
    let header = Message::UpdateHeader(UpdateHeader {
        round: 1,
        n_cases: 10,
        train_loss: 0.1,
        dice: vec![],
        payload_digest: digest.clone(),
        durations_ms: PhaseTimings::default(),
        resume: false,
    });
    assert_eq!(request(&conn, &header).await.unwrap(), Message::Ack(Ack { round: 1, refusal: None }));
    assert_eq!(up.await.unwrap(), digest);
    conn.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn broken_control_frames_are_refused_and_honest_sites_go_on() {
    let mut f = start();
    honest_site(&f, "alpha").await;
    let (_ep, conn) = f.connect("beta").await;

    // Old protocol version.
    let reply = request(&conn, &hello(0)).await.unwrap();
    let Message::Error(Refusal { kind, reason }) = reply else { panic!("{reply:?}") };
    assert_eq!(kind, ErrorKind::VersionMismatch);
    assert!(reason.contains("site 'beta': protocol version mismatch: peer speaks version 0"), "{reason}");
    assert_eq!(f.logged().await, reason);
    honest_site(&f, "alpha").await;

    // A frame over the cap (declared 16 MiB; only the prefix is sent).
    let reply = raw_request(&conn, &(16u32 << 20).to_be_bytes()).await;
    let Message::Error(Refusal { kind: ErrorKind::BadMessage, reason }) = reply else { panic!("{reply:?}") };
    assert!(reason.contains("frame of 16777216 bytes exceeds the cap of 1048576 bytes"), "{reason}");
    f.logged().await;

    // A truncated frame.
    let full = encode_frame(&hello(PROTOCOL_VERSION), MAX_FRAME_BYTES).unwrap();
    let reply = raw_request(&conn, &full[..full.len() - 3]).await;
    let Message::Error(Refusal { reason, .. }) = reply else { panic!("{reply:?}") };
    assert!(reason.contains("truncated frame: expected"), "{reason}");
    f.logged().await;

    // Random bytes with a plausible length.
    let mut junk = 40u32.to_be_bytes().to_vec();
    junk.extend((0..40u8).map(|i| i.wrapping_mul(97).wrapping_add(200)));
    let reply = raw_request(&conn, &junk).await;
    let Message::Error(Refusal { reason, .. }) = reply else { panic!("{reply:?}") };
    assert!(reason.contains("malformed message"), "{reason}");
    f.logged().await;

    // The same connection and other sites still work.
    assert_eq!(request(&conn, &hello(PROTOCOL_VERSION)).await.unwrap(), welcome());
    honest_site(&f, "alpha").await;
}

/// Uploads `bytes` as the tensor stream of an update announcing `digest`; returns the Ack.
async fn upload_raw(conn: &quinn::Connection, bytes: Vec<u8>, digest: String) -> Message {
    let c = conn.clone();
    tokio::spawn(async move {
        let mut s = c.open_uni().await.unwrap();
        let _ = s.write_all(&bytes).await;
        let _ = s.finish();
    });
    let header = Message::UpdateHeader(UpdateHeader {
        round: 1,
        n_cases: 1,
        train_loss: 0.0,
        dice: vec![],
        payload_digest: digest,
        durations_ms: PhaseTimings::default(),
        resume: false,
    });
    request(conn, &header).await.unwrap()
}

#[tokio::test]
async fn broken_tensor_uploads_are_refused_and_honest_sites_go_on() {
    let mut f = start();
    let (_ep, conn) = f.connect("beta").await;
    let good = model();
    let mut stream = Vec::new();
    let digest = send_tensors(&mut stream, &good, Transport::Native).await.unwrap();

    let mut check = async |bytes: Vec<u8>, digest: String, needle: &str| {
        let reply = upload_raw(&conn, bytes, digest).await;
        let Message::Ack(Ack { refusal: Some(Refusal { reason, .. }), .. }) = reply else { panic!("{reply:?}") };
        assert!(reason.contains(needle), "{reason:?} does not contain {needle:?}");
        assert_eq!(f.logged().await, reason);
        honest_site(&f, "alpha").await;
    };

    // Payload bytes corrupted in transit → the tensor's digest does not match.
    let mut bad = stream.clone();
    let n = bad.len();
    bad[n - 200] ^= 0xff;
    check(
        bad,
        digest.clone(),
        "site 'beta': update refused: tensor \"head.alpha.w\": SHA-256 of the received bytes does not match",
    )
    .await;

    // Consistent stream, but not the announced payload.
    check(stream.clone(), "ab".repeat(32), "is not the announced").await;

    // Unknown tensor name.
    let mut evil = good.clone();
    evil.tensors[1].name = "head.gamma.w".into();
    let mut b = Vec::new();
    let d = send_tensors(&mut b, &evil, Transport::Native).await.unwrap();
    check(b, d, "tensor \"head.gamma.w\" is not expected here").await;

    // Wrong shape.
    let mut evil = good.clone();
    evil.tensors[0].shape = vec![32, 64];
    let mut b = Vec::new();
    let d = send_tensors(&mut b, &evil, Transport::Native).await.unwrap();
    check(b, d, "tensor \"backbone.w\": shape [32, 64], expected [64, 32]").await;

    // Truncated upload.
    check(stream[..stream.len() / 2].to_vec(), digest.clone(), "stream ended inside \"backbone.w\"").await;

    // The refused site itself can still send a good update.
    let reply = upload_raw(&conn, stream.clone(), digest.clone()).await;
    assert_eq!(reply, Message::Ack(Ack { round: 1, refusal: None }));
}

/// A connected (site, coordinator) pair of connections over loopback.
async fn connection_pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
    let ca = FederationCa::create("ca").unwrap();
    let (cert, key) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let cfg = server_config(ca.cert_pem(), &cert, &key, Allowlist::new(["alpha"])).unwrap();
    let server = fedtalent_certs::server_endpoint(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let k = SiteKey::generate("alpha").unwrap();
    let site_cert = ca.sign_site_csr(&k.csr_pem, 1).unwrap();
    let mut client = fedtalent_certs::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config(ca.cert_pem(), &site_cert, &k.key_pem).unwrap());
    let connecting = client.connect(server.local_addr().unwrap(), "localhost").unwrap();
    let accepting = async { server.accept().await.unwrap().await };
    let (site, coordinator) = tokio::join!(connecting, accepting);
    (client, site.unwrap(), coordinator.unwrap())
}

/// The QUIC path streams a shared set without copying it (`send_tensors_uni`); what arrives must
/// be what the generic writer path sends: the same tensors and digests, with tensors that span
/// several chunks, end mid-chunk, are not f32, or whose digests the sender already knows.
#[tokio::test]
async fn shared_tensor_streams_arrive_intact() {
    let (_client, site, coordinator) = connection_pair().await;
    let big: Vec<f32> =
        (0..(fedtalent_protocol::tensor::CHUNK_BYTES / 4) * 5 / 2 + 3).map(|i| (i as f32 * 0.37).cos() * 1e3).collect();
    let ints: Vec<u8> = (0..4096i64).flat_map(|i| (i * 7919).to_le_bytes()).collect();
    let set = TensorSet::new(vec![
        WireTensor::from_f32("big", vec![big.len() as u64], &big),
        WireTensor { name: "ints".into(), dtype: DType::I64, shape: vec![4096], data: ints },
        WireTensor::from_f32("small", vec![3], &[1.5, -2.25, f32::MIN_POSITIVE]),
    ]);
    let limits = RecvLimits::for_manifest(set.manifest());
    for transport in [Transport::Native, Transport::Bf16] {
        // One digest known beforehand, as for a coordinator's cached global model.
        let mut digests = TensorDigests::new(transport);
        TensorSet::new(vec![set.tensors[0].clone()]).wire_digest_cached(&mut digests);
        let (sent, received) = tokio::join!(
            send_tensors_uni(&site, Arc::new(set.clone()), &mut digests),
            recv_tensors_uni(&coordinator, &limits)
        );
        let (got, digest) = received.unwrap();
        assert_eq!(sent.unwrap(), set.wire_digest(transport));
        assert_eq!(digest, set.wire_digest(transport));
        let mut expected = set.clone();
        if transport == Transport::Bf16 {
            for t in expected.tensors.iter_mut().filter(|t| t.dtype == DType::F32) {
                t.data = bf16_to_f32_bytes(&f32_to_bf16_bytes(&t.data));
            }
        }
        assert_eq!(got, expected, "{transport:?}");
        assert_eq!(digests.len(), 3);
    }
}
