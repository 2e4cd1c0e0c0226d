//! The controller in this process on a loopback port, and the requests
//! the tests make of it.
#![allow(dead_code)]

use handover_controller::{serve_on, ControllerConfig};
use handover_core::{Release, ReleaseInfo};
use serde_json::{json, Value};

/// Credentials nodes choose (at least 32 characters).
pub const CRED_A: &str = "credential-of-node-a-0123456789abcdef";
pub const CRED_B: &str = "credential-of-node-b-0123456789abcdef";

pub const OPERATOR: &str = "operator-token-0123456789";
/// The controller's read-only token (dashboards and status).
pub const READ_ONLY: &str = "read-only-token-0123456789";

pub struct Controller {
    pub addr: std::net::SocketAddr,
    base: String,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Controller {
    pub async fn start(release: u32) -> Controller {
        Controller::start_with(release, handover_net::Limits::CONTROLLER).await
    }

    pub async fn start_with(release: u32, limits: handover_net::Limits) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ControllerConfig {
            release: Release(release),
            data_dir: dir.path().to_owned(),
            listen: addr,
            operator_token: OPERATOR.into(),
            read_only_token: Some(READ_ONLY.into()),
            lease_ms: 3_000,
            trusted_keys: vec![],
            node_switch_wait_ms: 60_000,
            limits,
            allow_unsigned_artifacts: true,
            tls: None,
            database: None,
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
            addr,
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
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

impl Controller {
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(self.url(path))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    pub async fn group(&self, name: &str, primary: &str, backup: &str) {
        let (status, body) = self
            .post(
                "/api/v1/groups",
                Some(OPERATOR),
                json!({"name": name, "primary": primary, "backup": backup}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// `handover node add ID [--replace]`: the token.
    pub async fn node_add(&self, id: &str, replace: bool) -> String {
        let (status, body) = self
            .post(
                "/api/v1/nodes",
                Some(OPERATOR),
                json!({"ids": [id], "replace": replace}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["tokens"][0]["token"].as_str().unwrap().to_owned()
    }
}

/// A release-2 hello as a node sends it.
pub fn hello(
    id: &str,
    role: &str,
    group: &str,
    token: &str,
    new_credential: Option<&str>,
) -> Value {
    let info = ReleaseInfo::of(Release(2)).unwrap();
    let mut h = json!({"v": 1, "node_id": id, "token": token, "release": 2, "schema": 2,
        "protocol": info.protocol, "role": role, "group": group,
        "hls_url": format!("http://127.0.0.1:7000/{id}"),
        "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
        "current_events": [], "param_revision": null, "staged": []});
    if let Some(c) = new_credential {
        h["new_credential"] = json!(c);
    }
    h
}
