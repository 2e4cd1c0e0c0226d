//! Upgrades across two separately built binaries: the fleet runs this test's
//! binary (releases 1 and 2) and is upgraded to release 3, which only the
//! binary built with `--features next-release` carries. Everything the old
//! fleet knows of release 3 comes from the artifact's manifest, written from
//! the new binary itself.
//!
//! The new binary is built once per test run into `target/next-release`
//! (or taken from `HANDOVER_NEXT_BINARY`, as `.ci/run` may give it).

use handover::fleet::{file_sha256, Fleet};
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::upgrade::{Phase, Status};
use handover_core::wire::Role;
use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const SEGMENT_MS: u32 = 1000;
const GROUPS: u64 = 2;
/// Bound on building the next-release binary.
const BUILD_WAIT_S: u64 = 1_500;

fn old_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handover"))
}

/// The binary that carries release 3, built once for every test here.
fn next_binary() -> PathBuf {
    static NEXT: OnceLock<PathBuf> = OnceLock::new();
    NEXT.get_or_init(|| {
        if let Some(p) = std::env::var_os("HANDOVER_NEXT_BINARY") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target = root.join("target/next-release");
        let mut child = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "build",
                "--locked",
                "-p",
                "handover",
                "--features",
                "next-release",
            ])
            .arg("--target-dir")
            .arg(&target)
            .spawn()
            .expect("cargo build of the next release");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for cargo") {
                break s;
            }
            if started.elapsed() > Duration::from_secs(BUILD_WAIT_S) {
                let _ = child.kill();
                panic!("building the next release took more than {BUILD_WAIT_S} s");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            status.success(),
            "cargo build --features next-release failed"
        );
        target.join("debug/handover")
    })
    .clone()
}

struct Cluster {
    fleet: Fleet,
    _dir: tempfile::TempDir,
    targets: Vec<ChannelTarget>,
    event_start_ms: i64,
}

/// A cluster of the old binary at `release`: controller and `GROUPS` groups
/// of a primary and a backup, one channel each, one event of `event_ms`.
async fn old_cluster(subnet: u8, release: u32, event_ms: u64) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(&old_binary(), dir.path(), subnet).unwrap();
    fleet.start_controller(release).await.unwrap();
    let (targets, event_start_ms) = fleet
        .start_live_groups(GROUPS, release, SEGMENT_MS, event_ms)
        .await
        .unwrap();
    Cluster {
        fleet,
        _dir: dir,
        targets,
        event_start_ms,
    }
}

type Viewers = tokio::task::JoinHandle<anyhow::Result<ViewerReport>>;

/// Viewers on every channel from the first segment until the ENDLIST.
fn spawn_viewers(c: &Cluster, event_ms: u64) -> Viewers {
    let config = ViewerConfig {
        targets: c.targets.clone(),
        viewers_per_channel: 2,
        duration: Duration::from_millis(event_ms + 120_000),
        request_timeout: Duration::from_secs(5),
        steady: None,
    };
    viewers::spawn_at(config, c.event_start_ms + i64::from(SEGMENT_MS) + 300)
}

/// An artifact of `binary` (its newest release), made by the old CLI code
/// and uploaded; returns its id.
async fn upload_next(c: &Cluster, binary: &Path, name: &str) -> String {
    let out = c.fleet.dir.join(name);
    let m = handover::artifact::create(binary, None, &out).unwrap();
    handover::artifact::upload(&c.fleet.op, &out).await.unwrap();
    m.id()
}

async fn start(c: &Cluster, artifact: &str, pause_at: &[&str]) {
    let mut req = handover_core::api::UpgradeRequest::new(artifact, "wait");
    req.pause_at = pause_at
        .iter()
        .map(|p| handover_core::upgrade::Phase::parse(p).unwrap())
        .collect();
    handover::upgrade::start(&c.fleet.op, &req).await.unwrap();
}

async fn resume(c: &Cluster) {
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/resume", &serde_json::json!({}))
        .await
        .unwrap();
}

/// Waits for the upgrade to pause at `phase` (bounded).
async fn wait_paused_at(c: &Cluster, phase: Phase) {
    c.fleet
        .wait_paused_at(phase, Duration::from_secs(120))
        .await
        .unwrap();
}

/// SIGKILL of a worker; its supervisor starts the active release again.
fn sigkill(pid: nix::unistd::Pid) {
    kill(pid, Signal::SIGKILL).unwrap();
}

