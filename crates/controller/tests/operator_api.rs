//! The controller in this process on a loopback port: what release 3 added
//! to the operator API and the node protocol, seen from a release-2
//! controller (the newest the default build carries).

use handover_controller::{serve_on, ControllerConfig};
use handover_core::api::Status;
use handover_core::{Release, ReleaseInfo};
use serde_json::{json, Value};

const JOIN: &str = "join-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";

struct Controller {
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Controller {
    async fn start(release: u32) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ControllerConfig {
            release: Release(release),
            data_dir: dir.path().to_owned(),
            listen: addr,
            join_token: JOIN.into(),
            operator_token: OPERATOR.into(),
            lease_ms: 3_000,
            trusted_keys: vec![],
            allow_unsigned_artifacts: true,
            node_switch_wait_ms: 60_000,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // On a runtime of its own, as the binary runs it (its future is not
        // one `tokio::spawn` takes).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve_on(config, listener, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let c = Controller {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop: Some(stop),
            _dir: dir,
        };
        for _ in 0..200 {
            if c.http.get(c.url("/healthz")).send().await.is_ok() {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the controller did not come up");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.http
            .get(self.url(path))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

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
    let info = ReleaseInfo::of(Release(2)).unwrap();
    let hello = json!({"v": 1, "node_id": "n1", "token": JOIN, "release": 2, "schema": 2,
        "protocol": info.protocol, "role": "primary", "group": "g1",
        "hls_url": "http://127.0.0.1:7000", "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
        "current_events": [], "param_revision": null, "staged": []});
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
            join_token: JOIN.into(),
            operator_token: OPERATOR.into(),
            lease_ms: 3_000,
            trusted_keys: vec![],
            allow_unsigned_artifacts: allow,
            node_switch_wait_ms: 60_000,
        };
        let err = serve_on(config, listener, std::future::pending())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains(says), "{listen}: {err:#}");
        assert!(!data_dir.exists(), "{listen}: the data dir was touched");
    }
}
