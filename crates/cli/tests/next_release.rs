//! Upgrades across two separately built binaries: the fleet runs this test's
//! binary (releases 1 and 2) and is upgraded to release 3, which only the
//! binary built with `--features next-release` carries. Everything the old
//! fleet knows of release 3 comes from the artifact's manifest, written from
//! the new binary itself.
//!
//! The new binary is built once per test run into `target/next-release`
//! (or taken from `HANDOVER_NEXT_BINARY`, as `.ci/run` gives it), with
//! `cargo build`: as a shipped binary, without the test hooks.

mod common;

use common::*;
use handover::fleet::file_sha256;
use handover_core::upgrade::Phase;
use handover_core::wire::Role;
use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const GROUPS: usize = 2;
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

/// A cluster of the old binary at `release`: controller and `GROUPS` groups
/// of a primary and a backup, one channel each, one event of `event_ms`.
async fn old_cluster(name: &str, release: u32, event_ms: u64) -> Cluster {
    cluster(
        name,
        Options {
            groups: GROUPS,
            event_ms,
            release,
            viewer_slack_ms: 120_000,
            ..Options::default()
        },
    )
    .await
}

/// An artifact of `binary` (its newest release), made by the old CLI code
/// and uploaded; returns its id.
async fn upload_next(c: &Cluster, binary: &Path, name: &str) -> String {
    let out = c.fleet.dir.join(name);
    let m = handover::artifact::create(binary, None, &out).unwrap();
    handover::artifact::upload(&c.fleet.op, &out).await.unwrap();
    m.id()
}

/// SIGKILL of a worker; its supervisor starts the active release again.
fn sigkill(pid: nix::unistd::Pid) {
    kill(pid, Signal::SIGKILL).unwrap();
}

/// Upgrades `c` to `artifact` (policy `wait`), pausing at deliver to SIGKILL
/// the controller's worker and at backups to SIGKILL a primary's worker,
/// then waits for the end.
async fn upgrade_with_crashes(c: &Cluster, artifact: &str) {
    start_upgrade(&c.fleet, artifact, "wait", &["deliver", "backups"]).await;
    wait_paused_at(c, Phase::Deliver).await;
    sigkill(c.fleet.controller_worker_pid().await.unwrap());
    resume_when_back(&c.fleet).await;
    wait_paused_at(c, Phase::Backups).await;
    sigkill(c.fleet.node_worker_pid("g1-a").await.unwrap());
    resume_when_back(&c.fleet).await;
    wait_finalized(c).await;
}

/// What happens before the upgrade to release 3 in a [`Case`].
#[derive(Clone, Copy)]
enum Before {
    /// Start the upgrade to release 3, pause at fence and abort: release 2
    /// goes on, on an untouched database.
    AbortAtFence,
    /// 1 → 3 refused by preflight, changing nothing; then 1 → 2.
    RefusedThenRelease2,
}

/// One upgrade of an old fleet to release 3 of the separate binary.
struct Case {
    name: &'static str,
    release: u32,
    event_ms: u64,
    before: Before,
}

/// Runs `case`: the old fleet at its release with viewers, what comes
/// `before`, then the upgrade to release 3 with crashes, and what every
/// upgrade to release 3 must end with: viewers undisturbed, the cluster on
/// release 3 and schema 3, every process (supervisors included) running the
/// new binary, every record stored exactly once, older records translated.
async fn run(case: Case) {
    let next = next_binary();
    let c = old_cluster(case.name, case.release, case.event_ms).await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    let r3 = upload_next(&c, &next, "artifact-next").await;
    assert!(r3.starts_with("r3-"), "{r3}");
    match case.before {
        Before::AbortAtFence => abort_at_fence(&c, &r3).await,
        Before::RefusedThenRelease2 => {
            let r2 = c.fleet.upload_artifact(2).await.unwrap();
            refused_by_preflight(&c, &r3).await;
            start_upgrade(&c.fleet, &r2, "wait", &[]).await;
            wait_finalized(&c).await;
        }
    }
    upgrade_with_crashes(&c, &r3).await;
    let next_sha = file_sha256(&next).unwrap();
    let processes = c.fleet.processes().await.unwrap();
    assert_eq!(processes.len(), 2 * (1 + 2 * GROUPS), "{processes:?}");
    for p in &processes {
        assert_eq!(
            (p.release, p.sha256.as_str()),
            (3, next_sha.as_str()),
            "{p:?}"
        );
    }
    // A primary's worker was SIGKILLed at backups: a viewer whose request
    // was in flight on it sees that request fail and fails over to the
    // backup, as a player does (CI on PostgreSQL once caught one).
    finish(c, viewers, Viewing::NodeKilled, 3).await;
}

