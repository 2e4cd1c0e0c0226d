//! The operator's HTTP client for the controller API.

use anyhow::{anyhow, Context};
use handover_core::api::Status;
use handover_core::wire::ErrorBody;
use handover_net::controllers::ControllerUrls;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Write;
use std::time::Duration;

/// No operator call waits longer than this.
const REQUEST_TIMEOUT_MS: u64 = 10_000;

pub struct Operator {
    /// The controller, or its replicas: a request that cannot connect is
    /// sent to the next one.
    urls: ControllerUrls,
    /// None when the client certificate alone authenticates.
    token: Option<String>,
    http: reqwest::Client,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Operator {
    /// A client of the controller at `base` (plain http: loopback only).
    pub fn with(base: &str, token: &str) -> anyhow::Result<Operator> {
        Operator::with_trust(base, Some(token), None)
    }

    /// A client of the controller at `base` (or of its replicas, `a,b,c`),
    /// trusting the cluster CA `trust` (needed for https).
    pub fn with_trust(
        base: &str,
        token: Option<&str>,
        trust: Option<&handover_net::tls::ClientTrust>,
    ) -> anyhow::Result<Operator> {
        let urls = ControllerUrls::parse(base).context("the controller URL (--controller)")?;
        for url in urls.all() {
            let _checked = handover_net::tls::client_for(url, trust, reqwest::Client::builder())
                .map_err(|e| anyhow!("{e}"))?;
        }
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .no_proxy();
        let http = handover_net::tls::client_for(urls.current(), trust, builder)
            .map_err(|e| anyhow!("{e}"))?
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Operator {
            urls,
            token: token.map(str::to_owned),
            http,
        })
    }

    /// One client per replica (each with only its URL), for what every
    /// replica must hold: an uploaded artifact.
    pub fn replicas(&self) -> anyhow::Result<Vec<Operator>> {
        self.urls
            .all()
            .iter()
            .map(|url| {
                Ok(Operator {
                    urls: ControllerUrls::parse(url).context("a controller URL")?,
                    token: self.token.clone(),
                    http: self.http.clone(),
                })
            })
            .collect()
    }

    /// The URL requests go to now.
    pub fn url(&self) -> &str {
        self.urls.current()
    }

