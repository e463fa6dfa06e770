//! Tensors on the wire.
//!
//! A tensor stream (normally its own QUIC stream) is:
//! 1. a header frame (big-endian `u32` length + bincode of the stream header: per tensor the name,
//!    dtype, shape, byte length, and whether the receiver widens it from bf16 to f32), capped
//!    by [`RecvLimits::max_header_bytes`];
//! 2. for each tensor in header order: its raw little-endian bytes (sent in 1 MiB chunks), then
//!    the 32-byte SHA-256 of those bytes;
//! 3. the 32-byte set digest ([`TensorSet::digest`] of what was sent).
//!
//! The set digest is SHA-256 over `"fedtalent-tensors/1\0"`, the tensor count (u64 LE), each
//! tensor's canonical header (name length u64 LE, name bytes, dtype code u8, rank u64 LE, dims
//! u64 LE, byte length u64 LE) and then each tensor's SHA-256 — so it is computed in one pass
//! over the bytes and a receiver can name the tensor whose bytes were corrupted.
//!
//! The receiver checks every header entry (known name, dtype, shape, byte length =
//! elements × dtype size, total under the cap) before allocating, and both digests before
//! returning anything.
//!
//! Resuming (protocol 5): a receiver whose stream was cut keeps what it received in a
//! [`PartialSet`] bound to the set digest it was announced, and tells the sender on the next
//! try what it [`Held`] (bytes per tensor). Each header entry then says where the sender starts
//! that tensor (`resume_at`): only the bytes after it travel, then the tensor's SHA-256 as
//! always; the receiver hashes the kept prefix with the new bytes, so a tensor is checked whole
//! whichever attempts carried it, and the set digest over everything. Nothing kept is handed
//! out before both digests checked; a digest mismatch drops what was kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode_value, encode_value_frame, read_payload, FrameError};
use crate::MAX_FRAME_BYTES;

/// Size of the chunks the raw bytes are written in.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Longest tensor name accepted.
pub const MAX_NAME_BYTES: usize = 512;
/// Highest rank accepted.
pub const MAX_RANK: usize = 8;
const STREAM_MAGIC: u32 = 0x4654_5431; // "FTT1"
const DIGEST_DOMAIN: &[u8] = b"fedtalent-tensors/1\0";

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }
    /// Stable code used in the digest.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::F64 => 4,
            DType::I64 => 5,
            DType::I32 => 6,
            DType::U8 => 7,
            DType::Bool => 8,
        }
    }
}

pub use fedtalent_vocab::Transport;

/// One tensor: name, dtype, shape and its raw little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// `elements(shape) × dtype size`, or None on overflow.
pub fn byte_len_of(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?.checked_mul(dtype.size() as u64)
}

impl WireTensor {
    /// An f32 tensor from values (stored little-endian).
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> WireTensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        WireTensor { name: name.into(), dtype: DType::F32, shape, data }
    }

    /// The values of an f32 tensor; None for another dtype or a bad byte length.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        if self.dtype != DType::F32 || !self.data.len().is_multiple_of(4) {
            return None;
        }
        Some(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Number of elements given by the shape (None on overflow).
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Whether `data.len()` equals elements × dtype size.
    pub fn is_consistent(&self) -> bool {
        byte_len_of(self.dtype, &self.shape) == Some(self.data.len() as u64)
    }
}

/// Expected tensors: name → (dtype, shape) (dtype as used in memory, i.e. F32 for an f32 tensor
/// sent with bf16 transport).
pub type Manifest = BTreeMap<String, (DType, Vec<u64>)>;

