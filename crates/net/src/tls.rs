//! TLS for the controller's listener and for every client of it (nodes,
//! operators, the fleet harness), with rustls. The cluster's own CA
//! (`handover init`) is the only trust anchor a client has: no system
//! roots, so a certificate from anyone else's CA is refused.
//!
//! Clients may present a certificate of their own (nodes always do). The
//! server checks only that the client holds its key (the handshake's
//! signature), not who signed it: what a certificate may do is decided by
//! the application, which pins certificates by their SHA-256
//! ([`PeerCertificate`], in every request's extensions), the way SSH pins
//! keys. A certificate nobody pinned gets nothing a client without one
//! would not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest PEM file read (a certificate chain or a key is a few KB).
pub const PEM_BYTES_MAX: u64 = 256 * 1024;

/// Why TLS could not be set up; each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {PEM_BYTES_MAX} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM {what} (make one with `handover init`)")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > PEM_BYTES_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read_pem(path)?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's side: its certificate chain and key, as `handover init`
/// wrote them (`controller.crt`, `controller.key`).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let chain = certificates(cert)?;
    let key_pem = read_pem(key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        TlsError::Missing {
            path: key.to_owned(),
            what: "private key",
        }
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(Arc::new(PinnedByApplication {
            provider: provider(),
        }))
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            reason: format!("the key does not go with the certificate: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// The certificate a client presented and proved it holds the key of, as
/// the server's handlers see it (a request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    /// SHA-256 of the certificate's DER bytes, 64 lowercase hex digits
    /// (what `openssl x509 -fingerprint -sha256` shows, without colons).
    pub sha256_hex: Arc<str>,
}

impl PeerCertificate {
    /// The first certificate of a PEM file, to pin (`--operator-cert`).
    pub fn load(path: &Path) -> Result<PeerCertificate, TlsError> {
        let certs = certificates(path)?;
        Ok(PeerCertificate::of_der(&certs[0]))
    }

    pub fn of_der(der: &[u8]) -> PeerCertificate {
        use sha2::Digest as _;
        PeerCertificate {
            sha256_hex: handover_core::artifact::to_hex(&sha2::Sha256::digest(der)).into(),
        }
    }
}

/// Asks every client for a certificate, accepts none at all, and accepts
/// any certificate whose key signed the handshake: the application pins
/// certificates ([`PeerCertificate`]), so no CA, expiry or name is checked
/// here. The signature check is rustls' own, with the provider's algorithms.
#[derive(Debug)]
struct PinnedByApplication {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for PinnedByApplication {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client's own certificate and key (one PEM), presented to the server.
#[derive(Clone)]
pub struct ClientIdentity {
    pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// From a PEM holding the certificate and its PKCS#8 key.
    pub fn from_pem(pem: Vec<u8>) -> ClientIdentity {
        ClientIdentity { pem }
    }

    /// Reads `path` (at most [`PEM_BYTES_MAX`]): the certificate and key.
    pub fn load(path: &Path) -> Result<ClientIdentity, TlsError> {
        let id = ClientIdentity::from_pem(read_pem(path)?);
        id.reqwest().map_err(|reason| TlsError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(id)
    }

    /// A new key (ECDSA P-256) and a self-signed certificate naming
    /// `name`, as one PEM, and the certificate's SHA-256 (hex). A node makes
    /// its identity so at its first start; it never expires (what it may do
    /// is the pin the controller holds, removed by `handover node remove`).
    pub fn generate(name: &str) -> Result<(ClientIdentity, PeerCertificate), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let params = rcgen::CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| format!("{name:?} cannot name a certificate: {e}"))?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let peer = PeerCertificate::of_der(cert.der());
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        Ok((ClientIdentity::from_pem(pem.into_bytes()), peer))
    }

    /// The PEM (certificate, then key): a secret, keep it 0600.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// The certificate's PEM blocks alone (no key): what a server pins.
    pub fn certificate_pem(&self) -> String {
        const END: &str = "-----END CERTIFICATE-----";
        let text = String::from_utf8_lossy(&self.pem);
        match text.rfind(END) {
            Some(at) => format!("{}\n", &text[..at + END.len()]),
            None => String::new(),
        }
    }

    /// The certificate's SHA-256, as the server sees it.
    pub fn certificate(&self) -> Result<PeerCertificate, String> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(&self.pem)
            .next()
            .ok_or("no certificate in the identity")?
            .map_err(|e| e.to_string())?;
        Ok(PeerCertificate::of_der(&der))
    }

    fn reqwest(&self) -> Result<reqwest::Identity, String> {
        reqwest::Identity::from_pem(&self.pem).map_err(|e| e.to_string())
    }
}

/// What a client trusts: the cluster CA's certificate (`ca.crt`), and the
/// client's own certificate, if it presents one.
#[derive(Clone, Debug)]
pub struct ClientTrust {
    ca_pem: Vec<u8>,
    pub path: PathBuf,
    identity: Option<ClientIdentity>,
}

impl ClientTrust {
    /// Reads and checks `ca.crt` (at least one PEM certificate).
    pub fn load(path: &Path) -> Result<ClientTrust, TlsError> {
        certificates(path)?;
        Ok(ClientTrust {
            ca_pem: read_pem(path)?,
            path: path.to_owned(),
            identity: None,
        })
    }

    /// This trust, presenting `identity` to the server.
    pub fn with_identity(mut self, identity: ClientIdentity) -> ClientTrust {
        self.identity = Some(identity);
        self
    }

    /// `builder` trusting this CA only (no system roots), over rustls.
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, TlsError> {
        let ca =
            reqwest::Certificate::from_pem_bundle(&self.ca_pem).map_err(|e| TlsError::Invalid {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        let mut builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
        for c in ca {
            builder = builder.add_root_certificate(c);
        }
        if let Some(id) = &self.identity {
            let identity = id.reqwest().map_err(|reason| TlsError::Invalid {
                path: self.path.clone(),
                reason: format!("the client certificate: {reason}"),
            })?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}

/// A client for `url` (the controller's): `https://` needs `trust`;
/// `http://` is refused unless the host is a loopback address, so secrets
/// and acknowledgements never cross a network in the clear.
pub fn client_for(
    url: &str,
    trust: Option<&ClientTrust>,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::ClientBuilder, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match (parsed.scheme(), trust) {
        ("https", Some(t)) => t.apply(builder).map_err(|e| e.to_string()),
        ("https", None) => Err(format!(
            "{url} is https: give the cluster CA (--ca FILE or HANDOVER_CA, the ca.crt of `handover init`)"
        )),
        ("http", _) if is_loopback_host(&parsed) => Ok(builder),
        ("http", _) => Err(format!(
            "{url} is plain http to another host: use https:// and --ca (see `handover init`)"
        )),
        (other, _) => Err(format!("{url}: scheme {other:?} is neither https nor http")),
    }
}

fn is_loopback_host(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_and_https_only_with_the_ca() {
        let b = || reqwest::Client::builder();
        for ok in [
            "http://127.0.0.1:7400",
            "http://127.9.0.1:1",
            "http://[::1]:7400",
            "http://localhost:1",
        ] {
            assert!(client_for(ok, None, b()).is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.1:7400",
            "http://controller.example",
            "https://127.0.0.1:7400",
            "ftp://x",
        ] {
            assert!(client_for(refused, None, b()).is_err(), "{refused}");
        }
    }
}
