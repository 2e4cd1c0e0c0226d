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
//! untouched. Every test has its own subnet (127.60-79.x), tempdir and
//! bounded waits, and its fleet kills every process when dropped.

use handover::check::CheckReport;
use handover::fleet::Fleet;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::api::UpgradeStatus;
use handover_core::upgrade::{Phase, Status, Upgrade};
use handover_testkit::faultproxy::{Exchange, FaultProxy};
use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SEGMENT_MS: u32 = 1000;
/// Bound on any one upgrade in these tests.
const UPGRADE_WAIT: Duration = Duration::from_secs(100);

fn now_ms() -> i64 {
    handover::client::now_ms()
}

/// What a test changes in the standard cluster.
#[derive(Default)]
struct Options {
    groups: usize,
    event_ms: u64,
    /// Environment of the release-2 artifact (through its wrapper script).
    artifact_env: Vec<(&'static str, &'static str)>,
    /// Extra environment of one node's supervisor (and so of its workers).
    node_env: Option<(&'static str, Vec<(&'static str, &'static str)>)>,
    /// This node talks to the controller through a fault proxy.
    proxied: Option<&'static str>,
    /// Extra environment of the controller's supervisor.
    controller_env: Vec<(&'static str, &'static str)>,
    /// Release of the controller and nodes at the start.
    release: u32,
}

struct Cluster {
    fleet: Fleet,
    dir: Option<tempfile::TempDir>,
    targets: Vec<ChannelTarget>,
    event_start_ms: i64,
    event_ms: u64,
    artifact: String,
    proxy: Option<FaultProxy>,
    name: String,
}

/// A cluster of `groups` groups (g1 = g1-a primary + g1-b backup, …), one
/// channel each with one event starting 2 s from now, every node started
/// and registered, the release-2 artifact uploaded.
async fn cluster(name: &str, subnet: u8, opts: Options) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(
        &PathBuf::from(env!("CARGO_BIN_EXE_handover")),
        dir.path(),
        subnet,
    )
    .unwrap();
    fleet.controller_env = opts
        .controller_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let release = opts.release.max(1);
    fleet.start_controller(release).await.unwrap();
    let artifact = fleet
        .upload_artifact_with_env(2, &opts.artifact_env)
        .await
        .unwrap();
    let proxy = match opts.proxied {
        Some(_) => Some(
            FaultProxy::start(
                SocketAddr::from((Ipv4Addr::new(127, subnet, 0, 200), 7400)),
                fleet.controller_addr(),
            )
            .await
            .unwrap(),
        ),
        None => None,
    };
    let event_start_ms = now_ms() + 2_000;
    let mut targets = Vec::new();
    for g in 1..=opts.groups.max(1) {
        let names = [format!("ch{g}")];
        targets.extend(
            fleet
                .add_live_group(
                    g as u64,
                    &names,
                    release,
                    SEGMENT_MS,
                    event_start_ms,
                    opts.event_ms,
                )
                .await
                .unwrap(),
        );
    }
    if let (Some(id), Some(p)) = (opts.proxied, &proxy) {
        fleet.node(id).unwrap().controller_url = Some(p.url());
    }
    if let Some((id, env)) = &opts.node_env {
        fleet.node(id).unwrap().env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await.unwrap();
    }
    fleet.wait_nodes_registered().await.unwrap();
    Cluster {
        fleet,
        dir: Some(dir),
        targets,
        event_start_ms,
        event_ms: opts.event_ms,
        artifact,
        proxy,
        name: name.to_owned(),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test keeps its data dirs and logs to look at.
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("{}: logs kept in {}", self.name, dir.keep().display());
            }
        }
    }
}

fn one_group(event_ms: u64) -> Options {
    Options {
        groups: 1,
        event_ms,
        ..Options::default()
    }
}