/// An ordered set of tensors (e.g. a model's state dict, or a site's update).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TensorSet {
    pub tensors: Vec<WireTensor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TensorHeader {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    byte_len: u64,
    /// bf16 on the wire, f32 in memory.
    widen_to_f32: bool,
    /// Wire bytes of this tensor the receiver holds from an earlier attempt: the stream carries
    /// only the bytes after them (0: all of them).
    resume_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamHeader {
    magic: u32,
    tensors: Vec<TensorHeader>,
}

fn canonical_header(ctx: &mut Context, name: &str, dtype: DType, shape: &[u64], byte_len: u64) {
    ctx.update(&(name.len() as u64).to_le_bytes());
    ctx.update(name.as_bytes());
    ctx.update(&[dtype.code()]);
    ctx.update(&(shape.len() as u64).to_le_bytes());
    for d in shape {
        ctx.update(&d.to_le_bytes());
    }
    ctx.update(&byte_len.to_le_bytes());
}

fn set_digest_ctx(headers: &[TensorHeader]) -> Context {
    let mut ctx = Context::new(&SHA256);
    ctx.update(DIGEST_DOMAIN);
    ctx.update(&(headers.len() as u64).to_le_bytes());
    for h in headers {
        canonical_header(&mut ctx, &h.name, h.dtype, &h.shape, h.byte_len);
    }
    ctx
}

impl TensorSet {
    pub fn new(tensors: Vec<WireTensor>) -> TensorSet {
        TensorSet { tensors }
    }
    pub fn push(&mut self, t: WireTensor) {
        self.tensors.push(t);
    }
    pub fn get(&self, name: &str) -> Option<&WireTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Sum of the tensors' byte lengths.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }
    /// The manifest (name → dtype, shape) of this set.
    pub fn manifest(&self) -> Manifest {
        self.tensors.iter().map(|t| (t.name.clone(), (t.dtype, t.shape.clone()))).collect()
    }

    /// Hex SHA-256 of the set as it is (see the module docs for the canonical encoding). Names a
    /// model version. Equal to what [`send_tensors`] returns with [`Transport::Native`].
    pub fn digest(&self) -> String {
        self.wire_digest(Transport::Native)
    }

    /// Hex SHA-256 of what [`send_tensors`] sends with `transport` (with bf16 transport, the
    /// digest of the bf16-rounded f32 tensors).
    pub fn wire_digest(&self, transport: Transport) -> String {
        self.wire_digest_cached(&mut TensorDigests::new(transport))
    }

    /// As [`TensorSet::wire_digest`] with the transport of `digests`, hashing only the tensors
    /// not in `digests` (and adding them), so that a later [`send_tensors_cached`] of this set
    /// does not hash the bytes again.
    pub fn wire_digest_cached(&self, digests: &mut TensorDigests) -> String {
        let headers = headers_for(self, digests.transport);
        let mut ctx = set_digest_ctx(&headers);
        let mut buf = Vec::new();
        for (t, h) in self.tensors.iter().zip(&headers) {
            let td = match digests.by_name.get(&t.name) {
                Some(d) => *d,
                None => {
                    let mut tctx = Context::new(&SHA256);
                    if h.widen_to_f32 {
                        for chunk in t.data.chunks(CHUNK_BYTES) {
                            f32_to_bf16_into(chunk, &mut buf);
                            tctx.update(&buf);
                        }
                    } else {
                        tctx.update(&t.data);
                    }
                    digests.insert(&t.name, tctx.finish())
                }
            };
            ctx.update(&td);
        }
        hex::encode(ctx.finish().as_ref())
    }
}

/// The SHA-256 of each tensor's bytes as they travel with one [`Transport`], by tensor name.
///
/// Hashing is most of a sender's work per byte (SHA-256 runs at ~1.8 GB/s a core, AES-GCM at
/// ~4.5 GB/s). A sender that streams the same tensors to several peers (the coordinator's
/// backbone, to every site) or announces a set digest before streaming it (a site's update)
/// keeps one of these so each tensor is hashed once. It must be dropped when the tensors change
/// under the same names (a new model version): a stale entry is not trusted by anyone, since
/// the receiver hashes what arrives and refuses the stream ([`TensorError::TensorDigestMismatch`]).
#[derive(Clone, Debug)]
pub struct TensorDigests {
    transport: Transport,
    by_name: HashMap<String, [u8; 32]>,
}

impl TensorDigests {
    pub fn new(transport: Transport) -> Self {
        TensorDigests { transport, by_name: HashMap::new() }
    }
    pub fn transport(&self) -> Transport {
        self.transport
    }
    /// Number of tensors whose digest is known.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// Adds the digests `other` knows (of the same transport; others are ignored).
    pub fn merge(&mut self, other: TensorDigests) {
        if other.transport == self.transport {
            self.by_name.extend(other.by_name);
        }
    }
    fn insert(&mut self, name: &str, digest: ring::digest::Digest) -> [u8; 32] {
        let d: [u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        self.by_name.insert(name.to_string(), d);
        d
    }
}

fn headers_for(set: &TensorSet, transport: Transport) -> Vec<TensorHeader> {
    set.tensors
        .iter()
        .map(|t| {
            let widen = transport == Transport::Bf16 && t.dtype == DType::F32;
            TensorHeader {
                name: t.name.clone(),
                dtype: if widen { DType::BF16 } else { t.dtype },
                shape: t.shape.clone(),
                byte_len: if widen { t.data.len() as u64 / 2 } else { t.data.len() as u64 },
                widen_to_f32: widen,
                resume_at: 0,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// bf16

/// f32 → bf16 bits, round to nearest, ties to even; NaN stays a (quiet) NaN.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding_bias = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding_bias) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn f32_to_bf16_into(f32_le: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(f32_le.len() / 2);
    for c in f32_le.chunks_exact(4) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        out.extend_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// Little-endian f32 bytes → little-endian bf16 bytes (a trailing partial element is dropped).
pub fn f32_to_bf16_bytes(f32_le: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    f32_to_bf16_into(f32_le, &mut out);
    out
}

/// Little-endian bf16 bytes → little-endian f32 bytes (a trailing odd byte is dropped).
pub fn bf16_to_f32_bytes(bf16_le: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bf16_le.len() * 2);
    for c in bf16_le.chunks_exact(2) {
        out.extend_from_slice(&bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])).to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// errors and limits

/// Why a tensor stream was refused. Every variant about one tensor names it.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor stream header: {0}")]
    Header(#[source] FrameError),
    #[error("tensor stream header: {0}")]
    BadHeader(String),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {name:?} is not expected here")]
    UnknownTensor { name: String },
    #[error("tensor {name:?} appears twice")]
    Duplicate { name: String },
    #[error("expected tensor {name:?} is missing")]
    Missing { name: String },
    #[error("tensor {name:?}: dtype {got:?}, expected {expected:?}")]
    WrongDType { name: String, expected: DType, got: DType },
    #[error("tensor {name:?}: shape {got:?}, expected {expected:?}")]
    WrongShape { name: String, expected: Vec<u64>, got: Vec<u64> },
    #[error("tensor {name:?}: declared byte length {declared} does not equal shape × dtype size ({expected:?})")]
    LengthMismatch { name: String, declared: u64, expected: Option<u64> },
    #[error("tensor payload of {total} bytes exceeds the cap of {cap} bytes")]
    TooLarge { total: u64, cap: u64 },
    #[error("{count} tensors exceed the cap of {cap}")]
    TooMany { count: usize, cap: usize },
    #[error("stream ended inside {name:?}: got {got} of {expected} bytes")]
    Truncated { name: String, got: u64, expected: u64 },
    #[error("tensor {name:?}: SHA-256 of the received bytes does not match the sender's")]
    TensorDigestMismatch { name: String },
    #[error("tensor set digest mismatch: sender says {sent}, received bytes give {computed}")]
    DigestMismatch { sent: String, computed: String },
    #[error("tensor set digest {received} is not the announced {announced}")]
    NotAnnounced { announced: String, received: String },
    #[error("i/o error on the tensor stream: {0}")]
    Io(#[from] std::io::Error),
}

impl TensorError {
    /// Whether the link may be at fault (a stream cut or closed early, bytes corrupted in
    /// transit, an I/O error), so that sending the same set again can succeed. Every other error
    /// is what the sender declared: its header names a tensor, shape, dtype or size that is
    /// refused, and sending it again cannot help.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Header(_)
                | Self::Truncated { .. }
                | Self::TensorDigestMismatch { .. }
                | Self::DigestMismatch { .. }
                | Self::NotAnnounced { .. }
                | Self::Io(_)
        )
    }
}

/// What a receiver accepts.
#[derive(Debug, Clone)]
pub struct RecvLimits {
    /// Cap on the sum of the tensors' sizes in memory (after widening bf16 → f32).
    pub max_total_bytes: u64,
    /// Cap on the number of tensors.
    pub max_tensors: usize,
    /// Cap on the header frame.
    pub max_header_bytes: usize,
    /// If set, every tensor must be listed here with this dtype and shape.
    pub expected: Option<Manifest>,
    /// With `expected`: every tensor of the manifest must be present.
    pub require_all: bool,
    /// If set, the set digest must equal this (e.g. `UpdateHeader::payload_digest`).
    pub expected_digest: Option<String>,
}

impl Default for RecvLimits {
    fn default() -> Self {
        RecvLimits {
            max_total_bytes: 2 << 30,
            max_tensors: 4096,
            max_header_bytes: MAX_FRAME_BYTES,
            expected: None,
            require_all: true,
            expected_digest: None,
        }
    }
}

impl RecvLimits {
    /// Limits expecting exactly the tensors of `manifest`, total capped at its size (+ slack
    /// for nothing: the sizes are exact).
    pub fn for_manifest(manifest: Manifest) -> RecvLimits {
        let total: u64 = manifest
            .values()
            .map(|(d, s)| byte_len_of(*d, s).unwrap_or(u64::MAX))
            .fold(0u64, |a, b| a.saturating_add(b));
        RecvLimits {
            max_total_bytes: total,
            max_tensors: manifest.len(),
            expected: Some(manifest),
            ..RecvLimits::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// send / receive

/// Streams `set` to `w` (header, chunks + per-tensor SHA-256, set digest) and returns the hex
/// set digest of what was sent. Does not finish/close the stream. Refuses (before sending
/// anything) a tensor whose byte length does not match its shape.
pub async fn send_tensors<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    set: &TensorSet,
    transport: Transport,
) -> Result<String, TensorError> {
    send_tensors_cached(w, set, &mut TensorDigests::new(transport)).await
}

/// As [`send_tensors`] with the transport of `digests`: tensors whose digest `digests` knows
/// are streamed without being hashed again; the others are hashed as they stream and added.
pub async fn send_tensors_cached<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    set: &TensorSet,
    digests: &mut TensorDigests,
) -> Result<String, TensorError> {
    Ok(send_tensors_resumed(w, set, digests, &Held::default()).await?.digest)
}

/// As [`send_tensors_cached`], each tensor only from where the receiver's `held` copy ends (a
/// resumed transfer, see the module docs). Returns the set digest and the tensor bytes sent.
pub async fn send_tensors_resumed<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    set: &TensorSet,
    digests: &mut TensorDigests,
    held: &Held,
) -> Result<Sent, TensorError> {
    let sent = stream_tensors(&mut WriterSink(&mut *w), TensorSource::Borrowed(set), digests, held).await?;
    // A buffered writer must not keep the stream's tail.
    w.flush().await?;
    Ok(sent)
}

/// The tensors to stream: borrowed (their bytes are copied into the writer) or shared (a QUIC
/// stream keeps references to the chunks until they are acknowledged; nothing is copied).
pub(crate) enum TensorSource<'a> {
    Borrowed(&'a TensorSet),
    Shared(Arc<TensorSet>),
}

impl TensorSource<'_> {
    fn set(&self) -> &TensorSet {
        match self {
            TensorSource::Borrowed(set) => set,
            TensorSource::Shared(set) => set,
        }
    }
}

/// The bytes of tensor `index` of a shared set, as a [`Bytes`] owner.
struct SharedTensorBytes {
    set: Arc<TensorSet>,
    index: usize,
}

impl AsRef<[u8]> for SharedTensorBytes {
    fn as_ref(&self) -> &[u8] {
        &self.set.tensors[self.index].data
    }
}

/// Where a tensor stream goes.
pub(crate) trait TensorSink {
    /// Writes bytes that the caller keeps.
    async fn put_slice(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Writes bytes that the sink may keep without copying.
    async fn put_shared(&mut self, bytes: Bytes) -> std::io::Result<()>;
}

/// Any byte writer (a file, a buffer, a TCP or QUIC stream through `AsyncWrite`).
struct WriterSink<'a, W: ?Sized>(&'a mut W);

impl<W: AsyncWrite + Unpin + ?Sized> TensorSink for WriterSink<'_, W> {
    async fn put_slice(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes).await
    }
    async fn put_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.0.write_all(&bytes).await
    }
}

