//! The controller in this process on a loopback port: what release 3 added
//! to the operator API and the node protocol, seen from a release-2
//! controller (the newest the default build carries).

use handover_controller::{serve_on, ControllerConfig};
use handover_core::api::Status;
use handover_core::Release;
use serde_json::{json, Value};

mod support;
use support::{Controller, OPERATOR};

/// A channel window needs schema 3: a release-2 controller refuses it with
/// a JSON error and creates nothing; without it the channel is created.
#[tokio::test]
async fn a_channel_window_is_refused_before_schema_3() {
    let c = Controller::start(2).await;
    let (status, body) = c
        .post(
            "/api/v1/channels",
            Some(OPERATOR),
            json!({"name": "news", "segment_ms": 2000, "window_segments": 30}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_field")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or("");
    assert!(message.contains("needs schema 3"), "{message}");
    let channels: Vec<Value> = c.get("/api/v1/channels").await;
    assert!(channels.is_empty(), "{channels:?}");

    let (status, body) = c
        .post(
            "/api/v1/channels",
            Some(OPERATOR),
            json!({"name": "news", "segment_ms": 2000}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("window_segments").is_none(), "{body}");
}

/// `Heartbeat.hls_requests` (protocol 3) is read when present and shown in
/// the status; a heartbeat without it (protocol 2 and older) is answered as
/// before and shows nothing.
#[tokio::test]
async fn heartbeat_hls_requests_reach_the_status() {
    let c = Controller::start(2).await;
    c.group("g1", "n1", "n2").await;
    let token = c.node_add("n1", false).await;
    let hello = support::hello("n1", "primary", "g1", &token, Some(support::CRED_A));
    let (status, welcome) = c.post("/node/v1/hello", None, hello).await;
    assert_eq!(status, 200, "{welcome}");
    let credential = welcome["credential"].as_str().unwrap().to_owned();
    let heartbeat = |hls: Option<u64>| {
        let mut hb = json!({"v": 1, "node_id": "n1", "epoch": welcome["epoch"],
            "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
            "current_events": [], "staged": []});
        if let Some(n) = hls {
            hb["hls_requests"] = json!(n);
        }
        hb
    };
    let (status, body) = c
        .post("/node/v1/heartbeat", Some(&credential), heartbeat(None))
        .await;
    assert_eq!(status, 200, "{body}");
    let s: Status = c.get("/api/v1/status").await;
    assert_eq!(s.nodes[0].hls_requests, None);

    let (status, body) = c
        .post(
            "/node/v1/heartbeat",
            Some(&credential),
            heartbeat(Some(1234)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let s: Status = c.get("/api/v1/status").await;
    assert_eq!(s.nodes[0].hls_requests, Some(1234));
    let raw: Value = c.get("/api/v1/status").await;
    assert_eq!(raw["nodes"][0]["hls_requests"], json!(1234));
}

/// Artifact signatures are required: a controller with no trusted key and
/// no opt-in, or with the opt-in on an address other hosts reach, refuses
/// to serve and leaves its data dir untouched.
#[tokio::test]
async fn no_trusted_key_needs_the_loopback_only_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("controller");
    for (listen, allow, says) in [
        ("127.0.0.1:7400", false, "--trusted-key FILE"),
        ("0.0.0.0:7400", true, "refused on 0.0.0.0"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ControllerConfig {
            release: Release(2),
            data_dir: data_dir.clone(),
            listen: listen.parse().unwrap(),
            operator_token: OPERATOR.into(),
            read_only_token: None,
            lease_ms: 3_000,
            trusted_keys: vec![],
            allow_unsigned_artifacts: allow,
            node_switch_wait_ms: 60_000,
            limits: handover_net::Limits::CONTROLLER,
            tls: None,
            database: None,
        };
        let err = serve_on(config, listener, std::future::pending())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains(says), "{listen}: {err:#}");
        assert!(!data_dir.exists(), "{listen}: the data dir was touched");
    }
}

/// Plain HTTP only on loopback: a controller on an address other hosts
/// reach without a certificate refuses to serve and leaves its data dir
/// untouched.
#[tokio::test]
async fn off_loopback_the_controller_needs_tls() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("controller");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ControllerConfig {
        release: Release(2),
        data_dir: data_dir.clone(),
        listen: "0.0.0.0:7400".parse().unwrap(),
        operator_token: OPERATOR.into(),
        read_only_token: None,
        lease_ms: 3_000,
        trusted_keys: vec![],
        allow_unsigned_artifacts: false,
        node_switch_wait_ms: 60_000,
        limits: handover_net::Limits::CONTROLLER,
        tls: None,
        database: None,
    };
    // No trusted key either: whichever is refused first, nothing starts.
    let err = serve_on(config.clone(), listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(!data_dir.exists(), "{err:#}");
    let key = minisign_key();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve_on(
        ControllerConfig {
            trusted_keys: vec![key],
            ..config
        },
        listener,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("--tls-cert") && text.contains("handover init"),
        "{text}"
    );
    assert!(!data_dir.exists(), "the data dir was touched");
}

/// A minisign public key line (base64), as `--trusted-key` files hold.
fn minisign_key() -> String {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    kp.pk.to_base64()
}
