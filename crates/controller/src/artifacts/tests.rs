use super::*;
use futures_util::Stream;
use handover_core::artifact::sha256_hex;
use handover_core::artifact::{
    verify_manifest, PublicKey, BINARY_FILE, MANIFEST_FILE, SIGNATURE_FILE,
};
use handover_core::wire::ArtifactSources;
use handover_core::Release;
use handover_store::NodeRow;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path as FsPath;
use std::sync::Arc;

const OP: &str = "operator-token-0123456789";
const NODE: &str = "node-credential-0123456789";

#[derive(Clone)]
struct Host(
    Arc<ArtifactStore>,
    crate::auth::OperatorCredentials,
    /// The registry the sources are read from.
    Arc<std::sync::Mutex<Vec<NodeRow>>>,
);

impl crate::auth::OperatorAuth for Host {
    fn operator_credentials(&self) -> &crate::auth::OperatorCredentials {
        &self.1
    }
}

impl ArtifactHost for Host {
    fn artifacts(&self) -> &ArtifactStore {
        &self.0
    }
    async fn check_node(&self, proof: &NodeProof) -> ApiResult<()> {
        match proof.credential() {
            Some(d) if d.matches(&handover_core::identity::SecretDigest::of(NODE)) => Ok(()),
            _ => Err(ApiError::unauthorized("unknown credential")),
        }
    }
    async fn nodes(&self) -> ApiResult<Vec<NodeRow>> {
        Ok(self.2.lock().unwrap().clone())
    }
    fn lease_ms(&self) -> u64 {
        3_000
    }
}

fn binary(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn manifest_of(bytes: &[u8]) -> Manifest {
    Manifest::for_release(
        &handover_core::ReleaseInfo::of(Release(2)).unwrap().facts(),
        handover_core::release::CONTRACTS,
        sha256_hex(bytes),
        bytes.len() as u64,
        1_000,
    )
    .unwrap()
}

fn chunks(bytes: &[u8], n: usize) -> impl Stream<Item = Result<Vec<u8>, String>> + Unpin {
    let v: Vec<Result<Vec<u8>, String>> = bytes.chunks(n).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(v)
}

fn entries(dir: &FsPath) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn store_put_get_list_and_idempotence() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path().join("artifacts")).unwrap();
    let bytes = binary(100_000);
    let m = manifest_of(&bytes);
    let put = store.put_stream(&m, chunks(&bytes, 4096)).await.unwrap();
    assert_eq!(put, Put::Created(m.clone()));
    let (got, path) = store.get(&m.id()).unwrap();
    assert_eq!(got, m);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(store.list().unwrap(), vec![m.clone()]);
    // Same artifact again (a later created_ms): the stored one stays.
    let mut again = m.clone();
    again.created_ms += 5;
    let put = store.put_stream(&again, chunks(&bytes, 999)).await.unwrap();
    assert_eq!(put, Put::Existing(m.clone()));
    assert_eq!(entries(store.dir()), vec![m.id()]);
    assert!(store.get("r2-000000000000").is_none());
    assert!(store.get("../etc").is_none());
}

#[tokio::test]
async fn store_keeps_nothing_on_a_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path()).unwrap();
    let bytes = binary(10_000);
    let m = manifest_of(&bytes);
    let mut bad = bytes.clone();
    bad[1234] ^= 0x80;
    let mut long = bytes.clone();
    long.push(0);
    type Refusal = fn(&ArtifactStoreError) -> bool;
    let digest: Refusal = |e| {
        matches!(
            e,
            ArtifactStoreError::Artifact(ArtifactError::DigestMismatch { .. })
        )
    };
    let size: Refusal = |e| {
        matches!(
            e,
            ArtifactStoreError::Artifact(ArtifactError::SizeMismatch { .. })
        )
    };
    for (name, body, refused) in [
        ("a flipped bit", &bad[..], digest),
        ("a byte more", &long[..], size),
        ("a byte less", &bytes[..9_999], size),
    ] {
        let err = store.put_stream(&m, chunks(body, 1000)).await.unwrap_err();
        assert!(refused(&err), "{name}: {err}");
    }
    let cut = futures_util::stream::iter(vec![Ok(bytes[..10].to_vec()), Err("reset".to_owned())]);
    let err = store.put_stream(&m, cut).await.unwrap_err();
    assert!(
        matches!(err, ArtifactStoreError::Interrupted { received: 10, .. }),
        "{err}"
    );
    assert!(
        entries(store.dir()).is_empty(),
        "{:?}",
        entries(store.dir())
    );
    assert!(store.list().unwrap().is_empty());
    // A mismatching re-upload of a stored artifact changes nothing either.
    store.put_stream(&m, chunks(&bytes, 1000)).await.unwrap();
    let err = store.put_stream(&m, chunks(&bad, 1000)).await.unwrap_err();
    assert!(digest(&err), "{err}");
    assert_eq!(std::fs::read(store.get(&m.id()).unwrap().1).unwrap(), bytes);
}

