//! Frame and message decoding: round trips, caps, truncation, version mismatch, random bytes.

use fedtalent_protocol::*;

pub fn sample_messages() -> Vec<Message> {
    let plan = Plan {
        preset: "unet".into(),
        rounds: 100,
        local_steps: 250,
        batch: 2,
        lr: Some(0.01),
        optimizer: fedtalent_vocab::LocalOptimizer::Adam,
        eval_every: 5,
        min_sites: 2,
        round_deadline_s: 3600,
        dice_mode: DiceMode::PerSample,
        transport: Transport::Bf16,
        max_update_norm: 1e4,
        per_site_decoders: false,
        site_encoder_stages: 0,
        local: LocalPolicy::default(),
        server: ServerOptimizer { lr: 1.5, momentum: 0.9 },
        init_model: Some("m".into()),
        init_normalization: fedtalent_vocab::InitNormalization::Sites,
        input_channels: fedtalent_vocab::InputChannels::named(["T1", "T2"]),
        privacy: None,
    };
    vec![
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            site: "alpha".into(),
            classes: vec![ClassRegion { name: "liver".into(), labels: vec![1, 2] }],
            n_train: 80,
            n_val: 20,
            hu_histogram: HuHistogram { min_hu: -1024, counts: vec![1, 2, 3] },
            device: "cuda:0".into(),
            channels: fedtalent_vocab::InputChannels::ct(),
            exclusive_classes: true,
        }),
        Message::Welcome(Welcome {
            federation: "fed".into(),
            plan,
            classes: vec![GlobalClass::new(1, "alpha", &ClassRegion { name: "liver".into(), labels: vec![1, 2] })],
            normalization: CtNormalization { clip_low: -100.0, clip_high: 300.0, mean: 90.0, std: 50.0 },
            current_round: 3,
        }),
        Message::RoundStart(RoundStart {
            round: 4,
            model_digest: "ab".repeat(32),
            local_steps: 250,
            step_offset: 1000,
            total_steps: 25000,
            evaluate: true,
            secagg: Some(SecAggRound { id: 2, threshold: 2 }),
        }),
        Message::SecAgg(SecAggRequest {
            round: 4,
            stage: SecAggStage::Keys(AdvertiseKeys { id: 2, c_pk: [1; 32], s_pk: [2; 32] }),
        }),
        Message::SecAggReply(SecAggReply::Unmasking { survivors: vec![1, 2], dropped: vec![3] }),
        Message::ModelRequest(ModelRequest { digest: "cd".repeat(32), full: false, held: Default::default() }),
        Message::ModelRequest(ModelRequest {
            digest: "cd".repeat(32),
            full: false,
            held: Held { tensors: vec![("a.weight".into(), 4096), ("b.bias".into(), 12)] },
        }),
        Message::Resume(Held { tensors: vec![("a.weight".into(), 1 << 20)] }),
        Message::UpdateHeader(UpdateHeader {
            round: 4,
            n_cases: 80,
            train_loss: 0.5,
            dice: vec![("alpha/liver".into(), 0.9)],
            payload_digest: "ef".repeat(32),
            durations_ms: PhaseTimings { download: 12, evaluate: 0, train: 1234 },
            resume: false,
        }),
        Message::Ack(Ack { round: 4, refusal: Some(Refusal::new(ErrorKind::LateUpdate, "late")) }),
        Message::Ack(Ack { round: 5, refusal: None }),
        Message::refusal(ErrorKind::BadUpdate, "tensor x: NaN"),
        Message::Finished(Finished { rounds: 5, model_digest: "12".repeat(32) }),
        Message::Heartbeat,
        Message::Admin(AdminRequest::Launch { rounds: Some(3) }),
        Message::Admin(AdminRequest::Export { dir: "/tmp/x".into() }),
        Message::AdminReply(AdminReply::Status(StatusReport {
            federation: "fed".into(),
            current_round: 2,
            total_rounds: 5,
            running: true,
            model_digest: "00".into(),
            sites: vec![SiteStatus {
                site: "alpha".into(),
                connected: true,
                transport: Some(fedtalent_protocol::ConnKind::Tcp),
                allowed: true,
                last_round: Some(1),
                n_cases: 80,
                last_train_loss: Some(0.3),
            }],
            dice: vec![],
        })),
    ]
}

#[test]
fn every_message_round_trips() {
    for m in sample_messages() {
        let f = encode_frame(&m, MAX_FRAME_BYTES).unwrap();
        assert_eq!(decode_frame(&f, MAX_FRAME_BYTES).unwrap(), m);
    }
}

#[tokio::test]
async fn async_frames_round_trip_and_end_cleanly() {
    let mut buf = Vec::new();
    for m in sample_messages() {
        write_frame(&mut buf, &m).await.unwrap();
    }
    let mut r = &buf[..];
    for m in sample_messages() {
        assert_eq!(read_frame(&mut r, MAX_FRAME_BYTES).await.unwrap(), m);
    }
    assert!(matches!(read_frame(&mut r, MAX_FRAME_BYTES).await, Err(FrameError::Closed)));
}