async fn abort_at_fence(c: &Cluster, r3: &str) {
    start_upgrade(&c.fleet, r3, "wait", &["fence"]).await;
    wait_paused_at(c, Phase::Fence).await;
    post_empty(&c.fleet, "/api/v1/upgrade/abort").await;
    let s = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (s.controller.release.0, s.cluster.schema.0, s.cluster.fenced),
        (2, 2, false),
        "{s:?}"
    );
}

/// 1 → 3 directly: preflight names every node outside release 3's window
/// and changes nothing.
async fn refused_by_preflight(c: &Cluster, r3: &str) {
    let plan: Value = c
        .fleet
        .op
        .post(
            "/api/v1/upgrade/plan",
            &handover_core::api::UpgradeRequest::new(r3, "wait"),
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
        &handover_core::api::UpgradeRequest::new(r3, "wait"),
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_fleet_upgrades_to_release_3_of_a_separate_binary() {
    run(Case {
        name: "release 2 to 3",
        release: 2,
        event_ms: 30_000,
        before: Before::AbortAtFence,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_1_fleet_goes_through_release_2_to_release_3() {
    run(Case {
        name: "release 1 through 2 to 3",
        release: 1,
        event_ms: 45_000,
        before: Before::RefusedThenRelease2,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_release_3_meets_a_release_2_controller_and_is_fenced() {
    let next = next_binary();
    let site = Site::new("release-3 node, release-2 controller");
    let mut fleet = site.fleet_in(&old_binary(), site.path());
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

/// A build without the `test-hooks` feature does not read the test hooks'
/// variables at all. The next-release binary is built as a shipped one is
/// (`cargo build`: no dev-dependency, so no hooks; `.ci/run` builds it so
/// and `HANDOVER_NEXT_BINARY` must be such a build), while this test
/// binary has them (`cargo test`): `migrate_fail` makes its controllers
/// refuse to commit a migration and `exit_at_start` kills its node workers
/// at start (faults.rs). The next binary's controller migrates and its node
/// worker serves under the same variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_without_test_hooks_ignores_their_variables() {
    let next = next_binary();
    let site = Site::new("a build without test hooks");
    let mut fleet = site.fleet_in(&old_binary(), site.path());
    // Bare controllers: a supervisor's state.json would keep release 2.
    fleet.supervised = false;
    fleet.start_controller(2).await.unwrap();
    fleet.stop_all().await.unwrap();
    fleet.exe = next.clone();
    fleet.controller_env = vec![("HANDOVER_TEST_FAULT".into(), "migrate_fail".into())];
    fleet.start_controller(3).await.unwrap();
    let status = fleet.op.status().await.unwrap();
    assert_eq!(status.cluster.schema.0, 3, "migrated despite migrate_fail");
    let group = handover_core::params::Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let i = fleet.add_node("g1-a", Role::Primary, "g1", 3);
    fleet.nodes[i].env = vec![("HANDOVER_TEST_FAULT".into(), "exit_at_start".into())];
    fleet.supervised = true;
    fleet.start_node(i).await.unwrap();
    let status = fleet.wait_nodes_registered().await.unwrap();
    assert_eq!(status.nodes[0].node.release.0, 3, "{:?}", status.nodes[0]);
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
    let name = "patch build";
    let mut c = old_cluster(name, 2, 25_000).await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    let patch = patch_binary(&c.fleet.dir);
    let patch_sha = file_sha256(&patch).unwrap();
    let artifact = upload_next(&c, &patch, "artifact-patch").await;
    assert!(artifact.starts_with("r2-"), "{artifact}");
    let epoch = c.fleet.op.status().await.unwrap().cluster.epoch;
    start_upgrade(&c.fleet, &artifact, "wait", &[]).await;
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
    judge_viewers(name, &v, Viewing::Clean);
    let r = stop_and_check(&mut c.fleet, name).await;
    assert_eq!(r.translated, 0, "{name}: {r:?}");
    c.fleet.stop_all().await.unwrap();
}
