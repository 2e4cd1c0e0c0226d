//! The content node: handshake with the controller, parameter cache, durable
//! outbox, record shipping over the main or the redundant channel, and HLS
//! serving to viewers.
//!
//! The protocol is the node machine of the core
//! (`handover_core::node::Machine`): every decision towards the controller
//! is made there. Modules: [`driver`] (feeds the machine its events and
//! performs its actions), [`session`] (the HTTP client of the node API and
//! the parameter cache on disk), [`store`] (node.db: outbox, journal, kv),
//! [`producer`] (observations from the clock), [`stage`] (artifact
//! downloads), [`hls`] (HTTP), [`agent`] (readiness), [`lifecycle`] (how
//! the parts stop), and the leaf modules [`link`] (what the machine
//! publishes), [`viewer_counter`] and [`runtime`] (clock, stop signal,
//! backoff, test hooks). Modules depend one way: no two import each other,
//! directly or around a circle. This file holds the config, `serve_on` and
//! the wiring.

pub mod agent;
pub mod driver;
pub mod hls;
pub mod lifecycle;
pub mod link;
pub mod peer;
pub mod producer;
pub mod prune;
pub mod runtime;
pub mod session;
pub mod stage;
pub mod store;
pub mod viewer_counter;

use lifecycle::Lifecycle;
pub use lifecycle::{DRAIN_ON_STOP_MS, LOOPS_STOP_TIMEOUT_MS};
use runtime::Stop;
#[cfg(feature = "test-hooks")]
pub use runtime::{test_fault, TEST_FAULT_ENV};
pub use runtime::{BACKOFF_MS_MAX, BACKOFF_MS_MIN};

use anyhow::{bail, Context};
use handover_core::wire::{limits, validate_id, Hello, Validate};
use handover_core::ReleaseInfo;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

pub struct NodeConfig {
    pub node_id: String,
    pub release: handover_core::Release,
    pub role: handover_core::wire::Role,
    pub group: String,
    pub data_dir: std::path::PathBuf,
    pub listen: std::net::SocketAddr,
    /// HLS base URL advertised to the controller and viewers, e.g. http://127.0.0.5:7000
    pub advertise_url: String,
    /// The controller's URL, or its replicas' (the node moves to the next
    /// one it can reach).
    pub controller: Arc<handover_net::controllers::ControllerUrls>,
    /// The cluster CA (`ca.crt` of `handover init`) an https controller's
    /// certificate must chain to; nothing else is trusted.
    pub controller_ca: Option<std::path::PathBuf>,
    /// The single-use token `handover node add ID` issued: needed until the
    /// node holds a credential (it trades the token for one at its first
    /// hello and keeps that in its data dir).
    pub bootstrap_token: Option<String>,
    /// Drop records that cannot be stored at once, as nodes managed by hand
    /// do today (the demo's comparison); never set in production.
    pub legacy: bool,
    /// Minisign public keys (their base64 lines) an artifact must be signed
    /// by before it is staged. Empty only with `allow_unsigned_artifacts`.
    pub trusted_keys: Vec<String>,
    /// What the listener allows ([`handover_net::Limits::NODE`], the cap
    /// perhaps changed by `--connections-max`).
    pub limits: handover_net::Limits,
    /// `--allow-unsigned-artifacts`: run with no trusted key, artifacts not
    /// signature-checked; refused unless `listen` is a loopback address
    /// ([`handover_core::artifact::SignaturePolicy::decide`]).
    pub allow_unsigned_artifacts: bool,
    /// Serve the artifacts staged here to other nodes on the HLS listener
    /// ([`peer`]); `--no-peer-serving` turns it off.
    pub peer_serving: bool,
    /// `--artifact-cache DIR`: a directory the host's nodes share, so an
    /// artifact's binary is downloaded and written once per host and
    /// hard-linked by the others ([`handover_artifacts::HostCache`]).
    pub artifact_cache: Option<std::path::PathBuf>,
}

/// One record as a node's journal remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    pub seq: u64,
    pub natural_key: String,
}

/// What a node says it produced and what it still holds, for the
/// exactly-once checker (which compares it with the database).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// The journal, oldest first (at most [`store::JOURNAL_ROWS_MAX`] rows).
    pub produced: Vec<Produced>,
    /// Seqs still in the outbox: produced, not yet acknowledged.
    pub queued: Vec<u64>,
}

