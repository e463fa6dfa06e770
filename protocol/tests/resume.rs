//! Resumable tensor streams (protocol 5): a stream cut anywhere resumes from what the receiver
//! kept, only the rest travels, and nothing kept is handed out before both digests checked.

use fedtalent_protocol::*;

/// Three tensors of 300 KiB, 1 MiB + 12 bytes (two chunks) and 4 bytes, pseudo-random.
fn model() -> TensorSet {
    let mut x = 0x2545_f491u32;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    };
    TensorSet::new(vec![
        WireTensor::from_f32("a.weight", vec![75, 1024], &values(75 * 1024)),
        WireTensor::from_f32("b.weight", vec![(1 << 18) + 3], &values((1 << 18) + 3)),
        WireTensor::from_f32("c.bias", vec![1], &values(1)),
    ])
}

/// The stream of `set` as sent to a receiver holding `held`, and the tensor bytes it carries.
async fn stream(set: &TensorSet, transport: Transport, held: &Held) -> (Vec<u8>, Sent) {
    let mut buf = Vec::new();
    let sent = send_tensors_resumed(&mut buf, set, &mut TensorDigests::new(transport), held).await.unwrap();
    (buf, sent)
}

fn limits(set: &TensorSet, digest: &str) -> RecvLimits {
    RecvLimits { expected_digest: Some(digest.to_string()), ..RecvLimits::for_manifest(set.manifest()) }
}

/// Cuts the stream of `set` after `cut` bytes, then resumes it: the set arrives whole, and the
/// resumed stream carries only the tensor bytes the receiver had not kept.
async fn cut_and_resume(transport: Transport, cut: usize) {
    let set = model();
    let digest = set.wire_digest(transport);
    let limits = limits(&set, &digest);
    let (full, first) = stream(&set, transport, &Held::default()).await;
    assert!(cut < full.len());
    let mut partial = PartialSet::default();
    let e = recv_tensors_resumable(&mut &full[..cut], &limits, &mut partial).await.unwrap_err();
    assert!(e.is_transport(), "cut at {cut}: {e}");
    let held = partial.held(&digest);
    assert_eq!(held.bytes(), partial.kept_bytes());
    assert!(partial.held("another digest").tensors.is_empty(), "what is held belongs to its transfer only");
    let (rest, resumed) = stream(&set, transport, &held).await;
    assert_eq!(resumed.digest, digest);
    assert_eq!(resumed.bytes, first.bytes - held.bytes(), "cut at {cut}: only the rest travels");
    let got = recv_tensors_resumable(&mut &rest[..], &limits, &mut partial).await.unwrap();
    assert_eq!(got.digest, digest);
    assert_eq!((got.attempts, got.wire_bytes), (2, first.bytes));
    assert_eq!(got.received_bytes, first.bytes, "cut at {cut}: every byte received once");
    let expected = match transport {
        Transport::Native => set,
        Transport::Bf16 => recv_tensors(&mut &full[..], &limits).await.unwrap(),
    };
    assert_eq!(got.set, expected);
    assert_eq!(partial.kept_bytes(), 0, "a completed transfer keeps nothing");
}

#[tokio::test]
async fn a_stream_cut_anywhere_resumes_from_what_was_kept() {
    let (full, _) = stream(&model(), Transport::Native, &Held::default()).await;
    // In the header, inside the first tensor, on its digest, inside the second, on either side
    // of the second's chunk boundary (112 bytes before the end: its last 12 bytes, then four
    // digests and the 4-byte third tensor), just before the set digest, inside it.
    let end = full.len();
    for cut in [10, 5_000, 300 * 1024 + 150, 600_000, end - 200, end - 105, end - 40, end - 1] {
        cut_and_resume(Transport::Native, cut).await;
    }
    for cut in [2_000, 300_000, 600_000] {
        cut_and_resume(Transport::Bf16, cut).await;
    }
}

#[tokio::test]
async fn a_corrupted_kept_tensor_fails_its_digest_and_nothing_is_kept() {
    let set = model();
    let digest = set.digest();
    let limits = limits(&set, &digest);
    let (mut full, _) = stream(&set, Transport::Native, &Held::default()).await;
    // A byte flipped in the first tensor, then the stream cut in the second.
    full[200] ^= 0x40;
    let mut partial = PartialSet::default();
    let e = recv_tensors_resumable(&mut &full[..600_000], &limits, &mut partial).await.unwrap_err();
    assert!(matches!(e, TensorError::TensorDigestMismatch { ref name } if name == "a.weight"), "{e}");
    assert_eq!(partial.kept_bytes(), 0, "a digest mismatch drops what was kept");
    // A flip in the second tensor after a cut inside it: caught when the resumed tensor ends.
    let (mut full, _) = stream(&set, Transport::Native, &Held::default()).await;
    full[700_000] ^= 1;
    let e = recv_tensors_resumable(&mut &full[..800_000], &limits, &mut partial).await.unwrap_err();
    assert!(e.is_transport());
    let (rest, _) = stream(&set, Transport::Native, &partial.held(&digest)).await;
    let e = recv_tensors_resumable(&mut &rest[..], &limits, &mut partial).await.unwrap_err();
    assert!(matches!(e, TensorError::TensorDigestMismatch { ref name } if name == "b.weight"), "{e}");
    assert_eq!(partial.kept_bytes(), 0);
}

#[tokio::test]
async fn kept_bytes_of_another_set_are_never_resumed() {
    let set = model();
    let digest = set.digest();
    let (full, _) = stream(&set, Transport::Native, &Held::default()).await;
    let mut partial = PartialSet::default();
    recv_tensors_resumable(&mut &full[..700_000], &limits(&set, &digest), &mut partial).await.unwrap_err();
    assert!(partial.kept_bytes() > 0);
    // The next round's model: another announced digest, nothing of the old one is used.
    let mut next = model();
    next.tensors[0].data[0] ^= 1;
    let next_digest = next.digest();
    assert!(partial.held(&next_digest).tensors.is_empty());
    let (next_full, _) = stream(&next, Transport::Native, &Held::default()).await;
    let got = recv_tensors_resumable(&mut &next_full[..], &limits(&next, &next_digest), &mut partial).await.unwrap();
    assert_eq!((got.set, got.attempts), (next, 1));
    // A sender resuming where the receiver holds nothing is refused by name.
    let held = Held { tensors: vec![("b.weight".into(), 100)] };
    let (bogus, _) = stream(&set, Transport::Native, &held).await;
    let e = recv_tensors_resumable(&mut &bogus[..], &limits(&set, &digest), &mut partial).await.unwrap_err();
    assert!(matches!(e, TensorError::BadTensor { ref name, .. } if name == "b.weight"), "{e}");
}