/// What a tensor stream carried: the set digest, and how many tensor bytes travelled (less than
/// the set's wire size when the receiver held some from an earlier attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub digest: String,
    pub bytes: u64,
}

/// Streams the tensors of `source` into `sink`: header, chunks + per-tensor SHA-256, set digest
/// (see the module docs), each tensor from where `held` says the receiver's copy ends.
pub(crate) async fn stream_tensors<S: TensorSink>(
    sink: &mut S,
    source: TensorSource<'_>,
    digests: &mut TensorDigests,
    held: &Held,
) -> Result<Sent, TensorError> {
    let set = source.set();
    for t in &set.tensors {
        if !t.is_consistent() {
            return Err(TensorError::LengthMismatch {
                name: t.name.clone(),
                declared: t.data.len() as u64,
                expected: byte_len_of(t.dtype, &t.shape),
            });
        }
    }
    let mut headers = headers_for(set, digests.transport);
    for h in &mut headers {
        // An offset past the tensor is not what this sender sent: all of it goes again.
        h.resume_at = held.of(&h.name).filter(|&at| at <= h.byte_len).unwrap_or(0);
    }
    let header = StreamHeader { magic: STREAM_MAGIC, tensors: headers };
    sink.put_shared(Bytes::from(encode_value_frame(&header, usize::MAX >> 1).map_err(TensorError::Header)?)).await?;
    let mut ctx = set_digest_ctx(&header.tensors);
    let mut bytes = 0;
    for (index, (t, h)) in set.tensors.iter().zip(&header.tensors).enumerate() {
        let known = digests.by_name.get(&t.name).copied();
        let td = match known {
            // Held whole and hashed before: only its digest travels.
            Some(td) if h.resume_at == h.byte_len => td,
            _ => {
                let (hashed, n) = stream_tensor(sink, &source, index, h, known.is_none()).await?;
                bytes += n;
                match hashed {
                    Some(d) => digests.insert(&t.name, d),
                    None => known.expect("a tensor is hashed unless its digest is known"),
                }
            }
        };
        sink.put_slice(&td).await?;
        ctx.update(&td);
    }
    let d = ctx.finish();
    sink.put_slice(d.as_ref()).await?;
    Ok(Sent { digest: hex::encode(d.as_ref()), bytes })
}

