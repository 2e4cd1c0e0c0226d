//! Staging at fleet scale, as the controller (in this process) answers it:
//! the sources of an artifact are the nodes whose registration lists it
//! staged, asked with a node's credential.

mod support;

use handover_core::wire::{decode, ArtifactSources};
use serde_json::json;
use support::{hello, Controller, CRED_A, CRED_B};

const STAGED: &str = "r2-0123456789ab";

async fn sources(c: &Controller, id: &str, bearer: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = c
        .http
        .get(c.url(&format!("/node/v1/artifacts/{id}/sources")));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn sources_are_the_registered_nodes_that_staged_it() {
    let c = Controller::start(2).await;
    c.group("g1", "a", "b").await;
    for (id, role, credential, staged) in [
        ("a", "primary", CRED_A, json!([STAGED])),
        ("b", "backup", CRED_B, json!([])),
    ] {
        let token = c.node_add(id, false).await;
        let mut h = hello(id, role, "g1", &token, Some(credential));
        h["staged"] = staged;
        let (status, body) = c.post("/node/v1/hello", None, h).await;
        assert_eq!(status, 200, "{body}");
    }

    let (status, body) = sources(&c, STAGED, Some(CRED_B)).await;
    assert_eq!(status, 200);
    let answer: ArtifactSources = decode(&body).unwrap();
    assert_eq!(answer.sources, vec!["http://127.0.0.1:7000/a".to_owned()]);

    // Nobody staged this one.
    let (status, body) = sources(&c, "r2-ba9876543210", Some(CRED_A)).await;
    assert_eq!(status, 200);
    assert!(decode::<ArtifactSources>(&body).unwrap().sources.is_empty());

    // Only for nodes; an id is checked.
    for (id, bearer, want) in [
        (STAGED, None, 401),
        (STAGED, Some("not-a-credential-0123456789abcdef"), 401),
        ("r2-..%2F..%2Fx", Some(CRED_A), 400),
    ] {
        let (status, body) = sources(&c, id, bearer).await;
        assert_eq!(
            status,
            want,
            "{id} {bearer:?}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}