/// Viewers on every channel from the first segment until the ENDLIST.
fn spawn_viewers(c: &Cluster, request_timeout: Duration) -> tokio::task::JoinHandle<ViewerReport> {
    let config = ViewerConfig {
        targets: c.targets.clone(),
        viewers_per_channel: 2,
        duration: Duration::from_millis(c.event_ms + 60_000),
        request_timeout,
        steady: None,
    };
    let start_at = c.event_start_ms + i64::from(SEGMENT_MS) + 300;
    tokio::spawn(async move {
        let wait = u64::try_from(start_at - now_ms()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let (_tx, rx) = tokio::sync::watch::channel(false);
        viewers::run(&config, rx).await.unwrap()
    })
}

async fn start_upgrade(c: &Cluster, policy: &str, pause_at: &[&str]) {
    let mut req = handover_core::api::UpgradeRequest::new(&c.artifact, policy);
    req.pause_at = pause_at
        .iter()
        .map(|p| handover_core::upgrade::Phase::parse(p).unwrap())
        .collect();
    let _ = handover::upgrade::start(&c.fleet.op, &req).await.unwrap();
}

async fn resume(c: &Cluster) {
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/resume", &serde_json::json!({}))
        .await
        .unwrap();
}

/// Polls `probe` every 100 ms until it gives a value; panics after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn upgrade_now(c: &Cluster) -> Option<Upgrade> {
    handover::upgrade::status(&c.fleet.op).await.ok()?.upgrade
}

/// Waits for the upgrade to pause at `phase` (bounded); panics if it ends first.
async fn wait_paused_at(c: &Cluster, phase: Phase) -> Upgrade {
    wait_for(
        &format!("{}: pause at {phase:?}", c.name),
        UPGRADE_WAIT,
        || async {
            let up = upgrade_now(c).await?;
            assert!(
                !up.status.is_over(),
                "{}: over before pausing at {phase:?}: {up:?}",
                c.name
            );
            (up.phase == phase && up.status == Status::Paused).then_some(up)
        },
    )
    .await
}

/// Waits for the upgrade to pause (anywhere) and returns it.
async fn wait_paused(c: &Cluster) -> Upgrade {
    wait_for(&format!("{}: a pause", c.name), UPGRADE_WAIT, || async {
        let up = upgrade_now(c).await?;
        assert!(!up.status.is_over(), "{}: over: {up:?}", c.name);
        (up.status == Status::Paused).then_some(up)
    })
    .await
}

/// SIGKILL the controller (supervisor and worker) and start it again; the
/// supervisor's state decides the release it runs.
async fn crash_controller(c: &mut Cluster) {
    c.fleet.kill_controller().await.unwrap();
    start_again(c, None).await;
}

/// Starts node `i` (or the controller) again after a kill. Its workers are
/// gone (`Fleet::kill_*` waits for them), but under load the kernel has
/// once been seen to refuse the address for a moment: one more try after a
/// pause, with the sockets on it printed.
async fn start_again(c: &mut Cluster, node: Option<usize>) {
    let (addr, first) = match node {
        Some(i) => (c.fleet.nodes[i].addr, c.fleet.start_node(i).await),
        None => (c.fleet.controller_addr(), c.fleet.start_controller(1).await),
    };
    let Err(e) = first else {
        return;
    };
    let ss = std::process::Command::new("ss").args(["-tanpe"]).output();
    let sockets: Vec<String> = ss
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&addr.to_string()))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "{}: could not start again on {addr} ({e:#}); sockets there: {sockets:#?}; retrying once",
        c.name
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    match node {
        Some(i) => c.fleet.start_node(i).await.unwrap(),
        None => c.fleet.start_controller(1).await.unwrap(),
    }
}

/// Starts node `id` again after a kill (its supervisor's state decides the release).
async fn restart_node(c: &mut Cluster, id: &str) {
    let i = c.fleet.nodes.iter().position(|n| n.id == id).unwrap();
    start_again(c, Some(i)).await;
}

async fn node_status(url: &str) -> Option<Value> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(format!("{url}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// What one test saw, printed for the report.
struct Seen {
    viewers: ViewerReport,
    records: CheckReport,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v, r) = (&self.viewers, &self.records);
        write!(
            f,
            "viewers: {} requests, {} failed, {} failovers, {} segments missed; records: {} produced, {} stored, {} translated, {}/{}/{} lost/duplicated/unexpected",
            v.requests, v.failed_requests, v.failovers, v.segments_missed,
            r.produced, r.stored, r.translated, r.lost, r.duplicated, r.unexpected
        )
    }
}

/// How a test judges viewers: `Clean` = no failed request; `NodeKilled` =
/// one node of their group was killed once, so a viewer using it saw a
/// request fail and failed over to the other node, where it stays: at most
/// one failed request per viewer, and no segment missed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Viewing {
    Clean,
    NodeKilled,
}

