//! The operator API's two roles over HTTP, against a controller in this
//! process: every route × {the operator token, the read-only token, a
//! wrong token, none} → the status. Reading (`GET`) takes either token;
//! every change needs the operator token and the read-only one gets 403
//! `forbidden` and changes nothing; a wrong or missing token gets 401
//! `unauthorized`. The node protocol and `/healthz` stay outside the
//! operator's check. The table is checked against the router's source, so
//! a route added without a row fails here.

use base64::Engine as _;
use handover_core::artifact::{sha256_hex, Manifest};
use handover_core::{Release, ReleaseInfo};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

mod support;
use support::{Controller, OPERATOR, READ_ONLY};

/// A token that is neither of the controller's.
const WRONG: &str = "not-a-token-of-this-controller";

/// What one request of the table sends as its body.
enum Body {
    None,
    Json(Value),
    /// An artifact upload: the manifest (base64, in its header) and the binary.
    Upload {
        manifest: String,
        binary: Vec<u8>,
    },
}

/// One route of the table.
struct Case {
    method: Method,
    /// As the router names it (`{name}` and all).
    route: &'static str,
    /// What is requested.
    path: String,
    body: Body,
    /// The answer to the operator token (past the check: the route's own).
    operator: u16,
}

fn case(method: Method, route: &'static str, path: &str, body: Body, operator: u16) -> Case {
    Case {
        method,
        route,
        path: path.to_owned(),
        body,
        operator,
    }
}

/// A small release-2 artifact the controller stores unsigned (it runs with
/// `--allow-unsigned-artifacts`, as the tests' controllers do).
fn artifact() -> (Manifest, String, Vec<u8>) {
    let binary: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let manifest = Manifest::for_release(
        &ReleaseInfo::of(Release(2)).unwrap().facts(),
        handover_core::release::CONTRACTS,
        sha256_hex(&binary),
        binary.len() as u64,
        1_700_000_000_000,
    )
    .unwrap();
    let header = base64::engine::general_purpose::STANDARD.encode(manifest.to_pretty_json());
    (manifest, header, binary)
}

