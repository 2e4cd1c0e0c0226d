//! TLS for the controller's listener and for every client of it (nodes,
//! operators, the fleet harness), with rustls. The cluster's own CA
//! (`handover init`) is the only trust anchor a client has: no system
//! roots, so a certificate from anyone else's CA is refused.

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
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            reason: format!("the key does not go with the certificate: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// What a client trusts: the cluster CA's certificate (`ca.crt`).
#[derive(Clone, Debug)]
pub struct ClientTrust {
    ca_pem: Vec<u8>,
    pub path: PathBuf,
}

impl ClientTrust {
    /// Reads and checks `ca.crt` (at least one PEM certificate).
    pub fn load(path: &Path) -> Result<ClientTrust, TlsError> {
        certificates(path)?;
        Ok(ClientTrust {
            ca_pem: read_pem(path)?,
            path: path.to_owned(),
        })
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
