//! Who a node is, as the controller (in this process) judges a hello: the
//! groups name it, a bootstrap token bound to its id is traded once for the
//! credential it chose, and nothing a hello says is registered before that.
//! The same attacks against real processes are in the cli crate's
//! `tests/security.rs`.

use handover_core::api::Status;
use serde_json::{json, Value};

mod support;
use support::{hello, Controller, CRED_A, CRED_B, OPERATOR};

fn code(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("")
}

async fn heartbeat(c: &Controller, id: &str, credential: &str, epoch: &Value) -> u16 {
    let hb = json!({"v": 1, "node_id": id, "epoch": epoch,
        "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
        "current_events": [], "staged": []});
    c.post("/node/v1/heartbeat", Some(credential), hb).await.0
}

/// Everything a hello may not do, each refused with its code and nothing
/// registered; then the one thing it may.
#[tokio::test]
async fn a_hello_proves_its_id_and_claims_only_what_the_groups_say() {
    let c = Controller::start(2).await;
    c.group("g1", "a", "b").await;
    let token_a = c.node_add("a", false).await;
    let token_b = c.node_add("b", false).await;
    assert!(token_a.starts_with("hob_"), "{token_a}");

    let refused: [(Value, u16, &str); 6] = [
        // An id no group names, as a third "primary" of g1.
        (
            hello("zz", "primary", "g1", &token_a, Some(CRED_A)),
            403,
            "unknown_node",
        ),
        // A real id in a role or group the operator did not configure.
        (
            hello("a", "backup", "g1", &token_a, Some(CRED_A)),
            403,
            "identity_mismatch",
        ),
        (
            hello("a", "primary", "g2", &token_a, Some(CRED_A)),
            403,
            "identity_mismatch",
        ),
        // Another node's token, or no token at all.
        (
            hello("a", "primary", "g1", &token_b, Some(CRED_A)),
            401,
            "unauthorized",
        ),
        (
            hello("a", "primary", "g1", "guess-0123456789", Some(CRED_A)),
            401,
            "unauthorized",
        ),
        // Its own token without the credential it chose.
        (
            hello("a", "primary", "g1", &token_a, None),
            400,
            "invalid_field",
        ),
    ];
    for (h, status, want) in refused {
        let (got, body) = c.post("/node/v1/hello", None, h.clone()).await;
        assert_eq!((got, code(&body)), (status, want), "{h} -> {body}");
    }
    let s: Status = c.get("/api/v1/status").await;
    assert!(s.nodes.is_empty(), "nothing registered: {:?}", s.nodes);

    // The node's own token, once: the credential it chose is its credential.
    let (status, welcome) = c
        .post(
            "/node/v1/hello",
            None,
            hello("a", "primary", "g1", &token_a, Some(CRED_A)),
        )
        .await;
    assert_eq!(status, 200, "{welcome}");
    assert_eq!(welcome["credential"], CRED_A);
    assert_eq!(heartbeat(&c, "a", CRED_A, &welcome["epoch"]).await, 200);

    // The token is spent: whoever replays it cannot take the id over, nor
    // change what the controller knows of the node.
    let mut evil = hello("a", "primary", "g1", &token_a, Some(CRED_B));
    evil["hls_url"] = json!("http://attacker.invalid/");
    let (status, body) = c.post("/node/v1/hello", None, evil).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"), "{body}");
    let s: Status = c.get("/api/v1/status").await;
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(s.nodes[0].node.hls_url, "http://127.0.0.1:7000/a");
    assert_eq!(heartbeat(&c, "a", CRED_B, &welcome["epoch"]).await, 401);

    // A lost welcome costs nothing: the node's next hello presents the
    // credential it chose.
    let (status, again) = c
        .post(
            "/node/v1/hello",
            None,
            hello("a", "primary", "g1", CRED_A, None),
        )
        .await;
    assert_eq!(status, 200, "{again}");
}

/// `node add` is for ids a group names, and for a node that holds a
/// credential only with `replace`, whose token then replaces it; `node
/// remove` revokes at once.
#[tokio::test]
async fn node_add_replace_and_remove() {
    let c = Controller::start(2).await;
    let add = |ids: Value, extra: Value| {
        let mut body = json!({"ids": ids});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    };
    let (status, body) = c
        .post(
            "/api/v1/nodes",
            Some(OPERATOR),
            add(json!(["a"]), json!({})),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");
    c.group("g1", "a", "b").await;
    for (extra, ids) in [
        (json!({"ttl_ms": 1_000}), json!(["a"])),
        (json!({"ttl_ms": 30 * 24 * 3_600_000u64}), json!(["a"])),
        (json!({}), json!([])),
    ] {
        let (status, body) = c
            .post("/api/v1/nodes", Some(OPERATOR), add(ids, extra))
            .await;
        assert_eq!((status, code(&body)), (400, "invalid_field"), "{body}");
    }
    let (status, body) = c
        .post("/api/v1/nodes", None, add(json!(["a"]), json!({})))
        .await;
    assert_eq!((status, code(&body)), (401, "unauthorized"), "{body}");

    let token = c.node_add("a", false).await;
    let (status, welcome) = c
        .post(
            "/node/v1/hello",
            None,
            hello("a", "primary", "g1", &token, Some(CRED_A)),
        )
        .await;
    assert_eq!(status, 200, "{welcome}");
    let epoch = welcome["epoch"].clone();

    // A registered node gets a new token only with replace.
    let (status, body) = c
        .post(
            "/api/v1/nodes",
            Some(OPERATOR),
            add(json!(["a"]), json!({})),
        )
        .await;
    assert_eq!((status, code(&body)), (409, "exists"), "{body}");
    let replacement = c.node_add("a", true).await;
    assert_eq!(
        heartbeat(&c, "a", CRED_A, &epoch).await,
        200,
        "works until traded"
    );
    let (status, body) = c
        .post(
            "/node/v1/hello",
            None,
            hello("a", "primary", "g1", &replacement, Some(CRED_B)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(heartbeat(&c, "a", CRED_A, &epoch).await, 401, "replaced");
    assert_eq!(heartbeat(&c, "a", CRED_B, &epoch).await, 200);

    // Removed: the credential stops at once, a hello with it too.
    let (status, body) = c.delete("/api/v1/nodes/a").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(heartbeat(&c, "a", CRED_B, &epoch).await, 401);
    let (status, body) = c
        .post(
            "/node/v1/hello",
            None,
            hello("a", "primary", "g1", CRED_B, None),
        )
        .await;
    assert_eq!((status, code(&body)), (401, "unauthorized"), "{body}");
    let s: Status = c.get("/api/v1/status").await;
    assert!(s.nodes.is_empty(), "{:?}", s.nodes);
    let (status, body) = c.delete("/api/v1/nodes/a").await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");
}

/// A node id is in one group only.
#[tokio::test]
async fn a_node_cannot_be_in_two_groups() {
    let c = Controller::start(2).await;
    c.group("g1", "a", "b").await;
    let (status, body) = c
        .post(
            "/api/v1/groups",
            Some(OPERATOR),
            json!({"name": "g2", "primary": "b", "backup": "c"}),
        )
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_field"), "{body}");
}
