//! Mutual TLS over real quinn endpoints and TLS-over-TCP listeners on 127.0.0.1: honest peers
//! complete a round trip, each broken credential is refused at handshake time with a specific
//! reason, and the server keeps serving honest peers afterwards. Every test runs over both
//! transports (QUIC, and TLS over TCP, the fallback where UDP is blocked), which share one
//! rustls configuration per side.

use std::net::SocketAddr;
use std::time::Duration;

use fedtalent_certs::*;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Quic,
    Tcp,
}

const KINDS: [Kind; 2] = [Kind::Quic, Kind::Tcp];

struct Pki {
    ca: FederationCa,
    coord_cert: String,
    coord_key: String,
}

fn pki() -> Pki {
    let ca = FederationCa::create("test federation CA").unwrap();
    let (coord_cert, coord_key) = ca.issue_coordinator(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    Pki { ca, coord_cert, coord_key }
}

/// (cert, key) of a site, through the real keygen → CSR → sign path.
fn site(ca: &FederationCa, name: &str) -> (String, String) {
    let k = SiteKey::generate(name).unwrap();
    let cert = ca.sign_site_csr(&k.csr_pem, 30).unwrap();
    (cert, k.key_pem)
}

/// A site's client TLS config (both transports use it).
fn client(p: &Pki, cert: &str, key: &str) -> rustls::ClientConfig {
    client_tls_config(p.ca.cert_pem(), cert, key, ALPN).unwrap()
}

type Outcome = Result<String, String>;

struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    tcp_addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
}

impl Server {
    async fn next_outcome(&mut self) -> Outcome {
        tokio::time::timeout(Duration::from_secs(10), self.outcomes.recv())
            .await
            .expect("server reported nothing within 10 s")
            .expect("server loop ended")
    }
}

/// A server on both transports that reports, per incoming connection, Ok(site) or Err(handshake
/// error) and answers "ping" with "pong:<site>".
fn start_server(p: &Pki, allowlist: Allowlist) -> Server {
    let cfg = server_config(p.ca.cert_pem(), &p.coord_cert, &p.coord_key, allowlist.clone()).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, outcomes) = mpsc::unbounded_channel();
    let ep = endpoint.clone();
    let quic_tx = tx.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = quic_tx.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    Ok(conn) => {
                        let site = match peer_site_name(&conn) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(format!("peer_site_name: {e}")));
                                return;
                            }
                        };
                        let _ = tx.send(Ok(site.clone()));
                        if let Ok((mut s, mut r)) = conn.accept_bi().await {
                            if let Ok(req) = r.read_to_end(64).await {
                                if req == b"ping" {
                                    let _ = s.write_all(format!("pong:{site}").as_bytes()).await;
                                    let _ = s.finish();
                                }
                            }
                        }
                        conn.closed().await;
                    }
                }
            });
        }
    });
    let tls = server_tls_config(p.ca.cert_pem(), &p.coord_cert, &p.coord_key, allowlist).unwrap();
    let acceptor = tcp_acceptor(tls);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match tcp_accept(&acceptor, socket).await {
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    Ok((mut tls, site)) => {
                        let _ = tx.send(Ok(site.clone()));
                        let mut req = Vec::new();
                        if (&mut tls).take(64).read_to_end(&mut req).await.is_ok() && req == b"ping" {
                            let _ = tls.write_all(format!("pong:{site}").as_bytes()).await;
                            let _ = tls.shutdown().await;
                        }
                    }
                }
            });
        }
    });
    Server { endpoint, addr, tcp_addr, outcomes }
}

/// Connects over `kind` and does one ping/pong; returns the reply or the client-side error.
async fn round_trip(kind: Kind, cfg: rustls::ClientConfig, server: &Server, name: &str) -> Result<String, String> {
    match kind {
        Kind::Quic => quic_round_trip(quic_client_config(cfg).unwrap(), server.addr, name).await,
        Kind::Tcp => tcp_round_trip(cfg, server.tcp_addr, name).await,
    }
}

async fn quic_round_trip(cfg: quinn::ClientConfig, addr: SocketAddr, name: &str) -> Result<String, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let fut = async {
        let conn = ep.connect(addr, name).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        let reply = r.read_to_end(64).await.map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"done");
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    let res =
        tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap_or_else(|_| Err("client timed out".into()));
    ep.wait_idle().await;
    res
}

