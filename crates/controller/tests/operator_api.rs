//! The controller in this process on a loopback port: what release 3 added
//! to the operator API and the node protocol, seen from a release-2
//! controller (the newest the default build carries).

use handover_core::api::Status;
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
