//! Tensor streams: round trips (native and bf16), digests, and every refusal naming its tensor.

use fedtalent_protocol::*;

fn sample_set() -> TensorSet {
    let w: Vec<f32> = (0..3 * 4 * 5).map(|i| i as f32 * 0.37 - 7.0).collect();
    let b: Vec<f32> = vec![1.0, -2.5, 3.25];
    TensorSet::new(vec![
        WireTensor::from_f32("conv.weight", vec![3, 4, 5], &w),
        WireTensor::from_f32("conv.bias", vec![3], &b),
        WireTensor { name: "steps".into(), dtype: DType::I64, shape: vec![], data: 42i64.to_le_bytes().to_vec() },
    ])
}

async fn encode(set: &TensorSet, t: Transport) -> (Vec<u8>, String) {
    let mut buf = Vec::new();
    let d = send_tensors(&mut buf, set, t).await.unwrap();
    (buf, d)
}

#[tokio::test]
async fn native_round_trip_with_manifest_and_digest() {
    let set = sample_set();
    let (buf, d) = encode(&set, Transport::Native).await;
    assert_eq!(d, set.digest());
    assert_eq!(d.len(), 64);
    let mut limits = RecvLimits::for_manifest(set.manifest());
    limits.expected_digest = Some(d.clone());
    let (got, gd) = recv_tensors_digest(&mut &buf[..], &limits).await.unwrap();
    assert_eq!(got, set);
    assert_eq!(gd, d);
    // The digest depends on names, shapes and bytes.
    let mut other = set.clone();
    other.tensors[1].data[0] ^= 1;
    assert_ne!(other.digest(), d);
    let mut renamed = set.clone();
    renamed.tensors[1].name = "conv.bias2".into();
    assert_ne!(renamed.digest(), d);
}

#[tokio::test]
async fn bf16_transport_halves_f32_and_widens_back() {
    let set = sample_set();
    let (native, _) = encode(&set, Transport::Native).await;
    let (buf, d) = encode(&set, Transport::Bf16).await;
    assert!(buf.len() < native.len());
    assert_eq!(d, set.wire_digest(Transport::Bf16));
    assert_ne!(d, set.digest());
    let got = recv_tensors(&mut &buf[..], &RecvLimits::for_manifest(set.manifest())).await.unwrap();
    assert_eq!(got.manifest(), set.manifest());
    let w0 = set.tensors[0].to_f32().unwrap();
    let w1 = got.tensors[0].to_f32().unwrap();
    for (a, b) in w0.iter().zip(&w1) {
        assert_eq!(*b, bf16_bits_to_f32(f32_to_bf16_bits(*a)));
        assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
    }
    assert_eq!(got.tensors[1], set.tensors[1]); // exactly representable in bf16
    assert_eq!(got.tensors[2], set.tensors[2]); // i64 travels as is
}

#[tokio::test]
async fn cached_digests_send_the_same_bytes_and_a_stale_one_is_refused() {
    let set = sample_set();
    for transport in [Transport::Native, Transport::Bf16] {
        let (plain, d) = encode(&set, transport).await;
        // Filled by hashing the set once, then reused for two sends (as to two sites).
        let mut digests = TensorDigests::new(transport);
        assert_eq!(set.wire_digest_cached(&mut digests), d);
        assert_eq!(digests.len(), set.len());
        for _ in 0..2 {
            let mut buf = Vec::new();
            assert_eq!(send_tensors_cached(&mut buf, &set, &mut digests).await.unwrap(), d);
            assert_eq!(buf, plain, "{transport:?}");
        }
        // Filled while streaming: a send into an empty cache leaves every digest behind.
        let mut filled = TensorDigests::new(transport);
        let mut buf = Vec::new();
        send_tensors_cached(&mut buf, &set, &mut filled).await.unwrap();
        assert_eq!((buf, filled.len()), (plain, set.len()));
    }
    // The tensors change under the same names but the cache is kept: the receiver, which
    // hashes what arrives, refuses the stream and names the tensor.
    let mut digests = TensorDigests::new(Transport::Native);
    set.wire_digest_cached(&mut digests);
    let mut changed = set.clone();
    changed.tensors[1].data[0] ^= 1;
    let mut buf = Vec::new();
    send_tensors_cached(&mut buf, &changed, &mut digests).await.unwrap();
    let e = refuse(&buf, &RecvLimits::default()).await;
    assert!(matches!(&e, TensorError::TensorDigestMismatch { name } if name == "conv.bias"), "{e}");
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
    // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
    // 1.0078125 + half ulp: ties to even (0x3f82).
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    // Just above half: rounds up.
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
    assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // overflows to inf under RNE
    let bytes = f32_to_bf16_bytes(&1.5f32.to_le_bytes());
    assert_eq!(bf16_to_f32_bytes(&bytes), 1.5f32.to_le_bytes());
}

