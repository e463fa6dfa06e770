//! PKI files and certificate contents.

use fedtalent_certs::*;
use rcgen::{CertificateParams, DnType, IsCa, KeyPair};

#[test]
fn site_names_are_validated() {
    for ok in ["alpha", "site_2", "A-b_9", &"x".repeat(64)] {
        validate_site_name(ok).unwrap();
    }
    for bad in ["", "a b", "a.b", "é", "../x", &"x".repeat(65)] {
        let e = validate_site_name(bad).unwrap_err();
        assert!(matches!(e, CertError::InvalidSiteName { .. }), "{bad:?}: {e}");
        assert!(SiteKey::generate(bad).is_err());
    }
}

#[test]
fn keygen_sign_and_name_round_trip() {
    let ca = FederationCa::create("ca").unwrap();
    let k = SiteKey::generate("hospital-7").unwrap();
    assert!(k.csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
    let cert = ca.sign_site_csr(&k.csr_pem, 10).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice_helper(&cert);
    assert_eq!(site_name_from_cert_der(&der).unwrap(), "hospital-7");
    // Client auth only, not a CA, valid ~10 days.
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!x.is_ca());
    let days = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 10);
    assert!(ca.sign_site_csr(&k.csr_pem, 0).is_err());
}

trait PemHelper {
    fn from_pem_slice_helper(pem: &str) -> rustls::pki_types::CertificateDer<'static>;
}
impl PemHelper for rustls::pki_types::CertificateDer<'static> {
    fn from_pem_slice_helper(pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }
}

fn csr_with(cn: Option<&str>, sans: Vec<String>, ca_req: bool) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    if ca_req {
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn bad_csrs_are_refused() {
    let ca = FederationCa::create("ca").unwrap();
    let cases = [
        (csr_with(Some("bad name!"), vec![], false), "invalid site name \"bad name!\""),
        (csr_with(None, vec![], false), "no CN"),
        (csr_with(Some("alpha"), vec!["beta.site.fedtalent".into()], false), "is not \"alpha.site.fedtalent\""),
        (csr_with(Some("alpha"), vec![], true), "asks for a CA certificate"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(), "unreadable"),
    ];
    for (csr, needle) in cases {
        let e = ca.sign_site_csr(&csr, 10).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
    }
    // A CSR without SANs but a good CN is fine; the SAN is added by the CA.
    let cert = ca.sign_site_csr(&csr_with(Some("gamma"), vec![], false), 10).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice_helper(&cert);
    assert_eq!(site_name_from_cert_der(&der).unwrap(), "gamma");
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn files_are_written_with_private_modes_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = FederationCa::create("ca").unwrap();
    let (cert_path, key_path) = ca.save(dir.path()).unwrap();
    #[cfg(unix)]
    assert_eq!(mode(&key_path), 0o600);
    // Refuses to overwrite the CA key.
    assert!(matches!(ca.save(dir.path()), Err(CertError::Exists { .. })));
    let loaded = FederationCa::load(&cert_path, &key_path).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    // The reloaded CA issues certificates that chain to the saved one.
    let k = SiteKey::generate("alpha").unwrap();
    let cert = loaded.sign_site_csr(&k.csr_pem, 5).unwrap();
    client_config(ca.cert_pem(), &cert, &k.key_pem).unwrap();

    // keygen: <site>.key (0600) and <site>.csr; no overwrite.
    let (kp, cp) = write_keygen(dir.path(), "alpha").unwrap();
    assert_eq!(kp, dir.path().join("alpha.key"));
    assert_eq!(cp, dir.path().join("alpha.csr"));
    #[cfg(unix)]
    assert_eq!(mode(&kp), 0o600);
    let csr = std::fs::read_to_string(&cp).unwrap();
    loaded.sign_site_csr(&csr, 5).unwrap();
    assert!(matches!(write_keygen(dir.path(), "alpha"), Err(CertError::Exists { .. })));
    // No temp files left behind.
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");

    // Load errors name the file; a key that is not the CA's is refused.
    let missing = dir.path().join("nope.crt");
    let e = FederationCa::load(&missing, &key_path).unwrap_err().to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let other = FederationCa::create("other").unwrap();
    let other_key = dir.path().join("other.key");
    write_atomic(&other_key, other.key_pem().as_bytes(), 0o600).unwrap();
    let e = FederationCa::load(&cert_path, &other_key).unwrap_err().to_string();
    assert!(e.contains("does not match the key"), "{e}");
}

#[test]
fn config_errors_name_the_input() {
    let ca = FederationCa::create("ca").unwrap();
    let e = client_config(ca.cert_pem(), "not a pem", "also not").unwrap_err().to_string();
    assert!(e.contains("site certificate"), "{e}");
    let (c, _k) = ca.issue_coordinator(&["localhost".into()], 1).unwrap();
    let e = server_config(ca.cert_pem(), &c, "garbage", Allowlist::default()).unwrap_err().to_string();
    assert!(e.contains("coordinator key"), "{e}");
    assert!(ca.issue_coordinator(&[], 1).is_err());
}

#[test]
fn allowlist_is_shared_and_live() {
    let a = Allowlist::new(["x", "y"]);
    let b = a.clone();
    assert!(b.contains("x"));
    a.replace(["z"]);
    assert!(!b.contains("x") && b.contains("z"));
    assert!(b.insert("w"));
    assert_eq!(a.names(), vec!["w".to_string(), "z".to_string()]);
}

/// Issue 21 item 16: a key's temporary file is created new (O_EXCL): a symlink planted at its
/// name is neither written through nor renamed into place.
#[cfg(unix)]
#[test]
fn key_writes_do_not_follow_planted_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let key = dir.path().join("alpha.key");
    let planted = dir.path().join(format!(".alpha.key.tmp.{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    write_atomic(&key, b"secret", 0o600).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(!std::fs::symlink_metadata(&key).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
    assert_eq!(mode(&key), 0o600);
}