#[tokio::test]
async fn store_refuses_an_id_collision_and_cleans_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path()).unwrap();
    let bytes = binary(64);
    let m = manifest_of(&bytes);
    store.put_stream(&m, chunks(&bytes, 10)).await.unwrap();
    let mut other = m.clone();
    let flipped = if other.sha256.ends_with('0') {
        "1"
    } else {
        "0"
    };
    other.sha256.replace_range(63..64, flipped);
    assert_eq!(other.id(), m.id());
    let err = store
        .put_stream(&other, chunks(&bytes, 10))
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactStoreError::Conflict { .. }), "{err}");
    assert_eq!(ApiError::from(err).status, StatusCode::CONFLICT);

    std::fs::create_dir(store.dir().join(".tmp-r2-abc-1")).unwrap();
    std::fs::write(store.dir().join(".tmp-r2-abc-1/handover"), b"x").unwrap();
    let store = ArtifactStore::open(tmp.path()).unwrap();
    assert_eq!(entries(store.dir()), vec![m.id()]);
    // A torn artifact (binary of the wrong size) is not listed.
    std::fs::write(store.dir().join(m.id()).join(BINARY_FILE), b"short").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(store.get(&m.id()).is_none());
}

fn keypair() -> (minisign::KeyPair, PublicKey) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let key = PublicKey::decode(&kp.pk.to_box().unwrap().into_string()).unwrap();
    (kp, key)
}

fn sign(kp: &minisign::KeyPair, doc: &[u8]) -> String {
    minisign::sign(None, &kp.sk, doc, None, None)
        .unwrap()
        .into_string()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn serve(store: ArtifactStore) -> String {
    serve_host(store).await.0
}

/// As [`serve`], with the host (its registry may be set).
async fn serve_host(store: ArtifactStore) -> (String, Host) {
    // As the controller mounts it: merged under a router whose default
    // body limit is small, behind the operator API's check.
    let tokens = crate::auth::OperatorCredentials::new(OP.into(), None).unwrap();
    let host = Host(Arc::new(store), tokens, Arc::default());
    let served = host.clone();
    let app = Router::new()
        .merge(routes::<Host>())
        .layer(DefaultBodyLimit::max(1 << 20));
    let app = crate::auth::guard(app, host.clone()).with_state(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), served)
}

async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    (
        status,
        v["error"].as_str().unwrap().to_owned(),
        v["message"].as_str().unwrap().to_owned(),
    )
}

