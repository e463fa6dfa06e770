//! Who may talk to the coordinator: the QUIC endpoint and the TLS-over-TCP listener (the
//! fallback where UDP is blocked) and their handshake rate limit, each connection's site
//! identity and transport, and the membership (the allowlist and removals while serving).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedtalent_certs::TlsAcceptor;
use fedtalent_protocol::tcp::TcpConnection;
use fedtalent_protocol::{close, Connection};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{Coordinator, Inner};
use crate::config::{FederationConfig, ADMIN_IDENTITY};

/// Handshakes one remote IP may start in a burst, and per second after it. A handshake costs
/// the coordinator a signature and a certificate-chain verification; a site connects a few
/// times a day (plus reconnects with back-off), the operator's CLI once per command. The
/// address is not validated yet at this point (UDP): a spoofer could spend a site's budget,
/// which delays that site's next connection by seconds, never its membership.
const HANDSHAKE_BURST: f64 = 20.0;
const HANDSHAKE_PER_SECOND: f64 = 1.0;

/// Requests of one site (over all its connections) the coordinator serves at once: a site
/// needs two or three (its poll, a download or an upload); more only pin memory and tasks.
pub(super) const MAX_STREAMS_PER_SITE: usize = 8;

impl Coordinator {
    /// Serves QUIC only (tests); see [`Coordinator::serve_with_tcp`].
    pub async fn serve(self: Arc<Self>, server_config: quinn::ServerConfig) -> Result<()> {
        self.serve_with_tcp(server_config, None).await
    }