/// Over TLS 1.3 the client's handshake completes before the server has checked the client's
/// certificate: a refusal reaches the client as an alert on its first read.
async fn tcp_round_trip(cfg: rustls::ClientConfig, addr: SocketAddr, name: &str) -> Result<String, String> {
    let fut = async {
        let mut tls = tcp_connect(addr, name, std::sync::Arc::new(cfg)).await.map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap_or_else(|_| Err("client timed out".into()))
}

async fn honest_round_trip(kind: Kind, p: &Pki, server: &mut Server, name: &str) {
    let (cert, key) = site(&p.ca, name);
    let reply = round_trip(kind, client(p, &cert, &key), server, "localhost").await;
    assert_eq!(reply, Ok(format!("pong:{name}")), "{kind:?}");
    assert_eq!(server.next_outcome().await, Ok(name.to_string()), "{kind:?}");
}

/// Asserts the next handshake is refused by the server with a reason containing `needle`, that
/// the client's round trip failed, then that an honest peer still gets through.
async fn expect_refused(kind: Kind, p: &Pki, server: &mut Server, client: Result<String, String>, needle: &str) {
    assert!(client.is_err(), "{kind:?}: client round trip should fail, got {client:?}");
    let outcome = server.next_outcome().await;
    let reason = outcome.expect_err("server should refuse the handshake");
    assert!(reason.contains(needle), "{kind:?}: refusal reason {reason:?} does not mention {needle:?}");
    honest_round_trip(kind, p, server, "alpha").await;
}

#[tokio::test]
async fn honest_sites_round_trip() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha", "beta"]));
    for kind in KINDS {
        honest_round_trip(kind, &p, &mut server, "alpha").await;
        honest_round_trip(kind, &p, &mut server, "beta").await;
        // The coordinator's IP SAN works as server name too.
        let (cert, key) = site(&p.ca, "alpha");
        assert_eq!(round_trip(kind, client(&p, &cert, &key), &server, "127.0.0.1").await, Ok("pong:alpha".into()));
        assert_eq!(server.next_outcome().await, Ok("alpha".into()));
    }
    server.endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    let other = FederationCa::create("another CA").unwrap();
    let (cert, key) = site(&other, "alpha");
    for kind in KINDS {
        // The client trusts our coordinator, but presents a certificate of the other CA.
        let client = round_trip(kind, client(&p, &cert, &key), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client, "site 'alpha' refused: not issued by the federation CA").await;
    }
}

/// A client presenting a self-signed site certificate (SAN of alpha) with the subject CN `cn`.
fn self_signed_client(p: &Pki, cn: &str) -> rustls::ClientConfig {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![site_san("alpha")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    client(p, &cert.pem(), &key.serialize_pem())
}

#[tokio::test]
async fn self_signed_client_cert_is_refused() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    for kind in KINDS {
        let client = round_trip(kind, self_signed_client(&p, "alpha"), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client, "not issued by the federation CA").await;
    }
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    let k = SiteKey::generate("alpha").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert =
        p.ca.sign_site_csr_between(&k.csr_pem, now - time::Duration::days(10), now - time::Duration::days(1)).unwrap();
    for kind in KINDS {
        let client = round_trip(kind, client(&p, &cert, &k.key_pem), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client, "site 'alpha' refused: certificate expired (not after").await;
    }
}

#[tokio::test]
async fn site_not_on_allowlist_is_refused_and_removal_locks_out() {
    let p = pki();
    let allow = Allowlist::new(["alpha", "beta"]);
    let mut server = start_server(&p, allow.clone());
    for kind in KINDS {
        let (cert, key) = site(&p.ca, "mallory");
        let refused = round_trip(kind, client(&p, &cert, &key), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, refused, "site 'mallory' is not on the federation allowlist").await;

        // beta gets in, is removed, and is locked out at its next handshake; alpha goes on.
        honest_round_trip(kind, &p, &mut server, "beta").await;
        let (cert, key) = site(&p.ca, "beta");
        assert!(allow.remove("beta"));
        let cfg = client(&p, &cert, &key);
        let refused = round_trip(kind, cfg.clone(), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, refused, "site 'beta' is not on the federation allowlist").await;
        // Put back: accepted again, with the same certificate.
        allow.replace(["alpha", "beta"]);
        assert_eq!(round_trip(kind, cfg, &server, "localhost").await, Ok("pong:beta".into()));
        assert_eq!(server.next_outcome().await, Ok("beta".into()));
    }
}