/// Reads the ledger of the node whose data dir is `data_dir`. Meant for a
/// stopped node (a running one is fine too: SQLite readers see a committed
/// snapshot, but journal and outbox are read one after the other).
pub async fn ledger(data_dir: &std::path::Path) -> Result<Ledger, store::StoreError> {
    let db = data_dir.join(store::DB_FILE);
    if !db.exists() {
        return Err(store::StoreError::Missing(db.display().to_string()));
    }
    let s = store::Store::open(data_dir).await?;
    let read = async {
        let produced = s
            .journal_keys()
            .await?
            .into_iter()
            .map(|(seq, natural_key)| Produced { seq, natural_key })
            .collect();
        Ok(Ledger {
            produced,
            queued: s.outbox_seqs().await?,
        })
    }
    .await;
    s.close().await;
    read
}

/// The trusted keys of the config, parsed, under the signature policy
/// (checked first: no key needs the explicit, loopback-only opt-in); says
/// at start what is checked, loudly when nothing is.
fn trusted_keys(config: &NodeConfig) -> anyhow::Result<Vec<handover_core::artifact::PublicKey>> {
    let policy = handover_core::artifact::SignaturePolicy::decide(
        config.trusted_keys.len(),
        config.allow_unsigned_artifacts,
        config.listen.ip(),
    )?;
    let keys = config
        .trusted_keys
        .iter()
        .map(|line| {
            handover_core::artifact::PublicKey::from_base64(line)
                .context("a --trusted-key is not usable")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if policy == handover_core::artifact::SignaturePolicy::UnsignedAllowed {
        tracing::warn!(
            listen = %config.listen,
            "UNSIGNED ARTIFACTS ALLOWED (--allow-unsigned-artifacts): this node stages and \
             runs whatever binary the controller offers, signed or not. For local tests \
             and demos only: give --trusted-key FILE instead"
        );
    } else {
        let ids: Vec<&str> = keys.iter().map(|k| k.id()).collect();
        tracing::info!(
            keys = ids.join(","),
            "artifacts must be signed by a trusted key"
        );
    }
    Ok(keys)
}

/// The node's credential: the one it holds, or (first start) one it
/// chooses now and persists before any hello, so the bootstrap token it
/// trades it for is never wasted on a welcome lost on the way. With an
/// https controller the credential is a client certificate the node makes
/// (returned too, to present on every connection); else a random bearer
/// secret (plain http on loopback).
async fn credential(
    store: &store::Store,
    config: &NodeConfig,
) -> anyhow::Result<(String, Option<handover_net::tls::ClientIdentity>)> {
    use handover_net::tls::ClientIdentity;
    if let Some(c) = store.kv_get(store::keys::CREDENTIAL).await? {
        if handover_core::identity::is_bearer_secret(&c) {
            return Ok((c, None));
        }
        let pem = store
            .kv_get(store::keys::CLIENT_IDENTITY)
            .await?
            .with_context(|| {
                format!(
                    "node.db names a client certificate as this node's credential but holds none: \
                     the data dir is damaged; issue `handover node add {} --replace` and start \
                     with an empty data dir",
                    config.node_id
                )
            })?;
        let identity = ClientIdentity::from_pem(pem.into_bytes());
        let made = identity
            .certificate()
            .map_err(|e| anyhow::anyhow!("the client certificate in node.db: {e}"))?;
        if handover_core::identity::SecretDigest::of_certificate(&made.sha256_hex).as_str() != c {
            bail!("the client certificate in node.db is not the one its credential names");
        }
        return Ok((c, Some(identity)));
    }
    if config.bootstrap_token.is_none() {
        bail!(
            "node {id} holds no credential yet: issue a bootstrap token with `handover node add {id}` \
             and start this node with it in HANDOVER_BOOTSTRAP_TOKEN or --bootstrap-token-file",
            id = config.node_id
        );
    }
    let (chosen, identity, extra) = if config.controller.is_https() {
        let (identity, certificate) = ClientIdentity::generate(&config.node_id)
            .map_err(|e| anyhow::anyhow!("cannot make the node's client certificate: {e}"))?;
        let credential =
            handover_core::identity::SecretDigest::of_certificate(&certificate.sha256_hex);
        let pem = String::from_utf8_lossy(identity.pem()).into_owned();
        (
            credential.as_str().to_owned(),
            Some(identity),
            Some((store::keys::CLIENT_IDENTITY.to_owned(), pem)),
        )
    } else {
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        (secret, None, None)
    };
    let mut put = vec![
        (store::keys::CREDENTIAL.to_owned(), chosen.clone()),
        (
            store::keys::CREDENTIAL_UNCONFIRMED.to_owned(),
            "1".to_owned(),
        ),
    ];
    put.extend(extra);
    store.kv_put(put).await?;
    Ok((chosen, identity))
}

/// The cluster CA the controller's certificate must chain to, if given.
fn controller_trust(config: &NodeConfig) -> anyhow::Result<Option<handover_net::tls::ClientTrust>> {
    config
        .controller_ca
        .as_deref()
        .map(handover_net::tls::ClientTrust::load)
        .transpose()
        .context("the cluster CA (--ca)")
}

/// Checks the config with the same rules the controller applies to hello.
fn validate(config: &NodeConfig, info: &ReleaseInfo) -> anyhow::Result<()> {
    // Before the data dir is touched (trusted_keys logs what it means).
    handover_core::artifact::SignaturePolicy::decide(
        config.trusted_keys.len(),
        config.allow_unsigned_artifacts,
        config.listen.ip(),
    )?;
    validate_id("node_id", &config.node_id)?;
    validate_id("group", &config.group)?;
    if config
        .bootstrap_token
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > limits::TOKEN_CHARS_MAX)
    {
        bail!(
            "the bootstrap token must be 1 to {} characters",
            limits::TOKEN_CHARS_MAX
        );
    }
    // Checked here so a bad URL or CA stops the node before it binds.
    let trust = controller_trust(config)?;
    for url in config.controller.all() {
        let _checked =
            handover_net::tls::client_for(url, trust.as_ref(), reqwest::Client::builder())
                .map_err(|e| anyhow::anyhow!("controller URL: {e}"))?;
    }
    Hello::new(
        &config.node_id,
        config.bootstrap_token.as_deref().unwrap_or("token"),
        info,
        config.role,
        &config.group,
        &config.advertise_url,
    )
    .validate()
    .context("advertise URL")?;
    Ok(())
}

/// Serves on a bound listener (bound by `roles`, or handed over by a
/// supervisor) until `shutdown` resolves; then stops accepting, finishes
/// in-flight requests, drains the outbox (bounded) and returns.
pub async fn serve_on(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let info = ReleaseInfo::of(config.release)?;
    validate(&config, info)?;
    let store = Arc::new(
        store::Store::open(&config.data_dir)
            .await
            .with_context(|| format!("opening {}", config.data_dir.display()))?,
    );
    let started = start(config, info, listener, shutdown, store.clone()).await;
    store.close().await;
    started
}

async fn start(
    config: NodeConfig,
    info: &'static ReleaseInfo,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    store: Arc<store::Store>,
) -> anyhow::Result<()> {
    match store.kv_get(store::keys::NODE_ID).await? {
        Some(owner) if owner != config.node_id => bail!(
            "{} belongs to node {owner:?}, not {:?}; refusing to mix their records",
            config.data_dir.display(),
            config.node_id
        ),
        Some(_) => {}
        None => {
            store
                .kv_put(vec![(
                    store::keys::NODE_ID.to_owned(),
                    config.node_id.clone(),
                )])
                .await?
        }
    }
    let params = session::load_params(&store, info.schema, &config.group).await?;
    let progress = producer::load_state(&store).await?;
    let identity = handover_core::node::Identity {
        node_id: config.node_id.clone(),
        release: info,
        role: config.role,
        group: config.group.clone(),
        hls_url: config.advertise_url.clone(),
        bootstrap_token: config.bootstrap_token.clone(),
        binary_sha256: handover_supervisor::binary_sha256(),
    };
    let trusted = trusted_keys(&config)?;
    let trusted_key_ids: Vec<String> = trusted.iter().map(|k| k.id().to_owned()).collect();
    let peer_state = config.peer_serving.then(|| {
        Arc::new(peer::PeerState::new(
            config.data_dir.clone(),
            trusted.clone(),
        ))
    });
    let grant = match store.kv_get(store::keys::GRANT).await?.as_deref() {
        Some("full") => Some(handover_core::Grant::Full),
        Some("deliver") => Some(handover_core::Grant::Deliver),
        Some("fenced") => Some(handover_core::Grant::Fenced),
        _ => None,
    };
    let (credential, client_identity) = credential(&store, &config).await?;
    let durable = handover_core::node::Durable {
        grant,
        epoch: store
            .kv_get(store::keys::EPOCH)
            .await?
            .and_then(|e| e.parse::<u64>().ok()),
        credential: Some(credential.clone()),
        credential_confirmed: store
            .kv_get(store::keys::CREDENTIAL_UNCONFIRMED)
            .await?
            .is_none(),
        switch_failure: driver::switch_failure(&store).await,
    };
    let machine = handover_core::node::Machine::new(
        identity,
        handover_core::node::Config {
            legacy: config.legacy,
            heal_stale_registration: true,
        },
        durable,
        params.clone(),
        driver::staged_artifacts(&config.data_dir, &trusted),
    );
    let viewers = Arc::new(viewer_counter::ViewerCounter::default());
    let (view_tx, view_rx) = watch::channel(machine.view());
    let (params_tx, params_rx) = watch::channel(Arc::new(params));
    let appended = Arc::new(Notify::new());

    // The producer has its own stop so the outbox can drain after it.
    let (produce_stop_tx, produce_stop_rx) = watch::channel(false);
    let producer = tokio::spawn(
        producer::Producer {
            store: store.clone(),
            schema: info.schema,
            node_id: config.node_id.clone(),
            params: params_rx.clone(),
            link: view_rx.clone(),
            viewers: viewers.clone(),
            shipper_wake: appended.clone(),
        }
        .run(progress, Stop::new(produce_stop_rx)),
    );
    let (driver_stop_tx, driver_stop_rx) = watch::channel(false);
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let lifecycle = Arc::new(Lifecycle {
        produce_stop: produce_stop_tx,
        producer: tokio::sync::Mutex::new(Some(producer)),
        driver_stop: driver_stop_tx,
        http_stop: http_stop_tx,
        failure: Mutex::new(None),
    });
    let supervisor = handover_supervisor::SupervisorClient::from_env();
    let trust = controller_trust(&config)?.map(|t| match client_identity {
        Some(identity) => t.with_identity(identity),
        None => t,
    });
    let controller = Arc::new(
        session::Controller::new(config.controller.clone(), trust.as_ref())
            .map_err(|e| anyhow::anyhow!("cannot build the controller client: {e}"))?,
    );
    let artifact_cache = match &config.artifact_cache {
        Some(dir) => Some(
            handover_artifacts::HostCache::open(dir)
                .with_context(|| format!("--artifact-cache {}: cannot use it", dir.display()))?,
        ),
        None => None,
    };
    let driver = tokio::spawn(
        driver::Driver {
            machine,
            store: store.clone(),
            controller,
            controller_urls: config.controller.clone(),
            trust,
            node_id: config.node_id.clone(),
            schema: info.schema,
            data_dir: config.data_dir.clone(),
            trusted,
            artifact_cache,
            supervisor: supervisor.clone(),
            lifecycle: lifecycle.clone(),
            viewers: viewers.clone(),
            published: driver::Published {
                view: view_tx,
                params: params_tx,
            },
            appended,
            stop: driver_stop_rx,
        }
        .run(),
    );
    if let Some(client) = supervisor {
        tokio::spawn(agent::report_ready(
            client,
            view_rx.clone(),
            params_rx.clone(),
        ));
    }

    let app = hls::router(Arc::new(hls::HttpState {
        node_id: config.node_id.clone(),
        release: info,
        role: config.role,
        group: config.group.clone(),
        store: store.clone(),
        view: view_rx,
        params: params_rx,
        viewers,
        trusted_key_ids,
    }));
    let app = match peer_state {
        Some(state) => app.merge(peer::router(state)),
        None => app,
    };
    tracing::info!(
        node_id = config.node_id,
        release = info.release.0,
        role = config.role.as_str(),
        group = config.group,
        addr = ?listener.local_addr().ok(),
        "node serving"
    );
    let signal = lifecycle.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.stop_http();
    });
    let mut server_stop = Stop::new(http_stop_rx);
    // With the node's limits: timeouts close silent, slow and idle
    // connections; at the cap a connection without a request makes room.
    let served = handover_net::serve(listener, app, config.limits, None, async move {
        server_stop.wait().await
    })
    .await
    .context("HTTP server failed");
    // The server is done (drained, or failed): the machine stops producing,
    // drains the outbox (bounded) and ends its driver.
    lifecycle.driver_stop.send_replace(true);
    let bound = Duration::from_millis(DRAIN_ON_STOP_MS + LOOPS_STOP_TIMEOUT_MS);
    let abort = driver.abort_handle();
    match tokio::time::timeout(bound, driver).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the node driver ended abnormally"),
        Err(_) => {
            tracing::warn!("the node driver did not stop in time; aborting it");
            abort.abort();
        }
    }
    lifecycle.stop_producer().await;
    if let Some(why) = lifecycle.failure() {
        tracing::info!(node_id = config.node_id, "node stopped");
        bail!("{why}");
    }
    tracing::info!(node_id = config.node_id, "node stopped");
    served
}
