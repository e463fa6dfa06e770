//! Helpers for the round trips of the protocol over a QUIC connection.

use crate::frame::{read_frame, write_frame_capped, FrameError};
use crate::tensor::{recv_tensors_digest, send_tensors_cached, RecvLimits, TensorDigests, TensorError, TensorSet};
use crate::{Message, MAX_FRAME_BYTES};

/// Errors of the QUIC helpers.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// Opens a bidirectional stream, sends `request` as one frame, finishes the sending side and
/// reads one reply frame (capped at [`MAX_FRAME_BYTES`]).
pub async fn request(conn: &quinn::Connection, request: &Message) -> Result<Message, QuicError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame_capped(&mut send, request, MAX_FRAME_BYTES).await?;
    send.finish()?;
    Ok(read_frame(&mut recv, MAX_FRAME_BYTES).await?)
}

/// Opens a unidirectional stream, streams `set` on it with the transport of `digests` (hashing
/// only what `digests` does not know, see [`TensorDigests`]) and finishes it. Returns the set
/// digest of what was sent.
pub async fn send_tensors_uni(
    conn: &quinn::Connection,
    set: &TensorSet,
    digests: &mut TensorDigests,
) -> Result<String, QuicError> {
    let mut send = conn.open_uni().await?;
    let digest = send_tensors_cached(&mut send, set, digests).await?;
    send.finish()?;
    Ok(digest)
}

/// Accepts the next unidirectional stream and receives a tensor set from it. Returns the set
/// and its wire digest.
pub async fn recv_tensors_uni(conn: &quinn::Connection, limits: &RecvLimits) -> Result<(TensorSet, String), QuicError> {
    let mut recv = conn.accept_uni().await?;
    Ok(recv_tensors_digest(&mut recv, limits).await?)
}
