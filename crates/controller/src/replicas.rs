//! Controller replicas on one database (PostgreSQL; SQLite has exactly
//! one): every replica serves nodes and operators, one leads the upgrade
//! orchestrator. Every [`SYNC_MS`] each replica syncs with the store
//! ([`handover_store::replicas`]): it reports itself, takes or renews the
//! orchestrator's lease, and learns what others changed: the fence and
//! epoch (its watchers wake), desired states, removed nodes, groups, and
//! the upgrade. A follower that sees the upgrade's controller phase
//! switches itself. A replica that cannot reach the database for a lease
//! answers nodes 503, so they move to another replica.

use crate::{ApiError, ApiResult, Shared};
use handover_core::api::ErrorCode;
use handover_core::upgrade::{Phase, Status};
use handover_store::replicas::{Leader, ReplicaBeat, ReplicaRow};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often each replica syncs: a fence or a desired state reaches every
/// replica's nodes within this (plus their watch).
pub const SYNC_MS: u64 = 250;
/// The orchestrator's lease: a dead leader is replaced within this plus a
/// sync. Eight renewals fit in it, so a slow sync or two do not lose it.
pub const LEADER_LEASE_MS: u64 = 2_000;

/// What this replica knows of the others, from its last sync.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplicaView {
    /// The term this replica leads in.
    pub leading: Option<u64>,
    pub leader: Option<Leader>,
    /// Live replicas, this one included.
    pub replicas: Vec<ReplicaRow>,
}

/// `DATA_DIR/replica-name`: the replica's name, made at its first start.
pub const REPLICA_NAME_FILE: &str = "replica-name";

