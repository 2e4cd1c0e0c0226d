//! The upgrade orchestrator's shell: feeds the core state machine
//! ([`handover_core::upgrade::Upgrade`]) with what the registry and the
//! cluster look like, performs the effects it returns, and stores the state
//! after every step that changed it. Every effect is idempotent, so a step
//! redone after a crash does no harm.

use crate::{now_ms, ApiError, ApiResult, Shared};
use handover_core::api::ErrorCode;
use handover_core::upgrade::{ClusterView, Effect, Input, NodeView, Target, Upgrade};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a running upgrade is stepped.
pub const TICK_MS: u64 = 200;

/// Steps the running upgrade every [`TICK_MS`] until the process stops.
pub(crate) async fn run(state: Shared) {
    let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        if let Err(e) = tick(&state).await {
            tracing::warn!(error = %e.message, "upgrade step failed; retrying");
        }
    }
}

async fn tick(state: &Shared) -> ApiResult<()> {
    // One replica drives the upgrade: the one holding the lease.
    if !state.leading.load(Ordering::SeqCst) {
        return Ok(());
    }
    let running = {
        let guard = state.upgrade.lock().await;
        guard
            .as_ref()
            .is_some_and(|(_, up)| up.status == handover_core::upgrade::Status::Running)
    };
    if !running {
        return Ok(());
    }
    let input = Input::Tick {
        nodes: node_views(state).await?,
        cluster: cluster_view(state).await?,
    };
    step(state, input).await.map(|_| ())
}

/// One step of the state machine under the lock: effects, then the state.
pub(crate) async fn step(state: &Shared, input: Input) -> ApiResult<Option<Upgrade>> {
    crate::replicas::require_leader(state)?;
    let mut guard = state.upgrade.lock().await;
    let Some((id, up)) = guard.as_mut() else {
        return Ok(None);
    };
    let before = up.clone();
    let effects = up.step(input, now_ms_u64());
    // In order; a run of desired states (a phase tells every node at once)
    // is stored in one transaction.
    let mut desired = Vec::new();
    for effect in effects {
        match effect {
            Effect::SetDesired { node, desired: d } => desired.push((node, d)),
            other => {
                state.set_desired(std::mem::take(&mut desired)).await?;
                apply(state, other).await?;
            }
        }
    }
    state.set_desired(desired).await?;
    if *up != before || state.claim.swap(false, Ordering::SeqCst) {
        state.store.save_upgrade(Some(*id), up, now_ms()).await?;
        log_progress(&before, up);
    }
    Ok(Some(up.clone()))
}

fn log_progress(before: &Upgrade, after: &Upgrade) {
    if before.phase != after.phase {
        tracing::info!(
            from = before.phase.as_str(),
            to = after.phase.as_str(),
            "upgrade phase"
        );
    }
    if before.status != after.status {
        tracing::info!(status = ?after.status, "upgrade status");
    }
}

pub(crate) fn now_ms_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

pub(crate) async fn node_views(state: &Shared) -> ApiResult<Vec<NodeView>> {
    let now = now_ms();
    let lease = i64::try_from(state.config.lease_ms).unwrap_or(i64::MAX);
    Ok(state
        .store
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeView {
            reachable: now.saturating_sub(n.last_seen_ms) <= lease,
            id: n.node_id,
            role: n.role,
            group: n.group,
            release: n.release,
            schema: n.schema,
            grant: n.grant,
            epoch: n.epoch,
            staged: n.staged,
            outbox_count: n.outbox.count,
            current_events: n.current_events,
            binary_sha256: n.binary_sha256,
            supervisor_sha256: n.supervisor_sha256,
        })
        .collect())
}

pub(crate) async fn cluster_view(state: &Shared) -> ApiResult<ClusterView> {
    let c = state.refresh_cluster().await?;
    let disk_free_bytes = nix::sys::statvfs::statvfs(&state.config.data_dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0);
    Ok(ClusterView {
        epoch: c.epoch,
        fenced: c.fenced,
        controller_release: state.info.release,
        controller_sha256: state.binary_sha256.clone(),
        controller_supervisor_sha256: handover_supervisor::supervisor_sha256().await,
        replicas_behind: crate::replicas::behind(state),
        database_schema: c.schema,
        disk_free_bytes,
    })
}