    /// The HTTP client (with the cluster CA), for requests of other shapes.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn send<T: DeserializeOwned>(&self, req: Request<'_>, what: &str) -> anyhow::Result<T> {
        let body = self.exchange(req, what, false).await?.unwrap_or_default();
        serde_json::from_slice(&body)
            .with_context(|| format!("controller answer to {what} is not the expected JSON"))
    }

    /// Sends `req` with the token and reads the whole answer: its body on
    /// success, `None` for a 404 when `none_if_missing`, otherwise an error
    /// that says which request failed and, if the controller said, why.
    ///
    /// A request that cannot connect (so the controller never saw it), or
    /// that a replica refused with 503 (not the leader, or its database
    /// away: nothing was done), goes to the next replica, each tried once;
    /// a streamed body only once.
    async fn exchange(
        &self,
        req: Request<'_>,
        what: &str,
        none_if_missing: bool,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let tries = if req.retry { self.urls.all().len() } else { 1 };
        let mut tried = 0;
        let resp = loop {
            let base = self.urls.current().to_owned();
            let built = (req.build)(&self.http, &base);
            let built = match &self.token {
                Some(token) => built.bearer_auth(token),
                None => built,
            };
            tried += 1;
            match built.send().await {
                // A replica that refused before doing anything (not the
                // leader, or its database away): the next one may serve.
                Ok(resp)
                    if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        && tried < tries =>
                {
                    self.urls.failed(&base);
                }
                Ok(resp) => break resp,
                Err(e) if e.is_connect() && tried < tries => {
                    self.urls.failed(&base);
                }
                Err(e) => {
                    if e.is_connect() {
                        self.urls.failed(&base);
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot reach the controller at {base} ({what})")));
                }
            }
        };
        let status = resp.status();
        if none_if_missing && status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("controller answer to {what} was cut off"))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => anyhow!(
                    "controller refused {what}: {} ({}): {}",
                    e.error,
                    status,
                    e.message
                ),
                Err(_) => anyhow!("controller refused {what}: {status}"),
            });
        }
        Ok(Some(Vec::from(body)))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let build = |http: &reqwest::Client, base: &str| http.get(format!("{base}{path}"));
        self.send(Request::retried(&build), &format!("GET {path}"))
            .await
    }

    pub async fn post<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let build =
            |http: &reqwest::Client, base: &str| http.post(format!("{base}{path}")).json(body);
        self.send(Request::retried(&build), &format!("POST {path}"))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let build = |http: &reqwest::Client, base: &str| http.delete(format!("{base}{path}"));
        self.send(Request::retried(&build), &format!("DELETE {path}"))
            .await
    }

    pub async fn status(&self) -> anyhow::Result<Status> {
        self.get("/api/v1/status").await
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (to the second).
pub fn fmt_time_ms(ms: i64) -> String {
    let secs = u64::try_from(ms / 1000).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// The first 12 hex digits of a SHA-256 (as in artifact ids), or "-".
fn short_sha(sha: Option<&str>) -> &str {
    sha.map(|s| s.get(..12).unwrap_or(s)).unwrap_or("-")
}

pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let c = &s.controller;
    let _ = writeln!(
        out,
        "controller  release {} ({}), schema {}, protocol {}..={}, worker binary {}, supervisor binary {}",
        c.release,
        c.semver,
        c.schema,
        c.protocol.min,
        c.protocol.max,
        short_sha(c.binary_sha256.as_deref()),
        short_sha(c.supervisor_sha256.as_deref())
    );
    let _ = writeln!(
        out,
        "cluster     epoch {}{}, parameter revision {}",
        s.cluster.epoch,
        if s.cluster.fenced { " FENCED" } else { "" },
        s.cluster.param_revision
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:<12} {:<12} {:<8} {:<8} {:<8} {:>7} {:>7}  events",
        "node", "release", "binary", "supervisor", "role", "group", "grant", "outbox", "acked"
    );
    for n in &s.nodes {
        let r = &n.node;
        let lease = if n.lease_expired {
            " (lease expired)"
        } else {
            ""
        };
        let hls = n
            .hls_requests
            .map(|h| format!("  ({h} HLS requests)"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:<12} {:<12} {:<8} {:<8} {:<8} {:>7} {:>7}  {:?}{lease}{hls}",
            r.node_id,
            r.release.0,
            short_sha(r.binary_sha256.as_deref()),
            short_sha(r.supervisor_sha256.as_deref()),
            r.role.as_str(),
            r.group,
            n.grant_now.as_str(),
            n.outbox_depth,
            r.acked_through,
            r.current_events
        );
    }
    out
}

impl Operator {
    /// GET of a text answer; `None` for 404 (any code), as for a signature
    /// the controller does not have.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<Option<String>> {
        let build = |http: &reqwest::Client, base: &str| http.get(format!("{base}{path}"));
        let body = self
            .exchange(Request::retried(&build), &format!("GET {path}"), true)
            .await?;
        Ok(body.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// PUT with a raw (possibly streamed) body and extra headers; `timeout`
    /// replaces the usual per-request one (a large upload takes longer).
    pub async fn put_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: reqwest::Body,
        timeout: Duration,
    ) -> anyhow::Result<T> {
        // A streamed body is sent once: the request is built once.
        let body = std::sync::Mutex::new(Some(body));
        let build = |http: &reqwest::Client, base: &str| {
            let mut req = http.put(format!("{base}{path}")).timeout(timeout);
            if let Some(b) = body.lock().ok().and_then(|mut b| b.take()) {
                req = req.body(b);
            }
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            req
        };
        self.send(
            Request {
                build: &build,
                retry: false,
            },
            &format!("PUT {path}"),
        )
        .await
    }
}

/// One operator request: how to build it for a controller's base URL, and
/// whether it may be sent again to another replica after a failed connect.
struct Request<'a> {
    build: &'a (dyn Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder + Sync),
    retry: bool,
}

impl<'a> Request<'a> {
    fn retried(
        build: &'a (dyn Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder + Sync),
    ) -> Request<'a> {
        Request { build, retry: true }
    }
}
