//! `handover init`: a cluster's certificate authority and the controller's
//! certificate, made with rcgen, written private (dir 0700, keys 0600).
//! Nodes and operators trust `ca.crt` and nothing else; the CA key stays
//! with the controller's operator (it signs certificates, nothing reads it
//! at run time). Also two operator identities, client certificates the
//! controller pins: `operator.pem` (everything) and `read-only.pem`
//! (reading), each with its `.crt` for the controller's `--operator-cert`
//! and `--read-only-cert`.

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The files `init` writes into its directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CONTROLLER_CERT: &str = "controller.crt";
pub const CONTROLLER_KEY: &str = "controller.key";
/// The operator's client certificate and key (`--identity`), and the
/// certificate alone (the controller's `--operator-cert`).
pub const OPERATOR_IDENTITY: &str = "operator.pem";
pub const OPERATOR_CERT: &str = "operator.crt";
/// The same for the read-only role (`--read-only-cert`).
pub const READ_ONLY_IDENTITY: &str = "read-only.pem";
pub const READ_ONLY_CERT: &str = "read-only.crt";
/// How long the CA is valid: ten years, the life of a cluster.
const CA_VALID_DAYS: i64 = 3_650;
/// How long the controller's certificate is valid: a year; `init --renew`
/// is the way to a new one (not yet: issue a new one with a new dir).
const CONTROLLER_VALID_DAYS: i64 = 365;

/// What `init` made.
pub struct Made {
    pub dir: PathBuf,
    pub names: Vec<String>,
}

/// Creates the CA and the controller's certificate for `names` (DNS names
/// or IP addresses the controller is reached at) in `dir`, which must not
/// hold them already.
pub fn init(dir: &Path, names: &[String]) -> anyhow::Result<Made> {
    if names.is_empty() {
        bail!("name at least one address or DNS name the controller is reached at (--name)");
    }
    for f in [
        CA_CERT,
        CA_KEY,
        CONTROLLER_CERT,
        CONTROLLER_KEY,
        OPERATOR_IDENTITY,
        OPERATOR_CERT,
        READ_ONLY_IDENTITY,
        READ_ONLY_CERT,
    ] {
        if dir.join(f).exists() {
            bail!(
                "{} exists: this directory holds a cluster already; use another one",
                dir.join(f).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;

    let now = OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "handover cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - Duration::minutes(5);
    ca.not_after = now + Duration::days(CA_VALID_DAYS);
    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let ca_cert = ca.self_signed(&ca_key).context("cannot sign the CA")?;

    let mut leaf = CertificateParams::new(names.to_vec())
        .context("the controller's names are not valid DNS names or IP addresses")?;
    leaf.distinguished_name
        .push(DnType::CommonName, "handover controller");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - Duration::minutes(5);
    leaf.not_after = now + Duration::days(CONTROLLER_VALID_DAYS);
    let leaf_key = KeyPair::generate().context("cannot generate the controller's key")?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .context("cannot sign the controller's certificate")?;

    write_new(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(CONTROLLER_KEY),
        leaf_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(
        &dir.join(CONTROLLER_CERT),
        leaf_cert.pem().as_bytes(),
        0o644,
    )?;
    for (name, identity, cert) in [
        ("operator", OPERATOR_IDENTITY, OPERATOR_CERT),
        ("read-only", READ_ONLY_IDENTITY, READ_ONLY_CERT),
    ] {
        let (made, _) = handover_net::tls::ClientIdentity::generate(&format!("handover-{name}"))
            .map_err(|e| anyhow::anyhow!("cannot make the {name} identity: {e}"))?;
        write_new(&dir.join(identity), made.pem(), 0o600)?;
        write_new(&dir.join(cert), made.certificate_pem().as_bytes(), 0o644)?;
    }
    Ok(Made {
        dir: dir.to_owned(),
        names: names.to_vec(),
    })
}

/// Writes a new file with `mode` from the start (never readable by others,
/// not even for a moment), fsync'd.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn init_writes_a_ca_and_a_controller_certificate_private() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("pki");
        init(&at, &["127.0.0.1".into(), "controller.example".into()]).unwrap();
        let mode = |f: &str| std::fs::metadata(at.join(f)).unwrap().mode() & 0o777;
        assert_eq!(mode("."), 0o700);
        assert_eq!((mode(CA_KEY), mode(CONTROLLER_KEY)), (0o600, 0o600));
        assert_eq!(
            (mode(OPERATOR_IDENTITY), mode(READ_ONLY_IDENTITY)),
            (0o600, 0o600)
        );
        // The .crt pins what the .pem presents.
        for (identity, cert) in [
            (OPERATOR_IDENTITY, OPERATOR_CERT),
            (READ_ONLY_IDENTITY, READ_ONLY_CERT),
        ] {
            let id = handover_net::tls::ClientIdentity::load(&at.join(identity)).unwrap();
            let pinned = handover_net::tls::PeerCertificate::load(&at.join(cert)).unwrap();
            assert_eq!(id.certificate().unwrap(), pinned, "{cert}");
        }
        for f in [CA_CERT, CONTROLLER_CERT] {
            let pem = std::fs::read_to_string(at.join(f)).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{f}");
        }
        let again = init(&at, &["127.0.0.1".into()]).err().unwrap();
        assert!(
            again.to_string().contains("holds a cluster already"),
            "{again}"
        );
        assert!(init(&dir.path().join("x"), &[]).is_err());
    }
}