#[tokio::test]
async fn oversize_frame_is_refused_before_reading_the_payload() {
    // Header claims 4 GiB - 1 and nothing follows: the cap must fire, not a truncation or an
    // allocation of 4 GiB.
    let buf = u32::MAX.to_be_bytes();
    let e = read_frame(&mut &buf[..], MAX_FRAME_BYTES).await.unwrap_err();
    assert!(
        matches!(e, FrameError::TooLarge { size, cap } if size == u32::MAX as u64 && cap == MAX_FRAME_BYTES),
        "{e}"
    );
    assert_eq!(e.to_string(), format!("frame of {} bytes exceeds the cap of 1048576 bytes", u32::MAX));
    let e = decode_frame(&buf, MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
    // The sender refuses too.
    let big = Message::refusal(ErrorKind::Internal, "x".repeat(MAX_FRAME_BYTES));
    let e = write_frame(&mut Vec::new(), &big).await.unwrap_err();
    assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
    // A smaller cap applies.
    let f = encode_frame(&Message::Heartbeat, MAX_FRAME_BYTES).unwrap();
    assert!(decode_frame(&f, 0).is_err());
}

#[tokio::test]
async fn truncated_frames_are_refused() {
    let f = encode_frame(&sample_messages()[0], MAX_FRAME_BYTES).unwrap();
    for cut in [1, 3, 4, 10, f.len() - 1] {
        let e = read_frame(&mut &f[..cut], MAX_FRAME_BYTES).await.unwrap_err();
        assert!(matches!(e, FrameError::Truncated { .. }), "cut {cut}: {e}");
        let e = decode_frame(&f[..cut], MAX_FRAME_BYTES).unwrap_err();
        assert!(matches!(e, FrameError::Truncated { .. }), "cut {cut}: {e}");
    }
    // A frame whose declared length covers a payload that is itself cut short.
    let payload = encode_payload(&sample_messages()[1]).unwrap();
    let cut = &payload[..payload.len() / 2];
    let mut f = (cut.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(cut);
    let e = decode_frame(&f, MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(e, FrameError::Malformed(_)), "{e}");
    // Trailing bytes inside a frame.
    let mut payload = encode_payload(&Message::Heartbeat).unwrap();
    payload.push(0);
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&payload);
    let e = decode_frame(&f, MAX_FRAME_BYTES).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");
}

#[test]
fn old_or_new_protocol_version_is_refused() {
    let mut hello = sample_messages().remove(0);
    if let Message::Hello(Hello { protocol_version, .. }) = &mut hello {
        *protocol_version = 0;
    }
    let f = encode_frame(&hello, MAX_FRAME_BYTES).unwrap();
    let e = decode_frame(&f, MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(e, FrameError::VersionMismatch { got: 0, expected: PROTOCOL_VERSION }), "{e}");
    // A Hello of a future version whose layout differs is still recognised as a version mismatch.
    let future = bincode::serde::encode_to_vec(
        (0u32, 7u32, "something else entirely", [1.5f64; 3]),
        bincode::config::standard(),
    )
    .unwrap();
    let e = decode_payload(&future).unwrap_err();
    assert!(matches!(e, FrameError::VersionMismatch { got: 7, .. }), "{e}");
    assert!(e.to_string().contains("version 7"), "{e}");
}

/// xorshift64*: deterministic pseudo-random bytes without extra dependencies.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Stable-Rust stand-in for the cargo-fuzz target: random bytes and mutated valid frames must
/// give an error or a message that re-encodes to the same bytes — never a panic.
#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid: Vec<Vec<u8>> = sample_messages().iter().map(|m| encode_frame(m, MAX_FRAME_BYTES).unwrap()).collect();
    let mut decoded_ok = 0;
    for i in 0..200_000u32 {
        let input = if i % 2 == 0 {
            let n = (rng.next_u64() % 300) as usize;
            let mut b = rng.bytes(n);
            if n >= 4 && i % 4 == 0 {
                // Plausible length prefix so the decoder gets past the framing.
                b[..4].copy_from_slice(&((n - 4) as u32).to_be_bytes());
            }
            b
        } else {
            let mut b = valid[(rng.next_u64() as usize) % valid.len()].clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let pos = 4 + (rng.next_u64() as usize) % (b.len() - 4);
                b[pos] = rng.next_u64() as u8;
            }
            b
        };
        match decode_frame(&input, MAX_FRAME_BYTES) {
            Ok(m) => {
                decoded_ok += 1;
                // Canonical: what decodes re-encodes to a frame that decodes to the same message.
                let again = encode_frame(&m, MAX_FRAME_BYTES).unwrap();
                let m2 = decode_frame(&again, MAX_FRAME_BYTES).unwrap();
                assert!(m == m2 || format!("{m:?}").contains("NaN"), "{m:?} != {m2:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    assert!(decoded_ok > 100, "mutations should sometimes still decode ({decoded_ok})");
}