/// Writes a stream whose header is exactly `entries` (same serde layout as the private header:
/// magic, then (name, dtype, shape, byte_len, widen) per tensor), followed by `body`.
/// (name, dtype, shape, byte_len, widen) of one header entry.
type Entry<'a> = (&'a str, DType, Vec<u64>, u64, bool);

fn raw_stream(entries: Vec<Entry<'_>>, body: &[u8]) -> Vec<u8> {
    // The last field of each entry, `resume_at`: a fresh stream sends every byte.
    let entries: Vec<(String, DType, Vec<u64>, u64, bool, u64)> =
        entries.into_iter().map(|(n, d, s, l, w)| (n.to_string(), d, s, l, w, 0)).collect();
    let payload = bincode::serde::encode_to_vec((0x4654_5431u32, entries), bincode::config::standard()).unwrap();
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&payload);
    out.extend_from_slice(body);
    out
}

async fn refuse(buf: &[u8], limits: &RecvLimits) -> TensorError {
    recv_tensors(&mut &buf[..], limits).await.unwrap_err()
}

#[tokio::test]
async fn corrupted_bytes_are_refused_naming_the_tensor() {
    let set = sample_set();
    let (buf, _) = encode(&set, Transport::Native).await;
    let limits = RecvLimits::default();
    // Flip a byte in the middle of conv.bias's data: header length + conv.weight + 32.
    let header_len = 4 + u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    let pos = header_len + 240 + 32 + 5;
    let mut bad = buf.clone();
    bad[pos] ^= 0x40;
    let e = refuse(&bad, &limits).await;
    assert!(matches!(&e, TensorError::TensorDigestMismatch { name } if name == "conv.bias"), "{e}");
    assert!(e.to_string().contains("conv.bias"));
    // Corrupt the final set digest.
    let mut bad = buf.clone();
    *bad.last_mut().unwrap() ^= 1;
    let e = refuse(&bad, &limits).await;
    assert!(matches!(e, TensorError::DigestMismatch { .. }), "{e}");
    // Announced digest differs from what arrives.
    let l = RecvLimits { expected_digest: Some("00".repeat(32)), ..RecvLimits::default() };
    let e = refuse(&buf, &l).await;
    assert!(matches!(e, TensorError::NotAnnounced { .. }), "{e}");
    // Truncated inside a tensor.
    let e = refuse(&buf[..header_len + 100], &limits).await;
    assert!(matches!(&e, TensorError::Truncated { name, got: 100, expected: 240 } if name == "conv.weight"), "{e}");
    let e = refuse(&buf[..buf.len() - 1], &limits).await;
    assert!(matches!(&e, TensorError::Truncated { name, .. } if name == "<set digest>"), "{e}");
    // Empty stream, random header.
    assert!(matches!(refuse(&[], &limits).await, TensorError::Header(FrameError::Closed)));
    let e = refuse(&[0, 0, 0, 3, 0xff, 0xff, 0xff], &limits).await;
    assert!(matches!(e, TensorError::Header(FrameError::Malformed(_))), "{e}");
}

