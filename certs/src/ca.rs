//! The federation CA and the sites' own keys: who issues which certificate (DESIGN.md §2.4).
//! A site's private key never leaves it; only its CSR travels to the coordinator's operator.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::{
    read_private_key, read_to_string, site_san, validate_site_name, write_atomic, CertError, Result, CA_CERT_FILE,
    CA_KEY_FILE,
};

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
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
