//! The node's session with the controller: hello, heartbeat, the watch
//! long-poll and the parameter cache.
//!
//! The session owns the [`Link`] (grant, epoch, credential) and publishes it
//! on a `watch` channel; the shipper and the HTTP status read it. Whoever
//! meets `stale_epoch`, `unauthorized` or a lost lease calls
//! [`Session::request_handshake`]; only the session loop then says hello
//! again, so there is never more than one handshake in flight.

use crate::link::{Link, ParamsCache};
use crate::producer::{current_events, fence_alert, runnable};
use crate::runtime::{sleep_or_stop, Backoff, Stop};
use crate::store::{keys, Commit, NewRecord, Store, StoreError};
use crate::viewer_counter::ViewerCounter;
use handover_core::grant::{Grant, GrantReason};
use handover_core::params::events_for_group;
use handover_core::upgrade::Desired;
use handover_core::wire::{
    if_protocol, GrantState, Heartbeat, Hello, Role, Welcome, HLS_REQUESTS_PROTOCOL,
    MESSAGE_VERSION,
};
use handover_core::{ReleaseInfo, Schema};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How long the controller may hold a watch request.
pub const WATCH_WAIT_MS: u64 = 25_000;
/// Our side gives up on a watch this much later than the controller should answer.
pub const WATCH_TIMEOUT_MS: u64 = WATCH_WAIT_MS + 5_000;
/// A watch that answers "unchanged" faster than this is followed by a pause,
/// so a controller that does not hold the request cannot make us spin.
pub const WATCH_SPIN_GUARD_MS: u64 = 250;
/// Bounds on the heartbeat period (lease_ms / 3).
pub const HEARTBEAT_MS_MIN: u64 = 100;
pub const HEARTBEAT_MS_MAX: u64 = 10_000;
/// Timeout of hello, heartbeat, params and record requests.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Largest answer we read: parameters are the largest message.
pub const RESPONSE_BYTES_MAX: usize = 8 << 20;

/// The answer of `GET /node/v1/params`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParamsAnswer {
    pub schema: Schema,
    pub revision: u64,
    pub params: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("controller unreachable: {0}")]
    Unreachable(String),
    #[error("controller answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("controller answer is not valid: {0}")]
    BadAnswer(String),
}

impl CallError {
    /// Refusals a new hello heals (the core's rule, shared with the simulation).
    pub fn needs_handshake(&self) -> bool {
        matches!(self, CallError::Refused { status, code, .. }
            if handover_core::admission::refusal_needs_handshake(*status, code))
    }

    /// `grant_forbids_*`: our idea of the grant is out of date.
    pub fn forbidden(&self) -> bool {
        matches!(self, CallError::Refused { status: 403, .. })
    }

