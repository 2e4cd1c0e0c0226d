//! The controller in this process on a loopback port, and its limits: a
//! node holds at most `WATCHES_PER_NODE_MAX` watches (one more ends its
//! oldest at once, with the current grant state, and the others go on as
//! watches); a stalled request body is answered 408 `body_timeout`.

use handover_controller::WATCHES_PER_NODE_MAX;
use handover_core::wire::{GrantState, Hello, Role, Welcome};
use handover_core::{Grant, Release, ReleaseInfo};
use handover_net::Limits;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

mod support;
use support::{Controller, OPERATOR};

/// Bound on every wait for an answer.
const BOUND: Duration = Duration::from_secs(10);
/// Long enough for a watch request to reach its handler.
const SETTLE: Duration = Duration::from_millis(300);

/// Node `node_id` joins (its own group, its token traded): its welcome.
async fn hello(c: &Controller, node_id: &str) -> Welcome {
    c.group(node_id, node_id, &format!("{node_id}-b")).await;
    let token = c.node_add(node_id, false).await;
    let info = ReleaseInfo::of(Release(2)).unwrap();
    let hello = Hello {
        new_credential: Some(format!("{node_id}-credential-0123456789abcdef0123456789")),
        ..Hello::new(
            node_id,
            &token,
            info,
            Role::Primary,
            node_id,
            "http://127.0.0.1:7000",
        )
    };
    let resp = c
        .http
        .post(c.url("/node/v1/hello"))
        .json(&hello)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// A watch of `node_id` holding what `w` said, answered in a task.
fn watch(c: &Controller, node_id: &str, w: &Welcome) -> JoinHandle<GrantState> {
    let req = c
        .http
        .get(c.url("/node/v1/watch"))
        .bearer_auth(&w.credential)
        .query(&[
            ("node", node_id.to_owned()),
            ("epoch", w.epoch.to_string()),
            ("grant", w.grant.as_str().to_owned()),
            ("wait_ms", "25000".to_owned()),
            ("desired_rev", w.desired_rev.to_string()),
        ]);
    tokio::spawn(async move {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    })
}

async fn answer(w: JoinHandle<GrantState>) -> GrantState {
    tokio::time::timeout(BOUND, w)
        .await
        .expect("no answer within the bound")
        .unwrap()
}

#[tokio::test]
async fn a_watch_beyond_the_cap_ends_the_nodes_oldest_with_the_current_state() {
    assert_eq!(WATCHES_PER_NODE_MAX, 2);
    let c = Controller::start_with(2, Limits::CONTROLLER).await;
    let w = hello(&c, "n1").await;
    let other = hello(&c, "n2").await;
    assert_eq!(w.grant, Grant::Full);
    let oldest = watch(&c, "n1", &w);
    tokio::time::sleep(SETTLE).await;
    let second = watch(&c, "n1", &w);
    let of_n2 = watch(&c, "n2", &other);
    tokio::time::sleep(SETTLE).await;
    assert!(!oldest.is_finished() && !second.is_finished() && !of_n2.is_finished());

    // A third watch of n1: its oldest answers at once, unchanged.
    let third = watch(&c, "n1", &w);
    let got = answer(oldest).await;
    assert_eq!((got.grant, got.epoch), (Grant::Full, w.epoch));
    tokio::time::sleep(SETTLE).await;
    assert!(!second.is_finished() && !third.is_finished() && !of_n2.is_finished());

    // The others are still watches: a fence reaches every one.
    let fenced = c
        .http
        .post(c.url("/api/v1/fence"))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(fenced.status(), 200);
    for watch in [second, third, of_n2] {
        assert_eq!(answer(watch).await.grant, Grant::Fenced);
    }
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_body_timeout() {
    let c = Controller::start_with(
        2,
        Limits {
            body_read_timeout_ms: 200,
            write_timeout_ms: 200,
            ..Limits::CONTROLLER
        },
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    tcp.write_all(b"POST /node/v1/hello HTTP/1.1\r\nhost: c\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"v\": 1")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, tcp.read_to_end(&mut answer))
        .await
        .expect("no answer within the bound")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"body_timeout""#), "{answer}");
}