/// One request of these tests: a PUT of `body` (a GET without one), with
/// `token` as the bearer and `headers`.
async fn send(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> reqwest::Response {
    let mut req = match body {
        Some(body) => http.put(url).body(body.to_vec()),
        None => http.get(url),
    };
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

/// A GET with `token`, answered 200; the body.
async fn fetch(http: &reqwest::Client, url: &str, token: &str) -> bytes::Bytes {
    let resp = send(http, url, Some(token), &[], None).await;
    assert_eq!(resp.status().as_u16(), 200, "{url}");
    resp.bytes().await.unwrap()
}

#[tokio::test]
async fn http_upload_list_and_download() {
    let tmp = tempfile::tempdir().unwrap();
    let base = serve(ArtifactStore::open(tmp.path()).unwrap()).await;
    // Raw bytes: zstd is asked for explicitly where it is tested.
    let http = reqwest::Client::builder().no_zstd().build().unwrap();
    let bytes = binary(3 << 20); // above the router's 1 MiB default
    let m = manifest_of(&bytes);
    let header = serde_json::to_string(&m).unwrap();
    let url = format!("{base}/api/v1/artifacts/{}", m.sha256);

    let v3 = header.replace("\"v\":2", "\"v\":3");
    let zeros = format!("{base}/api/v1/artifacts/{}", "0".repeat(64));
    let mut bad = bytes.clone();
    bad[2 << 20] ^= 1;
    // (case, url, token, manifest header, body, expected status and code)
    for (name, to, token, manifest, body, want) in [
        ("no token", &url, None, Some(&header), &bytes, (401, None)),
        (
            "no manifest",
            &url,
            Some(OP),
            None,
            &bytes,
            (400, Some("missing_manifest")),
        ),
        (
            "manifest v3",
            &url,
            Some(OP),
            Some(&v3),
            &bytes,
            (400, Some("unsupported_version")),
        ),
        (
            "other digest",
            &zeros,
            Some(OP),
            Some(&header),
            &bytes,
            (400, Some("invalid_manifest")),
        ),
        (
            "binary edited",
            &url,
            Some(OP),
            Some(&header),
            &bad,
            (400, Some("digest_mismatch")),
        ),
    ] {
        let headers: Vec<(&str, &str)> = manifest
            .map(|h| (MANIFEST_HEADER, h.as_str()))
            .into_iter()
            .collect();
        let resp = send(&http, to, token, &headers, Some(body)).await;
        let (status, code, message) = error_of(resp).await;
        assert_eq!(status, want.0, "{name}: {message}");
        if let Some(want) = want.1 {
            assert_eq!(code, want, "{name}: {message}");
        }
        assert!(entries(tmp.path()).is_empty(), "{name}: something was kept");
    }

    // Stored, then already there.
    for want in [201, 200] {
        let resp = send(
            &http,
            &url,
            Some(OP),
            &[(MANIFEST_HEADER, &header)],
            Some(&bytes),
        )
        .await;
        assert_eq!(resp.status().as_u16(), want);
        assert_eq!(resp.json::<Manifest>().await.unwrap(), m);
    }

    let list = format!("{base}/api/v1/artifacts");
    assert_eq!(
        error_of(send(&http, &list, None, &[], None).await).await.0,
        401
    );
    let listed: Vec<Manifest> = serde_json::from_slice(&fetch(&http, &list, OP).await).unwrap();
    assert_eq!(listed, vec![m.clone()]);

    let murl = format!("{base}/node/v1/artifacts/{}/manifest", m.id());
    let burl = format!("{base}/node/v1/artifacts/{}/binary", m.id());
    for (url, token) in [(&murl, None), (&burl, Some(OP))] {
        assert_eq!(
            error_of(send(&http, url, token, &[], None).await).await.0,
            401
        );
    }
    let got: Manifest = serde_json::from_slice(&fetch(&http, &murl, NODE).await).unwrap();
    assert_eq!(got, m);
    let resp = send(&http, &burl, Some(NODE), &[], None).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.content_length(), Some(m.size));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), bytes.as_slice());
    // A node that accepts zstd gets the copy made at upload: fewer bytes
    // that decompress to exactly the binary (a real node decompresses as
    // it receives and checks the size and digest of what comes out).
    let resp = send(
        &http,
        &burl,
        Some(NODE),
        &[("accept-encoding", "gzip, zstd")],
        None,
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-encoding"], "zstd");
    let compressed = resp.bytes().await.unwrap();
    assert!(
        (compressed.len() as u64) < m.size / 2,
        "{}",
        compressed.len()
    );
    assert_eq!(zstd::decode_all(compressed.as_ref()).unwrap(), bytes);
    let auto = reqwest::Client::new();
    assert_eq!(fetch(&auto, &burl, NODE).await.as_ref(), bytes.as_slice());

    for (id, want) in [
        ("r2-000000000000", "not_found"),
        ("..%2F..%2Fetc", "invalid_id"),
    ] {
        let url = format!("{base}/node/v1/artifacts/{id}/binary");
        assert_eq!(
            error_of(send(&http, &url, Some(NODE), &[], None).await)
                .await
                .1,
            want
        );
    }
}

