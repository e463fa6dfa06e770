//! Who is connecting: the site name a certificate proves, the allowlist, and the coordinator's
//! client-certificate verifier that enforces both at every handshake.
//!
//! Rule (DESIGN §2.4): a peer's identity comes only from its verified certificate, never from
//! anything it sends (a `Hello`'s site name must equal it); TLS session resumption is off so
//! that every connection passes this verifier again.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme};
use time::OffsetDateTime;

use crate::{validate_site_name, CertError, Result, SITE_SAN_SUFFIX};

/// The set of site names allowed to connect. Cheap to clone (shared); updates are seen by the
/// server's certificate verifier at the next handshake.
#[derive(Clone, Default, Debug)]
pub struct Allowlist(Arc<RwLock<HashSet<String>>>);

impl Allowlist {
    pub fn new<I, S>(names: I) -> Allowlist
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Allowlist(Arc::new(RwLock::new(names.into_iter().map(Into::into).collect())))
    }
    /// Replaces the whole set.
    pub fn replace<I, S>(&self, names: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let set: HashSet<String> = names.into_iter().map(Into::into).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = set;
    }
    pub fn insert(&self, name: impl Into<String>) -> bool {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(name.into())
    }
    pub fn remove(&self, name: &str) -> bool {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).contains(name)
    }
    /// Sorted list of the allowed names.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.read().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        v.sort();
        v
    }
}

/// Reads the authenticated site name from a DER certificate: the SAN `<site>.site.fedtalent`
/// (authoritative), cross-checked with the CN.
pub fn site_name_from_cert_der(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::BadCertificate { field: "certificate", reason: e.to_string() })?;
    let mut from_san: Option<String> = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                if let Some(site) = d.strip_suffix(SITE_SAN_SUFFIX) {
                    if from_san.is_some() {
                        return Err(CertError::BadCertificate {
                            field: "subjectAltName",
                            reason: "more than one site name".into(),
                        });
                    }
                    from_san = Some(site.to_string());
                }
            }
        }
    }
    let site = from_san.ok_or_else(|| CertError::BadCertificate {
        field: "subjectAltName",
        reason: format!("no DNS name of the form <site>{SITE_SAN_SUFFIX}"),
    })?;
    validate_site_name(&site)?;
    let cn = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_string);
    if cn.as_deref() != Some(site.as_str()) {
        return Err(CertError::BadCertificate {
            field: "subject CN",
            reason: format!("CN {cn:?} does not match the SAN site name {site:?}"),
        });
    }
    Ok(site)
}

/// Best-effort CN of a certificate, for log messages about certificates that failed validation.
/// Escaped (`escape_debug`): the name is unverified, whoever connects chooses it, and a newline
/// or control character in it must not forge a log line.
fn claimed_name(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| c.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_string))
        .map_or_else(|| "<unreadable>".into(), |cn| cn.escape_debug().to_string())
}

/// The authenticated site name of the peer of a (server-side) connection.
pub fn peer_site_name(conn: &quinn::Connection) -> Result<String> {
    let identity = conn.peer_identity().ok_or(CertError::NoPeerCertificate)?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| CertError::NoPeerCertificate)?;
    site_name_of_chain(Some(&certs))
}

/// The site name of a peer's certificate chain (its leaf), as the handshake verified it.
pub(crate) fn site_name_of_chain(certs: Option<&[CertificateDer<'_>]>) -> Result<String> {
    let leaf = certs.and_then(|c| c.first()).ok_or(CertError::NoPeerCertificate)?;
    site_name_from_cert_der(leaf)
}

/// A refusal reason of the client-certificate verifier; shows up in the TLS error
/// ("invalid peer certificate: Other(...)") that quinn reports for the failed handshake.
/// Its Debug is its text too: rustls and quinn print the inner error with `{:?}`, and a derived
/// Debug would escape the (already escaped) names a second time.
#[derive(thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(Refusal(msg)))))
}

/// Describes a webpki failure in words an operator understands.
fn describe_cert_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "not issued by the federation CA (unknown issuer)".into(),
            C::BadSignature => "bad signature (not issued by the federation CA)".into(),
            C::ExpiredContext { time, not_after } => {
                format!("certificate expired (not after {}, now {})", unix_date(*not_after), unix_date(*time))
            }
            C::Expired => "certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("certificate not valid yet ({c:?})")
            }
            C::Revoked => "certificate revoked".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                format!("certificate not issued for client authentication ({c:?})")
            }
            other => format!("invalid certificate ({other:?})"),
        },
        other => other.to_string(),
    }
}

fn unix_date(t: UnixTime) -> String {
    OffsetDateTime::from_unix_timestamp(t.as_secs() as i64)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{}s since the epoch", t.as_secs()))
}

/// Client-certificate verifier of the coordinator: the chain must validate against the
/// federation CA (webpki), the certificate must carry a valid site name, and that name must be
/// on the allowlist at handshake time.
#[derive(Debug)]
pub(crate) struct FederationClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) allowlist: Allowlist,
}

impl ClientCertVerifier for FederationClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_client_cert(end_entity, intermediates, now) {
            let claimed = claimed_name(end_entity);
            let reason = format!("client certificate of site '{claimed}' refused: {}", describe_cert_error(&e));
            tracing::warn!(site = %claimed, "{reason}");
            return Err(refuse(reason));
        }
        let site = match site_name_from_cert_der(end_entity) {
            Ok(s) => s,
            Err(e) => {
                let claimed = claimed_name(end_entity);
                let reason = format!("client certificate of site '{claimed}' refused: {e}");
                tracing::warn!(site = %claimed, "{reason}");
                return Err(refuse(reason));
            }
        };
        if !self.allowlist.contains(&site) {
            let reason = format!("site '{site}' is not on the federation allowlist");
            tracing::warn!(site = %site, "{reason}");
            return Err(refuse(reason));
        }
        tracing::debug!(site = %site, "client certificate accepted");
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