/// Upgrades `c` to `artifact`, pausing at deliver to SIGKILL the controller's
/// worker and at backups to SIGKILL a primary's worker, then waits for the end.
async fn upgrade_with_crashes(c: &Cluster, artifact: &str) {
    start(c, artifact, &["deliver", "backups"]).await;
    wait_paused_at(c, Phase::Deliver).await;
    sigkill(c.fleet.controller_worker_pid().await.unwrap());
    resume_when_back(c).await;
    wait_paused_at(c, Phase::Backups).await;
    sigkill(c.fleet.node_worker_pid("g1-a").await.unwrap());
    resume_when_back(c).await;
    wait_finalized(c).await;
}

/// Waits (bounded) for the upgrade to end and asserts it finalized.
async fn wait_finalized(c: &Cluster) -> handover_core::upgrade::Upgrade {
    let s = c
        .fleet
        .wait_upgrade_over(Duration::from_secs(240))
        .await
        .unwrap();
    let up = s.upgrade.clone().unwrap();
    assert_eq!(
        up.status,
        Status::Finalized,
        "{}",
        handover::upgrade::render_status(&s)
    );
    up
}

/// Resume once the controller answers again (its worker may be restarting).
async fn resume_when_back(c: &Cluster) {
    for _ in 0..300 {
        let r: Result<Value, _> = c
            .fleet
            .op
            .post("/api/v1/upgrade/resume", &serde_json::json!({}))
            .await;
        if r.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resume(c).await;
}

/// What every upgrade to release 3 must end with: viewers undisturbed, the
/// cluster on release 3 and schema 3, every process (supervisors included)
/// running the new binary, every record stored exactly once, release-2
/// records translated.
async fn assert_on_release_3(mut c: Cluster, viewers: Viewers) {
    let next_sha = file_sha256(&next_binary()).unwrap();
    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            status.controller.release.0,
            status.cluster.release.0,
            status.cluster.schema.0
        ),
        (3, 3, 3)
    );
    for n in &status.nodes {
        assert_eq!(
            (n.node.release.0, n.grant_now.as_str()),
            (3, "full"),
            "{n:?}"
        );
    }
    let processes = c.fleet.processes().await.unwrap();
    assert_eq!(
        processes.len(),
        2 * (1 + 2 * GROUPS as usize),
        "{processes:?}"
    );
    for p in &processes {
        assert_eq!(
            (p.release, p.sha256.as_str()),
            (3, next_sha.as_str()),
            "{p:?}"
        );
    }
    let v = viewers.await.unwrap().unwrap();
    eprintln!("{v:?}");
    assert_eq!(v.failed_requests, 0, "{v:?}");
    assert_eq!(v.segments_missed, 0, "{v:?}");
    assert_eq!(v.ended_streams, v.viewers, "{v:?}");
    c.fleet.stop_nodes().await.unwrap();
    let r = c.fleet.check().await.unwrap();
    eprintln!("{r:?}");
    assert_eq!(
        (r.lost, r.duplicated, r.unexpected, r.queued),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.stored, r.produced, "{r:?}");
    assert!(r.translated > 0, "release-2 records land translated: {r:?}");
    c.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_fleet_upgrades_to_release_3_of_a_separate_binary() {
    let next = next_binary();
    let event_ms = 30_000;
    let c = old_cluster(61, 2, event_ms).await;
    let viewers = spawn_viewers(&c, event_ms);
    let artifact = upload_next(&c, &next, "artifact-next").await;
    assert!(artifact.starts_with("r3-"), "{artifact}");

    // Abort before the controller switch: release 2 goes on, on an untouched database.
    start(&c, &artifact, &["fence"]).await;
    wait_paused_at(&c, Phase::Fence).await;
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/abort", &serde_json::json!({}))
        .await
        .unwrap();
    let s = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (s.controller.release.0, s.cluster.schema.0, s.cluster.fenced),
        (2, 2, false),
        "{s:?}"
    );

    upgrade_with_crashes(&c, &artifact).await;
    assert_on_release_3(c, viewers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_1_fleet_goes_through_release_2_to_release_3() {
    let next = next_binary();
    let event_ms = 45_000;
    let c = old_cluster(62, 1, event_ms).await;
    let viewers = spawn_viewers(&c, event_ms);
    let r3 = upload_next(&c, &next, "artifact-next").await;
    let r2 = c.fleet.upload_artifact(2).await.unwrap();

    // 1 → 3 directly: preflight names every node outside release 3's window
    // and changes nothing.
    let plan: Value = c
        .fleet
        .op
        .post(
            "/api/v1/upgrade/plan",
            &handover_core::api::UpgradeRequest::new(&r3, "wait"),
        )
        .await
        .unwrap();
    let refusal = plan["preflight_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(refusal.contains("migrates only from schemas [2]"), "{plan}");
    for g in 1..=GROUPS {
        for n in ["a", "b"] {
            assert!(
                refusal.contains(&format!("g{g}-{n} (schema 1)")),
                "{refusal}"
            );
        }
    }
    let before = c.fleet.op.status().await.unwrap();
    let start_r3 = handover::upgrade::start(
        &c.fleet.op,
        &handover_core::api::UpgradeRequest::new(&r3, "wait"),
    )
    .await;
    if start_r3.is_ok() {
        let s = c
            .fleet
            .wait_upgrade_over(Duration::from_secs(30))
            .await
            .unwrap();
        let up = s.upgrade.unwrap();
        let reason = format!("{:?}", up.status);
        assert!(reason.contains("preflight"), "{reason}");
        for g in 1..=GROUPS {
            for n in ["a", "b"] {
                assert!(reason.contains(&format!("g{g}-{n}")), "{reason}");
            }
        }
    }
    let after = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            after.cluster.epoch,
            after.cluster.schema,
            after.controller.release
        ),
        (
            before.cluster.epoch,
            before.cluster.schema,
            before.controller.release
        )
    );

    start(&c, &r2, &[]).await;
    wait_finalized(&c).await;

    upgrade_with_crashes(&c, &r3).await;
    assert_on_release_3(c, viewers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_release_3_meets_a_release_2_controller_and_is_fenced() {
    let next = next_binary();
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(&old_binary(), dir.path(), 63).unwrap();
    fleet.start_controller(2).await.unwrap();
    let group = handover_core::params::Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let i = fleet.add_node("g1-a", Role::Primary, "g1", 3);
    fleet.exe = next.clone();
    fleet.start_node(i).await.unwrap();
    fleet.exe = old_binary();
    let status = fleet.wait_nodes_registered().await.unwrap();
    let n = &status.nodes[0];
    assert_eq!(
        (n.node.release.0, n.grant_now.as_str()),
        (3, "fenced"),
        "{n:?}"
    );
    let said = serde_json::to_string(&n).unwrap();
    assert!(said.contains("node_newer_than_database"), "{said}");
    fleet.stop_all().await.unwrap();
}

/// A patch build of release 2: this binary with bytes appended (it runs the
/// same, and has another digest, as a rebuilt 2.0.1 would).
fn patch_binary(dir: &Path) -> PathBuf {
    let path = dir.join("handover-2.0.1");
    let mut bytes = std::fs::read(old_binary()).unwrap();
    bytes.extend_from_slice(b"\nhandover 2.0.1 patch build\n");
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_build_rolls_through_without_fence_or_deliver() {
    let event_ms = 25_000;
    let mut c = old_cluster(64, 2, event_ms).await;
    let viewers = spawn_viewers(&c, event_ms);
    let patch = patch_binary(&c.fleet.dir);
    let patch_sha = file_sha256(&patch).unwrap();
    let artifact = upload_next(&c, &patch, "artifact-patch").await;
    assert!(artifact.starts_with("r2-"), "{artifact}");
    let epoch = c.fleet.op.status().await.unwrap().cluster.epoch;
    start(&c, &artifact, &[]).await;
    let up = wait_finalized(&c).await;
    let phases: Vec<Phase> = up.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Preflight,
            Phase::Stage,
            Phase::Controller,
            Phase::Backups,
            Phase::Primaries,
            Phase::Finalize
        ]
    );
    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(status.cluster.epoch, epoch, "no fence");
    assert_eq!(
        status.controller.binary_sha256.as_deref(),
        Some(patch_sha.as_str())
    );
    for p in c.fleet.processes().await.unwrap() {
        assert_eq!(
            (p.release, p.sha256.as_str()),
            (2, patch_sha.as_str()),
            "{p:?}"
        );
    }
    let v = viewers.await.unwrap().unwrap();
    assert_eq!((v.failed_requests, v.segments_missed), (0, 0), "{v:?}");
    c.fleet.stop_nodes().await.unwrap();
    let r = c.fleet.check().await.unwrap();
    assert_eq!(
        (r.lost, r.duplicated, r.unexpected, r.queued, r.translated),
        (0, 0, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.stored, r.produced, "{r:?}");
    c.fleet.stop_all().await.unwrap();
}