    /// Serves until the federation is finished (with `exit_when_done`) or forever: QUIC on
    /// `[federation].listen` unless `transport = "tcp"`, and, with `tcp` (the same rustls
    /// config as QUIC's: CA, allowlist, ALPN), TLS over TCP on `[federation].tcp_listen`
    /// (default: the same address and port) unless `transport = "quic"`.
    pub async fn serve_with_tcp(
        self: Arc<Self>,
        mut server_config: quinn::ServerConfig,
        tcp: Option<rustls::ServerConfig>,
    ) -> Result<()> {
        let choice = self.config.federation.transport;
        // Every request is a bidirectional stream: a peer may not open unidirectional ones
        // (they would never be accepted, only buffered), and a site needs few bidi streams.
        let mut transport = fedtalent_certs::transport_config();
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_concurrent_bidi_streams((MAX_STREAMS_PER_SITE as u32).into());
        server_config.transport_config(Arc::new(transport));
        let listen = self.config.federation.listen;
        let endpoint = match choice.quic() {
            true => {
                let endpoint = fedtalent_certs::server_endpoint(server_config, listen)
                    .with_context(|| format!("listening on UDP {listen}"))?;
                info!(addr = %endpoint.local_addr()?, federation = %self.config.federation.name, "coordinator listening (QUIC)");
                Some(endpoint)
            }
            false => None,
        };
        let tcp = match tcp.filter(|_| choice.tcp()) {
            Some(tls) => {
                let addr = self.config.federation.tcp_listen_addr();
                match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        info!(addr = %listener.local_addr()?, federation = %self.config.federation.name, "coordinator listening (TLS over TCP)");
                        Some((listener, fedtalent_certs::tcp_acceptor(tls)))
                    }
                    // With `auto`, QUIC still serves: a busy TCP port only costs the fallback.
                    Err(e) if endpoint.is_some() => {
                        warn!("not listening on TCP {addr} ({e}): sites whose network blocks UDP cannot connect; set [federation].tcp_listen to a free port");
                        None
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(format!("listening on TCP {addr}"))),
                }
            }
            None => None,
        };
        anyhow::ensure!(
            endpoint.is_some() || tcp.is_some(),
            "[federation].transport = \"tcp\" needs a TLS config for TCP"
        );
        let rounds = tokio::spawn(self.clone().run_rounds());
        let mut limiter = HandshakeLimiter::new(HANDSHAKE_BURST, HANDSHAKE_PER_SECOND);
        loop {
            tokio::select! {
                incoming = accept_quic(endpoint.as_ref()) => {
                    let Some(incoming) = incoming else { break };
                    let ip = incoming.remote_address().ip();
                    if !limiter.allow(ip, Instant::now()) {
                        // Refused before any TLS work; logged at debug so that a flood does not
                        // flood the log too.
                        tracing::debug!(%ip, "handshake refused: rate limit of this address");
                        incoming.refuse();
                        continue;
                    }
                    tokio::spawn(self.clone().handle_quic(incoming));
                }
                accepted = accept_tcp(tcp.as_ref().map(|(l, _)| l)) => {
                    let (socket, remote) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            warn!("TCP accept: {e}");
                            continue;
                        }
                    };
                    // The same budget per address as QUIC handshakes (here the address is
                    // validated by TCP's own handshake).
                    if !limiter.allow(remote.ip(), Instant::now()) {
                        tracing::debug!(ip = %remote.ip(), "handshake refused: rate limit of this address");
                        continue;
                    }
                    let acceptor = tcp.as_ref().map(|(_, a)| a.clone()).expect("a TCP socket comes from the listener");
                    tokio::spawn(self.clone().handle_tcp(acceptor, socket, remote));
                }
                _ = wait_finished(&rounds) => break,
            }
        }
        let result = rounds.await.context("round task")?;
        if let Some(endpoint) = endpoint {
            endpoint.close(close::DONE, b"federation finished");
            endpoint.wait_idle().await;
        }
        result
    }

    async fn handle_quic(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(%remote, transport = "quic", "handshake refused: {e}");
                return;
            }
        };
        let peer = match fedtalent_certs::peer_site_name(&conn) {
            Ok(name) => name,
            Err(e) => {
                warn!(%remote, "connection without a usable site certificate: {e}");
                conn.close(close::REFUSED, b"no site identity");
                return;
            }
        };
        self.handle_connection(Connection::Quic(conn), peer).await;
    }

    async fn handle_tcp(self: Arc<Self>, acceptor: TlsAcceptor, socket: TcpStream, remote: SocketAddr) {
        match fedtalent_certs::tcp_accept(&acceptor, socket).await {
            Ok((tls, peer)) => self.handle_connection(Connection::Tcp(TcpConnection::server(tls, remote)), peer).await,
            Err(e) => warn!(%remote, transport = "tcp", "handshake refused: {e}"),
        }
    }

    /// Serves the requests of an authenticated connection of either transport until it ends.
    async fn handle_connection(self: Arc<Self>, conn: Connection, peer: String) {
        let (remote, transport) = (conn.remote_address(), conn.kind());
        if !self.add_connection(&peer, &conn) {
            warn!(site = %peer, %remote, "refused: the site was removed while it connected");
            conn.close(close::REFUSED, removed_reason(&peer).as_bytes());
            return;
        }
        info!(site = %peer, %remote, %transport, "connected");
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    tokio::spawn(self.clone().handle_stream(peer.clone(), send, recv));
                }
                Err(e) => {
                    info!(site = %peer, %transport, "disconnected: {e}");
                    break;
                }
            }
        }
        let mut inner = self.lock();
        if let Some(site) = inner.sites.get_mut(&peer) {
            site.connections.remove(&conn.stable_id());
        }
    }

    /// Records an open connection of `peer`, unless `peer` is no longer allowed. The allowlist is
    /// read under the lock that [`Coordinator::set_sites`] closes connections under, so that a
    /// handshake racing a removal is either closed there or refused here.
    fn add_connection(&self, peer: &str, conn: &Connection) -> bool {
        let mut inner = self.lock();
        if !self.allowlist.contains(peer) {
            return false;
        }
        inner.sites.entry(peer.to_string()).or_default().connections.insert(conn.stable_id(), conn.clone());
        true
    }

    /// Whether `site` said an accepted `Hello` to this run of the coordinator.
    pub(super) fn joined(&self, site: &str) -> bool {
        self.lock().sites.get(site).is_some_and(|s| s.joined)
    }

    /// Re-reads `[federation].sites` from `path` every `every`, so that removing a site there
    /// locks it out without restarting `serve` ([`Coordinator::set_sites`]). Errors elsewhere in
    /// the file are warned about (once per change) and do not hold a removal back; a file whose
    /// sites list cannot be read at all keeps the current list, since it names no removal.
    pub async fn watch_config(self: Arc<Self>, path: PathBuf, every: Duration) {
        let (mut applied, mut last_error): (Option<Vec<String>>, Option<String>) = (None, None);
        loop {
            tokio::time::sleep(every).await;
            let error = match crate::config::listed_sites(&path) {
                Ok(sites) => {
                    if applied.as_ref() != Some(&sites) {
                        self.set_sites(&sites);
                        applied = Some(sites);
                    }
                    FederationConfig::load(&path).err().map(|e| format!("{e:#}; its [federation].sites is applied"))
                }
                Err(e) => Some(format!("{e:#}; keeping the current allowlist")),
            };
            if error.is_some() && error != last_error {
                warn!("{}", error.as_deref().unwrap_or_default());
            }
            last_error = error;
        }
    }

    /// Applies a new list of allowed sites (federation.toml's `[federation].sites` or the
    /// operator's `SetAllowlist`). Revocation fails closed: a site stays a member only while it
    /// is listed both when `serve` started (that list fixed the class layout) and now. The
    /// allowlist is replaced first, so that no new handshake of a removed site succeeds; then
    /// each removed site's open connections are closed, it must say Hello again if re-added,
    /// and its update leaves the open round. Nothing else in the list can block a removal:
    /// problems with the rest are warnings.
    pub fn set_sites(&self, sites: &[String]) {
        let configured = &self.config.federation.sites;
        for extra in sites.iter().filter(|s| !configured.contains(s)) {
            warn!(site = %extra, "not added: the sites of a running federation are those listed when serve started (restart serve to add one)");
        }
        let kept: Vec<String> = configured.iter().filter(|s| sites.contains(s)).cloned().collect();
        let mut names = kept.clone();
        names.push(ADMIN_IDENTITY.into());
        self.allowlist.replace(names);
        let mut inner = self.lock();
        for site in configured {
            if kept.contains(site) {
                if inner.removed.remove(site) {
                    info!(site = %site, "site allowed again (it must connect and say Hello again)");
                }
            } else if inner.removed.insert(site.clone()) {
                revoke(&mut inner, site);
            }
        }
        let active = self.active_sites(&inner);
        let set_up = inner.running().is_some();
        drop(inner);
        self.changed();
        info!(sites = ?kept, "allowlist applied");
        if active < self.config.plan.min_sites as usize {
            warn!(
                active,
                min_sites = self.config.plan.min_sites,
                "fewer sites than [plan].min_sites remain: no round can complete until a site is allowed again"
            );
        }
        if !set_up && active < configured.len() {
            warn!("the federation is not set up yet: it waits for every site listed when serve started; restart serve with the new list to set up without the removed ones");
        }
    }
}

