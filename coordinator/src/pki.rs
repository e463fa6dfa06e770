//! The operator's PKI files: `coordinator init` creates them, `coordinator sign` uses the CA.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedtalent_certs::{FederationCa, SiteKey};

use crate::config::ADMIN_IDENTITY;

pub const COORDINATOR_CERT: &str = "coordinator.crt";
pub const COORDINATOR_KEY: &str = "coordinator.key";
pub const COORDINATOR_SANS: &str = "coordinator.sans";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";

/// Creates the federation CA, the coordinator's certificate (for `sans`) and the operator CLI's
/// admin certificate under `pki_dir`. Refuses to overwrite an existing CA.
pub fn init(pki_dir: &Path, federation: &str, sans: &[String], validity_days: u32) -> Result<()> {
    let ca_cert = pki_dir.join(fedtalent_certs::CA_CERT_FILE);
    anyhow::ensure!(!ca_cert.exists(), "{} exists: refusing to replace the federation CA", ca_cert.display());
    let ca = FederationCa::create(&format!("{federation} federation CA"))?;
    ca.save(pki_dir)?;
    let (cert, key) = ca.issue_coordinator(sans, validity_days)?;
    fedtalent_certs::write_atomic(&pki_dir.join(COORDINATOR_CERT), cert.as_bytes(), 0o644)?;
    fedtalent_certs::write_atomic(&pki_dir.join(COORDINATOR_KEY), key.as_bytes(), 0o600)?;
    fedtalent_certs::write_atomic(&pki_dir.join(COORDINATOR_SANS), sans.join("\n").as_bytes(), 0o644)?;
    let admin = SiteKey::generate(ADMIN_IDENTITY)?;
    let admin_cert = ca.sign_site_csr(&admin.csr_pem, validity_days)?;
    fedtalent_certs::write_atomic(&pki_dir.join(ADMIN_KEY), admin.key_pem.as_bytes(), 0o600)?;
    fedtalent_certs::write_atomic(&pki_dir.join(ADMIN_CERT), admin_cert.as_bytes(), 0o644)?;
    Ok(())
}

pub fn load_ca(pki_dir: &Path) -> Result<FederationCa> {
    Ok(FederationCa::load(&pki_dir.join(fedtalent_certs::CA_CERT_FILE), &pki_dir.join(fedtalent_certs::CA_KEY_FILE))?)
}

/// Signs a site's certificate request; returns the site name and the certificate path. Only a
/// name listed in `sites` (`[federation].sites`) is signed: a certificate is a credential, and
/// one for an unlisted name is either a typo or a request nobody decided to admit.
pub fn sign(pki_dir: &Path, csr: &Path, out: &Path, validity_days: u32, sites: &[String]) -> Result<(String, PathBuf)> {
    let ca = load_ca(pki_dir)?;
    let csr_pem = std::fs::read_to_string(csr).with_context(|| format!("reading {}", csr.display()))?;
    let cert = ca.sign_site_csr(&csr_pem, validity_days).with_context(|| format!("signing {}", csr.display()))?;
    let der = rustls_pem_to_der(&cert)?;
    let site = fedtalent_certs::site_name_from_cert_der(&der)?;
    anyhow::ensure!(site != ADMIN_IDENTITY, "{}: the name {ADMIN_IDENTITY} is reserved", csr.display());
    anyhow::ensure!(
        sites.contains(&site),
        "{}: site {site:?} is not in [federation].sites {sites:?}; add it there first, then sign",
        csr.display()
    );
    fedtalent_certs::write_atomic(out, cert.as_bytes(), 0o644)?;
    Ok((site, out.to_path_buf()))
}

fn rustls_pem_to_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("decoding the issued certificate")?;
    Ok(der.to_vec())
}

/// The files a client (site or admin CLI) needs to reach the coordinator.
pub struct ClientPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientPki {
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        Ok(Self { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: fedtalent_certs::read_private_key(key)? })
    }
}

/// The first SAN of the coordinator certificate (the name admin clients verify).
pub fn coordinator_server_name(pki_dir: &Path) -> Result<String> {
    let path = pki_dir.join(COORDINATOR_SANS);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines().next().map(str::to_string).context("no SAN recorded")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 16: `coordinator sign` issues certificates only for listed sites.
    #[test]
    fn only_listed_sites_are_signed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        init(&pki, "t", &["localhost".into()], 1).unwrap();
        let (_, csr) = fedtalent_certs::write_keygen(dir.path(), "gamma").unwrap();
        let out = dir.path().join("gamma.crt");
        let sites = ["alpha".to_string(), "beta".to_string()];
        let err = format!("{:#}", sign(&pki, &csr, &out, 1, &sites).unwrap_err());
        assert!(err.contains("\"gamma\" is not in [federation].sites") && err.contains("gamma.csr"), "{err}");
        assert!(!out.exists(), "a certificate was written for an unlisted site");
        let listed = ["alpha".to_string(), "gamma".to_string()];
        assert_eq!(sign(&pki, &csr, &out, 1, &listed).unwrap().0, "gamma");
    }

    /// Issue 21 item 16: a private key others can read is refused on load, naming the file.
    #[cfg(unix)]
    #[test]
    fn group_readable_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        init(&pki, "t", &["localhost".into()], 1).unwrap();
        load_ca(&pki).unwrap();
        let key = pki.join(fedtalent_certs::CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", load_ca(&pki).unwrap_err());
        assert!(err.contains("ca.key") && err.contains("0640") && err.contains("chmod 600"), "{err}");
        let admin = pki.join(ADMIN_KEY);
        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o604)).unwrap();
        let ca = pki.join(fedtalent_certs::CA_CERT_FILE);
        let err = format!("{:#}", ClientPki::read(&ca, &pki.join(ADMIN_CERT), &admin).err().unwrap());
        assert!(err.contains("admin.key"), "{err}");
    }
}
