//! The node's HTTP client of the controller's node API, and the parameter
//! cache on disk. What to send and when is the node machine's decision
//! (`handover_core::node`); this module only carries requests and answers.

use crate::link::ParamsCache;
use crate::runtime::error_chain;
use crate::store::{keys, Store, StoreError};
use handover_core::node::{self, Reply};
use handover_core::params::events_for_group;
use handover_core::Schema;
use handover_net::controllers::ControllerUrls;
use std::sync::Arc;
use std::time::Duration;

pub use handover_core::node::{REQUEST_TIMEOUT_MS, WATCH_TIMEOUT_MS, WATCH_WAIT_MS};
/// Timeout of establishing a connection to the controller.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Largest answer we read: parameters are the largest message.
pub const RESPONSE_BYTES_MAX: usize = 8 << 20;

/// The controller's node API over HTTP/1.1 JSON, at the current one of
/// its URLs: a request that cannot reach it moves the node to the next
/// replica, and the machine's retry goes there.
pub struct Controller {
    http: reqwest::Client,
    urls: Arc<ControllerUrls>,
}

impl Controller {
    /// A client of the controller at `urls`: https with the cluster CA
    /// `trust`, or plain http to a loopback address only.
    pub fn new(
        urls: Arc<ControllerUrls>,
        trust: Option<&handover_net::tls::ClientTrust>,
    ) -> Result<Controller, String> {
        let builder =
            reqwest::Client::builder().connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
        let http = handover_net::tls::client_for(urls.current(), trust, builder)?
            .build()
            .map_err(|e| error_chain(&e))?;
        Ok(Controller { http, urls })
    }

    /// Sends one request of the machine; `batch` is the body of a
    /// [`node::Request::Batch`] (the records the shell read).
    pub async fn send(
        &self,
        send: &node::Send,
        batch: Option<&handover_core::wire::Batch>,
    ) -> Reply {
        let base = self.urls.current().to_owned();
        let url = |path: &str| format!("{base}{path}");
        let req = match &send.request {
            node::Request::Hello(hello) => self.http.post(url("/node/v1/hello")).json(hello),
            node::Request::Heartbeat(hb) => self.http.post(url("/node/v1/heartbeat")).json(hb),
            node::Request::Watch {
                epoch,
                grant,
                wait_ms,
                desired_rev,
            } => {
                let mut path =
                    format!("/node/v1/watch?epoch={epoch}&grant={grant}&wait_ms={wait_ms}");
                if let Some(rev) = desired_rev {
                    path.push_str(&format!("&desired_rev={rev}"));
                }
                self.http.get(url(&path))
            }
            node::Request::Params { epoch } => self
                .http
                .get(url(&format!("/node/v1/params?epoch={epoch}"))),
            node::Request::Batch { channel, .. } => match batch {
                Some(b) => self.http.post(url(channel.path())).json(b),
                None => return Reply::Invalid("no records to send for this batch".into()),
            },
        };
        let mut req = req.timeout(Duration::from_millis(send.timeout_ms));
        // A certificate's digest is not sent: the connection proves it.
        if let Some(token) = send
            .credential
            .as_deref()
            .filter(|c| handover_core::identity::is_bearer_secret(c))
        {
            req = req.bearer_auth(token);
        }
        let reply = call(req).await;
        // Unreachable, or a replica that cannot serve now (503: its
        // database is away): the next replica is tried.
        let why = match &reply {
            Reply::Unreachable(why) => Some(why.clone()),
            Reply::Refused {
                status: 503,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        };
        if let Some(why) = why {
            let next = self.urls.failed(&base);
            if next != base {
                tracing::warn!(controller = %base, next = %next, error = %why, "controller unavailable; moving to the next replica");
            }
        }
        reply
    }
}

async fn call(req: reqwest::RequestBuilder) -> Reply {
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Reply::Unreachable(error_chain(&e)),
    };
    let status = resp.status();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                    return Reply::Invalid(format!(
                        "answer larger than {RESPONSE_BYTES_MAX} bytes"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Reply::Unreachable(error_chain(&e)),
        }
    }
    if status.is_success() {
        return Reply::Ok(body);
    }
    let (code, message) = crate::runtime::refusal(status.as_u16(), &body);
    Reply::Refused {
        status: status.as_u16(),
        code,
        message,
    }
}

/// Reads this schema's parameter cache from kv. A missing cache (the node
/// was started as a new release) or one that no longer parses leaves the
/// node serving nothing until it may read parameters again.
pub async fn load_params(
    store: &Store,
    schema: Schema,
    group: &str,
) -> Result<ParamsCache, StoreError> {
    let empty = ParamsCache {
        schema,
        revision: None,
        events: Vec::new(),
    };
    let revision = store.kv_get(&keys::params_revision(schema)).await?;
    let raw = store.kv_get(&keys::params_json(schema)).await?;
    let (Some(revision), Some(raw)) = (revision, raw) else {
        return Ok(empty);
    };
    let parsed = serde_json::from_str::<serde_json::Value>(&raw)
        .map_err(|e| e.to_string())
        .and_then(|v| events_for_group(schema, &v, group).map_err(|e| e.to_string()));
    match (parsed, revision.parse::<u64>()) {
        (Ok(events), Ok(revision)) => Ok(ParamsCache {
            schema,
            revision: Some(revision),
            events,
        }),
        (Err(e), _) => {
            tracing::warn!(error = %e, "ignoring an unreadable parameter cache");
            Ok(empty)
        }
        (_, Err(_)) => {
            tracing::warn!(revision, "ignoring a parameter cache with a bad revision");
            Ok(empty)
        }
    }
}