fn judge_viewers(name: &str, v: &ViewerReport, viewing: Viewing) {
    eprintln!("{name}: viewers {v:?}");
    assert!(v.segments_received > 0, "{name}: {v:?}");
    assert_eq!(v.segments_missed, 0, "{name}: {v:?}");
    assert_eq!(v.ended_streams, v.viewers, "{name}: {v:?}");
    match viewing {
        Viewing::Clean => assert_eq!(v.failed_requests, 0, "{name}: {v:?}"),
        Viewing::NodeKilled => assert!(v.failed_requests <= v.viewers, "{name}: {v:?}"),
    }
}

/// Stops every node gracefully (each drains its outbox), then checks every
/// record: none lost, duplicated or unexpected, every one stored.
async fn stop_and_check(c: &mut Cluster) -> CheckReport {
    c.fleet.stop_nodes().await.unwrap();
    let r = c.fleet.check().await.unwrap();
    eprintln!("{}: records {r:?}", c.name);
    assert!(r.produced > 0, "{}: {r:?}", c.name);
    assert_eq!(
        (r.lost, r.duplicated, r.unexpected, r.queued),
        (0, 0, 0, 0),
        "{}: {r:?}",
        c.name
    );
    assert_eq!(r.stored, r.produced, "{}: {r:?}", c.name);
    r
}

/// Waits for the upgrade to finalize and asserts what the issue asks of it.
async fn finish(
    mut c: Cluster,
    viewers: tokio::task::JoinHandle<ViewerReport>,
    viewing: Viewing,
) -> Seen {
    let s = c.fleet.wait_upgrade_over(UPGRADE_WAIT).await.unwrap();
    let rendered = handover::upgrade::render_status(&s);
    eprintln!("{}:\n{rendered}", c.name);
    let up = s.upgrade.clone().unwrap();
    assert_eq!(up.status, Status::Finalized, "{}: {rendered}", c.name);
    let v = viewers.await.unwrap();
    judge_viewers(&c.name, &v, viewing);
    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            status.controller.release.0,
            status.cluster.release.0,
            status.cluster.schema.0
        ),
        (2, 2, 2),
        "{}",
        c.name
    );
    for n in &status.nodes {
        assert_eq!(
            (n.node.release.0, n.grant_now.as_str()),
            (2, "full"),
            "{}: {n:?}",
            c.name
        );
    }
    let records = stop_and_check(&mut c).await;
    assert!(records.translated > 0, "{}: {records:?}", c.name);
    c.fleet.stop_all().await.unwrap();
    Seen {
        viewers: v,
        records,
    }
}

// ---------------------------------------------------------------- crashes