async fn send(c: &Controller, case: &Case, bearer: Option<&str>) -> (u16, Value) {
    let mut req = c.http.request(case.method.clone(), c.url(&case.path));
    req = match &case.body {
        Body::None => req,
        Body::Json(v) => req.json(v),
        Body::Upload { manifest, binary } => req
            .header(
                handover_controller::artifacts::MANIFEST_HEADER,
                manifest.as_str(),
            )
            .body(binary.clone()),
    };
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

/// Every operator route, in an order where each finds what it needs (a
/// group before its nodes, an artifact before its signature).
fn operator_routes() -> Vec<Case> {
    let (manifest, header, binary) = artifact();
    let id = manifest.id();
    let start_ms = 4_000_000_000_000_i64;
    let unknown = "r2-000000000000";
    vec![
        case(
            Method::GET,
            "/api/v1/status",
            "/api/v1/status",
            Body::None,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/channels",
            "/api/v1/channels",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/channels",
            "/api/v1/channels",
            Body::Json(json!({"name": "news", "segment_ms": 2000})),
            200,
        ),
        case(
            Method::GET,
            "/api/v1/groups",
            "/api/v1/groups",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/groups",
            "/api/v1/groups",
            Body::Json(json!({"name": "g1", "primary": "g1-a", "backup": "g1-b"})),
            200,
        ),
        case(
            Method::GET,
            "/api/v1/groups/{name}/nodes",
            "/api/v1/groups/g1/nodes",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/events",
            "/api/v1/events",
            Body::Json(
                json!({"channel": "news", "group": "g1", "start_ms": start_ms,
                "duration_ms": 60_000}),
            ),
            200,
        ),
        case(
            Method::GET,
            "/api/v1/events",
            "/api/v1/events",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/nodes",
            "/api/v1/nodes",
            Body::Json(json!({"ids": ["g1-a"]})),
            200,
        ),
        case(
            Method::DELETE,
            "/api/v1/nodes/{id}",
            "/api/v1/nodes/g1-a",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/fence",
            "/api/v1/fence",
            Body::None,
            200,
        ),
        case(
            Method::POST,
            "/api/v1/unfence",
            "/api/v1/unfence",
            Body::None,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/records",
            "/api/v1/records?node=g1-a",
            Body::None,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/records/summary",
            "/api/v1/records/summary",
            Body::None,
            200,
        ),
        case(
            Method::PUT,
            "/api/v1/artifacts/{sha256}",
            &format!("/api/v1/artifacts/{}", manifest.sha256),
            Body::Upload {
                manifest: header,
                binary,
            },
            201,
        ),
        case(
            Method::GET,
            "/api/v1/artifacts",
            "/api/v1/artifacts",
            Body::None,
            200,
        ),
        // Stored without a signature: 404 `unsigned`, past the check.
        case(
            Method::GET,
            "/api/v1/artifacts/{id}/signature",
            &format!("/api/v1/artifacts/{id}/signature"),
            Body::None,
            404,
        ),
        case(
            Method::POST,
            "/api/v1/upgrade/plan",
            "/api/v1/upgrade/plan",
            Body::Json(json!({"artifact": id})),
            200,
        ),
        case(
            Method::GET,
            "/api/v1/upgrade",
            "/api/v1/upgrade",
            Body::None,
            200,
        ),
        // No such artifact, no upgrade ever started: the routes' own 404s.
        case(
            Method::POST,
            "/api/v1/upgrade",
            "/api/v1/upgrade",
            Body::Json(json!({"artifact": unknown})),
            404,
        ),
        case(
            Method::POST,
            "/api/v1/upgrade/pause",
            "/api/v1/upgrade/pause",
            Body::None,
            404,
        ),
        case(
            Method::POST,
            "/api/v1/upgrade/resume",
            "/api/v1/upgrade/resume",
            Body::None,
            404,
        ),
        case(
            Method::POST,
            "/api/v1/upgrade/abort",
            "/api/v1/upgrade/abort",
            Body::None,
            404,
        ),
    ]
}

/// What the table expects of `bearer` on `case`: (status, error code).
fn expected(case: &Case, bearer: Option<&str>) -> (u16, Option<&'static str>) {
    let reads = case.method == Method::GET || case.method == Method::HEAD;
    match bearer {
        Some(OPERATOR) => (case.operator, None),
        Some(READ_ONLY) if reads => (case.operator, None),
        Some(READ_ONLY) => (403, Some("forbidden")),
        _ => (401, Some("unauthorized")),
    }
}

fn code(body: &Value) -> Option<&str> {
    body["error"].as_str()
}

/// Each route with no token, a wrong one, the read-only one, then the
/// operator's (so a change the read-only token was refused is still there
/// for the operator to make: a create answered 200, not 409 `exists`).
#[tokio::test]
async fn every_route_answers_each_token_as_its_role_allows() {
    let c = Controller::start(2).await;
    let cases = operator_routes();
    for case in &cases {
        for bearer in [None, Some(WRONG), Some(READ_ONLY), Some(OPERATOR)] {
            let (status, body) = send(&c, case, bearer).await;
            let (want, want_code) = expected(case, bearer);
            let who = match bearer {
                Some(OPERATOR) => "operator",
                Some(READ_ONLY) => "read-only",
                Some(_) => "wrong",
                None => "none",
            };
            assert_eq!(
                status, want,
                "{} {} with the {who} token: {body}",
                case.method, case.path
            );
            if let Some(want_code) = want_code {
                assert_eq!(
                    code(&body),
                    Some(want_code),
                    "{} {}: {body}",
                    case.method,
                    case.path
                );
                assert!(
                    body["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{body}"
                );
            }
        }
    }

    // What every route of the router's source is: the table holds exactly
    // those (a route added without its row fails here).
    let in_source = api_routes_in_source();
    let in_table: BTreeSet<(String, String)> = cases
        .iter()
        .map(|c| (c.method.to_string(), c.route.to_owned()))
        .collect();
    assert_eq!(in_table, in_source);
}

/// Outside the routes: an unknown path or method is answered by the
/// fallbacks only past the check; the node protocol and `/healthz` are
/// not the operator's (an operator token opens no node route).
#[tokio::test]
async fn fallbacks_need_a_token_and_node_routes_are_the_nodes() {
    let c = Controller::start(2).await;
    let rows: [(Method, &str, [u16; 4]); 6] = [
        // (method, path, [operator, read-only, wrong, none])
        (Method::GET, "/api/v1/nope", [404, 404, 401, 401]),
        (Method::GET, "/", [404, 404, 401, 401]),
        (Method::DELETE, "/api/v1/status", [405, 403, 401, 401]),
        (Method::POST, "/api/v1/status", [405, 403, 401, 401]),
        (Method::GET, "/healthz", [200, 200, 200, 200]),
        (
            Method::GET,
            "/node/v1/artifacts/r2-000000000000/manifest",
            [401, 401, 401, 401],
        ),
    ];
    for (method, path, want) in rows {
        let case = case(method, "", path, Body::None, 0);
        for (bearer, want) in [Some(OPERATOR), Some(READ_ONLY), Some(WRONG), None]
            .into_iter()
            .zip(want)
        {
            let (status, body) = send(&c, &case, bearer).await;
            assert_eq!(
                status, want,
                "{} {path} with {bearer:?}: {body}",
                case.method
            );
        }
    }
}

/// The read-only token reads what the operator sees and changes nothing:
/// refused fence, channel, group, node token and upload leave the cluster
/// as it was.
#[tokio::test]
async fn the_read_only_token_changes_nothing() {
    let c = Controller::start(2).await;
    let read = |path: &'static str| {
        let case = case(Method::GET, "", path, Body::None, 0);
        let c = &c;
        async move {
            let (status, body) = send(c, &case, Some(READ_ONLY)).await;
            assert_eq!(status, 200, "{path}: {body}");
            body
        }
    };
    let before = (
        read("/api/v1/status").await["cluster"].clone(),
        read("/api/v1/channels").await,
        read("/api/v1/groups").await,
        read("/api/v1/artifacts").await,
    );
    for case in operator_routes()
        .into_iter()
        .filter(|c| c.method != Method::GET)
    {
        let (status, body) = send(&c, &case, Some(READ_ONLY)).await;
        assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    }
    let after = (
        read("/api/v1/status").await["cluster"].clone(),
        read("/api/v1/channels").await,
        read("/api/v1/groups").await,
        read("/api/v1/artifacts").await,
    );
    assert_eq!(after, before);
    assert_eq!(after.0["fenced"], json!(false), "{}", after.0);

    // The operator's status and the read-only one's are the same document.
    let op: Value = c.get("/api/v1/status").await;
    assert_eq!(op["cluster"], after.0);
}

/// Every `(METHOD, route)` under `/api/` that the controller's router
/// source declares: `.route("PATH", get(..).post(..))` in `lib.rs` and
/// `artifacts.rs`.
fn api_routes_in_source() -> BTreeSet<(String, String)> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeSet::new();
    for file in ["lib.rs", "artifacts.rs"] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        for chunk in text.split(".route(").skip(1) {
            let Some(path) = chunk
                .trim_start()
                .strip_prefix('"')
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            if !path.starts_with("/api/") {
                continue;
            }
            // The method routers up to the next route (or the end of the chain).
            let end = chunk.find(".merge(").unwrap_or(chunk.len());
            let methods: Vec<&str> = ["get", "post", "put", "delete", "patch", "head"]
                .into_iter()
                .filter(|m| {
                    chunk[..end].match_indices(&format!("{m}(")).any(|(i, _)| {
                        i == 0 || {
                            let before = chunk.as_bytes()[i - 1];
                            !(before.is_ascii_alphanumeric() || before == b'_' || before == b':')
                        }
                    })
                })
                .collect();
            assert!(!methods.is_empty(), "no method for route {path} in {file}");
            for m in methods {
                found.insert((m.to_uppercase(), path.to_owned()));
            }
        }
    }
    assert!(
        found.len() >= 20,
        "the source scan found too little: {found:?}"
    );
    found
}