/// One upload over HTTP: the manifest document and signature as the CLI
/// sends them (base64 headers).
async fn put(
    http: &reqwest::Client,
    base: &str,
    doc: &[u8],
    sig: Option<&str>,
    body: &[u8],
) -> reqwest::Response {
    let m = Manifest::decode(doc)
        .or_else(|_| serde_json::from_slice::<Manifest>(doc))
        .unwrap();
    let url = format!("{base}/api/v1/artifacts/{}", m.sha256);
    let (doc, sig) = (b64(doc), sig.map(|sig| b64(sig.as_bytes())));
    let mut headers = vec![(MANIFEST_HEADER, doc.as_str())];
    headers.extend(sig.as_deref().map(|sig| (SIGNATURE_HEADER, sig)));
    send(http, &url, Some(OP), &headers, Some(body)).await
}

#[tokio::test]
async fn with_trusted_keys_only_signed_uploads_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (kp_a, key_a) = keypair();
    let (kp_b, _) = keypair();
    let store = ArtifactStore::open(tmp.path())
        .unwrap()
        .with_trusted_keys(vec![key_a.clone()]);
    let base = serve(store).await;
    let http = reqwest::Client::new();
    let bytes = binary(200_000);
    let m = manifest_of(&bytes);
    let doc = m.to_pretty_json().into_bytes();
    let good_sig = sign(&kp_a, &doc);

    // (case, manifest document, signature, body, expected code)
    type Case = (&'static str, Vec<u8>, Option<String>, Vec<u8>, &'static str);
    let refusals: Vec<Case> = vec![
        ("unsigned", doc.clone(), None, bytes.clone(), "unsigned"),
        (
            "other key",
            doc.clone(),
            Some(sign(&kp_b, &doc)),
            bytes.clone(),
            "untrusted_key",
        ),
        (
            "manifest edited after signing",
            {
                let mut edited = m.clone();
                edited.created_ms += 1;
                edited.to_pretty_json().into_bytes()
            },
            Some(good_sig.clone()),
            bytes.clone(),
            "bad_signature",
        ),
        (
            "binary edited after signing",
            doc.clone(),
            Some(good_sig.clone()),
            {
                let mut b = bytes.clone();
                b[100] ^= 1;
                b
            },
            "digest_mismatch",
        ),
        (
            "not a signature",
            doc.clone(),
            Some("hello".into()),
            bytes.clone(),
            "bad_signature",
        ),
    ];
    for (name, doc, sig, body, want) in refusals {
        let resp = put(&http, &base, &doc, sig.as_deref(), &body).await;
        let (status, code, message) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (400, want), "{name}: {message}");
        assert!(entries(tmp.path()).is_empty(), "{name}: something was kept");
    }
    let url = format!("{base}/api/v1/artifacts/{}", m.sha256);
    let (legacy, doc64) = (serde_json::to_string(&m).unwrap(), b64(&doc));
    for (headers, want) in [
        // The legacy one-line JSON header is unsigned, so refused too.
        (vec![(MANIFEST_HEADER, legacy.as_str())], "unsigned"),
        // A signature header that is not base64.
        (
            vec![(MANIFEST_HEADER, doc64.as_str()), (SIGNATURE_HEADER, "!!!")],
            "bad_signature",
        ),
    ] {
        let resp = send(&http, &url, Some(OP), &headers, Some(&bytes)).await;
        assert_eq!(error_of(resp).await.1, want);
    }

    let resp = put(&http, &base, &doc, Some(&good_sig), &bytes).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.json::<Manifest>().await.unwrap(), m);
    let dir = tmp.path().join(m.id());
    assert_eq!(std::fs::read(dir.join(MANIFEST_FILE)).unwrap(), doc);
    assert_eq!(
        std::fs::read_to_string(dir.join(SIGNATURE_FILE)).unwrap(),
        good_sig
    );

    // Nodes get the exact bytes that were signed, and the signature.
    let murl = format!("{base}/node/v1/artifacts/{}/manifest", m.id());
    let surl = format!("{base}/node/v1/artifacts/{}/signature", m.id());
    let got_doc = fetch(&http, &murl, NODE).await;
    assert_eq!(got_doc.as_ref(), doc.as_slice());
    let got_sig = String::from_utf8(fetch(&http, &surl, NODE).await.to_vec()).unwrap();
    assert_eq!(got_sig, good_sig);
    assert_eq!(
        verify_manifest(&got_doc, Some(&got_sig), &[key_a]),
        Ok(m.clone())
    );
    assert_eq!(
        error_of(send(&http, &surl, None, &[], None).await).await.0,
        401
    );
}