/// Streams the wire bytes of tensor `index` after `h.resume_at` (hashing all of them when
/// `hash`); returns the digest if hashed and the bytes sent.
async fn stream_tensor<S: TensorSink>(
    sink: &mut S,
    source: &TensorSource<'_>,
    index: usize,
    h: &TensorHeader,
    hash: bool,
) -> Result<(Option<ring::digest::Digest>, u64), TensorError> {
    let t = &source.set().tensors[index];
    let mut tctx = hash.then(|| Context::new(&SHA256));
    let shared = match source {
        TensorSource::Shared(set) if !h.widen_to_f32 => {
            Some(Bytes::from_owner(SharedTensorBytes { set: set.clone(), index }))
        }
        _ => None,
    };
    // Wire bytes per in-memory byte: bf16 transport halves an f32 tensor.
    let ratio = if h.widen_to_f32 { 2 } else { 1 };
    let skip = h.resume_at as usize;
    let mut sent = 0u64;
    for start in (0..t.data.len()).step_by(CHUNK_BYTES) {
        let end = (start + CHUNK_BYTES).min(t.data.len());
        let (wire_start, wire_end) = (start / ratio, end / ratio);
        if tctx.is_none() && wire_end <= skip {
            continue; // held by the receiver, and its digest is known
        }
        let from = skip.clamp(wire_start, wire_end) - wire_start;
        let chunk = &t.data[start..end];
        if h.widen_to_f32 {
            let bf16 = Bytes::from(f32_to_bf16_bytes(chunk));
            if let Some(tctx) = tctx.as_mut() {
                tctx.update(&bf16);
            }
            if from < bf16.len() {
                sink.put_shared(bf16.slice(from..)).await?;
            }
        } else {
            if let Some(tctx) = tctx.as_mut() {
                tctx.update(chunk);
            }
            if from < chunk.len() {
                match &shared {
                    Some(bytes) => sink.put_shared(bytes.slice(start + from..end)).await?,
                    None => sink.put_slice(&chunk[from..]).await?,
                }
            }
        }
        sent += (wire_end - wire_start - from) as u64;
    }
    Ok((tctx.map(Context::finish), sent))
}

