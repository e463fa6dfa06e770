//! The mutual-TLS configurations of both ends: TLS 1.3 only, the ring provider, ALPN
//! `fedtalent/1`, the federation CA as the only root.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::identity::FederationClientVerifier;
use crate::{transport_config, Allowlist, CertError, Result, ALPN};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| CertError::BadPem { what: what.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::NoPem { what: what.into(), kind: "CERTIFICATE" });
    }
    Ok(certs)
}

fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoPem { what: what.into(), kind: "PRIVATE KEY" },
        e => CertError::BadPem { what: what.into(), reason: e.to_string() },
    })
}

fn roots(ca_cert_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_cert_pem, "federation CA certificate")? {
        roots.add(c).map_err(|e| CertError::Tls(format!("federation CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The coordinator's rustls config, shared by both transports: TLS 1.3 only, ring provider,
/// ALPN `fedtalent/1`, client certificates required, validated against the federation CA, and
/// their site name checked against `allowlist` at every handshake (session resumption is off, so
/// every connection is a full handshake that runs the verifier).
pub fn server_tls_config(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    allowlist: Allowlist,
) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca_cert_pem)?, provider.clone())
        .build()
        .map_err(|e| CertError::Tls(format!("client verifier: {e}")))?;
    let verifier = Arc::new(FederationClientVerifier { inner, allowlist });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem, "coordinator certificate")?, parse_key(key_pem, "coordinator key")?)
        .map_err(|e| CertError::Tls(format!("coordinator certificate/key: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // No session resumption: a resumed TLS 1.3 session authenticates with the PSK of an earlier
    // handshake and never calls the client-certificate verifier, so a site removed from the
    // allowlist (or whose certificate expired) would get back in. Every connection is a full
    // handshake instead: no server-side session store, no tickets (the default ticketer never
    // produces stateless ones, and with no store a stateful ticket could not be honoured).
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// Server (coordinator) QUIC config: [`server_tls_config`] with the federation's QUIC transport.
pub fn server_config(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    allowlist: Allowlist,
) -> Result<quinn::ServerConfig> {
    let tls = server_tls_config(ca_cert_pem, cert_pem, key_pem, allowlist)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// The site's rustls config, shared by both transports: verifies the coordinator's certificate
/// against the federation CA (the server name connected to must be one of the coordinator's
/// SANs), presents the site certificate, offers `alpn`.
pub fn client_tls_config(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
) -> Result<rustls::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_client_auth_cert(parse_certs(cert_pem, "site certificate")?, parse_key(key_pem, "site key")?)
        .map_err(|e| CertError::Tls(format!("site certificate/key: {e}")))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A client rustls config that presents no client certificate (only useful to test refusals).
pub fn client_tls_config_without_client_auth(ca_cert_pem: &str) -> Result<rustls::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Client (site) QUIC config: [`client_tls_config`] with ALPN `fedtalent/1` and the federation's
/// QUIC transport.
pub fn client_config(ca_cert_pem: &str, cert_pem: &str, key_pem: &str) -> Result<quinn::ClientConfig> {
    client_config_with_alpn(ca_cert_pem, cert_pem, key_pem, ALPN)
}

/// As [`client_config`] with another ALPN (only useful to test refusals).
pub fn client_config_with_alpn(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
) -> Result<quinn::ClientConfig> {
    quic_client_config(client_tls_config(ca_cert_pem, cert_pem, key_pem, alpn)?)
}

/// A client config that presents no client certificate (only useful to test refusals).
pub fn client_config_without_client_auth(ca_cert_pem: &str) -> Result<quinn::ClientConfig> {
    quic_client_config(client_tls_config_without_client_auth(ca_cert_pem)?)
}

/// A QUIC client config around a client rustls config, with the federation's QUIC transport.
pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}
