//! One connection type over both transports: QUIC, and TLS 1.3 over TCP where UDP is blocked
//! ([`crate::tcp`]). The coordinator and the site agent run their requests over [`Connection`],
//! [`SendStream`] and [`RecvStream`] without caring which transport carries them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::frame::{read_frame, write_frame_capped};
use crate::quic::QuicError;
use crate::tcp::{TcpClosed, TcpConnection, TcpRecvStream, TcpSendStream};
use crate::tensor::{stream_tensors, Held, Sent, TensorDigests, TensorSet, TensorSink, TensorSource};
use crate::{close, Message, MAX_FRAME_BYTES};

/// Which transport carries a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConnKind {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP, the fallback.
    Tcp,
}

impl ConnKind {
    pub fn name(self) -> &'static str {
        match self {
            ConnKind::Quic => "quic",
            ConnKind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for ConnKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a connection ended.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Tcp(#[from] TcpClosed),
}

/// A mutually authenticated connection between a site and the coordinator. Cheap to clone.
#[derive(Clone)]
pub enum Connection {
    Quic(quinn::Connection),
    Tcp(TcpConnection),
}

impl Connection {
    pub fn kind(&self) -> ConnKind {
        match self {
            Connection::Quic(_) => ConnKind::Quic,
            Connection::Tcp(_) => ConnKind::Tcp,
        }
    }

    /// Opens a bidirectional stream (a request).
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnError> {
        Ok(match self {
            Connection::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                (SendStream::Quic(s), RecvStream::Quic(r))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.open_bi()?;
                (SendStream::Tcp(s), RecvStream::Tcp(r))
            }
        })
    }

    /// The next bidirectional stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnError> {
        Ok(match self {
            Connection::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                (SendStream::Quic(s), RecvStream::Quic(r))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.accept_bi().await?;
                (SendStream::Tcp(s), RecvStream::Tcp(r))
            }
        })
    }

    /// Closes the connection with an application code ([`close`]) and a reason for the peer.
    pub fn close(&self, code: quinn::VarInt, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(code, reason),
            Connection::Tcp(c) => c.close(code.into_inner(), reason),
        }
    }

    /// An id unique among this process's open connections.
    pub fn stable_id(&self) -> usize {
        match self {
            Connection::Quic(c) => c.stable_id(),
            Connection::Tcp(c) => c.stable_id(),
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Tcp(c) => c.remote_address(),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ConnError> {
        match self {
            Connection::Quic(c) => c.close_reason().map(ConnError::Quic),
            Connection::Tcp(c) => c.close_reason().map(ConnError::Tcp),
        }
    }

    /// The reason, when the peer refused this side for good: TLS refused the handshake (an
    /// unknown CA, a certificate not on the allowlist, an expired one), or the peer closed with
    /// [`close::REFUSED`]. Retrying cannot help then.
    pub fn refusal(&self) -> Option<String> {
        match self.close_reason()? {
            ConnError::Quic(quinn::ConnectionError::ConnectionClosed(c)) if is_tls_refusal(c.error_code) => {
                Some(format!("handshake: {c}"))
            }
            ConnError::Quic(quinn::ConnectionError::TransportError(e)) if is_tls_refusal(e.code) => {
                Some(format!("handshake: {e}"))
            }
            ConnError::Quic(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::REFUSED => {
                Some(format!("closed by the coordinator: {}", String::from_utf8_lossy(&c.reason)))
            }
            ConnError::Tcp(TcpClosed::Refused(reason)) => Some(format!("handshake: {reason}")),
            ConnError::Tcp(TcpClosed::ByPeer { code, reason }) if code == close::REFUSED.into_inner() => {
                Some(format!("closed by the coordinator: {reason}"))
            }
            _ => None,
        }
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100..0x200 (RFC 9001 §4.8): the peer's
/// TLS stack rejected us (an unknown CA, a certificate not on the allowlist, an expired one).
pub fn is_tls_refusal(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// The sending side of a stream of either transport.
pub enum SendStream {
    Quic(quinn::SendStream),
    Tcp(TcpSendStream),
}

impl SendStream {
    /// Ends the stream after what was written.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e)),
            SendStream::Tcp(s) => s.finish(),
        }
    }
}

/// The receiving side of a stream of either transport.
pub enum RecvStream {
    Quic(quinn::RecvStream),
    Tcp(TcpRecvStream),
}

impl RecvStream {
    /// Tells the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: quinn::VarInt) -> io::Result<()> {
        match self {
            RecvStream::Quic(r) => r.stop(code).map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e)),
            RecvStream::Tcp(r) => {
                r.stop(code.into_inner());
                Ok(())
            }
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            SendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_flush(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(r) => Pin::new(r).poll_read(cx, buf),
            RecvStream::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// Both transports take shared chunks without copying them.
impl TensorSink for SendStream {
    async fn put_slice(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.put_slice(bytes).await,
            SendStream::Tcp(s) => s.write_shared(Bytes::copy_from_slice(bytes)).await,
        }
    }
    async fn put_shared(&mut self, bytes: Bytes) -> io::Result<()> {
        match self {
            SendStream::Quic(s) => s.put_shared(bytes).await,
            SendStream::Tcp(s) => s.write_shared(bytes).await,
        }
    }
}

/// Opens a bidirectional stream, sends `request` as one frame, finishes the sending side and
/// reads one reply frame (capped at [`MAX_FRAME_BYTES`]).
pub async fn request(conn: &Connection, request: &Message) -> Result<Message, QuicError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame_capped(&mut send, request, MAX_FRAME_BYTES).await?;
    send.finish()?;
    Ok(read_frame(&mut recv, MAX_FRAME_BYTES).await?)
}

/// Streams `set` on `send` (a tensor stream, see [`crate::tensor`]) with the transport of
/// `digests`, hashing only what `digests` does not know, without copying the tensors' bytes,
/// and each tensor only from where the receiver's `held` copy ends (a resumed transfer). Does
/// not finish the stream. Returns the set digest and the tensor bytes sent.
pub async fn send_tensors_shared(
    send: &mut SendStream,
    set: Arc<TensorSet>,
    digests: &mut TensorDigests,
    held: &Held,
) -> Result<Sent, QuicError> {
    Ok(stream_tensors(send, TensorSource::Shared(set), digests, held).await?)
}

/// `transport` of a site's (or the coordinator's) configuration: which transports to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP when QUIC gets no answer within [`QUIC_WAIT`] (a site), or both
    /// listening (the coordinator).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl TransportChoice {
    pub fn quic(self) -> bool {
        self != TransportChoice::Tcp
    }
    pub fn tcp(self) -> bool {
        self != TransportChoice::Quic
    }
}

/// How long `auto` waits for a QUIC handshake before it tries TLS over TCP. A QUIC handshake
/// takes one round trip (plus the coordinator's certificate check); where UDP is blocked nothing
/// ever answers, so this is what a site behind such a firewall pays per connection.
pub const QUIC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a connection attempt of one transport may take when it is the only one tried.
pub const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where and how a site (or the operator's CLI) connects to the coordinator.
pub struct Dial<'a> {
    /// The coordinator's UDP address.
    pub quic_addr: SocketAddr,
    /// Its TCP address (usually the same).
    pub tcp_addr: SocketAddr,
    /// A name on the coordinator's certificate.
    pub server_name: &'a str,
    /// The client's TLS config (`fedtalent_certs::client_tls_config`), for either transport.
    pub tls: rustls::ClientConfig,
    pub choice: TransportChoice,
    /// How long `auto` waits for QUIC ([`QUIC_WAIT`]).
    pub quic_wait: std::time::Duration,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The coordinator (or this side, for the coordinator's certificate) refused the TLS
    /// handshake: retrying or another transport cannot help.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// A connection made by [`dial`] (the QUIC endpoint must live as long as its connection).
pub struct Dialed {
    pub conn: Connection,
    pub endpoint: Option<quinn::Endpoint>,
}

/// Connects to the coordinator over the configured transport: with `auto`, QUIC first, then
/// TLS over TCP when QUIC got no answer within `quic_wait` (a refusal is final either way).
pub async fn dial(d: &Dial<'_>) -> Result<Dialed, DialError> {
    let mut why_not_quic = None;
    if d.choice.quic() {
        let wait = if d.choice.tcp() { d.quic_wait } else { CONNECT_WAIT };
        match dial_quic(d, wait).await {
            Ok(dialed) => return Ok(dialed),
            Err(DialError::Refused(r)) => return Err(DialError::Refused(r)),
            Err(DialError::Failed(e)) if d.choice.tcp() => {
                tracing::warn!(coordinator = %d.quic_addr, "QUIC: {e}; trying TLS over TCP at {}", d.tcp_addr);
                why_not_quic = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    dial_tcp(d).await.map_err(|e| match (e, why_not_quic) {
        (DialError::Failed(e), Some(q)) => DialError::Failed(format!("QUIC: {q}; TLS over TCP: {e}")),
        (e, _) => e,
    })
}

async fn dial_quic(d: &Dial<'_>, wait: std::time::Duration) -> Result<Dialed, DialError> {
    let failed = |e: &dyn std::fmt::Display| DialError::Failed(format!("connecting to {}: {e}", d.quic_addr));
    let config = fedtalent_certs::quic_client_config(d.tls.clone()).map_err(|e| failed(&e))?;
    let bind: SocketAddr = if d.quic_addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = fedtalent_certs::client_endpoint(bind).map_err(|e| failed(&e))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(d.quic_addr, d.server_name).map_err(|e| failed(&e))?;
    let conn = match tokio::time::timeout(wait, connecting).await {
        Err(_) => return Err(DialError::Failed(format!("no QUIC answer from {} within {wait:?}", d.quic_addr))),
        // A TLS alert means the coordinator looked at our certificate and said no (or we at its).
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c))) if is_tls_refusal(c.error_code) => {
            return Err(DialError::Refused(format!("handshake: {c}")));
        }
        Ok(Err(quinn::ConnectionError::TransportError(e))) if is_tls_refusal(e.code) => {
            return Err(DialError::Refused(format!("handshake: {e}")));
        }
        Ok(Err(e)) => return Err(failed(&e)),
        Ok(Ok(conn)) => conn,
    };
    Ok(Dialed { conn: Connection::Quic(conn), endpoint: Some(endpoint) })
}

async fn dial_tcp(d: &Dial<'_>) -> Result<Dialed, DialError> {
    let connecting = fedtalent_certs::tcp_connect(d.tcp_addr, d.server_name, Arc::new(d.tls.clone()));
    match tokio::time::timeout(CONNECT_WAIT, connecting).await {
        Err(_) => Err(DialError::Failed(format!("no TCP answer from {} within {CONNECT_WAIT:?}", d.tcp_addr))),
        Ok(Err(e)) => match fedtalent_certs::tls_refusal(&e) {
            Some(r) => Err(DialError::Refused(format!("handshake: {r}"))),
            None => Err(DialError::Failed(format!("connecting to {} over TCP: {e}", d.tcp_addr))),
        },
        Ok(Ok(tls)) => Ok(Dialed { conn: Connection::Tcp(TcpConnection::client(tls, d.tcp_addr)), endpoint: None }),
    }
}