/// Receives a tensor stream, checks it against `limits` and both digests, and returns the
/// tensors (bf16-transported ones widened back to f32).
pub async fn recv_tensors<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &RecvLimits,
) -> Result<TensorSet, TensorError> {
    recv_tensors_digest(r, limits).await.map(|(s, _)| s)
}

fn validate_headers(headers: &[TensorHeader], limits: &RecvLimits) -> Result<(), TensorError> {
    if headers.len() > limits.max_tensors {
        return Err(TensorError::TooMany { count: headers.len(), cap: limits.max_tensors });
    }
    let mut seen = HashSet::with_capacity(headers.len());
    let mut total: u64 = 0;
    for h in headers {
        let bad = |reason: String| TensorError::BadTensor { name: h.name.clone(), reason };
        if h.name.is_empty() || h.name.len() > MAX_NAME_BYTES {
            return Err(bad(format!("name length {} outside 1..={MAX_NAME_BYTES}", h.name.len())));
        }
        if h.shape.len() > MAX_RANK {
            return Err(bad(format!("rank {} above {MAX_RANK}", h.shape.len())));
        }
        if h.widen_to_f32 && h.dtype != DType::BF16 {
            return Err(bad(format!("marked for bf16→f32 widening but sent as {:?}", h.dtype)));
        }
        if !seen.insert(h.name.as_str()) {
            return Err(TensorError::Duplicate { name: h.name.clone() });
        }
        let expected_len = byte_len_of(h.dtype, &h.shape);
        if expected_len != Some(h.byte_len) {
            return Err(TensorError::LengthMismatch {
                name: h.name.clone(),
                declared: h.byte_len,
                expected: expected_len,
            });
        }
        let mem_dtype = if h.widen_to_f32 { DType::F32 } else { h.dtype };
        if let Some(m) = &limits.expected {
            let Some((dt, shape)) = m.get(&h.name) else {
                return Err(TensorError::UnknownTensor { name: h.name.clone() });
            };
            if *dt != mem_dtype {
                return Err(TensorError::WrongDType { name: h.name.clone(), expected: *dt, got: mem_dtype });
            }
            if *shape != h.shape {
                return Err(TensorError::WrongShape {
                    name: h.name.clone(),
                    expected: shape.clone(),
                    got: h.shape.clone(),
                });
            }
        }
        let mem = if h.widen_to_f32 { h.byte_len.saturating_mul(2) } else { h.byte_len };
        total = total.saturating_add(mem);
        if total > limits.max_total_bytes {
            return Err(TensorError::TooLarge { total, cap: limits.max_total_bytes });
        }
    }
    if let (Some(m), true) = (&limits.expected, limits.require_all) {
        if let Some(missing) = m.keys().find(|k| !seen.contains(k.as_str())) {
            return Err(TensorError::Missing { name: missing.clone() });
        }
    }
    Ok(())
}

