//! Federation PKI and mutual-TLS configuration for fedtalent (DESIGN.md §2.4).
//!
//! * A federation CA ([`FederationCa`]) issues one coordinator certificate (server auth, SANs for
//!   the coordinator's DNS names / IPs) and one certificate per site (client auth).
//! * A site creates its own key pair and a certificate signing request ([`SiteKey`],
//!   [`write_keygen`]); only the CSR travels to the coordinator's operator, who signs it
//!   ([`FederationCa::sign_site_csr`]). Private keys never leave their owner.
//! * [`server_config`] / [`client_config`] build quinn configs for mutual TLS 1.3 with the ring
//!   provider and ALPN `fedtalent/1`; [`server_tls_config`] / [`client_tls_config`] the same
//!   rustls configs for TLS over TCP ([`tcp_accept`], [`tcp_connect`]).
//!
//! ## Site identity
//! A site certificate carries the site name twice: as the subject common name (CN) and as the
//! SAN DNS name `<site>.site.fedtalent` ([`site_san`]). **The SAN is authoritative**: it is the
//! field X.509 path validation is defined over. The CN must carry the same name; a certificate
//! whose CN and SAN disagree, that has no such SAN, or that has more than one, is refused.
//! Site names match `[A-Za-z0-9_-]{1,64}`.
//!
//! ## Where things are
//! * `ca`: the CA and the sites' keys and CSRs ([`FederationCa`], [`SiteKey`]).
//! * `identity`: the site name a certificate proves, the [`Allowlist`], the client verifier.
//! * `tls`: the rustls client and server configurations, and the quinn ones around them.
//! * `transport`: QUIC transport tuning and the UDP endpoints.
//! * `tcp`: TLS 1.3 over TCP with the same configurations, the fallback where UDP is blocked.

use std::fs;
use std::path::{Path, PathBuf};

mod ca;
mod congestion;
mod identity;
mod tcp;
mod tls;
mod transport;
pub use ca::{write_keygen, FederationCa, SiteKey};
pub use congestion::{DeliveryRate, RateWindow, RateWindowConfig, INITIAL_WINDOW_PACKETS, WINDOW_GAIN};
pub use identity::{peer_site_name, site_name_from_cert_der, Allowlist};
pub use tcp::{
    tcp_accept, tcp_acceptor, tcp_connect, tls_refusal, tune_tcp, ClientTlsStream, ServerTlsStream,
    TCP_HANDSHAKE_TIMEOUT,
};
pub use tls::{
    client_config, client_config_with_alpn, client_config_without_client_auth, client_tls_config,
    client_tls_config_without_client_auth, quic_client_config, server_config, server_tls_config,
};
pub use tokio_rustls::TlsAcceptor;
pub use transport::{
    client_endpoint, server_endpoint, transport_config, transport_config_with, Congestion, CONGESTION, UDP_BUFFER_BYTES,
};

/// ALPN protocol identifier of the federation protocol (defined once, in the vocabulary).
pub use fedtalent_vocab::ALPN;

/// Suffix of the authoritative SAN DNS name of a site certificate: `<site>.site.fedtalent`.
pub const SITE_SAN_SUFFIX: &str = ".site.fedtalent";

/// File names written by [`FederationCa::save`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key written by [`FederationCa::save`] (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors of the PKI and TLS configuration. Each names the file, site or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid site name {name:?}: {why} (allowed: [A-Za-z0-9_-]{{1,64}})")]
    InvalidSiteName { name: String, why: &'static str },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("private key {path} is readable by others (mode {mode:04o}): run `chmod 600 {path}` (and replace the key if it may have been copied)")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("refusing to overwrite existing {path}")]
    Exists { path: PathBuf },
    #[error("{what}: no PEM {kind} found")]
    NoPem { what: String, kind: &'static str },
    #[error("{what}: bad PEM: {reason}")]
    BadPem { what: String, reason: String },
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("certificate signing request refused: {0}")]
    CsrRefused(String),
    #[error("certificate field {field}: {reason}")]
    BadCertificate { field: &'static str, reason: String },
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("peer has no certificate (connection not mutually authenticated)")]
    NoPeerCertificate,
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;

/// Checks a site name against `[A-Za-z0-9_-]{1,64}`.
pub fn validate_site_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > 64 {
        Some("longer than 64 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Some("contains a character outside [A-Za-z0-9_-]")
    } else {
        None
    };
    match why {
        Some(why) => Err(CertError::InvalidSiteName { name: name.to_string(), why }),
        None => Ok(()),
    }
}

/// The authoritative SAN DNS name of a site: `<site>.site.fedtalent`.
/// (DNS names are case-insensitive; site names are compared exactly as written in the CN.)
pub fn site_san(site: &str) -> String {
    format!("{site}{SITE_SAN_SUFFIX}")
}

/// Writes `bytes` to `path` atomically with `mode` ([`fedtalent_atomic::write`]: a private key is
/// never readable by others, even transiently, and never written through a planted symlink).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fedtalent_atomic::write(path, bytes, mode).map_err(|source| CertError::Write { path: path.to_path_buf(), source })
}

/// Reads a private key file, refusing one that others may read (group or world permission
/// bits, on Unix): such a key may already be copied, and silently using it would hide that.
/// The operator fixes it with `chmod 600` (or issues a new key if it could have leaked).
pub fn read_private_key(path: &Path) -> Result<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CertError::KeyPermissions { path: path.to_path_buf(), mode });
        }
    }
    read_to_string(path)
}

pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })
}