#[tokio::test]
async fn missing_client_cert_is_refused() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    for kind in KINDS {
        let cfg = client_tls_config_without_client_auth(p.ca.cert_pem()).unwrap();
        let client = round_trip(kind, cfg, &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client, "peer sent no certificates").await;
    }
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    let (cert, key) = site(&p.ca, "alpha");
    for kind in KINDS {
        let cfg = client_tls_config(p.ca.cert_pem(), &cert, &key, b"other/1").unwrap();
        let client = round_trip(kind, cfg, &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client, "peer doesn't support any known protocol").await;
    }
    // Over TCP a client may offer no ALPN at all (QUIC requires one): refused too.
    let mut cfg = client(&p, &cert, &key);
    cfg.alpn_protocols.clear();
    let client = round_trip(Kind::Tcp, cfg, &server, "localhost").await;
    expect_refused(Kind::Tcp, &p, &mut server, client, "no ALPN fedtalent/1").await;
}

#[tokio::test]
async fn client_refuses_wrong_server_name_and_foreign_coordinator() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    let (cert, key) = site(&p.ca, "alpha");
    for kind in KINDS {
        let err = round_trip(kind, client(&p, &cert, &key), &server, "coordinator.example").await.unwrap_err();
        assert!(err.contains("NotValidForName") || err.contains("not valid for"), "{kind:?}: {err}");
        // A coordinator certified by another CA is refused by the site.
        let other = FederationCa::create("impostor CA").unwrap();
        let cfg = client_tls_config(other.cert_pem(), &cert, &key, ALPN).unwrap();
        let err = round_trip(kind, cfg, &server, "localhost").await.unwrap_err();
        assert!(err.contains("UnknownIssuer") || err.contains("unknown issuer"), "{kind:?}: {err}");
        // The server saw both handshakes fail (the client aborted them).
        for _ in 0..2 {
            assert!(server.next_outcome().await.is_err());
        }
        honest_round_trip(kind, &p, &mut server, "alpha").await;
    }
}

/// Issue 21 item 2: TLS 1.3 resumption must not bypass the client-certificate verifier. A site
/// whose client keeps the session tickets of an earlier connection (one client config, as a
/// long-running site agent has) is refused once removed from the allowlist, and the removal
/// is logged by the verifier, not skipped.
#[tokio::test]
async fn resumed_session_after_removal_is_refused() {
    let p = pki();
    let allow = Allowlist::new(["alpha", "beta"]);
    let mut server = start_server(&p, allow.clone());
    for kind in KINDS {
        let (cert, key) = site(&p.ca, "beta");
        // One rustls config for both connections: its session cache is shared by its clones.
        let cfg = client(&p, &cert, &key);
        assert_eq!(round_trip(kind, cfg.clone(), &server, "localhost").await, Ok("pong:beta".into()));
        assert_eq!(server.next_outcome().await, Ok("beta".into()));
        assert!(allow.remove("beta"));
        let client_result = round_trip(kind, cfg.clone(), &server, "localhost").await;
        expect_refused(kind, &p, &mut server, client_result, "site 'beta' is not on the federation allowlist").await;
        allow.replace(["alpha", "beta"]);
        // A site still on the list connects again and again with one config (full handshakes).
        let (cert, key) = site(&p.ca, "alpha");
        let cfg = client(&p, &cert, &key);
        for _ in 0..2 {
            assert_eq!(round_trip(kind, cfg.clone(), &server, "localhost").await, Ok("pong:alpha".into()));
            assert_eq!(server.next_outcome().await, Ok("alpha".into()));
        }
    }
}

/// Issue 21 item 12: the unverified CN of a refused certificate is escaped in the refusal (and
/// the log line made of it): a newline in it cannot forge a second log line.
#[tokio::test]
async fn unverified_names_are_escaped_in_refusals() {
    let p = pki();
    let mut server = start_server(&p, Allowlist::new(["alpha"]));
    for kind in KINDS {
        let client =
            round_trip(kind, self_signed_client(&p, "alpha\nINFO site mallory joined"), &server, "localhost").await;
        assert!(client.is_err(), "{kind:?}: a self-signed certificate got in: {client:?}");
        let reason = server.next_outcome().await.expect_err("the handshake should be refused");
        assert!(reason.contains("alpha\\nINFO site mallory") && !reason.contains('\n'), "{kind:?}: {reason:?}");
    }
}