async fn read_exact_named<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    name: &str,
) -> Result<(), TensorError> {
    let mut got = 0usize;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(TensorError::Truncated { name: name.to_string(), got: got as u64, expected: buf.len() as u64 });
        }
        got += n;
    }
    Ok(())
}

/// As [`recv_tensors`], also returning the hex set digest of what was received (the sender's
/// [`TensorSet::wire_digest`]).
pub async fn recv_tensors_digest<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &RecvLimits,
) -> Result<(TensorSet, String), TensorError> {
    let received = recv_tensors_resumable(r, limits, &mut PartialSet::default()).await?;
    Ok((received.set, received.digest))
}

/// What a receiver holds of a tensor set from an interrupted transfer: wire bytes per tensor
/// name. It travels in the next request for the set ([`crate::ModelRequest::held`],
/// [`crate::Message::Resume`]); the sender starts each tensor there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub tensors: Vec<(String, u64)>,
}

impl Held {
    /// The bytes held of tensor `name`, if any.
    pub fn of(&self, name: &str) -> Option<u64> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, b)| *b)
    }
    /// Bytes held in all.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, b)| b).sum()
    }
}

/// What a receiver kept of a tensor set whose transfer was cut, to resume it: the received wire
/// bytes of each tensor, bound to the set digest the transfer was announced with (its key).
/// Bounded by the receive limits of the transfer (only tensors of an accepted header are kept,
/// at most their declared length); a new key, a digest mismatch or a completed transfer empties
/// it. Nothing in it is used before the whole set's digests checked.
#[derive(Debug, Default)]
pub struct PartialSet {
    /// The announced set digest the kept bytes belong to.
    key: Option<String>,
    tensors: HashMap<String, KeptTensor>,
    /// Tensor bytes received over every attempt of this transfer.
    received: u64,
    attempts: u32,
}

