//! Readiness of a new worker: its own `ready` message, then an HTTP probe
//! of the shared socket (bounded status line, bounded wait).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::warn;

/// Bound on one health probe (connect, request, status line).
const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Pause between health probes of a worker that sent `ready`.
const PROBE_INTERVAL_MS: u64 = 50;
/// Bound on the status line of a health probe answer.
const PROBE_MAX_STATUS_LINE_BYTES: usize = 1024;
/// Bytes read at a time from a probe's answer: a status line fits in one.
const PROBE_READ_BYTES: usize = 256;
/// Resolves once `pid` sent `ready` and the socket answers the health path
/// with 200. Both workers accept on one socket, so the probe alone cannot
/// tell who answered: `ready` is the signal, the probe confirms the socket
/// serves.
pub(super) async fn wait_ready(
    mut ready: watch::Receiver<BTreeSet<u32>>,
    pid: u32,
    addr: SocketAddr,
    path: String,
    tls: bool,
) {
    if ready.wait_for(|pids| pids.contains(&pid)).await.is_err() {
        std::future::pending::<()>().await;
    }
    loop {
        match probe(addr, &path, tls).await {
            Ok(200) => return,
            Ok(code) => warn!("health probe GET {path}: {code}"),
            Err(e) => warn!("health probe GET {path}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(PROBE_INTERVAL_MS)).await;
    }
}

/// One `GET path` over a fresh connection (TLS when `tls`); the HTTP status code.
async fn probe(addr: SocketAddr, path: &str, tls: bool) -> io::Result<u16> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        if tls {
            let connector = tokio_rustls::TlsConnector::from(tls_probe_config()?);
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = connector.connect(name, tcp).await?;
            get(stream, addr, path).await
        } else {
            get(tcp, addr, path).await
        }
    };
    tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {PROBE_TIMEOUT_MS} ms"),
            )
        })?
}

async fn get<S>(mut stream: S, addr: SocketAddr, path: &str) -> io::Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: handover-supervisor\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; PROBE_READ_BYTES];
    while !head.contains(&b'\n') {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > PROBE_MAX_STATUS_LINE_BYTES {
            break;
        }
    }
    parse_status_line(&head).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no HTTP status line in the answer",
        )
    })
}

/// The probe's TLS client: it sends no secret and only asks whether the
/// socket answers, so it accepts any certificate (the handshake's
/// signatures are still checked).
fn tls_probe_config() -> io::Result<std::sync::Arc<rustls::ClientConfig>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Accepts any server certificate; checks the handshake's signatures.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Where to probe: a wildcard listen address is reached over loopback.
pub(super) fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Busy\r\nx: y"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn wildcard_listen_addresses_are_probed_over_loopback() {
        let any: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(probe_addr(any), "127.0.0.1:8080".parse().expect("addr"));
        let any6: SocketAddr = "[::]:8080".parse().expect("addr");
        assert_eq!(probe_addr(any6), "[::1]:8080".parse().expect("addr"));
        let one: SocketAddr = "127.40.0.1:80".parse().expect("addr");
        assert_eq!(probe_addr(one), one);
    }
}
