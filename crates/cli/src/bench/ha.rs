//! Benchmark 11, ha: three controller replicas (real processes under their
//! supervisors) on one PostgreSQL store, an upgrade paused at its fence
//! phase, the replica leading the orchestrator SIGKILLed. The figure runs
//! from the kill until a surviving replica's orchestrator stepped the
//! upgrade under a new term: its first step, which the step log records
//! with the term and the replica's clock, when the operator's resume
//! (retried every [`RESUME_RETRY`], moving past the dead replica and past
//! followers) reaches it.

use super::*;
use handover_core::upgrade::Phase;

const SUBNET_HA: u8 = 55;
/// How often the operator's resume is sent again while no replica leads.
const RESUME_RETRY: Duration = Duration::from_millis(20);
/// A takeover is over well within this (the lease is 2 s).
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn ha(exe: &Path, dir: &Path, server_url: &str) -> anyhow::Result<Figures> {
    let mut fleet = Fleet::new(exe, &dir.join("ha"), SUBNET_HA)?;
    fleet.use_postgres(server_url).await?;
    fleet.start_controller(1).await?;
    fleet.start_replica(1).await?;
    fleet.start_replica(1).await?;
    let artifact = fleet.upload_artifact(2).await?;
    let request = UpgradeRequest {
        pause_at: vec![Phase::Fence],
        ..UpgradeRequest::new(&artifact, "wait")
    };
    // The first replica leads within a sync of starting; until one does,
    // every replica refuses the start (503 `not_leader`).
    let deadline = Instant::now() + TAKEOVER_WAIT;
    while let Err(e) = crate::upgrade::start(&fleet.op, &request).await {
        ensure!(
            Instant::now() < deadline,
            "no replica started the upgrade: {e:#}"
        );
        tokio::time::sleep(RESUME_RETRY).await;
    }
    fleet.wait_paused_at(Phase::Fence, TAKEOVER_WAIT).await?;
    let status = fleet.op.status().await?;
    let leader = status
        .replicas
        .iter()
        .find(|r| r.leads_term.is_some())
        .cloned()
        .context("no replica leads")?;
    let killed_term = leader.leads_term.unwrap_or(0);
    let killed_at_ms = crate::client::now_ms();
    if leader.url == fleet.controller_url() {
        fleet.kill_controller().await?;
    } else {
        let k = (0..fleet.replicas.len())
            .find(|k| leader.url.ends_with(&fleet.replica_addr(*k).to_string()))
            .context("the leader is none of the fleet's replicas")?;
        fleet.kill_replica(k).await?;
    }
    let deadline = Instant::now() + TAKEOVER_WAIT;
    loop {
        let resumed: anyhow::Result<Value> =
            fleet.op.post("/api/v1/upgrade/resume", &json!({})).await;
        if resumed.is_ok() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no replica took over within {TAKEOVER_WAIT:?}"
        );
        tokio::time::sleep(RESUME_RETRY).await;
    }
    let db = fleet
        .database
        .as_ref()
        .context("the fleet's store")?
        .url()
        .to_owned();
    let store = handover_store::postgres::PostgresStore::open(&db, Release(1)).await?;
    let steps = async {
        let (id, _) = store.upgrade().await?.context("no upgrade stored")?;
        anyhow::Ok(store.upgrade_steps(id).await?)
    }
    .await;
    store.close().await;
    fleet.stop_all().await?;
    let first = steps?
        .into_iter()
        .find(|s| s.term > killed_term)
        .context("no step under a later term")?;
    let mut f = Figures::new();
    put(
        &mut f,
        "ha.takeover_ms",
        first.at_ms.saturating_sub(killed_at_ms) as f64,
    );
    Ok(f)
}