async fn apply(state: &Shared, effect: Effect) -> ApiResult<()> {
    match effect {
        Effect::Fence => {
            if !state.refresh_cluster().await?.fenced {
                state.store.set_fence(true).await?;
                let c = state.refresh_cluster().await?;
                tracing::warn!(epoch = c.epoch, "upgrade: cluster fenced");
            }
        }
        Effect::Unfence => {
            if state.refresh_cluster().await?.fenced {
                state.store.set_fence(false).await?;
                state.refresh_cluster().await?;
                tracing::info!("upgrade: fence lifted");
            }
        }
        Effect::SetDesired { node, desired } => state.set_desired(vec![(node, desired)]).await?,
        Effect::SwitchController { target } => start_controller_switch(state, target),
        Effect::Finalize { release } => {
            state.store.set_cluster_release(release).await?;
            state.refresh_cluster().await?;
            tracing::info!(
                release = release.0,
                "upgrade finalized: the cluster release moved"
            );
        }
    }
    Ok(())
}

/// What the new controller wrote about why it could not start is quoted
/// in the failure up to this many characters: a reason, not a log.
const START_FAILURE_CHARS_MAX: usize = 1_000;

/// Starts the switch of this controller to the target release, once per
/// process. On success the supervisor stops this worker; on failure the
/// state machine hears why and rolls back.
pub(crate) fn start_controller_switch(state: &Shared, target: Target) {
    if state.switching.swap(true, Ordering::SeqCst) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let asked = std::time::SystemTime::now();
        let mut failure = match switch_controller(&state, &target).await {
            Ok(()) => return,
            Err(reason) => reason,
        };
        // The new worker wrote why it could not start (e.g. its migration failed).
        let said = state.config.data_dir.join(crate::START_FAILURE_FILE);
        let fresh = std::fs::metadata(&said)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at >= asked);
        if let (true, Ok(why)) = (fresh, std::fs::read_to_string(&said)) {
            let why: String = why.trim().chars().take(START_FAILURE_CHARS_MAX).collect();
            failure = format!("{failure}; the new controller said: {why}");
        }
        // A later upgrade may try again.
        state.switching.store(false, Ordering::SeqCst);
        tracing::error!(reason = %failure, "controller switch failed");
        // It gave the lease up to switch: it bids again at once, so (unless
        // another replica took the lease meanwhile, which then finds the
        // switch failing for itself) it records the failure as the leader.
        crate::replicas::sync_now(&state).await;
        if let Err(e) = step(&state, Input::ControllerSwitchFailed { reason: failure }).await {
            tracing::error!(error = %e.message, "cannot record the failed controller switch");
        }
    });
}

async fn switch_controller(state: &Shared, target: &Target) -> Result<(), String> {
    let (manifest, binary) = state.artifacts.get(&target.artifact_id).ok_or_else(|| {
        format!(
            "artifact {} is not stored on the controller",
            target.artifact_id
        )
    })?;
    let client = handover_supervisor::SupervisorClient::from_env().ok_or(
        "this controller runs without a supervisor (--no-supervisor), so it cannot switch release",
    )?;
    tracing::info!(release = manifest.release.0, binary = %binary.display(), "switching the controller");
    match client
        .switch(&handover_supervisor::Release {
            release: manifest.release.0,
            binary,
            sha256: Some(manifest.sha256.clone()),
            contracts: Some(manifest.contracts),
        })
        .await
        .map_err(|e| e.to_string())?
    {
        // The old worker keeps serving: the state machine must hear why.
        handover_supervisor::SwitchOutcome::Failed { release, reason } => Err(format!(
            "the supervisor refused release {release}: {reason}; see the controller's log"
        )),
        _ => Ok(()),
    }
}

/// Creates and stores a new upgrade; refuses while another one runs.
pub(crate) async fn start(state: &Shared, up: Upgrade) -> ApiResult<Upgrade> {
    crate::replicas::require_leader(state)?;
    let mut guard = state.upgrade.lock().await;
    if let Some((_, current)) = guard.as_ref() {
        if !current.status.is_over() {
            return Err(ApiError::operator(
                ErrorCode::UpgradeRunning,
                "an upgrade is already under way: see `handover upgrade status`; pause, resume or abort it",
            ));
        }
    }
    let id = state.store.save_upgrade(None, &up, now_ms()).await?;
    *guard = Some((id, up.clone()));
    tracing::info!(id, release = up.plan.target.release.0, "upgrade started");
    Ok(up)
}