/// SIGKILL of the controller at the start of `phase`, restart, resume.
async fn controller_killed_at(phase: Phase, subnet: u8) -> Seen {
    let name = format!("controller killed at {}", phase.as_str());
    let mut c = cluster(&name, subnet, one_group(24_000)).await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &[phase.as_str()]).await;
    wait_paused_at(&c, phase).await;
    crash_controller(&mut c).await;
    // The restarted controller resumes from the stored state: still paused there.
    let up = upgrade_now(&c).await.unwrap();
    assert_eq!((up.phase, &up.status), (phase, &Status::Paused), "{name}");
    resume(&c).await;
    finish(c, viewers, Viewing::Clean).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_at_the_start_of_each_phase_resumes_and_loses_nothing() {
    let phases = [
        (Phase::Fence, 60),
        (Phase::Deliver, 61),
        (Phase::Backups, 62),
        (Phase::Primaries, 63),
        (Phase::Finalize, 64),
    ];
    let runs = phases
        .iter()
        .map(|(phase, subnet)| tokio::spawn(controller_killed_at(*phase, *subnet)));
    for (run, (phase, _)) in runs.collect::<Vec<_>>().into_iter().zip(phases) {
        let seen = run.await.unwrap_or_else(|e| panic!("{phase:?}: {e}"));
        eprintln!("controller killed at {phase:?}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_migration_restarts_into_the_new_release_and_loses_nothing() {
    let name = "controller killed mid-migration";
    let mut c = cluster(
        name,
        65,
        Options {
            artifact_env: vec![("HANDOVER_TEST_FAULT", "migrate_slow_ms:6000")],
            ..one_group(26_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &[]).await;
    // The new controller took its snapshot and holds the migration open.
    let snapshots = c.fleet.dir.join("controller").join("snapshots");
    let supervisor = c.fleet.controller_supervisor();
    wait_for(name, Duration::from_secs(30), || async {
        let starting = supervisor.status().await.ok()?.starting_pid;
        let snapped = snapshots.join("schema-1-0.db").exists();
        (starting.is_some() && snapped).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    crash_controller(&mut c).await;
    // The interrupted switch is tried once more and committed: a second snapshot,
    // and the database is migrated once, by the new release.
    let supervisor = c.fleet.controller_supervisor();
    let sup = wait_for(name, Duration::from_secs(20), || async {
        let s = supervisor.status().await.ok()?;
        (s.switching.is_none() && s.active_pid.is_some()).then_some(s)
    })
    .await;
    assert_eq!(sup.active.release, 2, "{name}: {sup:?}");
    assert!(snapshots.join("schema-1-1.db").exists(), "{name}");
    let seen = finish(c, viewers, Viewing::Clean).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_worker_killed_mid_drain_restarts_and_switches_and_loses_nothing() {
    let name = "backup worker killed mid-drain";
    let c = cluster(
        name,
        66,
        Options {
            // g1-b's workers take 4 s to drain when they quiesce for a switch.
            node_env: Some(("g1-b", vec![("HANDOVER_TEST_FAULT", "drain_slow_ms:4000")])),
            ..one_group(26_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &["backups"]).await;
    // Paused at the start of backups: g1-b was told to switch; its release-1
    // worker stops producing and drains before it asks for the new release.
    let old = c.fleet.node_worker_pid("g1-b").await.unwrap();
    wait_paused_at(&c, Phase::Backups).await;
    let log_dir = c.fleet.dir.join("logs");
    wait_for(name, Duration::from_secs(20), || async {
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
    resume(&c).await;
    let seen = finish(c, viewers, Viewing::NodeKilled).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_it_stages_stages_again_and_loses_nothing() {
    let name = "node killed mid-stage";
    let mut c = cluster(
        name,
        67,
        Options {
            // Only g1-b's release-1 worker stalls its download (4 s after the first chunk).
            node_env: Some(("g1-b", vec![("HANDOVER_TEST_FAULT", "stage_slow_ms:4000")])),
            ..one_group(26_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &[]).await;
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
    wait_for(name, Duration::from_secs(20), || async {
        (!partial(&releases).is_empty()).then_some(())
    })
    .await;
    c.fleet.kill_node("g1-b").await.unwrap();
    let up = upgrade_now(&c).await.unwrap();
    assert_eq!(
        up.phase,
        Phase::Stage,
        "{name}: killed while staging: {up:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_node(&mut c, "g1-b").await;
    let staged = c
        .fleet
        .node("g1-b")
        .unwrap()
        .data_dir
        .join("releases")
        .join(&c.artifact);
    // Staged again from scratch after the restart; the upgrade went on.
    wait_for(name, Duration::from_secs(30), || async {
        let up = upgrade_now(&c).await?;
        (up.phase > Phase::Stage).then_some(())
    })
    .await;
    assert!(staged.join("manifest.json").is_file(), "{name}");
    assert!(
        partial(&releases).is_empty(),
        "{name}: the stalled download was replaced: {:?}",
        partial(&releases)
    );
    let seen = finish(c, viewers, Viewing::NodeKilled).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_supervisor_killed_mid_switch_commits_the_switch_on_restart() {
    let name = "node supervisor killed mid-switch";
    let mut c = cluster(
        name,
        68,
        Options {
            // The new worker waits 4 s before it reports ready: the switch window.
            artifact_env: vec![("HANDOVER_TEST_FAULT", "ready_delay_ms:4000")],
            ..one_group(26_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &[]).await;
    let supervisor = c.fleet.node_supervisor("g1-b").unwrap();
    let sup = wait_for(name, Duration::from_secs(60), || async {
        let s = supervisor.status().await.ok()?;
        (s.switching.is_some() && s.starting_pid.is_some()).then_some(s)
    })
    .await;
    eprintln!("{name}: killing g1-b's supervisor during {sup:?}");
    c.fleet.kill_node("g1-b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart_node(&mut c, "g1-b").await;
    // The restarted supervisor tries the interrupted switch once more and commits it.
    let supervisor = c.fleet.node_supervisor("g1-b").unwrap();
    let sup = wait_for(name, Duration::from_secs(20), || async {
        let s = supervisor.status().await.ok()?;
        (s.switching.is_none() && s.active_pid.is_some()).then_some(s)
    })
    .await;
    assert_eq!(sup.active.release, 2, "{name}: {sup:?}");
    let seen = finish(c, viewers, Viewing::NodeKilled).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_supervisor_killed_during_the_upgrade_restarts_and_loses_nothing() {
    let name = "node supervisor killed in deliver";
    let mut c = cluster(name, 69, one_group(26_000)).await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &["deliver"]).await;
    wait_paused_at(&c, Phase::Deliver).await;
    c.fleet.kill_node("g1-a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    restart_node(&mut c, "g1-a").await;
    // Its supervisor starts release 1 again; it handshakes for `deliver`.
    let url = c.fleet.nodes[0].url();
    wait_for(name, Duration::from_secs(15), || async {
        let s = node_status(&url).await?;
        (s["grant"] == "deliver").then_some(())
    })
    .await;
    resume(&c).await;
    let seen = finish(c, viewers, Viewing::NodeKilled).await;
    eprintln!("{name}: {seen:?}");
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
        70,
        Options {
            proxied: Some("g1-b"),
            ..one_group(30_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &["stage", "deliver"]).await;
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
    resume(&c).await;
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
    resume(&c).await;
    let seen = finish(c, viewers, Viewing::Clean).await;
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_is_refused_every_stale_write_and_loses_nothing() {
    let name = "node SIGSTOPped across a fence";
    let mut c = cluster(
        name,
        71,
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
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/fence", &serde_json::json!({}))
        .await
        .unwrap();
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/unfence", &serde_json::json!({}))
        .await
        .unwrap();
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
    let v = viewers.await.unwrap();
    judge_viewers(name, &v, Viewing::Clean);
    let r = stop_and_check(&mut c).await;
    c.fleet.stop_all().await.unwrap();
    eprintln!("{name}: {r:?}");
}

// ------------------------------------------------------- failed releases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_release_whose_migration_fails_rolls_back_to_release_1() {
    let name = "controller migration fails";
    let mut c = cluster(
        name,
        72,
        Options {
            artifact_env: vec![("HANDOVER_TEST_FAULT", "migrate_fail")],
            ..one_group(16_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "failover", &[]).await;
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
    assert!(c
        .fleet
        .dir
        .join("controller")
        .join("snapshots")
        .join("schema-1-0.db")
        .is_file());
    // Nodes are back to `full` at the fence's epoch.
    for n in &c.fleet.nodes {
        let url = n.url();
        wait_for(name, Duration::from_secs(15), || async {
            let s = node_status(&url).await?;
            (s["grant"] == "full" && s["epoch"] == status.cluster.epoch).then_some(())
        })
        .await;
    }
    let v = viewers.await.unwrap();
    judge_viewers(name, &v, Viewing::Clean);
    let r = stop_and_check(&mut c).await;
    assert_eq!(r.translated, 0, "{name}: nothing was translated: {r:?}");
    c.fleet.stop_all().await.unwrap();
}

/// A node release that cannot run: the backup's supervisor refuses it, the
/// old release goes on serving, the upgrade pauses naming the node.
async fn a_node_release_that_fails(
    name: &str,
    subnet: u8,
    fault: &'static str,
    why: &str,
    viewing: Viewing,
) {
    let mut c = cluster(
        name,
        subnet,
        Options {
            artifact_env: vec![("HANDOVER_TEST_FAULT", fault)],
            controller_env: vec![("HANDOVER_NODE_SWITCH_WAIT_MS", "45000")],
            ..one_group(45_000)
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "wait", &[]).await;
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
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/abort", &serde_json::json!({}))
        .await
        .unwrap();
    let up = upgrade_now(&c).await.unwrap();
    assert!(matches!(up.status, Status::Aborted { .. }), "{up:?}");
    let v = viewers.await.unwrap();
    judge_viewers(name, &v, viewing);
    let r = stop_and_check(&mut c).await;
    c.fleet.stop_all().await.unwrap();
    eprintln!("{name}: {r:?}; node said: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_release_that_exits_at_start_is_refused_and_the_upgrade_pauses() {
    a_node_release_that_fails(
        "node release exits at start",
        73,
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
        74,
        "never_ready",
        "did not send ready",
        // A worker that never reports ready still takes a share of the
        // socket's connections until its supervisor stops it: under load a
        // viewer can see one failed request (then fails over; none missed).
        Viewing::NodeKilled,
    )
    .await;
}