#[tokio::test]
async fn header_checks_name_the_tensor() {
    let set = sample_set();
    let manifest = set.manifest();
    let strict = RecvLimits::for_manifest(manifest.clone());
    let cases: Vec<(Vec<Entry<'_>>, RecvLimits, &str)> = vec![
        (
            vec![("conv.weight", DType::F32, vec![3, 4, 5], 239, false)],
            RecvLimits::default(),
            "tensor \"conv.weight\": declared byte length 239 does not equal shape × dtype size (Some(240))",
        ),
        (
            vec![("evil.head", DType::F32, vec![3], 12, false)],
            strict.clone(),
            "tensor \"evil.head\" is not expected here",
        ),
        (
            vec![("conv.weight", DType::F32, vec![3, 4, 6], 288, false)],
            strict.clone(),
            "tensor \"conv.weight\": shape [3, 4, 6], expected [3, 4, 5]",
        ),
        (
            vec![("conv.bias", DType::F64, vec![3], 24, false)],
            strict.clone(),
            "tensor \"conv.bias\": dtype F64, expected F32",
        ),
        (
            vec![("conv.bias", DType::F32, vec![3], 12, false)],
            strict.clone(),
            "expected tensor \"conv.weight\" is missing",
        ),
        (
            vec![("a", DType::U8, vec![1], 1, false), ("a", DType::U8, vec![1], 1, false)],
            RecvLimits::default(),
            "tensor \"a\" appears twice",
        ),
        (vec![("huge", DType::F32, vec![1 << 20, 1 << 20], 4 << 40, false)], RecvLimits::default(), "exceeds the cap"),
        (
            vec![("ovf", DType::F32, vec![u64::MAX, 2], 8, false)],
            RecvLimits::default(),
            "tensor \"ovf\": declared byte length 8 does not equal shape × dtype size (None)",
        ),
        (
            vec![("w", DType::F32, vec![2], 8, true)],
            RecvLimits::default(),
            "tensor \"w\": marked for bf16→f32 widening but sent as F32",
        ),
        (vec![("", DType::U8, vec![1], 1, false)], RecvLimits::default(), "name length 0"),
    ];
    for (entries, limits, needle) in cases {
        // No body at all: every refusal must come from the header, before any byte is read.
        let e = refuse(&raw_stream(entries, &[]), &limits).await.to_string();
        assert!(e.contains(needle), "{e:?} does not contain {needle:?}");
    }
    // Widened bf16 counts at f32 size against the cap.
    let l = RecvLimits { max_total_bytes: 10, ..RecvLimits::default() };
    let e = refuse(&raw_stream(vec![("w", DType::BF16, vec![3], 6, true)], &[]), &l).await;
    assert!(matches!(e, TensorError::TooLarge { total: 12, cap: 10 }), "{e}");
    // Too many tensors.
    let l = RecvLimits { max_tensors: 1, ..RecvLimits::default() };
    let e =
        refuse(&raw_stream(vec![("a", DType::U8, vec![1], 1, false), ("b", DType::U8, vec![1], 1, false)], &[]), &l)
            .await;
    assert!(matches!(e, TensorError::TooMany { count: 2, cap: 1 }), "{e}");
    // An oversize header frame.
    let l = RecvLimits { max_header_bytes: 8, ..RecvLimits::default() };
    let e = refuse(&encode(&set, Transport::Native).await.0, &l).await;
    assert!(matches!(e, TensorError::Header(FrameError::TooLarge { .. })), "{e}");
}

#[tokio::test]
async fn sender_refuses_inconsistent_tensor() {
    let mut set = sample_set();
    set.tensors[0].data.pop();
    let mut buf = Vec::new();
    let e = send_tensors(&mut buf, &set, Transport::Native).await.unwrap_err();
    assert!(matches!(&e, TensorError::LengthMismatch { name, .. } if name == "conv.weight"), "{e}");
    assert!(buf.is_empty(), "nothing is sent");
}

/// A buffered writer holds nothing back once `send_tensors` returns: the stream is flushed.
#[tokio::test]
async fn buffered_writer_is_flushed() {
    let set = sample_set();
    let mut w = tokio::io::BufWriter::with_capacity(64 << 10, Vec::new());
    let d = send_tensors(&mut w, &set, Transport::Native).await.unwrap();
    let buf = w.into_inner();
    let (got, gd) = recv_tensors_digest(&mut &buf[..], &RecvLimits::for_manifest(set.manifest())).await.unwrap();
    assert_eq!((got, gd), (set, d));
}
