//! Federation PKI and mutual-TLS configuration for fedtalent (DESIGN.md §2.4).
//!
//! * A federation CA ([`FederationCa`]) issues one coordinator certificate (server auth, SANs for
//!   the coordinator's DNS names / IPs) and one certificate per site (client auth).
//! * A site creates its own key pair and a certificate signing request ([`SiteKey`],
//!   [`write_keygen`]); only the CSR travels to the coordinator's operator, who signs it
//!   ([`FederationCa::sign_site_csr`]). Private keys never leave their owner.
//! * [`server_config`] / [`client_config`] build quinn configs for mutual TLS 1.3 with the ring
//!   provider and ALPN `fedtalent/1`.
//!
//! ## Site identity
//! A site certificate carries the site name twice: as the subject common name (CN) and as the
//! SAN DNS name `<site>.site.fedtalent` ([`site_san`]). **The SAN is authoritative**: it is the
//! field X.509 path validation is defined over. The CN must carry the same name; a certificate
//! whose CN and SAN disagree, that has no such SAN, or that has more than one, is refused.
//! Site names match `[A-Za-z0-9_-]{1,64}`.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};
use time::OffsetDateTime;

mod transport;
pub use transport::{client_endpoint, server_endpoint, transport_config, UDP_BUFFER_BYTES};

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

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
}

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

fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })
}

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime)> {
    if days == 0 {
        return Err(CertError::Validity("validity must be at least 1 day".into()));
    }
    let now = OffsetDateTime::now_utc();
    // Small back-dating tolerates clock skew between the coordinator and the sites.
    Ok((now - time::Duration::minutes(5), now + time::Duration::days(days as i64)))
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system random number generator");
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The federation certificate authority. Holds the CA private key: only the coordinator's
/// operator has one.
pub struct FederationCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederationCa").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl FederationCa {
    /// Creates a new self-signed federation CA (ECDSA P-256, 10 years).
    pub fn create(common_name: &str) -> Result<FederationCa> {
        let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "fedtalent federation");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let (nb, na) = validity(3650)?;
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(rc("self-signing the CA certificate"))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::new(params, key);
        Ok(FederationCa { cert_pem, key_pem, issuer })
    }

    /// Loads a CA from its certificate and private key PEM files.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<FederationCa> {
        let cert_pem = read_to_string(cert_pem_path)?;
        let key_pem = read_private_key(key_pem_path)?;
        let what_key = key_pem_path.display().to_string();
        let key = KeyPair::from_pem(&key_pem).map_err(rc(what_key))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(rc(cert_pem_path.display().to_string()))?;
        // The key must belong to the certificate.
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CertError::BadPem { what: cert_pem_path.display().to_string(), reason: e.to_string() })?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::BadPem { what: cert_pem_path.display().to_string(), reason: e.to_string() })?;
        let spki = x509.public_key().subject_public_key.data.as_ref();
        if spki != rcgen::PublicKeyData::der_bytes(issuer.key()) {
            return Err(CertError::BadCertificate {
                field: "subjectPublicKeyInfo",
                reason: format!("{} does not match the key in {}", cert_pem_path.display(), key_pem_path.display()),
            });
        }
        Ok(FederationCa { cert_pem, key_pem, issuer })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, each atomically. Refuses to
    /// overwrite an existing key.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(CertError::Exists { path: key_path });
        }
        write_atomic(&key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, self.cert_pem.as_bytes(), 0o644)?;
        Ok((cert_path, key_path))
    }

    /// The CA certificate (PEM). This is what every participant trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM). Keep on the coordinator's operator machine only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues the coordinator's server certificate with the given SANs (DNS names or IP
    /// addresses) and returns `(cert_pem, key_pem)`. The key is generated here, on the
    /// coordinator's machine.
    pub fn issue_coordinator(&self, sans: &[String], validity_days: u32) -> Result<(String, String)> {
        if sans.is_empty() {
            return Err(CertError::BadCertificate {
                field: "subjectAltName",
                reason: "the coordinator certificate needs at least one DNS name or IP".into(),
            });
        }
        let mut params = CertificateParams::new(sans.to_vec()).map_err(rc(format!("coordinator SANs {sans:?}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fedtalent coordinator");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let (nb, na) = validity(validity_days)?;
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(rc("generating the coordinator key"))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rc("signing the coordinator certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a site certificate from a site's CSR, valid from now for `validity_days`.
    ///
    /// The request's signature is verified (proof of possession). The site name is taken from
    /// the CSR's CN and must be a valid site name; if the CSR lists SANs they must be exactly
    /// `<site>.site.fedtalent`. Nothing else from the request is trusted: the certificate is
    /// built from scratch (client auth only, not a CA) around the requested public key.
    pub fn sign_site_csr(&self, csr_pem: &str, validity_days: u32) -> Result<String> {
        let (nb, na) = validity(validity_days)?;
        self.sign_site_csr_between(csr_pem, nb, na)
    }

    /// As [`sign_site_csr`](Self::sign_site_csr) with an explicit validity window (used to
    /// issue short-lived or — in tests — already expired certificates).
    pub fn sign_site_csr_between(
        &self,
        csr_pem: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String> {
        if not_after <= not_before {
            return Err(CertError::Validity(format!("not_after {not_after} is not after not_before {not_before}")));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::CsrRefused(format!("unreadable or badly signed: {e}")))?;
        let site = site_from_csr(&csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, site.clone());
        dn.push(DnType::OrganizationName, "fedtalent site");
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::DnsName(site_san(&site).try_into().map_err(rc(format!("SAN of site {site:?}")))?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rc(format!("signing the certificate of site {site:?}")))?;
        tracing::info!(site = %site, not_after = %not_after, "issued site certificate");
        Ok(cert.pem())
    }
}

fn site_from_csr(csr: &CertificateSigningRequestParams) -> Result<String> {
    let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        Some(rcgen::DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(_) => return Err(CertError::CsrRefused("subject CN has an unsupported string type".into())),
        None => return Err(CertError::CsrRefused("subject has no CN (site name)".into())),
    };
    validate_site_name(&cn).map_err(|e| CertError::CsrRefused(e.to_string()))?;
    let want = site_san(&cn);
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(d) if d.as_str().eq_ignore_ascii_case(&want) => {}
            other => {
                return Err(CertError::CsrRefused(format!("site {cn:?}: requested SAN {other:?} is not {want:?}")))
            }
        }
    }
    if csr.params.is_ca != IsCa::NoCa && csr.params.is_ca != IsCa::ExplicitNoCa {
        return Err(CertError::CsrRefused(format!("site {cn:?}: the request asks for a CA certificate")));
    }
    Ok(cn)
}

/// A site's freshly generated key pair and certificate signing request.
pub struct SiteKey {
    pub site: String,
    /// PKCS#8 private key (PEM). Stays on the site.
    pub key_pem: String,
    /// Certificate signing request (PEM): CN = site, SAN = `<site>.site.fedtalent`.
    pub csr_pem: String,
}

impl fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteKey").field("site", &self.site).field("csr_pem", &self.csr_pem).finish_non_exhaustive()
    }
}

