//! `handover_net::serve` with TLS on a loopback port: a client trusting the
//! cluster CA is served; one trusting another CA, or speaking plain HTTP,
//! is not; a connection that never finishes its handshake is closed.

use axum::routing::get;
use axum::Router;
use handover_net::tls::{client_for, server_config, ClientTrust};
use handover_net::{serve, Limits};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on every wait.
const BOUND: Duration = Duration::from_secs(10);
/// The handshake (and header) timeout of the server under test.
const SHORT_MS: u64 = 300;

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// (ca.crt, server.crt, server.key).
fn pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    let files = (
        dir.join(format!("{name}-ca.crt")),
        dir.join(format!("{name}-server.crt")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&files.0, ca_cert.pem()).unwrap();
    std::fs::write(&files.1, leaf_cert.pem()).unwrap();
    std::fs::write(&files.2, leaf_key.serialize_pem()).unwrap();
    files
}

#[tokio::test]
async fn only_clients_of_the_cluster_ca_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path(), "ours");
    let (other_ca, _, _) = pki(dir.path(), "theirs");
    let config = server_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        connections_max: 64,
        header_read_timeout_ms: SHORT_MS,
        body_read_timeout_ms: SHORT_MS,
        write_timeout_ms: SHORT_MS,
        evictable_idle_ms: SHORT_MS,
        drain_idle_ms: 0,
    };
    let router = Router::new().route("/healthz", get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, router, limits, Some(config), async move {
        let _ = stopped.await;
    }));
    let url = format!("https://{addr}/healthz");

    let ours = ClientTrust::load(&ca).unwrap();
    let client = client_for(&url, Some(&ours), reqwest::Client::builder().timeout(BOUND))
        .unwrap()
        .build()
        .unwrap();
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");

    let theirs = ClientTrust::load(&other_ca).unwrap();
    let stranger = client_for(
        &url,
        Some(&theirs),
        reqwest::Client::builder().timeout(BOUND),
    )
    .unwrap()
    .build()
    .unwrap();
    let refused = stranger.get(&url).send().await;
    assert!(refused.is_err(), "a certificate of another CA was accepted");

    // Plain HTTP to the TLS socket gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(BOUND, plain.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");

    // A client that opens and never says anything is closed.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut one = [0u8; 1];
    let n = tokio::time::timeout(BOUND, silent.read(&mut one))
        .await
        .expect("a silent client was never closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    let _ = stop.send(());
    tokio::time::timeout(BOUND, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn a_missing_or_foreign_file_says_which_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.crt");
    let e = ClientTrust::load(&missing).unwrap_err().to_string();
    assert!(e.contains("none.crt"), "{e}");
    let not_pem = dir.path().join("x.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let e = ClientTrust::load(&not_pem).unwrap_err().to_string();
    assert!(e.contains("handover init"), "{e}");
    let (_, cert, _) = pki(dir.path(), "a");
    let (_, _, other_key) = pki(dir.path(), "b");
    let e = server_config(&cert, &other_key).unwrap_err().to_string();
    assert!(e.contains("does not go with"), "{e}");
}

/// A client's certificate reaches the handlers as the SHA-256 of what the
/// client proved it holds (any issuer: the application pins it); a client
/// without one is served too, with none; a certificate whose key the client
/// does not hold cannot be presented at all.
#[tokio::test]
async fn a_client_certificate_reaches_the_handler_as_its_digest() {
    use handover_net::tls::{ClientIdentity, PeerCertificate};
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path(), "ours");
    let config = server_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route(
        "/who",
        get(
            |peer: Option<axum::Extension<PeerCertificate>>| async move {
                peer.map(|p| p.0.sha256_hex.to_string())
                    .unwrap_or_else(|| "nobody".into())
            },
        ),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        router,
        Limits::NODE,
        Some(config),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("https://{addr}/who");
    let trust = ClientTrust::load(&ca).unwrap();
    let ask = |trust: ClientTrust| {
        let url = url.clone();
        async move {
            let client = client_for(
                &url,
                Some(&trust),
                reqwest::Client::builder().timeout(BOUND),
            )
            .unwrap()
            .build()
            .map_err(|e| e.to_string())?;
            let r = client.get(&url).send().await.map_err(|e| e.to_string())?;
            r.text().await.map_err(|e| e.to_string())
        }
    };
    assert_eq!(ask(trust.clone()).await.unwrap(), "nobody");
    let (identity, peer) = ClientIdentity::generate("g1-b").unwrap();
    assert_eq!(identity.certificate().unwrap(), peer);
    assert_eq!(
        ask(trust.clone().with_identity(identity.clone()))
            .await
            .unwrap(),
        peer.sha256_hex.to_string()
    );
    // Its certificate with another key cannot even be presented (the
    // handshake's signature, checked by the server, could not match).
    let (stranger, _) = ClientIdentity::generate("g1-b").unwrap();
    let cert_only = identity.certificate_pem();
    let other_pem = String::from_utf8(stranger.pem().to_vec()).unwrap();
    let key_only = &other_pem[other_pem.find("-----BEGIN PRIVATE KEY-----").unwrap()..];
    let forged = ClientIdentity::from_pem(format!("{cert_only}{key_only}").into_bytes());
    let refused = ask(trust.with_identity(forged)).await;
    assert!(
        refused.is_err(),
        "a certificate without its key was accepted: {refused:?}"
    );
    let _ = stop.send(());
    tokio::time::timeout(BOUND, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
