//! The controller: owns the database, serves the node protocol
//! (`/node/v1/…`) and the operator API (`/api/v1/…`), decides grants and
//! pushes grant changes to nodes over the watch stream.

pub mod artifacts;
pub mod auth;
mod error;
mod node_api;
mod operator_api;
mod orchestrator;
mod replicas;
mod upgrade_api;
mod watches;

pub(crate) use auth::bearer;
pub use error::{ApiError, ApiResult};
pub use node_api::NodeProof;
pub use watches::WATCHES_PER_NODE_MAX;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use handover_core::artifact::{PublicKey, SignaturePolicy};
use handover_core::identity::{Membership, SecretDigest};
use handover_core::params::Group;
use handover_core::role::Role;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{limits, ControllerView};
use handover_core::{Release, ReleaseInfo, Schema};
use handover_store::postgres::{PostgresStore, Target};
use handover_store::sqlite::SqliteStore;
use handover_store::{ClusterState, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// How long a node's grant holds without a heartbeat.
pub const LEASE_MS_DEFAULT: u64 = 3_000;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub release: Release,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The token that may do everything on the operator API.
    pub operator_token: String,
    /// The token that may only read it (`GET`): dashboards and status.
    /// Never the operator token ([`auth::OperatorCredentials::new`]).
    pub read_only_token: Option<String>,
    pub lease_ms: u64,
    /// Minisign public keys (their base64 lines) whose signatures make an
    /// artifact acceptable. Empty only with `allow_unsigned_artifacts`.
    pub trusted_keys: Vec<String>,
    /// `--allow-unsigned-artifacts`: run with no trusted key, artifacts not
    /// signature-checked; refused unless `listen` is a loopback address
    /// ([`SignaturePolicy::decide`]).
    pub allow_unsigned_artifacts: bool,
    /// Given to every upgrade's plan ([`handover_core::upgrade::Plan::node_switch_wait_ms`]).
    pub node_switch_wait_ms: u64,
    /// What the listener allows ([`handover_net::Limits::CONTROLLER`], the
    /// cap perhaps changed by `--connections-max`).
    pub limits: handover_net::Limits,
    /// The certificate and key to serve TLS with (`handover init` made
    /// them). None: plain HTTP, refused unless `listen` is a loopback address.
    pub tls: Option<TlsFiles>,
    /// The PostgreSQL store (`--database postgres://…`). None: SQLite in
    /// `DATA_DIR/controller.db`. Shown only redacted (no password).
    pub database: Option<Target>,
}

/// The controller's TLS certificate chain and private key (PEM files), and
/// the operators' client certificates it pins (client certificates exist
/// only over TLS).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates (PEM) whose holders may do everything, like the operator token.
    pub operator_certs: Vec<PathBuf>,
    /// Certificates (PEM) whose holders may only read, like the read-only token.
    pub read_only_certs: Vec<PathBuf>,
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
    /// What [`auth::require`] checks every operator request against.
    pub tokens: auth::OperatorCredentials,
    /// The cluster state in force; every change wakes the watchers.
    pub cluster: watch::Sender<ClusterState>,
    /// Credential digest → session. Loaded lazily from the registry.
    pub sessions: RwLock<HashMap<SecretDigest, Session>>,
    /// Node id → its group and role: the groups, which say who a node is.
    pub members: RwLock<HashMap<String, Membership>>,
    /// Held by whoever changes the groups or reloads `members` from the
    /// store, across the store's write or read and the map's update: a
    /// reload read before a group's commit never replaces the map after
    /// that group was added to it.
    pub members_update: tokio::sync::Mutex<()>,
    /// The cluster row as the replica sync last acted on it: its caches
    /// (desired states, sessions, members) reflect these revisions. Not
    /// `cluster`, which any request may refresh first, and then a sync
    /// would see no revision move and keep a stale cache for good.
    pub synced: std::sync::Mutex<ClusterState>,
    /// Node → desired upgrade state, a cache of `node_desired`.
    pub desired: RwLock<HashMap<String, Desired>>,
    /// Bumped on every desired-state change; wakes the watchers.
    pub desired_rev: watch::Sender<u64>,
    pub artifacts: artifacts::ArtifactStore,
    /// The upgrade (its id and state); the orchestrator steps it under this lock.
    pub upgrade: tokio::sync::Mutex<Option<(i64, Upgrade)>>,
    /// Set once this worker has asked its supervisor to switch release.
    pub switching: AtomicBool,
    /// SHA-256 of the binary this worker runs (from its supervisor).
    pub binary_sha256: Option<String>,
    /// Node → the HLS requests its last heartbeat reported (protocol 3 on),
    /// for the status. In memory only: one entry per node with a session,
    /// and the count is per worker anyway.
    pub hls_requests: RwLock<HashMap<String, u64>>,
    /// The watches each node holds (at most [`WATCHES_PER_NODE_MAX`]).
    pub watches: watches::Watches,
    /// This process among the controller replicas ([`replicas::replica_id`]).
    pub replica: String,
    /// The replica it is a worker of ([`replicas::replica_name`]).
    pub replica_name: String,
    /// Where operators and nodes reach this replica.
    pub url: String,
    /// Whether this replica holds the orchestrator's lease (last sync).
    pub leading: AtomicBool,
    /// Set when this replica takes the lease: its first step of the upgrade
    /// stores the state under its term even if nothing changed, so the
    /// step log shows when each leader took over.
    pub claim: AtomicBool,
    /// Set while the database has not answered for a lease: nodes get 503.
    pub detached: AtomicBool,
    /// The lease and the live replicas, from the last sync.
    pub replicas: RwLock<replicas::ReplicaView>,
}