impl SiteKey {
    /// Generates a key pair (ECDSA P-256) and a CSR for `site_name`.
    pub fn generate(site_name: &str) -> Result<SiteKey> {
        validate_site_name(site_name)?;
        let key = KeyPair::generate().map_err(rc("generating the site key"))?;
        let mut params =
            CertificateParams::new(vec![site_san(site_name)]).map_err(rc(format!("SAN of site {site_name:?}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, site_name);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).map_err(rc(format!("CSR of site {site_name:?}")))?;
        Ok(SiteKey {
            site: site_name.to_string(),
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem().map_err(rc("encoding the CSR"))?,
        })
    }

    /// Writes `<site>.key` (0600) and `<site>.csr` (0644) into `dir`; refuses to overwrite an
    /// existing key. Returns `(key_path, csr_path)`.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
        let key_path = dir.join(format!("{}.key", self.site));
        let csr_path = dir.join(format!("{}.csr", self.site));
        if key_path.exists() {
            return Err(CertError::Exists { path: key_path });
        }
        write_atomic(&key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&csr_path, self.csr_pem.as_bytes(), 0o644)?;
        Ok((key_path, csr_path))
    }
}

/// `site-agent keygen --site NAME`: generates a key and CSR and writes `<site>.key` (0600) and
/// `<site>.csr` into `dir`. Returns `(key_path, csr_path)`.
pub fn write_keygen(dir: &Path, site: &str) -> Result<(PathBuf, PathBuf)> {
    SiteKey::generate(site)?.write(dir)
}

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
    let leaf = certs.first().ok_or(CertError::NoPeerCertificate)?;
    site_name_from_cert_der(leaf)
}

/// A refusal reason of the client-certificate verifier; shows up in the TLS error
/// ("invalid peer certificate: Other(...)") that quinn reports for the failed handshake.
struct Refusal(String);
impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refusal {}

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
struct FederationClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowlist: Allowlist,
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

/// Server (coordinator) config: TLS 1.3 only, ring provider, ALPN `fedtalent/1`, client
/// certificates required, validated against the federation CA, and their site name checked
/// against `allowlist` at every handshake (session resumption is off, so every connection is a
/// full handshake that runs the verifier).
pub fn server_config(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    allowlist: Allowlist,
) -> Result<quinn::ServerConfig> {
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
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Client (site) config: verifies the coordinator's certificate against the federation CA
/// (the server name passed to `Endpoint::connect` must be one of the coordinator's SANs) and
/// presents the site certificate.
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
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_client_auth_cert(parse_certs(cert_pem, "site certificate")?, parse_key(key_pem, "site key")?)
        .map_err(|e| CertError::Tls(format!("site certificate/key: {e}")))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    finish_client(tls)
}

/// A client config that presents no client certificate (only useful to test refusals).
pub fn client_config_without_client_auth(ca_cert_pem: &str) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    finish_client(tls)
}

fn finish_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}
