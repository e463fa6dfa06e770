//! Helpers for the round trips of the protocol over a QUIC connection.

use std::sync::Arc;

use bytes::Bytes;

use crate::frame::FrameError;
use crate::tensor::{
    recv_tensors_digest, stream_tensors, Held, RecvLimits, TensorDigests, TensorError, TensorSet, TensorSink,
    TensorSource,
};
use crate::Message;

/// Errors of a request over either transport ([`crate::conn`]) or of the QUIC helpers here.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connection: {0}")]
    Link(#[from] crate::conn::ConnError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// Opens a bidirectional stream, sends `request` as one frame, finishes the sending side and
/// reads one reply frame (capped at [`MAX_FRAME_BYTES`]).
pub async fn request(conn: &quinn::Connection, request: &Message) -> Result<Message, QuicError> {
    crate::conn::request(&crate::conn::Connection::Quic(conn.clone()), request).await
}

/// A QUIC send stream takes shared chunks as they are: it keeps a reference until the peer
/// acknowledges them, so a tensor's bytes are not copied on their way to the packets.
impl TensorSink for quinn::SendStream {
    async fn put_slice(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        Ok(self.write_all(bytes).await?)
    }
    async fn put_shared(&mut self, bytes: Bytes) -> std::io::Result<()> {
        Ok(self.write_chunk(bytes).await?)
    }
}

/// Streams `set` on `send` (a tensor stream, see [`crate::tensor`]) with the transport of
/// `digests`, hashing only what `digests` does not know (see [`TensorDigests`]), without
/// copying the tensors' bytes. Does not finish the stream. Returns the set digest of what was
/// sent.
pub async fn send_tensors_shared(
    send: &mut quinn::SendStream,
    set: Arc<TensorSet>,
    digests: &mut TensorDigests,
) -> Result<String, QuicError> {
    Ok(stream_tensors(send, TensorSource::Shared(set), digests, &Held::default()).await?.digest)
}

/// Opens a unidirectional stream, streams `set` on it as [`send_tensors_shared`] does and
/// finishes it. Returns the set digest of what was sent.
pub async fn send_tensors_uni(
    conn: &quinn::Connection,
    set: Arc<TensorSet>,
    digests: &mut TensorDigests,
) -> Result<String, QuicError> {
    let mut send = conn.open_uni().await?;
    let digest = send_tensors_shared(&mut send, set, digests).await?;
    send.finish()?;
    Ok(digest)
}

/// Accepts the next unidirectional stream and receives a tensor set from it. Returns the set
/// and its wire digest.
pub async fn recv_tensors_uni(conn: &quinn::Connection, limits: &RecvLimits) -> Result<(TensorSet, String), QuicError> {
    let mut recv = conn.accept_uni().await?;
    Ok(recv_tensors_digest(&mut recv, limits).await?)
}
