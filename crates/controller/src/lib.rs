//! The controller: owns the database, serves the node protocol
//! (`/node/v1/…`) and the operator API (`/api/v1/…`), decides grants and
//! pushes grant changes to nodes over the watch stream.

mod error;
mod node_api;
mod operator_api;

pub use error::{ApiError, ApiResult};
pub use operator_api::{ControllerInfo, GroupNodes, NodeStatus, Status};

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use handover_core::wire::{limits, ControllerView};
use handover_core::{Release, ReleaseInfo, Schema};
use handover_store::sqlite::SqliteStore;
use handover_store::{ClusterState, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// How long a node's grant holds without a heartbeat.
pub const LEASE_MS_DEFAULT: u64 = 3_000;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub release: Release,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub join_token: String,
    pub operator_token: String,
    pub lease_ms: u64,
}

/// What the controller remembers of a node between requests.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub node_id: String,
    pub schema: Schema,
}

pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub info: &'static ReleaseInfo,
    pub config: ControllerConfig,
    /// The cluster state in force; every change wakes the watchers.
    pub cluster: watch::Sender<ClusterState>,
    /// Credential → session. Loaded lazily from the registry.
    pub sessions: RwLock<HashMap<String, Session>>,
}

impl AppState {
    pub fn view(&self) -> ControllerView {
        let c = *self.cluster.borrow();
        ControllerView {
            info: self.info,
            epoch: c.epoch,
            fenced: c.fenced,
            lease_ms: self.config.lease_ms,
            param_revision: c.param_revision,
        }
    }

    /// Re-reads the cluster state after a write and wakes watchers if it changed.
    pub async fn refresh_cluster(&self) -> ApiResult<ClusterState> {
        let c = self.store.cluster().await?;
        self.cluster.send_if_modified(|old| {
            let changed = *old != c;
            *old = c;
            changed
        });
        Ok(c)
    }
}

pub(crate) type Shared = Arc<AppState>;

fn validate(config: &ControllerConfig) -> anyhow::Result<&'static ReleaseInfo> {
    let info = ReleaseInfo::of(config.release)?;
    for (name, token) in [
        ("join token", &config.join_token),
        ("operator token", &config.operator_token),
    ] {
        anyhow::ensure!(
            token.len() >= 16 && token.len() <= limits::TOKEN_CHARS_MAX,
            "the {name} must be 16 to {} characters",
            limits::TOKEN_CHARS_MAX
        );
    }
    anyhow::ensure!(config.lease_ms >= 300, "lease must be at least 300 ms");
    Ok(info)
}

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    serve_on(config, listener, shutdown).await
}

/// Serves on an already bound listener (a supervisor may hand one over).
pub async fn serve_on(
    config: ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let info = validate(&config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let db = config.data_dir.join("controller.db");
    let store = SqliteStore::open(&db, config.release, &config.data_dir.join("snapshots"))
        .await
        .with_context(|| format!("cannot open the database {}", db.display()))?;
    let cluster = store
        .cluster()
        .await
        .context("cannot read the cluster state")?;
    let (tx, _) = watch::channel(cluster);
    let state = Arc::new(AppState {
        store: Arc::new(store),
        info,
        config: config.clone(),
        cluster: tx,
        sessions: RwLock::new(HashMap::new()),
    });
    let app = router(state);
    tracing::info!(
        release = info.release.0,
        schema = info.schema.0,
        epoch = cluster.epoch,
        listen = %config.listen,
        "controller serving"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("controller server failed")?;
    Ok(())
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/node/v1/hello", post(node_api::hello))
        .route("/node/v1/heartbeat", post(node_api::heartbeat))
        .route("/node/v1/watch", get(node_api::watch))
        .route("/node/v1/params", get(node_api::params))
        .route("/node/v1/records", post(node_api::records))
        .route("/node/v1/deliver", post(node_api::deliver))
        .route("/api/v1/status", get(operator_api::status))
        .route(
            "/api/v1/channels",
            get(operator_api::channels).post(operator_api::create_channel),
        )
        .route(
            "/api/v1/groups",
            get(operator_api::groups).post(operator_api::create_group),
        )
        .route(
            "/api/v1/groups/{name}/nodes",
            get(operator_api::group_nodes),
        )
        .route(
            "/api/v1/events",
            get(operator_api::events).post(operator_api::create_event),
        )
        .route("/api/v1/fence", post(operator_api::fence))
        .route("/api/v1/unfence", post(operator_api::unfence))
        .route("/api/v1/records", get(operator_api::records))
        .route("/api/v1/records/summary", get(operator_api::record_summary))
        .fallback(|| async {
            ApiError::not_found("no such endpoint; see /api/v1/status and the README")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(limits::BODY_BYTES_MAX))
        .with_state(state)
}

/// Milliseconds since the Unix epoch; the shell's clock, passed into the core.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Constant-time comparison so a token cannot be guessed byte by byte.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}