#[tokio::test]
async fn with_trusted_keys_an_unsigned_stored_artifact_is_not_served_until_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = binary(5_000);
    let m = manifest_of(&bytes);
    // Stored while no key was trusted.
    let open = ArtifactStore::open(tmp.path()).unwrap();
    open.put_stream(&m, chunks(&bytes, 1000)).await.unwrap();
    assert!(open.get(&m.id()).is_some());

    let (kp, key) = keypair();
    let store = ArtifactStore::open(tmp.path())
        .unwrap()
        .with_trusted_keys(vec![key]);
    match store.find(&m.id()) {
        Err(Missing::Unverified { source, .. }) => assert_eq!(source, ArtifactError::Unsigned),
        other => panic!("expected unverified, got {other:?}"),
    }
    assert!(store.get(&m.id()).is_none());
    assert!(store.list().unwrap().is_empty());
    let api = ApiError::from(store.find(&m.id()).unwrap_err());
    assert_eq!(
        (api.status, api.code),
        (StatusCode::BAD_REQUEST, "unsigned")
    );
    let err = store
        .put_stream(&m, chunks(&bytes, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactStoreError::Artifact(ArtifactError::Unsigned)),
        "{err}"
    );

    // Uploading it signed replaces the unsigned copy.
    let doc = m.to_pretty_json().into_bytes();
    let sig = sign(&kp, &doc);
    let accepted = store.accept(&doc, Some(&sig)).unwrap();
    let put = store
        .put_accepted(&accepted, chunks(&bytes, 1000))
        .await
        .unwrap();
    assert_eq!(put, Put::Created(m.clone()));
    let stored = store.find(&m.id()).unwrap();
    assert_eq!(stored.signature.as_deref(), Some(sig.as_str()));
    assert_eq!(std::fs::read(&stored.binary).unwrap(), bytes);
    assert_eq!(entries(store.dir()), vec![m.id()]);
    // Again: already there.
    let put = store
        .put_accepted(&accepted, chunks(&bytes, 1000))
        .await
        .unwrap();
    assert_eq!(put, Put::Existing(m.clone()));
}

#[tokio::test]
async fn without_trusted_keys_unsigned_is_served_and_a_signature_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = serve(ArtifactStore::open(tmp.path()).unwrap()).await;
    let http = reqwest::Client::new();
    let bytes = binary(4_000);
    let m = manifest_of(&bytes);
    let doc = m.to_pretty_json().into_bytes();
    let resp = put(&http, &base, &doc, None, &bytes).await;
    assert_eq!(resp.status().as_u16(), 201);
    let surl = format!("{base}/node/v1/artifacts/{}/signature", m.id());
    let (status, code, _) = error_of(send(&http, &surl, Some(NODE), &[], None).await).await;
    assert_eq!((status, code.as_str()), (404, "unsigned"));
    // A malformed signature is refused even here: nodes may check it.
    let resp = put(&http, &base, &doc, Some("not a signature"), &bytes).await;
    assert_eq!(error_of(resp).await.1, "bad_signature");
    // A signed upload of the same artifact adds the signature.
    let (kp, key) = keypair();
    let sig = sign(&kp, &doc);
    let resp = put(&http, &base, &doc, Some(&sig), &bytes).await;
    assert_eq!(resp.status().as_u16(), 201);
    let got = String::from_utf8(fetch(&http, &surl, NODE).await.to_vec()).unwrap();
    assert_eq!(verify_manifest(&doc, Some(&got), &[key]), Ok(m.clone()));
    let resp = put(&http, &base, &doc, Some(&sig), &bytes).await;
    assert_eq!(resp.status().as_u16(), 200);
}

/// A registry row: node `n` at `http://127.0.0.{n}:7000`, with `staged`,
/// last seen at `seen_ms`.
fn row(n: u8, staged: &[&str], seen_ms: i64) -> NodeRow {
    NodeRow {
        node_id: format!("n{n}"),
        release: Release(2),
        schema: handover_core::Schema(2),
        role: handover_core::wire::Role::Primary,
        group: "g1".into(),
        hls_url: format!("http://127.0.0.{n}:7000"),
        grant: handover_core::Grant::Full,
        epoch: 1,
        outbox: handover_core::wire::OutboxState::default(),
        current_events: vec![],
        staged: staged.iter().map(|s| s.to_string()).collect(),
        last_seen_ms: seen_ms,
        acked_through: 0,
        binary_sha256: None,
        supervisor_sha256: None,
    }
}