/// The replica's name, the same for every worker it runs: kept in its data
/// dir (each replica has its own), made at random the first time.
pub(crate) fn replica_name(data_dir: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let file = data_dir.join(REPLICA_NAME_FILE);
    match std::fs::read_to_string(&file) {
        Ok(name) if !name.trim().is_empty() => return Ok(name.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
    let name = format!("replica-{:016x}", rand::random::<u64>());
    // Written whole, then renamed: a crash leaves no half name.
    let tmp = data_dir.join(format!("{REPLICA_NAME_FILE}.tmp"));
    std::fs::write(&tmp, &name)
        .and_then(|()| std::fs::rename(&tmp, &file))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(name)
}

/// This process among the replicas: the replica's name, its pid and a
/// random part, so each worker is a holder of its own.
pub(crate) fn replica_id(name: &str) -> String {
    format!(
        "{name}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Syncs every [`SYNC_MS`] until the process stops; on the way out (a
/// switch retires this worker) the next leader need not wait for the lease.
pub(crate) async fn run(state: Shared) {
    let mut ticker = tokio::time::interval(Duration::from_millis(SYNC_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_ok = Instant::now();
    loop {
        ticker.tick().await;
        // A database that does not answer (a partition) fails the sync too.
        let synced = tokio::time::timeout(Duration::from_millis(LEADER_LEASE_MS), sync(&state))
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::operator(
                    ErrorCode::StoreUnavailable,
                    format!("the database did not answer within {LEADER_LEASE_MS} ms"),
                ))
            });
        match synced {
            Ok(()) => {
                last_ok = Instant::now();
                if state.detached.swap(false, Ordering::SeqCst) {
                    tracing::info!("the database answers again: serving nodes");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "replica sync failed; retrying");
                if last_ok.elapsed() >= Duration::from_millis(LEADER_LEASE_MS)
                    && !state.detached.swap(true, Ordering::SeqCst)
                {
                    // Its lease (if it led) is over by now: another replica leads.
                    state.leading.store(false, Ordering::SeqCst);
                    tracing::error!(
                        "the database has not answered for {LEADER_LEASE_MS} ms: this replica \
                         stops leading and answers nodes 503 until it does"
                    );
                }
            }
        }
    }
}

/// A sync now: the first, before the controller serves (a lone controller,
/// or the new worker of the replica that led, leads from its first
/// request), or after a failed switch (to bid again at once).
pub(crate) async fn sync_now(state: &Shared) {
    if let Err(e) = sync(state).await {
        tracing::warn!(error = %e.message, "first replica sync failed; retrying in the background");
    }
}

/// Gives the lease up now (the process is stopping).
pub(crate) async fn resign(state: &Shared) {
    if state.leading.swap(false, Ordering::SeqCst) {
        let beat = beat(state, false);
        if let Err(e) = state.store.sync_replica(&beat).await {
            tracing::warn!(error = %e, "cannot give up the orchestrator's lease; it expires by itself");
        }
    }
}

fn beat(state: &Shared, bid: bool) -> ReplicaBeat {
    ReplicaBeat {
        replica: state.replica.clone(),
        name: state.replica_name.clone(),
        url: state.url.clone(),
        release: state.info.release,
        binary_sha256: state.binary_sha256.clone(),
        lease_ms: LEADER_LEASE_MS,
        bid,
    }
}

async fn sync(state: &Shared) -> ApiResult<()> {
    // A worker on its way out (switching release) bids no more.
    let bid = !state.switching.load(Ordering::SeqCst);
    let sync = state.store.sync_replica(&beat(state, bid)).await?;
    // A lost lease stops this replica's steps at once; a won one only once
    // it holds the upgrade as stored (below).
    let was_leading = if sync.leading.is_some() {
        state.leading.load(Ordering::SeqCst)
    } else {
        state.leading.swap(false, Ordering::SeqCst)
    };
    let before = match state.synced.lock() {
        Ok(synced) => *synced,
        Err(poisoned) => *poisoned.into_inner(),
    };
    state.cluster.send_if_modified(|old| {
        let changed = *old != sync.cluster;
        *old = sync.cluster;
        changed
    });
    let took_over = sync.leading.is_some() && !was_leading;
    // The leader writes every desired state itself; a follower, or a new
    // leader, reads again what another replica wrote.
    if took_over
        || (sync.leading.is_none() && before.desired_revision != sync.cluster.desired_revision)
    {
        if let Ok(mut m) = state.desired.write() {
            m.clear();
        }
        state.desired_rev.send_modify(|r| *r = r.wrapping_add(1));
    }
    if before.registry_revision != sync.cluster.registry_revision {
        if let Ok(mut m) = state.sessions.write() {
            m.clear();
        }
    }
    if before.param_revision != sync.cluster.param_revision {
        let _update = state.members_update.lock().await;
        let members = crate::members(&*state.store)
            .await
            .map_err(|e| ApiError::operator(ErrorCode::StoreUnavailable, format!("{e:#}")))?;
        if let Ok(mut m) = state.members.write() {
            *m = members;
        }
    }
    // Only now: a reload that failed is tried again at the next sync.
    match state.synced.lock() {
        Ok(mut synced) => *synced = sync.cluster,
        Err(poisoned) => *poisoned.into_inner() = sync.cluster,
    }
    if let Ok(mut v) = state.replicas.write() {
        *v = ReplicaView {
            leading: sync.leading,
            leader: sync.leader.clone(),
            replicas: sync.replicas.clone(),
        };
    }
    if took_over || sync.leading.is_none() {
        // The upgrade as the leader last wrote it, read under the lock a
        // step holds: a new leader's first step (an operator's resume
        // arriving with the takeover) starts from it, and no step saved
        // meanwhile is overwritten by an older read.
        let mut guard = state.upgrade.lock().await;
        *guard = state.store.upgrade().await?;
        if sync.leading.is_none() {
            if let Some((_, up)) = guard.as_ref() {
                follow_switch(state, up);
            }
        }
    }
    match (was_leading, sync.leading) {
        (false, Some(term)) => {
            state.claim.store(true, Ordering::SeqCst);
            state.leading.store(true, Ordering::SeqCst);
            tracing::info!(term, replica = %state.replica, "leading the upgrade orchestrator");
        }
        (true, None) => tracing::warn!(
            leader = sync
                .leader
                .as_ref()
                .map_or("nobody", |l| l.replica.as_str()),
            "no longer leading the upgrade orchestrator"
        ),
        _ => {}
    }
    Ok(())
}

/// A follower switches itself when the upgrade is in its controller phase
/// and this replica does not run the target yet.
fn follow_switch(state: &Shared, up: &handover_core::upgrade::Upgrade) {
    let target = &up.plan.target;
    if up.phase == Phase::Controller
        && matches!(up.status, Status::Running | Status::Paused)
        && !target.runs_on(state.info.release, state.binary_sha256.as_deref())
    {
        crate::orchestrator::start_controller_switch(state, target.clone());
    }
}

/// Live replicas none of whose workers runs this one's binary: a replica
/// whose new worker runs it is not behind while its old worker retires,
/// and this replica's own earlier worker never is.
pub(crate) fn behind(state: &Shared) -> Vec<String> {
    let Ok(view) = state.replicas.read() else {
        return vec![];
    };
    let runs_ours = |r: &ReplicaRow| {
        r.release == state.info.release
            && match (&r.binary_sha256, &state.binary_sha256) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    };
    let mut behind: Vec<String> = view
        .replicas
        .iter()
        .filter(|r| r.name != state.replica_name)
        .filter(|r| {
            !view
                .replicas
                .iter()
                .any(|w| w.name == r.name && runs_ours(w))
        })
        .map(|r| r.name.clone())
        .collect();
    behind.sort();
    behind.dedup();
    behind
}

/// The live replicas as the operator's status shows them: one line per
/// replica, its leading worker or else its newest one (a replica switching
/// release runs two workers for a moment).
pub(crate) fn statuses(state: &Shared) -> Vec<handover_core::api::ReplicaStatus> {
    let Ok(view) = state.replicas.read() else {
        return vec![];
    };
    let leader = view.leader.as_ref();
    let leads = |r: &ReplicaRow| {
        leader.is_some_and(|l| l.replica == r.replica)
            && (r.replica != state.replica || view.leading.is_some())
    };
    let mut shown: Vec<&ReplicaRow> = Vec::new();
    for r in &view.replicas {
        match shown.iter_mut().find(|s| s.name == r.name) {
            None => shown.push(r),
            Some(s) => {
                if !leads(s) && (leads(r) || (r.release, r.seen_ms) > (s.release, s.seen_ms)) {
                    *s = r;
                }
            }
        }
    }
    shown
        .into_iter()
        .map(|r| handover_core::api::ReplicaStatus {
            replica: r.replica.clone(),
            url: r.url.clone(),
            release: r.release,
            leads_term: leader.filter(|_| leads(r)).map(|l| l.term),
            answering: r.name == state.replica_name,
        })
        .collect()
}

/// Upgrade and fence commands are the leader's: elsewhere they are refused
/// before anything is done, naming the leader.
pub(crate) fn require_leader(state: &Shared) -> ApiResult<()> {
    if state.leading.load(Ordering::SeqCst) {
        return Ok(());
    }
    let leader = state
        .replicas
        .read()
        .ok()
        .and_then(|v| v.leader.clone())
        .map_or_else(
            || "no replica yet".to_owned(),
            |l| format!("{} at {}", l.replica, l.url),
        );
    Err(ApiError::operator(
        ErrorCode::NotLeader,
        format!(
            "this controller replica does not lead the upgrade orchestrator (the leader: {leader}); \
             nothing was done: send the command to the leader (a client given every replica's \
             URL moves on by itself)"
        ),
    ))
}

/// Nodes are served only while the database answers.
pub(crate) fn require_attached(state: &Shared) -> ApiResult<()> {
    if state.detached.load(Ordering::SeqCst) {
        return Err(ApiError::operator(
            ErrorCode::StoreUnavailable,
            "this controller replica cannot reach its database: use another replica",
        ));
    }
    Ok(())
}
