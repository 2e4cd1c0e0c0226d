//! The upgrade end to end on real processes: a release-1 controller and
//! nodes under their supervisors, viewers throughout, the upgrade to
//! release 2, then the exactly-once check.

use handover::fleet::Fleet;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::upgrade::{Phase, Status, Upgrade};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const SEGMENT_MS: u32 = 1000;
const GROUPS: u64 = 2;

struct Cluster {
    fleet: Fleet,
    _dir: tempfile::TempDir,
    targets: Vec<ChannelTarget>,
    event_start_ms: i64,
    artifact: String,
}

/// A release-1 cluster of `GROUPS` groups, one channel each, events of `event_ms`.
async fn release_1_cluster(subnet: u8, event_ms: u64) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(
        &PathBuf::from(env!("CARGO_BIN_EXE_handover")),
        dir.path(),
        subnet,
    )
    .unwrap();
    fleet.start_controller(1).await.unwrap();
    // Uploaded first, so the events below are still live when the upgrade runs.
    let artifact = fleet.upload_artifact(2).await.unwrap();
    let (targets, event_start_ms) = fleet
        .start_live_groups(GROUPS, 1, SEGMENT_MS, event_ms)
        .await
        .unwrap();
    Cluster {
        fleet,
        _dir: dir,
        targets,
        event_start_ms,
        artifact,
    }
}

/// Viewers on every channel from the first segment until the ENDLIST.
fn spawn_viewers(
    c: &Cluster,
    event_ms: u64,
) -> tokio::task::JoinHandle<anyhow::Result<ViewerReport>> {
    let config = ViewerConfig {
        targets: c.targets.clone(),
        viewers_per_channel: 2,
        duration: Duration::from_millis(event_ms + 60_000),
        request_timeout: Duration::from_secs(5),
        steady: None,
    };
    viewers::spawn_at(config, c.event_start_ms + i64::from(SEGMENT_MS) + 300)
}

async fn start_upgrade(c: &Cluster, policy: &str, pause_at: &[&str]) {
    let mut req = handover_core::api::UpgradeRequest::new(&c.artifact, policy);
    req.pause_at = pause_at
        .iter()
        .map(|p| handover_core::upgrade::Phase::parse(p).unwrap())
        .collect();
    let _ = handover::upgrade::start(&c.fleet.op, &req).await.unwrap();
}

/// Waits for the upgrade to pause at `phase` (bounded).
async fn wait_paused_at(c: &Cluster, phase: Phase) {
    c.fleet
        .wait_paused_at(phase, Duration::from_secs(60))
        .await
        .unwrap();
}

/// SIGKILL the controller (supervisor and worker) and start it again.
async fn crash_controller(c: &mut Cluster) {
    c.fleet.controller.take().unwrap().kill().await.unwrap();
    // The supervisor's own state decides the release it runs now.
    c.fleet.start_controller(1).await.unwrap();
}

/// Waits for the end and asserts what the issue asks of every upgrade.
async fn finish(
    mut c: Cluster,
    viewers: tokio::task::JoinHandle<anyhow::Result<ViewerReport>>,
) -> Upgrade {
    let s = c
        .fleet
        .wait_upgrade_over(Duration::from_secs(150))
        .await
        .unwrap();
    let up = s.upgrade.clone().unwrap();
    eprintln!("{}", handover::upgrade::render_status(&s));
    assert_eq!(
        up.status,
        Status::Finalized,
        "{}",
        handover::upgrade::render_status(&s)
    );
    let v = viewers.await.unwrap().unwrap();
    assert_eq!(v.failed_requests, 0, "{v:?}");
    assert_eq!(v.segments_missed, 0, "{v:?}");
    assert_eq!(v.ended_streams, v.viewers, "{v:?}");

    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            status.controller.release.0,
            status.cluster.release.0,
            status.cluster.schema.0
        ),
        (2, 2, 2)
    );
    for n in &status.nodes {
        assert_eq!(
            (n.node.release.0, n.grant_now.as_str()),
            (2, "full"),
            "{n:?}"
        );
    }
    c.fleet.stop_nodes().await.unwrap();
    let r = c.fleet.check().await.unwrap();
    eprintln!("{v:?}\n{r:?}");
    assert_eq!(
        (r.lost, r.duplicated, r.unexpected, r.queued),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.stored, r.produced, "{r:?}");
    assert!(
        r.translated > 0,
        "records of release-1 nodes land translated: {r:?}"
    );
    assert!(
        r.translated < r.stored,
        "release-2 nodes write natively after their switch: {r:?}"
    );
    c.fleet.stop_all().await.unwrap();
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_wait_switches_primaries_after_their_events() {
    let c = release_1_cluster(21, 22_000).await;
    let viewers = spawn_viewers(&c, 22_000);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    start_upgrade(&c, "wait", &[]).await;
    let up = finish(c, viewers).await;
    assert!(
        up.waiting_for_operations_ms > 0,
        "primaries waited for their events: {up:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_failover_switches_primaries_mid_event() {
    let c = release_1_cluster(22, 22_000).await;
    let viewers = spawn_viewers(&c, 22_000);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    start_upgrade(&c, "failover", &[]).await;
    finish(c, viewers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_deadline_fails_over_after_the_deadline() {
    let c = release_1_cluster(23, 22_000).await;
    let viewers = spawn_viewers(&c, 22_000);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    start_upgrade(&c, "deadline=3000", &[]).await;
    let up = finish(c, viewers).await;
    assert!(up.waiting_for_operations_ms > 0, "{up:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_deliver_phase_resumes_and_loses_nothing() {
    let mut c = release_1_cluster(24, 20_000).await;
    let viewers = spawn_viewers(&c, 20_000);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "wait", &["deliver"]).await;
    wait_paused_at(&c, Phase::Deliver).await;
    crash_controller(&mut c).await;
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/resume", &serde_json::json!({}))
        .await
        .unwrap();
    finish(c, viewers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_backups_phase_resumes_and_loses_nothing() {
    let mut c = release_1_cluster(25, 20_000).await;
    let viewers = spawn_viewers(&c, 20_000);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c, "wait", &["backups"]).await;
    wait_paused_at(&c, Phase::Backups).await;
    crash_controller(&mut c).await;
    let _: Value = c
        .fleet
        .op
        .post("/api/v1/upgrade/resume", &serde_json::json!({}))
        .await
        .unwrap();
    finish(c, viewers).await;
}