/// Sources: only reachable nodes that staged the artifact, at most
/// `ARTIFACT_SOURCES_MAX` per answer, answers rotating over all of them;
/// a node credential needed, an id checked.
#[tokio::test]
async fn sources_name_reachable_nodes_that_staged_it() {
    use handover_core::wire::limits::ARTIFACT_SOURCES_MAX;
    let tmp = tempfile::tempdir().unwrap();
    let (base, host) = serve_host(ArtifactStore::open(tmp.path()).unwrap()).await;
    let id = "r2-0123456789ab";
    let now = crate::now_ms();
    let mut rows = vec![
        row(1, &[id], now - 60_000),           // not seen for a minute
        row(2, &["r2-ba9876543210"], now),     // another artifact
        row(3, &["r2-ba9876543210", id], now), // both
    ];
    rows.extend((10..40).map(|n| row(n, &[id], now)));
    *host.2.lock().unwrap() = rows;
    let http = reqwest::Client::new();
    let url = format!("{base}/node/v1/artifacts/{id}/sources");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let body = fetch(&http, &url, NODE).await;
        let answer: ArtifactSources = handover_core::wire::decode(&body).unwrap();
        assert_eq!(answer.sources.len(), ARTIFACT_SOURCES_MAX);
        seen.extend(answer.sources);
    }
    let want: std::collections::BTreeSet<String> = std::iter::once(3)
        .chain(10..40)
        .map(|n| format!("http://127.0.0.{n}:7000"))
        .collect();
    assert_eq!(
        seen, want,
        "every reachable source named, in turn; no other"
    );

    let nobody = format!("{base}/node/v1/artifacts/r2-000000000000/sources");
    let answer: ArtifactSources =
        handover_core::wire::decode(&fetch(&http, &nobody, NODE).await).unwrap();
    assert!(answer.sources.is_empty());
    for (token, path, want) in [
        (Some(OP), url.clone(), (401, "unauthorized")),
        (None, url.clone(), (401, "unauthorized")),
        (
            Some(NODE),
            format!("{base}/node/v1/artifacts/r2-..%2F..%2Fx/sources"),
            (400, "invalid_id"),
        ),
    ] {
        let (status, code, _) = error_of(send(&http, &path, token, &[], None).await).await;
        assert_eq!((status, code.as_str()), want, "{path} with {token:?}");
    }
}

/// At most `downloads_max` binaries are served at once; one more is
/// answered 503 `busy` with `Retry-After`; a slot comes back when a
/// download ends (here: its client goes away).
#[tokio::test]
async fn binary_downloads_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path())
        .unwrap()
        .with_downloads_max(2);
    // Larger than what the sockets buffer, so a download that is not read
    // keeps its slot.
    let bytes = binary(24 << 20);
    let m = manifest_of(&bytes);
    store.put_stream(&m, chunks(&bytes, 1 << 20)).await.unwrap();
    let base = serve(store).await;
    let url = format!("{base}/node/v1/artifacts/{}/binary", m.id());
    let client = || reqwest::Client::builder().no_zstd().build().unwrap();
    let (a, b) = (client(), client());
    let first = send(&a, &url, Some(NODE), &[], None).await;
    let second = send(&b, &url, Some(NODE), &[], None).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let third = send(&client(), &url, Some(NODE), &[], None).await;
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let (status, code, message) = error_of(third).await;
    assert_eq!((status, code.as_str()), (503, "busy"));
    assert!(message.contains("sources"), "{message}");

    // The second read to its end: exactly the binary.
    assert_eq!(second.bytes().await.unwrap(), bytes);
    // The first abandoned: its connection closes, its slot comes back.
    drop(first);
    drop(a);
    let mut served = 0;
    for _ in 0..100 {
        let resp = send(&client(), &url, Some(NODE), &[], None).await;
        if resp.status() == 200 {
            assert_eq!(resp.bytes().await.unwrap().len(), bytes.len());
            served += 1;
            if served == 2 {
                break;
            }
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(served, 2, "both slots came back");
}
