//! The controller in this process on a loopback port, and its limits: a
//! node holds at most `WATCHES_PER_NODE_MAX` watches (one more ends its
//! oldest at once, with the current grant state, and the others go on as
//! watches); a stalled request body is answered 408 `body_timeout`.

use handover_controller::{serve_on, ControllerConfig, WATCHES_PER_NODE_MAX};
use handover_core::wire::{GrantState, Hello, Role, Welcome};
use handover_core::{Grant, Release, ReleaseInfo};
use handover_net::Limits;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

const JOIN: &str = "join-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
/// Bound on every wait for an answer.
const BOUND: Duration = Duration::from_secs(10);
/// Long enough for a watch request to reach its handler.
const SETTLE: Duration = Duration::from_millis(300);

struct Controller {
    addr: std::net::SocketAddr,
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Controller {
    async fn start(limits: Limits) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ControllerConfig {
            release: Release(2),
            data_dir: dir.path().to_owned(),
            listen: addr,
            join_token: JOIN.into(),
            operator_token: OPERATOR.into(),
            lease_ms: 60_000,
            trusted_keys: vec![],
            node_switch_wait_ms: 60_000,
            limits,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // On a runtime of its own, as the binary runs it.
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
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the controller did not come up");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn hello(&self, node_id: &str) -> Welcome {
        let info = ReleaseInfo::of(Release(2)).unwrap();
        let hello = Hello::new(
            node_id,
            JOIN,
            info,
            Role::Primary,
            "g1",
            "http://127.0.0.1:7000",
        );
        let resp = self
            .http
            .post(self.url("/node/v1/hello"))
            .json(&hello)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// A watch of `node_id` holding what `w` said, answered in a task.
    fn watch(&self, node_id: &str, w: &Welcome) -> JoinHandle<GrantState> {
        let req = self
            .http
            .get(self.url("/node/v1/watch"))
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
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
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
    let c = Controller::start(Limits::CONTROLLER).await;
    let w = c.hello("n1").await;
    let other = c.hello("n2").await;
    assert_eq!(w.grant, Grant::Full);
    let oldest = c.watch("n1", &w);
    tokio::time::sleep(SETTLE).await;
    let second = c.watch("n1", &w);
    let of_n2 = c.watch("n2", &other);
    tokio::time::sleep(SETTLE).await;
    assert!(!oldest.is_finished() && !second.is_finished() && !of_n2.is_finished());

    // A third watch of n1: its oldest answers at once, unchanged.
    let third = c.watch("n1", &w);
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
    let c = Controller::start(Limits {
        body_read_timeout_ms: 200,
        ..Limits::CONTROLLER
    })
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