impl auth::OperatorAuth for Shared {
    fn operator_credentials(&self) -> &auth::OperatorCredentials {
        &self.tokens
    }
}

impl artifacts::ArtifactHost for Shared {
    fn artifacts(&self) -> &artifacts::ArtifactStore {
        &self.artifacts
    }

    async fn check_node(&self, proof: &node_api::NodeProof) -> ApiResult<()> {
        node_api::session(self, proof, None).await.map(|_| ())
    }

    async fn nodes(&self) -> ApiResult<Vec<handover_store::NodeRow>> {
        Ok(self.store.nodes().await?)
    }

    fn lease_ms(&self) -> u64 {
        self.config.lease_ms
    }
}

impl AppState {
    /// What admits node requests now (epoch, fence, this release).
    pub fn admission(&self) -> handover_core::admission::Admission<'static> {
        let c = *self.cluster.borrow();
        handover_core::admission::Admission {
            controller: self.info,
            epoch: c.epoch,
            fenced: c.fenced,
        }
    }

    pub fn view(&self) -> ControllerView {
        let c = *self.cluster.borrow();
        ControllerView {
            info: self.info,
            desired_rev: *self.desired_rev.borrow(),
            epoch: c.epoch,
            fenced: c.fenced,
            lease_ms: self.config.lease_ms,
            param_revision: c.param_revision,
        }
    }

    pub async fn desired_of(&self, node_id: &str) -> ApiResult<Desired> {
        if let Some(d) = self
            .desired
            .read()
            .ok()
            .and_then(|m| m.get(node_id).cloned())
        {
            return Ok(d);
        }
        let d = self.store.desired(node_id).await?;
        if let Ok(mut m) = self.desired.write() {
            m.insert(node_id.to_owned(), d.clone());
        }
        Ok(d)
    }

    /// Stores what nodes should do (those whose desired state changes, in
    /// one transaction) and wakes every watcher so they learn at once.
    pub async fn set_desired(&self, desired: Vec<(String, Desired)>) -> ApiResult<()> {
        let mut changed = Vec::with_capacity(desired.len());
        for (node_id, d) in desired {
            if self.desired_of(&node_id).await? != d {
                changed.push((node_id, d));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.store.set_desired(&changed).await?;
        if let Ok(mut m) = self.desired.write() {
            m.extend(changed);
        }
        self.desired_rev.send_modify(|r| *r = r.wrapping_add(1));
        Ok(())
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

/// Shortest node lease: a few heartbeats fit in it even on a busy host.
const LEASE_MS_MIN: u64 = 300;

fn validate(
    config: &ControllerConfig,
) -> anyhow::Result<(&'static ReleaseInfo, auth::OperatorCredentials)> {
    let info = ReleaseInfo::of(config.release)?;
    let mut tokens = auth::OperatorCredentials::new(
        config.operator_token.clone(),
        config.read_only_token.clone(),
    )?;
    if let Some(tls) = &config.tls {
        let pins = [
            (
                &tls.operator_certs,
                auth::ApiRole::Operator,
                "--operator-cert",
            ),
            (
                &tls.read_only_certs,
                auth::ApiRole::ReadOnly,
                "--read-only-cert",
            ),
        ];
        for (files, role, flag) in pins {
            for f in files {
                let pinned = handover_net::tls::PeerCertificate::load(f)
                    .with_context(|| format!("{flag} {}", f.display()))?;
                tokens = tokens.pin(&pinned.sha256_hex, role);
            }
        }
    }
    anyhow::ensure!(
        config.lease_ms >= LEASE_MS_MIN,
        "lease must be at least {LEASE_MS_MIN} ms"
    );
    Ok((info, tokens))
}

/// The TLS config to serve with; plain HTTP only on a loopback address, so
/// tokens, credentials and acknowledgements never cross a network in clear.
fn server_tls(config: &ControllerConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match &config.tls {
        Some(files) => Ok(Some(
            handover_net::tls::server_config(&files.cert, &files.key)
                .context("cannot set up TLS (--tls-cert, --tls-key)")?,
        )),
        None if config.listen.ip().is_loopback() => {
            tracing::warn!("serving plain HTTP: fine on loopback only; see `handover init`");
            Ok(None)
        }
        None => anyhow::bail!(
            "--listen {} is not a loopback address: serve TLS with --tls-cert and --tls-key \
             (make them with `handover init`)",
            config.listen
        ),
    }
}

/// The trusted keys of the config, parsed, under the signature policy
/// (checked first: no key needs the explicit, loopback-only opt-in); says
/// at start what is checked, loudly when nothing is.
fn trusted_keys(config: &ControllerConfig) -> anyhow::Result<Vec<PublicKey>> {
    let policy = SignaturePolicy::decide(
        config.trusted_keys.len(),
        config.allow_unsigned_artifacts,
        config.listen.ip(),
    )?;
    let keys = config
        .trusted_keys
        .iter()
        .map(|line| PublicKey::from_base64(line).context("a --trusted-key is not usable"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if policy == SignaturePolicy::UnsignedAllowed {
        tracing::warn!(
            listen = %config.listen,
            "UNSIGNED ARTIFACTS ALLOWED (--allow-unsigned-artifacts): this controller stores \
             and hands out upgrade artifacts nobody signed, so whoever holds the operator \
             token can make every node run any binary. For local tests and demos only: \
             give --trusted-key FILE instead"
        );
    } else {
        let ids: Vec<&str> = keys.iter().map(PublicKey::id).collect();
        tracing::info!(
            keys = ids.join(","),
            "artifacts must be signed by a trusted key"
        );
    }
    Ok(keys)
}

/// Serves on an already bound listener (a supervisor may hand one over).
pub async fn serve_on(
    config: ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (info, tokens) = validate(&config)?;
    let trusted = trusted_keys(&config)?;
    let tls = server_tls(&config)?;
    handover_private::dir(&config.data_dir).context("the controller's data dir")?;
    let (store, cluster) = match open_checked(&config, info).await {
        Ok(opened) => opened,
        Err(e) => {
            // A controller that is switched to says why it could not start;
            // the old one reads it into the upgrade's reason.
            let why = format!("release {}: {e:#}", info.release.0);
            if let Err(w) = std::fs::write(config.data_dir.join(START_FAILURE_FILE), &why) {
                tracing::warn!(error = %w, "cannot record why this controller could not start");
            }
            return Err(e);
        }
    };
    // An upgrade under way resumes where the last controller (of any release) left it.
    let upgrade = store
        .upgrade()
        .await
        .context("cannot read the upgrade state")?;
    let members = members(&*store).await?;
    let (tx, _) = watch::channel(cluster);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let replica_name = replicas::replica_name(&config.data_dir)?;
    let state = Arc::new(AppState {
        store: store.clone(),
        info,
        config: config.clone(),
        tokens,
        cluster: tx,
        sessions: RwLock::new(HashMap::new()),
        members: RwLock::new(members),
        members_update: tokio::sync::Mutex::new(()),
        synced: std::sync::Mutex::new(cluster),
        desired: RwLock::new(HashMap::new()),
        // Starts from the clock so a restarted controller never repeats a revision.
        desired_rev: watch::channel(u64::try_from(now_ms()).unwrap_or(0)).0,
        artifacts: artifacts::ArtifactStore::open(config.data_dir.join("artifacts"))
            .context("cannot open the artifact store")?
            .with_trusted_keys(trusted),
        upgrade: tokio::sync::Mutex::new(upgrade),
        switching: AtomicBool::new(false),
        binary_sha256: handover_supervisor::binary_sha256(),
        hls_requests: RwLock::new(HashMap::new()),
        watches: watches::Watches::default(),
        replica: replicas::replica_id(&replica_name),
        replica_name,
        url: format!("{scheme}://{}", config.listen),
        leading: AtomicBool::new(false),
        claim: AtomicBool::new(false),
        detached: AtomicBool::new(false),
        replicas: RwLock::new(replicas::ReplicaView::default()),
    });
    replicas::sync_now(&state).await;
    tokio::spawn(replicas::run(state.clone()));
    tokio::spawn(orchestrator::run(state.clone()));
    if let Some(client) = handover_supervisor::SupervisorClient::from_env() {
        // Migrated and self-checked: the supervisor may retire the old worker.
        client
            .ready()
            .await
            .context("cannot report ready to the supervisor")?;
    }
    let app = router(state.clone());
    tracing::info!(
        release = info.release.0,
        schema = info.schema.0,
        epoch = cluster.epoch,
        listen = %config.listen,
        read_only_token = config.read_only_token.is_some(),
        store = config.database.as_ref().map_or("sqlite", |t| t.redacted()),
        "controller serving"
    );
    // With the controller's limits: timeouts close silent, slow and idle
    // connections (a watch in flight is not idle); at the cap a connection
    // without a request makes room.
    let served = handover_net::serve(listener, app, config.limits, tls, shutdown).await;
    // The next leader need not wait for this one's lease to run out.
    replicas::resign(&state).await;
    served.context("controller server failed")?;
    Ok(())
}

/// Every node the groups name, with its group and role.
async fn members(store: &dyn Store) -> anyhow::Result<HashMap<String, Membership>> {
    let groups = store.groups().await.context("cannot read the groups")?;
    Ok(groups.iter().flat_map(membership_of).collect())
}

/// The two members of a group.
pub(crate) fn membership_of(g: &Group) -> [(String, Membership); 2] {
    [(&g.primary, Role::Primary), (&g.backup, Role::Backup)].map(|(id, role)| {
        (
            id.clone(),
            Membership {
                group: g.name.clone(),
                role,
            },
        )
    })
}

/// `DATA_DIR/start-failure.txt`: why the last controller that could not
/// open or self-check the database gave up (one line, overwritten).
pub const START_FAILURE_FILE: &str = "start-failure.txt";

async fn open_checked(
    config: &ControllerConfig,
    info: &'static ReleaseInfo,
) -> anyhow::Result<(Arc<dyn Store>, ClusterState)> {
    let store: Arc<dyn Store> = match &config.database {
        Some(target) => Arc::new(
            PostgresStore::open_at(target, info)
                .await
                .with_context(|| format!("cannot open the PostgreSQL store {target:?}"))?,
        ),
        None => {
            let db = config.data_dir.join("controller.db");
            Arc::new(
                SqliteStore::open(&db, config.release, &config.data_dir.join("snapshots"))
                    .await
                    .with_context(|| format!("cannot open the database {}", db.display()))?,
            )
        }
    };
    let cluster = self_check(&*store, info).await?;
    Ok((store, cluster))
}

/// What a new controller proves before it reports ready: the database is at
/// this release's schema and its parameters read back in that schema.
async fn self_check(store: &dyn Store, info: &'static ReleaseInfo) -> anyhow::Result<ClusterState> {
    let cluster = store
        .cluster()
        .await
        .context("cannot read the cluster state")?;
    anyhow::ensure!(
        cluster.schema == info.schema,
        "self-check: the database is at schema {}, this release runs schema {}",
        cluster.schema,
        info.schema
    );
    let params = store
        .params()
        .await
        .context("self-check: cannot read the parameters")?;
    handover_core::params::events_for_group(info.schema, &params, "")
        .map_err(|e| anyhow::anyhow!("self-check: the parameters do not read back: {e}"))?;
    Ok(cluster)
}

/// Every route; [`auth::guard`] puts the operator API's one check in front
/// of all of them (and of the fallbacks), last, so none is left out.
fn router(state: Shared) -> Router {
    let routes = Router::new()
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
        .route("/api/v1/nodes", post(operator_api::add_nodes))
        .route("/api/v1/nodes/{id}", delete(operator_api::remove_node))
        .route("/api/v1/fence", post(operator_api::fence))
        .route("/api/v1/unfence", post(operator_api::unfence))
        .route("/api/v1/records", get(operator_api::records))
        .route("/api/v1/records/summary", get(operator_api::record_summary))
        .route(
            "/api/v1/upgrade",
            get(upgrade_api::status).post(upgrade_api::start),
        )
        .route("/api/v1/upgrade/plan", post(upgrade_api::plan))
        .route("/api/v1/upgrade/pause", post(upgrade_api::pause))
        .route("/api/v1/upgrade/resume", post(upgrade_api::resume))
        .route("/api/v1/upgrade/abort", post(upgrade_api::abort))
        .merge(artifacts::routes::<Shared>())
        .fallback(|| async {
            ApiError::not_found("no such endpoint; see /api/v1/status and the README")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::operator(
                handover_core::api::ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(limits::BODY_BYTES_MAX));
    auth::guard(routes, state.clone()).with_state(state)
}

/// Milliseconds since the Unix epoch; the shell's clock, passed into the core.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