#[derive(Debug, Default)]
struct KeptTensor {
    /// Wire bytes received, from the tensor's start.
    data: Vec<u8>,
    /// Its SHA-256, once the whole tensor arrived and matched the sender's.
    checked: Option<[u8; 32]>,
}

impl PartialSet {
    /// What is held, for the sender of the transfer announced as `digest` (nothing for another).
    pub fn held(&self, digest: &str) -> Held {
        if self.key.as_deref() != Some(digest) {
            return Held::default();
        }
        let mut tensors: Vec<(String, u64)> = self
            .tensors
            .iter()
            .filter(|(_, t)| !t.data.is_empty())
            .map(|(n, t)| (n.clone(), t.data.len() as u64))
            .collect();
        tensors.sort();
        Held { tensors }
    }

    /// Bytes kept in all.
    pub fn kept_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.data.len() as u64).sum()
    }

    /// The announced digest of the transfer kept, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    pub fn clear(&mut self) {
        *self = PartialSet::default();
    }

    /// Starts an attempt of the transfer announced as `key`: what was kept of another is dropped.
    fn begin(&mut self, key: Option<&str>) {
        if key.is_none() || self.key.as_deref() != key {
            self.clear();
            self.key = key.map(str::to_string);
        }
        self.attempts += 1;
    }
}

/// A tensor set received whole and checked, and what its transfer cost.
#[derive(Debug)]
pub struct Received {
    pub set: TensorSet,
    /// Its set digest.
    pub digest: String,
    /// Wire bytes of its tensors.
    pub wire_bytes: u64,
    /// Tensor bytes received over every attempt (more than `wire_bytes` when a cut attempt's
    /// bytes were not all kept, e.g. a tensor that failed its digest).
    pub received_bytes: u64,
    /// Attempts it took (1: no cut).
    pub attempts: u32,
}

/// As [`recv_tensors_digest`], resuming the transfer kept in `partial` when `limits` announces
/// the same set digest (the sender must have been told [`PartialSet::held`]). A cut leaves what
/// arrived in `partial` for the next attempt; a digest mismatch drops it; success empties it.
/// Without an announced digest nothing is kept across attempts (there is no key to bind it to).
pub async fn recv_tensors_resumable<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &RecvLimits,
    partial: &mut PartialSet,
) -> Result<Received, TensorError> {
    partial.begin(limits.expected_digest.as_deref());
    let result = recv_into(r, limits, partial).await;
    match &result {
        Ok(_) => partial.clear(),
        Err(e) if !matches!(e, TensorError::Truncated { .. } | TensorError::Io(_) | TensorError::Header(_)) => {
            partial.clear()
        }
        Err(_) if partial.key.is_none() => partial.clear(),
        Err(_) => {}
    }
    result
}