    fn unauthorized(&self) -> bool {
        matches!(self, CallError::Refused { status: 401, .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("parameters refused: {0}")]
    Params(String),
}

/// The controller's node API over HTTP/1.1 JSON.
pub struct Controller {
    http: reqwest::Client,
    base: String,
}

impl Controller {
    pub fn new(base: &str) -> Result<Controller, CallError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .build()
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        Ok(Controller {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &B,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .timeout(timeout);
        self.call(req, bearer).await
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(timeout);
        self.call(req, bearer).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        mut req: reqwest::RequestBuilder,
        bearer: Option<&str>,
    ) -> Result<T, CallError> {
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| CallError::Unreachable(error_chain(&e)))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| CallError::Unreachable(error_chain(&e)))?
        {
            if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                return Err(CallError::BadAnswer(format!(
                    "answer larger than {RESPONSE_BYTES_MAX} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let (code, message) =
                match serde_json::from_slice::<handover_core::wire::ErrorBody>(&body) {
                    Ok(e) => (e.error, e.message),
                    Err(_) => (
                        format!("http_{}", status.as_u16()),
                        String::from_utf8_lossy(&body).chars().take(200).collect(),
                    ),
                };
            return Err(CallError::Refused {
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| CallError::BadAnswer(e.to_string()))
    }
}

/// reqwest hides the useful part ("connection refused") in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Who this node is, as hello tells the controller.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: String,
    pub release: &'static ReleaseInfo,
    pub role: Role,
    pub group: String,
    pub hls_url: String,
    pub join_token: String,
    /// SHA-256 of the binary this worker runs (from its supervisor).
    pub binary_sha256: Option<String>,
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

/// What to adopt from a welcome or a grant state.
struct Adopt {
    grant: Grant,
    reason: GrantReason,
    epoch: u64,
    lease_ms: u64,
    param_revision: u64,
    desired: Desired,
    desired_rev: u64,
    /// Set for a welcome: it is authoritative and starts a new generation.
    credential: Option<String>,
}

pub struct Session {
    id: Identity,
    ctl: Controller,
    store: Arc<Store>,
    link: watch::Sender<Link>,
    params: watch::Sender<Arc<ParamsCache>>,
    params_wake: Notify,
    /// A grant or epoch change is acknowledged at once (it is persisted
    /// before), not at the next heartbeat: a fence completes in milliseconds.
    heartbeat_wake: Notify,
    /// One adoption at a time, so a grant change is persisted (and its
    /// alert written) exactly once even when heartbeat and watch see it together.
    adopt_lock: tokio::sync::Mutex<()>,
    reachable: AtomicBool,
    last_contact: Mutex<Option<Instant>>,
    /// Ids of the artifacts staged in the data dir, reported to the controller.
    staged: Mutex<Vec<String>>,
    /// The supervisor's binary digest the last hello said.
    supervisor_sha256: Mutex<Option<String>>,
    /// The controller's release, from the last welcome.
    controller_release: Mutex<Option<handover_core::Release>>,
    /// The protocol negotiated in the last welcome: which optional fields
    /// the controller reads (see `wire`'s rule for added fields).
    protocol: Mutex<Option<u32>>,
    /// HLS requests answered, reported in heartbeats from protocol 3 on.
    viewers: Arc<ViewerCounter>,
}

impl Session {
    /// Builds the session from the persisted credential, epoch and grant.
    /// Nothing is sent until [`Session::run`] says hello.
    pub async fn new(
        id: Identity,
        controller_url: &str,
        store: Arc<Store>,
        params: ParamsCache,
        viewers: Arc<ViewerCounter>,
    ) -> Result<Session, SessionError> {
        let grant = match store.kv_get(keys::GRANT).await?.as_deref() {
            Some("full") => Some(Grant::Full),
            Some("deliver") => Some(Grant::Deliver),
            Some("fenced") => Some(Grant::Fenced),
            _ => None,
        };
        let epoch = store
            .kv_get(keys::EPOCH)
            .await?
            .and_then(|e| e.parse::<u64>().ok());
        let credential = store.kv_get(keys::CREDENTIAL).await?;
        let link = Link {
            grant,
            epoch,
            credential,
            ..Link::default()
        };
        Ok(Session {
            id,
            ctl: Controller::new(controller_url)?,
            store,
            link: watch::channel(link).0,
            params: watch::channel(Arc::new(params)).0,
            params_wake: Notify::new(),
            heartbeat_wake: Notify::new(),
            adopt_lock: tokio::sync::Mutex::new(()),
            reachable: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            staged: Mutex::new(Vec::new()),
            supervisor_sha256: Mutex::new(None),
            controller_release: Mutex::new(None),
            protocol: Mutex::new(None),
            viewers,
        })
    }

    pub fn set_staged(&self, ids: Vec<String>) {
        *self.staged.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    pub fn staged(&self) -> Vec<String> {
        self.staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The events this node runs now: quiesced, it takes no new one.
    fn current_events(&self, now_ms: i64) -> Vec<i64> {
        let quiesce = self.link.borrow().quiesce_since_ms;
        current_events(&runnable(&self.params.borrow().events, quiesce), now_ms)
    }

    /// The heartbeat's `hls_requests`: only for a controller that
    /// negotiated protocol 3 or newer (an older one refuses the field).
    fn hls_requests(&self) -> Option<u64> {
        let negotiated = *self.protocol.lock().unwrap_or_else(|e| e.into_inner());
        if_protocol(negotiated, HLS_REQUESTS_PROTOCOL, self.viewers.requests())
    }

    pub fn controller(&self) -> &Controller {
        &self.ctl
    }

    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.subscribe()
    }

    pub fn link_now(&self) -> Link {
        self.link.borrow().clone()
    }

    pub fn params(&self) -> watch::Receiver<Arc<ParamsCache>> {
        self.params.subscribe()
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Asks for a new hello, unless one already happened since `generation`.
    pub fn request_handshake(&self, generation: u64, why: &str) {
        self.link.send_if_modified(|l| {
            if l.generation == generation && l.established {
                tracing::info!(why, "handshaking again");
                l.established = false;
                true
            } else {
                false
            }
        });
    }

    /// Records whether the controller answered at all.
    pub fn note<T>(&self, r: &Result<T, CallError>) {
        let answered = !matches!(r, Err(CallError::Unreachable(_)));
        self.reachable.store(answered, Ordering::Relaxed);
        if answered {
            *self.last_contact.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    fn since_contact(&self) -> Option<Duration> {
        self.last_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    fn hello_body(&self, token: &str) -> Hello {
        let now = crate::runtime::wall_clock_ms();
        let params = self.params.borrow();
        Hello {
            v: MESSAGE_VERSION,
            node_id: self.id.node_id.clone(),
            token: token.to_owned(),
            release: self.id.release.release,
            schema: self.id.release.schema,
            protocol: self.id.release.protocol,
            role: self.id.role,
            group: self.id.group.clone(),
            hls_url: self.id.hls_url.clone(),
            outbox: self.store.outbox_state(),
            current_events: current_events(
                &runnable(&params.events, self.link.borrow().quiesce_since_ms),
                now,
            ),
            param_revision: params.revision,
            staged: self.staged(),
            binary_sha256: self.id.binary_sha256.clone(),
            supervisor_sha256: self
                .supervisor_sha256
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    async fn send_hello(&self, token: &str) -> Result<Welcome, CallError> {
        let r = self
            .ctl
            .post(
                "/node/v1/hello",
                None,
                &self.hello_body(token),
                Duration::from_millis(REQUEST_TIMEOUT_MS),
            )
            .await;
        self.note(&r);
        r
    }

    /// Hello with the persisted credential; on 401 once more with the join token.
    pub async fn hello(&self) -> Result<(), SessionError> {
        *self
            .supervisor_sha256
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = handover_supervisor::supervisor_sha256().await;
        let credential = self.link.borrow().credential.clone();
        let welcome = match credential {
            Some(c) => match self.send_hello(&c).await {
                Err(e) if e.unauthorized() => {
                    tracing::info!("credential refused; joining with the join token");
                    self.send_hello(&self.id.join_token).await?
                }
                other => other?,
            },
            None => self.send_hello(&self.id.join_token).await?,
        };
        if welcome.v != MESSAGE_VERSION {
            return Err(CallError::BadAnswer(format!("welcome of version {}", welcome.v)).into());
        }
        tracing::info!(
            grant = %welcome.grant,
            epoch = welcome.epoch,
            controller_release = welcome.controller_release.0,
            protocol = welcome.protocol,
            "welcomed"
        );
        *self
            .controller_release
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(welcome.controller_release);
        *self.protocol.lock().unwrap_or_else(|e| e.into_inner()) = Some(welcome.protocol);
        self.adopt(Adopt {
            grant: welcome.grant,
            reason: welcome.grant_reason,
            epoch: welcome.epoch,
            lease_ms: welcome.lease_ms,
            param_revision: welcome.param_revision,
            desired: welcome.desired,
            desired_rev: welcome.desired_rev,
            credential: Some(welcome.credential),
        })
        .await?;
        Ok(())
    }

    /// Adopts a grant state from heartbeat or watch. An answer carrying an
    /// older epoch than we hold lost a race with a newer one and is ignored.
    /// Returns whether grant or epoch changed.
    async fn adopt_state(&self, gs: GrantState) -> Result<bool, SessionError> {
        if gs.v != MESSAGE_VERSION {
            return Err(CallError::BadAnswer(format!("grant state of version {}", gs.v)).into());
        }
        // A grant that contradicts this release's schema means the controller
        // holds another registration for this node (a late hello of its
        // previous release overtook ours; found by the simulation): hello again.
        let controller = *self
            .controller_release
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(info) = controller.and_then(|r| ReleaseInfo::of(r).ok()) {
            let expected = handover_core::decide_grant(info, self.id.release.schema, false).grant;
            if gs.grant != Grant::Fenced && gs.grant != expected {
                let generation = self.link.borrow().generation;
                self.request_handshake(
                    generation,
                    &format!("grant {} contradicts this release's schema", gs.grant),
                );
                return Ok(false);
            }
        }
        Ok(self
            .adopt(Adopt {
                grant: gs.grant,
                reason: gs.grant_reason,
                epoch: gs.epoch,
                lease_ms: gs.lease_ms,
                param_revision: gs.param_revision,
                desired: gs.desired,
                desired_rev: gs.desired_rev,
                credential: None,
            })
            .await?)
    }

    /// Persists grant, epoch (and credential) before anyone acts on them —
    /// "fenced at epoch E" is durable before the next request acknowledges
    /// it — with the fence alert in the same transaction.
    async fn adopt(&self, a: Adopt) -> Result<bool, StoreError> {
        let _one = self.adopt_lock.lock().await;
        let cur = self.link.borrow().clone();
        let from_hello = a.credential.is_some();
        if !from_hello && cur.epoch.is_some_and(|held| a.epoch < held) {
            return Ok(false);
        }
        let grant_changed = cur.grant != Some(a.grant);
        let epoch_changed = cur.epoch != Some(a.epoch);
        let mut commit = Commit::default();
        if grant_changed || epoch_changed {
            commit
                .put
                .push((keys::GRANT.to_owned(), a.grant.as_str().to_owned()));
            commit
                .put
                .push((keys::EPOCH.to_owned(), a.epoch.to_string()));
        }
        if let Some(c) = &a.credential {
            if cur.credential.as_ref() != Some(c) {
                commit.put.push((keys::CREDENTIAL.to_owned(), c.clone()));
            }
        }
        if a.grant == Grant::Fenced && cur.grant != Some(Grant::Fenced) {
            let events = self.params.borrow().events.clone();
            // An alert belongs to a channel; a node with no events only logs it.
            if let Some(alert) =
                fence_alert(&events, crate::runtime::wall_clock_ms(), a.epoch, a.reason)
            {
                match NewRecord::encode(self.id.release.schema, &self.id.node_id, &alert) {
                    Ok(r) => commit.records.push(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "fence alert cannot be encoded; not recorded")
                    }
                }
            }
            tracing::warn!(epoch = a.epoch, reason = ?a.reason, "fenced");
        }
        self.store.commit(&commit).await?;
        self.link.send_if_modified(|l| {
            let before = l.clone();
            l.grant = Some(a.grant);
            l.reason = Some(a.reason);
            l.epoch = Some(a.epoch);
            l.lease_ms = a.lease_ms;
            l.controller_param_revision = Some(a.param_revision);
            l.quiesce_since_ms = match (a.desired.quiesce, l.quiesce_since_ms) {
                (true, Some(since)) => Some(since),
                (true, None) => Some(crate::runtime::wall_clock_ms()),
                (false, _) => None,
            };
            l.desired = a.desired.clone();
            l.desired_rev = Some(a.desired_rev);
            if let Some(c) = &a.credential {
                l.credential = Some(c.clone());
                l.established = true;
                l.generation = l.generation.wrapping_add(1);
            }
            *l != before
        });
        if a.grant.may_read_params() && self.params.borrow().revision != Some(a.param_revision) {
            self.params_wake.notify_one();
        }
        if grant_changed || epoch_changed {
            self.heartbeat_wake.notify_one();
        }
        Ok(grant_changed || epoch_changed || cur.desired != a.desired)
    }

    /// The session loop: hello whenever not established (with bounded
    /// backoff while the controller is unreachable), otherwise the watch
    /// long-poll, so a grant change reaches the node within milliseconds.
    pub async fn run(self: Arc<Self>, mut stop: Stop) {
        let mut backoff = Backoff::new();
        let mut rx = self.link.subscribe();
        loop {
            if stop.is_set() {
                return;
            }
            let link = rx.borrow_and_update().clone();
            if !link.established {
                let r = tokio::select! {
                    r = self.hello() => r,
                    _ = stop.wait() => return,
                };
                match r {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        tracing::warn!(error = %e, "hello failed; retrying");
                        if !sleep_or_stop(backoff.next(), &mut stop).await {
                            return;
                        }
                    }
                }
                continue;
            }
            let (Some(epoch), Some(grant), Some(credential)) =
                (link.epoch, link.grant, link.credential.as_deref())
            else {
                self.request_handshake(link.generation, "incomplete session state");
                continue;
            };
            let mut path =
                format!("/node/v1/watch?epoch={epoch}&grant={grant}&wait_ms={WATCH_WAIT_MS}");
            if let Some(rev) = link.desired_rev {
                path.push_str(&format!("&desired_rev={rev}"));
            }
            let started = Instant::now();
            let generation = link.generation;
            let r = tokio::select! {
                r = self.ctl.get::<GrantState>(&path, Some(credential), Duration::from_millis(WATCH_TIMEOUT_MS)) => r,
                _ = rx.wait_for(|l| !l.established || l.generation != generation) => continue,
                _ = stop.wait() => return,
            };
            self.note(&r);
            let pause = match r {
                Ok(gs) => match self.adopt_state(gs).await {
                    Ok(changed) => {
                        backoff.reset();
                        let quick = started.elapsed() < Duration::from_millis(WATCH_SPIN_GUARD_MS);
                        (!changed && quick).then(|| Duration::from_millis(WATCH_SPIN_GUARD_MS))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot adopt the grant state");
                        Some(backoff.next())
                    }
                },
                Err(e) if e.needs_handshake() || e.forbidden() => {
                    self.request_handshake(generation, &e.to_string());
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch failed");
                    Some(backoff.next())
                }
            };
            if let Some(d) = pause {
                if !sleep_or_stop(d, &mut stop).await {
                    return;
                }
            }
        }
    }

    /// Heartbeats every lease_ms / 3 while established; a lease without any
    /// answer for lease_ms is lost and needs a new hello.
    pub async fn run_heartbeat(self: Arc<Self>, mut stop: Stop) {
        let mut rx = self.link.subscribe();
        loop {
            let lease_ms = tokio::select! {
                r = rx.wait_for(|l| l.established) => match r {
                    Ok(l) => l.lease_ms,
                    Err(_) => return,
                },
                _ = stop.wait() => return,
            };
            let period = (lease_ms / 3).clamp(HEARTBEAT_MS_MIN, HEARTBEAT_MS_MAX);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(period)) => {}
                _ = self.heartbeat_wake.notified() => {}
                _ = stop.wait() => return,
            }
            let link = self.link_now();
            let (true, Some(epoch), Some(credential)) =
                (link.established, link.epoch, link.credential.clone())
            else {
                continue;
            };
            let hb = Heartbeat {
                v: MESSAGE_VERSION,
                node_id: self.id.node_id.clone(),
                epoch,
                outbox: self.store.outbox_state(),
                current_events: self.current_events(crate::runtime::wall_clock_ms()),
                staged: self.staged(),
                hls_requests: self.hls_requests(),
            };
            let timeout = Duration::from_millis(lease_ms.clamp(1_000, REQUEST_TIMEOUT_MS));
            let r = tokio::select! {
                r = self.ctl.post::<_, GrantState>("/node/v1/heartbeat", Some(&credential), &hb, timeout) => r,
                _ = stop.wait() => return,
            };
            self.note(&r);
            match r {
                Ok(gs) => {
                    if let Err(e) = self.adopt_state(gs).await {
                        tracing::warn!(error = %e, "cannot adopt the grant state");
                    }
                }
                Err(e) if e.needs_handshake() || e.forbidden() => {
                    self.request_handshake(link.generation, &e.to_string());
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
            let lost = self
                .since_contact()
                .is_some_and(|d| d > Duration::from_millis(lease_ms.max(HEARTBEAT_MS_MIN)));
            if lost {
                self.request_handshake(link.generation, "lease lost");
            }
            // Who this node is changed under it: say so in a new hello.
            let said = self
                .supervisor_sha256
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(now) = handover_supervisor::supervisor_sha256().await {
                if said.as_deref() != Some(now.as_str()) {
                    self.request_handshake(
                        link.generation,
                        "the supervisor now runs another binary",
                    );
                }
            }
        }
    }

    /// Fetches parameters whenever the grant is full and the controller
    /// announces a revision we have not cached. Never asks with any other grant.
    pub async fn run_params(self: Arc<Self>, mut stop: Stop) {
        let mut rx = self.link.subscribe();
        let mut backoff = Backoff::new();
        // The announced revision last dealt with (cached or refused), so a
        // refused revision is not fetched again and again.
        let mut settled: Option<u64> = None;
        loop {
            let link = rx.borrow_and_update().clone();
            let cached = self.params.borrow().revision;
            let want = match (&link, link.controller_param_revision) {
                (
                    Link {
                        established: true,
                        grant: Some(Grant::Full),
                        epoch: Some(epoch),
                        credential: Some(credential),
                        ..
                    },
                    Some(rev),
                ) if Some(rev) != cached && Some(rev) != settled => {
                    Some((rev, *epoch, credential.clone()))
                }
                _ => None,
            };
            let Some((rev, epoch, credential)) = want else {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = self.params_wake.notified() => {}
                    _ = stop.wait() => return,
                }
                continue;
            };
            let path = format!("/node/v1/params?epoch={epoch}");
            let r = tokio::select! {
                r = self.ctl.get::<ParamsAnswer>(
                    &path,
                    Some(&credential),
                    Duration::from_millis(REQUEST_TIMEOUT_MS),
                ) => r,
                _ = stop.wait() => return,
            };
            self.note(&r);
            let err = match r {
                Ok(answer) => match self.cache_params(answer).await {
                    Ok(got) => {
                        tracing::info!(revision = got, "parameters cached");
                        settled = Some(rev);
                        backoff.reset();
                        continue;
                    }
                    Err(SessionError::Params(why)) => {
                        tracing::error!(
                            revision = rev,
                            why,
                            "parameters refused; keeping the cache"
                        );
                        settled = Some(rev);
                        continue;
                    }
                    Err(e) => e,
                },
                Err(e) if e.needs_handshake() || e.forbidden() => {
                    self.request_handshake(link.generation, &e.to_string());
                    continue;
                }
                Err(e) => e.into(),
            };
            tracing::warn!(error = %err, "parameter fetch failed; retrying");
            if !sleep_or_stop(backoff.next(), &mut stop).await {
                return;
            }
        }
    }

    /// Checks the parameters parse in our own schema, then caches them durably.
    async fn cache_params(&self, answer: ParamsAnswer) -> Result<u64, SessionError> {
        let own = self.id.release.schema;
        if answer.schema != own {
            return Err(SessionError::Params(format!(
                "they are of schema {}, this release reads schema {own}",
                answer.schema
            )));
        }
        let events = events_for_group(own, &answer.params, &self.id.group)
            .map_err(|e| SessionError::Params(e.to_string()))?;
        self.store
            .kv_put(vec![
                (keys::params_revision(own), answer.revision.to_string()),
                (keys::params_json(own), answer.params.to_string()),
            ])
            .await?;
        self.params.send_replace(Arc::new(ParamsCache {
            schema: own,
            revision: Some(answer.revision),
            events,
        }));
        Ok(answer.revision)
    }
}