/// What a removed site's connections are closed with ([`close::REFUSED`]: the site agent takes
/// it as final and stops with this reason).
fn removed_reason(site: &str) -> String {
    format!("site {site} was removed from the federation")
}

/// Ends a removed site's membership: closes its connections, forgets its Hello and drops its
/// update from the open round (it must not count toward min_sites).
fn revoke(inner: &mut Inner, site: &str) {
    let reason = removed_reason(site);
    if let Some(state) = inner.sites.get_mut(site) {
        state.joined = false;
        for conn in std::mem::take(&mut state.connections).into_values() {
            conn.close(close::REFUSED, reason.as_bytes());
        }
    }
    let dropped = inner.running_mut().and_then(|f| f.open.as_mut()).and_then(|o| o.forget(site).then_some(o.round));
    match dropped {
        Some(round) => warn!(site, round, "site removed: connections closed, its update of round {round} dropped"),
        None => warn!(site, "site removed: connections closed"),
    }
}

/// The next QUIC connection attempt; never, without a QUIC endpoint.
async fn accept_quic(endpoint: Option<&quinn::Endpoint>) -> Option<quinn::Incoming> {
    match endpoint {
        Some(endpoint) => endpoint.accept().await,
        None => std::future::pending().await,
    }
}

/// The next TCP socket; never, without a TCP listener.
async fn accept_tcp(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn wait_finished(task: &tokio::task::JoinHandle<Result<()>>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A token bucket per remote IP: `burst` handshakes at once, refilled at `per_second`.
pub struct HandshakeLimiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
    burst: f64,
    per_second: f64,
}

impl HandshakeLimiter {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self { buckets: HashMap::new(), burst, per_second }
    }

    /// Takes a token of `ip`'s bucket if it has one.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            // Forget the addresses whose bucket is full again (as good as new).
            let (burst, rate) = (self.burst, self.per_second);
            self.buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One of a site's [`MAX_STREAMS_PER_SITE`] request slots, released on drop.
pub(super) struct StreamSlot {
    coordinator: Arc<Coordinator>,
    site: String,
}

impl StreamSlot {
    pub(super) fn take(coordinator: &Arc<Coordinator>, site: &str) -> Option<StreamSlot> {
        let mut inner = coordinator.lock();
        let state = inner.sites.entry(site.to_string()).or_default();
        if state.streams >= MAX_STREAMS_PER_SITE {
            return None;
        }
        state.streams += 1;
        Some(StreamSlot { coordinator: coordinator.clone(), site: site.to_string() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(state) = self.coordinator.lock().sites.get_mut(&self.site) {
            state.streams = state.streams.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 12: a burst per address, then the refill rate; other addresses unaffected.
    #[test]
    fn handshakes_are_rate_limited_per_address() {
        let mut limiter = HandshakeLimiter::new(3.0, 2.0);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..4).map(|_| limiter.allow(a, t0)).collect::<Vec<_>>(), [true, true, true, false]);
        assert!(limiter.allow(b, t0), "another address shares the bucket");
        assert!(!limiter.allow(a, t0 + Duration::from_millis(400)));
        // 0.8 tokens at 400 ms, 2 at 1 s.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!((0..3).map(|_| limiter.allow(a, t1)).collect::<Vec<_>>(), [true, true, false]);
    }
}