async fn recv_into<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &RecvLimits,
    partial: &mut PartialSet,
) -> Result<Received, TensorError> {
    let payload = read_payload(r, limits.max_header_bytes)
        .await
        .map_err(TensorError::Header)?
        .ok_or(TensorError::Header(FrameError::Closed))?;
    let header: StreamHeader = decode_value(&payload).map_err(TensorError::Header)?;
    drop(payload);
    if header.magic != STREAM_MAGIC {
        return Err(TensorError::BadHeader(format!("bad magic {:#010x}", header.magic)));
    }
    validate_headers(&header.tensors, limits)?;
    // Only the tensors of this (accepted) header are kept, each from where the sender resumes.
    partial.tensors.retain(|name, _| header.tensors.iter().any(|h| &h.name == name));
    for h in &header.tensors {
        let kept = partial.tensors.entry(h.name.clone()).or_default();
        if h.resume_at == 0 {
            *kept = KeptTensor::default();
        } else if h.resume_at != kept.data.len() as u64 || h.resume_at > h.byte_len {
            return Err(TensorError::BadTensor {
                name: h.name.clone(),
                reason: format!("the sender resumes at byte {} but {} are held", h.resume_at, kept.data.len()),
            });
        }
    }

    let mut ctx = set_digest_ctx(&header.tensors);
    let mut buf = vec![0u8; CHUNK_BYTES];
    for h in &header.tensors {
        let kept = partial.tensors.get_mut(&h.name).expect("every header tensor has an entry");
        let mut tctx = Context::new(&SHA256);
        if kept.checked.is_none() {
            tctx.update(&kept.data);
        }
        kept.data.reserve_exact(h.byte_len as usize - kept.data.len());
        while (kept.data.len() as u64) < h.byte_len {
            let want = (h.byte_len as usize - kept.data.len()).min(CHUNK_BYTES);
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(TensorError::Truncated {
                    name: h.name.clone(),
                    got: kept.data.len() as u64,
                    expected: h.byte_len,
                });
            }
            tctx.update(&buf[..n]);
            kept.data.extend_from_slice(&buf[..n]);
            partial.received += n as u64;
        }
        let mut sent = [0u8; 32];
        read_exact_named(r, &mut sent, &format!("{} (its SHA-256)", h.name)).await?;
        let td: [u8; 32] = match kept.checked {
            Some(td) => td,
            None => tctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes"),
        };
        if td != sent {
            return Err(TensorError::TensorDigestMismatch { name: h.name.clone() });
        }
        kept.checked = Some(td);
        ctx.update(&td);
    }
    let mut sent = [0u8; 32];
    read_exact_named(r, &mut sent, "<set digest>").await?;
    let computed = hex::encode(ctx.finish().as_ref());
    let sent = hex::encode(sent);
    if computed != sent {
        return Err(TensorError::DigestMismatch { sent, computed });
    }
    if let Some(announced) = &limits.expected_digest {
        if !announced.eq_ignore_ascii_case(&computed) {
            return Err(TensorError::NotAnnounced { announced: announced.clone(), received: computed });
        }
    }
    let wire_bytes = header.tensors.iter().map(|h| h.byte_len).sum();
    let set = TensorSet {
        tensors: header
            .tensors
            .into_iter()
            .map(|h| {
                let data = partial.tensors.remove(&h.name).map(|k| k.data).unwrap_or_default();
                if h.widen_to_f32 {
                    WireTensor { name: h.name, dtype: DType::F32, shape: h.shape, data: bf16_to_f32_bytes(&data) }
                } else {
                    WireTensor { name: h.name, dtype: h.dtype, shape: h.shape, data }
                }
            })
            .collect(),
    };
    Ok(Received { set, digest: computed, wire_bytes, received_bytes: partial.received, attempts: partial.attempts })
}
