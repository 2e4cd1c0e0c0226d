//! Faults lose nothing: real processes (controller and nodes under their
//! supervisors, viewers throughout) upgraded from release 1 to 2 while
//! processes are SIGKILLed, paused, cut off or handed broken releases. After
//! each, the exactly-once checker must find every record a node produced
//! stored once (nodes stopped gracefully first), and viewers must have seen
//! no failure unless the test killed a node they were using.
//!
//! A fault meant for the new release only is set per artifact: its binary
//! is a wrapper script that adds `HANDOVER_TEST_FAULT` (see
//! `Fleet::upload_artifact_with_env`), so the release switched from is
//! untouched. Every test claims its own subnet (`handover_testkit::subnet`)
//! and tempdir, waits only with bounds, and its fleet kills every process
//! when dropped. The crashes are one table ([`CRASHES`]) run by one helper
//! ([`run_crash`]).

mod common;

use common::*;
use handover_core::api::UpgradeStatus;
use handover_core::upgrade::{Phase, Status};
use handover_testkit::faultproxy::{Exchange, FaultProxy};
use nix::sys::signal::{kill, Signal};
use std::time::{Duration, Instant};

fn one_group(event_ms: u64) -> Options {
    Options {
        groups: 1,
        event_ms,
        artifact: Artifact::Wrapped(vec![]),
        ..Options::default()
    }
}

// ---------------------------------------------------------------- crashes

/// What a crash case kills, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    /// SIGKILL of the controller paused at the start of a phase, restart, resume.
    ControllerAt(Phase),
    /// SIGKILL of the controller while the new release migrates the database.
    ControllerMidMigration,
    /// SIGKILL of g1-b's release-1 worker while it drains for its switch.
    BackupWorkerMidDrain,
    /// SIGKILL of g1-b while it downloads the artifact.
    NodeMidStage,
    /// SIGKILL of g1-b's supervisor while its new worker starts.
    NodeSupervisorMidSwitch,
    /// SIGKILL of g1-a's supervisor with the upgrade paused in deliver.
    NodeSupervisorInDeliver,
}

/// One crash case: the fault, the test faults it needs, and what viewers
/// may see. Every case upgrades with policy `failover` from 2 s into the
/// event and must finalize on release 2 with every record stored once.
struct Case {
    name: &'static str,
    crash: Crash,
    event_ms: u64,
    /// Phases the upgrade pauses at.
    pause_at: &'static [&'static str],
    /// `HANDOVER_TEST_FAULT` of the release-2 artifact.
    artifact_fault: Option<&'static str>,
    /// `HANDOVER_TEST_FAULT` of one node's own supervisor (release 1 too).
    node_fault: Option<(&'static str, &'static str)>,
    viewing: Viewing,
}

