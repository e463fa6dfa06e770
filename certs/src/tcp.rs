//! TLS 1.3 over TCP: the fallback transport of networks that block UDP (issue 18). The same
//! rustls configurations as QUIC ([`crate::server_tls_config`], [`crate::client_tls_config`]):
//! the federation CA, the site certificate and its allowlist check, ALPN `fedtalent/1`, no
//! session resumption. What runs over the TLS stream (one connection, several request streams)
//! is `fedtalent_protocol::tcp`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::site_name_of_chain;
use crate::{CertError, ALPN};

pub use tokio_rustls::client::TlsStream as ClientTlsStream;
pub use tokio_rustls::server::TlsStream as ServerTlsStream;

/// How long a TLS handshake over TCP may take at the coordinator (a peer that opens a socket
/// and says nothing must not hold a task).
pub const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket options of every federation TCP connection: no Nagle delay (requests and replies are
/// small frames) and kernel keep-alives (a half-open connection is found even when idle; the
/// connection's own pings and idle timeout do the same above TLS).
pub fn tune_tcp(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(15)).with_interval(Duration::from_secs(5));
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!("TCP keep-alive not set: {e}");
    }
}

/// A site's TLS-over-TCP connection to the coordinator at `addr`, which must present a
/// certificate for `server_name` (one of its SANs) issued by the federation CA.
pub async fn tcp_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<ClientTlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("server name {server_name:?}: {e}")))?;
    let tcp = TcpStream::connect(addr).await?;
    tune_tcp(&tcp);
    TlsConnector::from(config).connect(name, tcp).await
}

/// The coordinator's side of a TLS-over-TCP handshake: at most [`TCP_HANDSHAKE_TIMEOUT`], the
/// negotiated ALPN must be `fedtalent/1` (a client that offers none is refused too, as QUIC
/// refuses it), and the peer's certificate names the site. Returns the stream and the site.
pub async fn tcp_accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Result<(ServerTlsStream<TcpStream>, String), CertError> {
    tune_tcp(&tcp);
    let tls = match tokio::time::timeout(TCP_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => return Err(CertError::Tls(format!("no TLS handshake within {TCP_HANDSHAKE_TIMEOUT:?}"))),
        Ok(Err(e)) => return Err(CertError::Tls(e.to_string())),
        Ok(Ok(tls)) => tls,
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN) {
        return Err(CertError::Tls("peer doesn't support any known protocol (no ALPN fedtalent/1)".into()));
    }
    let site = site_name_of_chain(session.peer_certificates())?;
    Ok((tls, site))
}

/// The acceptor of the coordinator's TCP listener, around [`crate::server_tls_config`].
pub fn tcp_acceptor(config: rustls::ServerConfig) -> TlsAcceptor {
    TlsAcceptor::from(Arc::new(config))
}

/// The peer's local view of a TLS-over-TCP connection failing because TLS refused it (an alert
/// received from the peer, or a certificate this side refused): retrying cannot help. `None`
/// for anything else (a lost or reset connection).
pub fn tls_refusal(e: &io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(_)
        | rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoApplicationProtocol
        | rustls::Error::PeerIncompatible(_) => Some(inner.to_string()),
        _ => None,
    }
}
