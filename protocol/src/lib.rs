//! fedtalent wire format (DESIGN.md §2.3).
//!
//! * [`messages`]: the control messages of a federation ([`Message`]), serde + bincode 2.
//! * [`frame`]: each control message travels as one frame, a big-endian `u32` length followed by
//!   the bincode payload; the length is checked against a cap (default [`MAX_FRAME_BYTES`])
//!   before anything is allocated.
//! * [`tensor`]: tensors travel on their own QUIC stream as a header frame (names, dtypes,
//!   shapes, byte lengths), then the raw little-endian bytes of each tensor followed by its
//!   SHA-256, then the SHA-256 of the whole set ([`TensorSet::digest`]), which names a model
//!   version. Optional bf16 transport of f32 tensors. A cut transfer resumes from what the
//!   receiver kept and checked ([`PartialSet`], [`Held`]).
//! * [`conn`]: one connection type over both transports (QUIC, and TLS over TCP where UDP is
//!   blocked), and framed request/response over it; [`quic`]: QUIC-only helpers.
//! * [`tcp`]: request streams over one TLS-over-TCP connection (a minimal multiplexer).

pub mod conn;
pub mod frame;
pub mod messages;
pub mod quic;
pub mod tcp;
pub mod tensor;

pub use conn::{dial, ConnKind, Connection, Dial, DialError, Dialed, RecvStream, SendStream, TransportChoice};
pub use frame::{
    decode_frame, decode_payload, encode_frame, encode_payload, read_frame, read_frame_opt, write_frame,
    write_frame_capped, FrameError,
};
pub use messages::*;
pub use tensor::{
    bf16_bits_to_f32, bf16_to_f32_bytes, f32_to_bf16_bits, f32_to_bf16_bytes, recv_tensors, recv_tensors_digest,
    recv_tensors_resumable, send_tensors, send_tensors_cached, send_tensors_resumed, DType, Held, Manifest, PartialSet,
    Received, RecvLimits, Sent, TensorDigests, TensorError, TensorSet, Transport, WireTensor,
};

/// Version of the federation protocol, sent in [`Hello`]; a coordinator refuses a different
/// one. 2: the messages wrap named structs, `Welcome` carries the whole `[plan]`, updates carry
/// typed phase timings and `Ack` a structured refusal. 3: `Hello` carries the site's input
/// channels and whether its classes are exclusive, `[plan]` the federation's channels and
/// local optimizer. 4: secure aggregation (`RoundStart.secagg`, the `SecAgg` messages,
/// `[plan.privacy]`'s secure-aggregation keys and `noise`) and `[plan].site_encoder_stages`.
/// 5: resumable transfers: each tensor stream header entry says where the sender resumes it
/// (`resume_at`), `ModelRequest.held` and `UpdateHeader.resume` say what the receiver kept of
/// a cut transfer, and the coordinator answers a resumed upload's header with
/// [`Message::Resume`] (see [`tensor`]).
pub const PROTOCOL_VERSION: u32 = 5;

pub use fedtalent_vocab::ALPN;

/// QUIC application close codes of a federation connection.
pub mod close {
    use quinn::VarInt;

    /// A normal end: the federation finished, the request was served, a round limit reached.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The peer is refused for good (no site identity, removed from the federation); a site
    /// agent closed with it stops with the reason instead of reconnecting. Also the code a
    /// stream is stopped with when its request is refused before its payload is read.
    pub const REFUSED: VarInt = VarInt::from_u32(1);
}

/// Default cap on one control frame's payload: 1 MiB.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