const fn at_phase(name: &'static str, phase: Phase, pause: &'static [&'static str]) -> Case {
    Case {
        name,
        crash: Crash::ControllerAt(phase),
        event_ms: 24_000,
        pause_at: pause,
        artifact_fault: None,
        node_fault: None,
        viewing: Viewing::Clean,
    }
}

const CRASHES: &[Case] = &[
    at_phase("controller killed at fence", Phase::Fence, &["fence"]),
    at_phase("controller killed at deliver", Phase::Deliver, &["deliver"]),
    at_phase("controller killed at backups", Phase::Backups, &["backups"]),
    at_phase(
        "controller killed at primaries",
        Phase::Primaries,
        &["primaries"],
    ),
    at_phase(
        "controller killed at finalize",
        Phase::Finalize,
        &["finalize"],
    ),
    Case {
        name: "controller killed mid-migration",
        crash: Crash::ControllerMidMigration,
        event_ms: 26_000,
        pause_at: &[],
        artifact_fault: Some("migrate_slow_ms:6000"),
        node_fault: None,
        viewing: Viewing::Clean,
    },
    Case {
        name: "backup worker killed mid-drain",
        crash: Crash::BackupWorkerMidDrain,
        event_ms: 26_000,
        pause_at: &["backups"],
        artifact_fault: None,
        // g1-b's workers take 4 s to drain when they quiesce for a switch.
        node_fault: Some(("g1-b", "drain_slow_ms:4000")),
        viewing: Viewing::NodeKilled,
    },
    Case {
        name: "node killed mid-stage",
        crash: Crash::NodeMidStage,
        event_ms: 26_000,
        pause_at: &[],
        artifact_fault: None,
        // Only g1-b's release-1 worker stalls its download (4 s after the first chunk).
        node_fault: Some(("g1-b", "stage_slow_ms:4000")),
        viewing: Viewing::NodeKilled,
    },
    Case {
        name: "node supervisor killed mid-switch",
        crash: Crash::NodeSupervisorMidSwitch,
        event_ms: 26_000,
        pause_at: &[],
        // The new worker waits 4 s before it reports ready: the switch window.
        artifact_fault: Some("ready_delay_ms:4000"),
        node_fault: None,
        viewing: Viewing::NodeKilled,
    },
    Case {
        name: "node supervisor killed in deliver",
        crash: Crash::NodeSupervisorInDeliver,
        event_ms: 26_000,
        pause_at: &["deliver"],
        artifact_fault: None,
        node_fault: None,
        viewing: Viewing::NodeKilled,
    },
];

/// Runs the case of `crash`: cluster, viewers, upgrade, the crash, then
/// [`finish`]'s checks on release 2.
async fn run_crash(crash: Crash) -> Seen {
    run_crash_on(crash, Backend::from_env()).await
}

/// [`run_crash`] with the controller's store on `backend`.
async fn run_crash_on(crash: Crash, backend: Backend) -> Seen {
    let case = CRASHES
        .iter()
        .find(|c| c.crash == crash)
        .unwrap_or_else(|| panic!("no case for {crash:?}"));
    let name = case.name;
    let mut c = cluster(
        name,
        Options {
            artifact: Artifact::Wrapped(
                case.artifact_fault
                    .map(|f| ("HANDOVER_TEST_FAULT", f))
                    .into_iter()
                    .collect(),
            ),
            node_env: case
                .node_fault
                .map(|(id, f)| (id, vec![("HANDOVER_TEST_FAULT", f)])),
            postgres: backend == Backend::Postgres,
            ..one_group(case.event_ms)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c.fleet, &c.artifact, "failover", case.pause_at).await;
    match crash {
        Crash::ControllerAt(phase) => controller_at(&mut c, phase).await,
        Crash::ControllerMidMigration => controller_mid_migration(&mut c).await,
        Crash::BackupWorkerMidDrain => backup_worker_mid_drain(&mut c).await,
        Crash::NodeMidStage => node_mid_stage(&mut c).await,
        Crash::NodeSupervisorMidSwitch => node_supervisor_mid_switch(&mut c).await,
        Crash::NodeSupervisorInDeliver => node_supervisor_in_deliver(&mut c).await,
    }
    let seen = finish(c, viewers, case.viewing, 2).await;
    eprintln!("{name}: {seen:?}");
    seen
}

async fn controller_at(c: &mut Cluster, phase: Phase) {
    wait_paused_at(c, phase).await;
    crash_controller(c).await;
    // The restarted controller resumes from the stored state: still paused there.
    let up = upgrade_now(&c.fleet).await.unwrap();
    assert_eq!(
        (up.phase, &up.status),
        (phase, &Status::Paused),
        "{}",
        c.name
    );
    resume(&c.fleet).await;
}

async fn controller_mid_migration(c: &mut Cluster) {
    let name = c.name.clone();
    // The new controller took its snapshot (SQLite) or holds the store's
    // lock (PostgreSQL: the copy and the migration are one transaction),
    // and holds the migration open.
    let snapshots = c.fleet.dir.join("controller").join("snapshots");
    let postgres = c.fleet.database.as_ref().map(|d| d.target().unwrap());
    let supervisor = c.fleet.controller_supervisor();
    wait_for(&name, Duration::from_secs(30), || async {
        let starting = supervisor.status().await.ok()?.starting_pid;
        let migrating = match &postgres {
            Some(target) => target.opening_now().await.ok()?,
            None => snapshots.join("schema-1-0.db").exists(),
        };
        (starting.is_some() && migrating).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    crash_controller(c).await;
    // The interrupted switch is tried once more and committed: a second
    // snapshot (SQLite) or the one copy the committed migration took
    // (PostgreSQL), and the database is migrated once, by the new release.
    let sup = supervisor_settled(&name, &c.fleet.controller_supervisor()).await;
    assert_eq!(sup.active.release, 2, "{name}: {sup:?}");
    match &postgres {
        Some(target) => assert_eq!(target.pre_upgrade_copies().await.unwrap(), [1], "{name}"),
        None => assert!(snapshots.join("schema-1-1.db").exists(), "{name}"),
    }
}

async fn backup_worker_mid_drain(c: &mut Cluster) {
    let name = c.name.clone();
    // Paused at the start of backups: g1-b was told to switch; its release-1
    // worker stops producing and drains before it asks for the new release.
    let old = c.fleet.node_worker_pid("g1-b").await.unwrap();
    wait_paused_at(c, Phase::Backups).await;
    let log_dir = c.fleet.dir.join("logs");
    wait_for(&name, Duration::from_secs(20), || async {
        let log = std::fs::read_to_string(log_dir.join("g1-b-r1.log")).ok()?;
        log.contains("test hook: draining slowly").then_some(())
    })
    .await;
    let during = c
        .fleet
        .node_supervisor("g1-b")
        .unwrap()
        .status()
        .await
        .unwrap();
    kill(old, Signal::SIGKILL).unwrap();
    eprintln!("{name}: SIGKILLed the release-1 worker {old} of g1-b during {during:?}");
    assert_eq!(
        (during.active_pid, during.switching.is_none()),
        (Some(old.as_raw().unsigned_abs()), true),
        "{name}: killed while draining, before it asked for the switch"
    );
    // Its supervisor starts release 1 again; told to switch still, it drains and switches.
    resume(&c.fleet).await;
}

async fn node_mid_stage(c: &mut Cluster) {
    let name = c.name.clone();
    let releases = c.fleet.node("g1-b").unwrap().data_dir.join("releases");
    // The artifact's temporary directory, while it downloads.
    let artifact = c.artifact.clone();
    let partial = |releases: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(releases)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| handover_artifacts::is_temporary(n, Some(&artifact)))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(&name, Duration::from_secs(20), || async {
        (!partial(&releases).is_empty()).then_some(())
    })
    .await;
    c.fleet.kill_node("g1-b").await.unwrap();
    let up = upgrade_now(&c.fleet).await.unwrap();
    assert_eq!(
        up.phase,
        Phase::Stage,
        "{name}: killed while staging: {up:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_node(c, "g1-b").await;
    // Staged again from scratch after the restart; the upgrade went on.
    wait_for(&name, Duration::from_secs(30), || async {
        let up = upgrade_now(&c.fleet).await?;
        (up.phase > Phase::Stage).then_some(())
    })
    .await;
    let staged = releases.join(&c.artifact);
    assert!(staged.join("manifest.json").is_file(), "{name}");
    assert!(
        partial(&releases).is_empty(),
        "{name}: the stalled download was replaced: {:?}",
        partial(&releases)
    );
}

async fn node_supervisor_mid_switch(c: &mut Cluster) {
    let name = c.name.clone();
    let supervisor = c.fleet.node_supervisor("g1-b").unwrap();
    let sup = wait_for(&name, Duration::from_secs(60), || async {
        let s = supervisor.status().await.ok()?;
        (s.switching.is_some() && s.starting_pid.is_some()).then_some(s)
    })
    .await;
    eprintln!("{name}: killing g1-b's supervisor during {sup:?}");
    c.fleet.kill_node("g1-b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_node(c, "g1-b").await;
    // The restarted supervisor tries the interrupted switch once more and commits it.
    let sup = supervisor_settled(&name, &c.fleet.node_supervisor("g1-b").unwrap()).await;
    assert_eq!(sup.active.release, 2, "{name}: {sup:?}");
}

async fn node_supervisor_in_deliver(c: &mut Cluster) {
    wait_paused_at(c, Phase::Deliver).await;
    c.fleet.kill_node("g1-a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    restart_node(c, "g1-a").await;
    // Its supervisor starts release 1 again; it handshakes for `deliver`.
    let url = c.fleet.nodes[0].url();
    wait_for(&c.name, Duration::from_secs(15), || async {
        let s = node_status(&url).await?;
        (s["grant"] == "deliver").then_some(())
    })
    .await;
    resume(&c.fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_at_the_start_of_each_phase_resumes_and_loses_nothing() {
    let phases = [
        Phase::Fence,
        Phase::Deliver,
        Phase::Backups,
        Phase::Primaries,
        Phase::Finalize,
    ];
    let runs: Vec<_> = phases
        .iter()
        .map(|phase| tokio::spawn(run_crash(Crash::ControllerAt(*phase))))
        .collect();
    for (run, phase) in runs.into_iter().zip(phases) {
        run.await.unwrap_or_else(|e| panic!("{phase:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_migration_restarts_into_the_new_release_and_loses_nothing() {
    run_crash(Crash::ControllerMidMigration).await;
}

/// The same with the controller's store on PostgreSQL: the killed
/// migration's transaction rolls back on the server, the next one commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_migration_on_postgres_restarts_into_the_new_release_and_loses_nothing(
) {
    run_crash_on(Crash::ControllerMidMigration, Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_worker_killed_mid_drain_restarts_and_switches_and_loses_nothing() {
    run_crash(Crash::BackupWorkerMidDrain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_it_stages_stages_again_and_loses_nothing() {
    run_crash(Crash::NodeMidStage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_supervisor_killed_mid_switch_commits_the_switch_on_restart() {
    run_crash(Crash::NodeSupervisorMidSwitch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_supervisor_killed_during_the_upgrade_restarts_and_loses_nothing() {
    run_crash(Crash::NodeSupervisorInDeliver).await;
}

// ------------------------------------------------------ partitions, pauses

/// The node's writes with an epoch older than `epoch`, from `since` on, and
/// whether every one of them was refused with 409 `stale_epoch`.
fn stale_writes(proxy: &FaultProxy, since: Instant, epoch: u64) -> Vec<Exchange> {
    let writes = [
        "/node/v1/records",
        "/node/v1/deliver",
        "/node/v1/heartbeat",
        "/node/v1/params",
    ];
    let stale: Vec<Exchange> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.at >= since && writes.contains(&e.path()))
        .filter(|e| e.epoch.is_some_and(|ep| ep < epoch))
        .collect();
    for e in &stale {
        assert_eq!(
            (e.status, e.error.as_deref()),
            (409, Some("stale_epoch")),
            "a write with a stale epoch was not refused: {e:?}"
        );
    }
    stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_across_the_fence_handshakes_again_and_its_records_arrive_once() {
    let name = "node partitioned across the fence";
    let c = cluster(
        name,
        Options {
            proxied: Some("g1-b"),
            ..one_group(30_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c.fleet, &c.artifact, "failover", &["stage", "deliver"]).await;
    wait_paused_at(&c, Phase::Stage).await;
    // Staged everywhere (g1-b through the proxy), then cut off before the fence.
    wait_for(name, Duration::from_secs(20), || async {
        let s = handover::upgrade::status(&c.fleet.op).await.ok()?;
        s.nodes
            .iter()
            .all(|n| n.staged.contains(&c.artifact))
            .then_some(())
    })
    .await;
    let proxy = c.proxy.as_ref().unwrap();
    let before = c.fleet.op.status().await.unwrap().cluster.epoch;
    proxy.partition();
    let cut_at = Instant::now();
    resume(&c.fleet).await;
    // The fence goes on without g1-b's acknowledgement; the controller switches.
    let up = wait_paused_at(&c, Phase::Deliver).await;
    let fence = up.phases.iter().find(|p| p.phase == Phase::Fence).unwrap();
    eprintln!(
        "{name}: fence phase took {:?} ms",
        fence.ended_ms.map(|e| e - fence.started_ms)
    );
    let status = c.fleet.op.status().await.unwrap();
    let fenced_epoch = status.cluster.epoch;
    assert_eq!(fenced_epoch, before + 1, "{name}");
    let b = status
        .nodes
        .iter()
        .find(|n| n.node.node_id == "g1-b")
        .unwrap();
    assert!(b.lease_expired, "{name}: g1-b is cut off: {b:?}");
    let url = c.fleet.nodes[1].url();
    let held = node_status(&url).await.unwrap();
    assert!(
        held["epoch"].as_u64().unwrap() < fenced_epoch,
        "{name}: g1-b never heard of the fence: {held}"
    );
    proxy.heal();
    let healed_at = Instant::now();
    // It handshakes again: the new epoch, `deliver` from the release-2 controller.
    wait_for(name, Duration::from_secs(20), || async {
        let s = node_status(&url).await?;
        (s["epoch"] == fenced_epoch && s["grant"] == "deliver").then_some(())
    })
    .await;
    let stale = stale_writes(proxy, cut_at, fenced_epoch);
    // Its lease ran out while cut off, so the first thing it sent after the
    // heal was a hello, not a write under the old epoch.
    let after: Vec<Exchange> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.at >= healed_at)
        .collect();
    assert_eq!(
        after.first().map(|e| e.path()),
        Some("/node/v1/hello"),
        "{name}: {after:?}"
    );
    let accepted = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.at >= cut_at && e.status == 200 && e.path() == "/node/v1/deliver")
        .count();
    eprintln!(
        "{name}: after the heal, {} stale writes refused with 409, {accepted} deliver batches accepted",
        stale.len()
    );
    resume(&c.fleet).await;
    let seen = finish(c, viewers, Viewing::Clean, 2).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_is_refused_every_stale_write_and_loses_nothing() {
    let name = "node SIGSTOPped across a fence";
    let mut c = cluster(
        name,
        Options {
            proxied: Some("g1-b"),
            release: 2,
            ..one_group(16_000)
        },
    )
    .await;
    // A 10 s request timeout: the paused node answers late, not never.
    let viewers = spawn_viewers(&c, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let worker = c.fleet.node_worker_pid("g1-b").await.unwrap();
    let proxy = c.proxy.as_ref().unwrap();
    // Paused right after a heartbeat was answered, so none is in flight.
    let beats = || {
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.path() == "/node/v1/heartbeat" && e.status == 200)
            .count()
    };
    let before = beats();
    wait_for(name, Duration::from_secs(5), || async {
        (beats() > before).then_some(())
    })
    .await;
    kill(worker, Signal::SIGSTOP).unwrap();
    let paused_at = Instant::now();
    let expired = wait_for(name, Duration::from_secs(10), || async {
        let s = c.fleet.op.status().await.ok()?;
        let b = s.nodes.iter().find(|n| n.node.node_id == "g1-b")?;
        b.lease_expired.then_some(())
    })
    .await;
    // The watch long-poll (and so the fence it would announce) is lost with
    // its connection, as behind a load balancer that times it out; the idle
    // ones stay, so the node wakes up with its old epoch and uses them.
    let dropped = proxy.reset_busy_connections();
    post_empty(&c.fleet, "/api/v1/fence").await;
    post_empty(&c.fleet, "/api/v1/unfence").await;
    let epoch = c.fleet.op.status().await.unwrap().cluster.epoch;
    let woke_at = Instant::now();
    kill(worker, Signal::SIGCONT).unwrap();
    eprintln!(
        "{name}: paused {:?} (lease expired: {expired:?}), {dropped} busy connections dropped, fenced and unfenced to epoch {epoch}",
        woke_at - paused_at
    );
    let url = c.fleet.nodes[1].url();
    wait_for(name, Duration::from_secs(20), || async {
        let s = node_status(&url).await?;
        (s["epoch"] == epoch && s["grant"] == "full").then_some(())
    })
    .await;
    // Its first requests carried the old epoch: every write among them was refused.
    let stale = stale_writes(proxy, woke_at, epoch);
    assert!(
        !stale.is_empty(),
        "{name}: the node woke with its old epoch and tried to write: {:?}",
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.at >= woke_at)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "{name}: {} writes with the old epoch refused: {:?}",
        stale.len(),
        stale
            .iter()
            .map(|e| e.path().to_owned())
            .collect::<Vec<_>>()
    );
    let v = viewers.await.unwrap().unwrap();
    judge_viewers(name, &v, Viewing::Clean);
    let r = stop_and_check(&mut c.fleet, name).await;
    c.fleet.stop_all().await.unwrap();
    eprintln!("{name}: {r:?}");
}

// ------------------------------------------------------- failed releases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_release_whose_migration_fails_rolls_back_to_release_1() {
    migration_fails(Backend::from_env()).await;
}

/// The same with the controller's store on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_release_whose_migration_fails_on_postgres_rolls_back_to_release_1() {
    migration_fails(Backend::Postgres).await;
}

async fn migration_fails(backend: Backend) {
    let name = &format!("controller migration fails on {backend:?}");
    let mut c = cluster(
        name,
        Options {
            artifact: Artifact::Wrapped(vec![("HANDOVER_TEST_FAULT", "migrate_fail")]),
            postgres: backend == Backend::Postgres,
            ..one_group(16_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c.fleet, &c.artifact, "failover", &[]).await;
    let s: UpgradeStatus = c.fleet.wait_upgrade_over(UPGRADE_WAIT).await.unwrap();
    let up = s.upgrade.clone().unwrap();
    eprintln!("{name}:\n{}", handover::upgrade::render_status(&s));
    let Status::Failed { reason } = &up.status else {
        panic!("{name}: {up:?}");
    };
    assert_eq!(up.phase, Phase::Controller, "{name}");
    assert!(
        reason.contains("migration from schema 1 to 2 failed"),
        "{name}: the reason names the failure: {reason}"
    );
    // Release 1 still runs, on its unchanged database, and the fence is lifted.
    let sup = c.fleet.controller_supervisor().status().await.unwrap();
    assert_eq!(
        (sup.active.release, sup.switching.is_none()),
        (1, true),
        "{sup:?}"
    );
    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            status.controller.release.0,
            status.cluster.schema.0,
            status.cluster.release.0,
            status.cluster.fenced
        ),
        (1, 1, 1, false),
        "{name}"
    );
    // SQLite's snapshot is taken before the migration's transaction;
    // PostgreSQL's copy is in it, and rolled back with it.
    assert_eq!(
        c.fleet
            .dir
            .join("controller")
            .join("snapshots")
            .join("schema-1-0.db")
            .is_file(),
        backend == Backend::Sqlite,
        "{name}"
    );
    // Nodes are back to `full` at the fence's epoch.
    for n in &c.fleet.nodes {
        let url = n.url();
        wait_for(name, Duration::from_secs(15), || async {
            let s = node_status(&url).await?;
            (s["grant"] == "full" && s["epoch"] == status.cluster.epoch).then_some(())
        })
        .await;
    }
    let v = viewers.await.unwrap().unwrap();
    judge_viewers(name, &v, Viewing::Clean);
    let r = stop_and_check(&mut c.fleet, name).await;
    assert_eq!(r.translated, 0, "{name}: nothing was translated: {r:?}");
    c.fleet.stop_all().await.unwrap();
}

/// A node release that cannot run: the backup's supervisor refuses it, the
/// old release goes on serving, the upgrade pauses naming the node.
async fn a_node_release_that_fails(name: &str, fault: &'static str, why: &str, viewing: Viewing) {
    let mut c = cluster(
        name,
        Options {
            artifact: Artifact::Wrapped(vec![("HANDOVER_TEST_FAULT", fault)]),
            controller_env: vec![("HANDOVER_NODE_SWITCH_WAIT_MS", "45000")],
            ..one_group(45_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c.fleet, &c.artifact, "wait", &[]).await;
    let up = wait_paused(&c).await;
    eprintln!("{name}: paused in {:?}: {}", up.phase, up.waiting_for);
    assert_eq!(up.plan.node_switch_wait_ms, 45_000, "{name}");
    assert!(
        up.waiting_for
            .contains("node g1-b could not switch to release 2: it came back on release 1"),
        "{name}: {}",
        up.waiting_for
    );
    // The old release serves, and the node says why it could not switch.
    let url = c.fleet.nodes[1].url();
    let s = node_status(&url).await.unwrap();
    assert_eq!(
        (s["release"].as_u64(), s["grant"].as_str()),
        (Some(1), Some("deliver")),
        "{s}"
    );
    let error = s["switch_error"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains(why), "{name}: {s}");
    let sup = c
        .fleet
        .node_supervisor("g1-b")
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(
        (sup.active.release, sup.switching.is_none()),
        (1, true),
        "{sup:?}"
    );
    // It is not asked to try again while paused; abort ends the upgrade there.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let again = node_status(&url).await.unwrap();
    assert_eq!(again["release"].as_u64(), Some(1), "{again}");
    post_empty(&c.fleet, "/api/v1/upgrade/abort").await;
    let up = upgrade_now(&c.fleet).await.unwrap();
    assert!(matches!(up.status, Status::Aborted { .. }), "{up:?}");
    let v = viewers.await.unwrap().unwrap();
    judge_viewers(name, &v, viewing);
    let r = stop_and_check(&mut c.fleet, name).await;
    c.fleet.stop_all().await.unwrap();
    eprintln!("{name}: {r:?}; node said: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_release_that_exits_at_start_is_refused_and_the_upgrade_pauses() {
    a_node_release_that_fails(
        "node release exits at start",
        "exit_at_start",
        "exited before it was ready",
        Viewing::Clean,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_release_that_never_becomes_ready_is_refused_and_the_upgrade_pauses() {
    a_node_release_that_fails(
        "node release never ready",
        "never_ready",
        "did not send ready",
        // A worker that never reports ready still takes a share of the
        // socket's connections until its supervisor stops it: under load a
        // viewer can see one failed request (then fails over; none missed).
        Viewing::NodeKilled,
    )
    .await;
}
