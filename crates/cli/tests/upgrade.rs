//! The upgrade end to end on real processes: a release-1 controller and
//! nodes under their supervisors, viewers throughout, the upgrade to
//! release 2, then the exactly-once check.

use handover::fleet::Fleet;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::params::Group;
use handover_core::upgrade::Status;
use handover_core::wire::Role;
use handover_store::{ChannelSpec, EventSpec};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const SEGMENT_MS: u32 = 1000;
const GROUPS: usize = 2;

fn now_ms() -> i64 {
    handover::client::now_ms()
}

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
    let event_start_ms = now_ms() + 2_000;
    let mut targets = Vec::new();
    for g in 1..=GROUPS {
        let group = Group {
            name: format!("g{g}"),
            primary: format!("g{g}-a"),
            backup: format!("g{g}-b"),
        };
        let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
        let channel = format!("ch{g}");
        let spec = ChannelSpec {
            name: channel.clone(),
            title: None,
            segment_ms: SEGMENT_MS,
            ladder: vec![],
        };
        let _: Value = fleet.op.post("/api/v1/channels", &spec).await.unwrap();
        let ev = EventSpec {
            channel: channel.clone(),
            group: group.name.clone(),
            start_ms: event_start_ms,
            duration_ms: event_ms,
        };
        let _: Value = fleet.op.post("/api/v1/events", &ev).await.unwrap();
        let a = fleet.add_node(&group.primary, Role::Primary, &group.name, 1);
        let b = fleet.add_node(&group.backup, Role::Backup, &group.name, 1);
        targets.push(ChannelTarget {
            channel,
            node_urls: vec![fleet.nodes[a].url(), fleet.nodes[b].url()],
        });
    }
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await.unwrap();
    }
    fleet.wait_nodes_registered().await.unwrap();
    Cluster {
        fleet,
        _dir: dir,
        targets,
        event_start_ms,
        artifact,
    }
}

/// Viewers on every channel from the first segment until the ENDLIST.
fn spawn_viewers(c: &Cluster, event_ms: u64) -> tokio::task::JoinHandle<ViewerReport> {
    let config = ViewerConfig {
        targets: c.targets.clone(),
        viewers_per_channel: 2,
        duration: Duration::from_millis(event_ms + 60_000),
        request_timeout: Duration::from_secs(5),
    };
    let start_at = c.event_start_ms + i64::from(SEGMENT_MS) + 300;
    tokio::spawn(async move {
        let wait = u64::try_from(start_at - now_ms()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let (_tx, rx) = tokio::sync::watch::channel(false);
        viewers::run(&config, rx).await.unwrap()
    })
}

async fn upgrade_with(subnet: u8, policy: &str, event_ms: u64) {
    let mut c = release_1_cluster(subnet, event_ms).await;
    let viewers = spawn_viewers(&c, event_ms);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let _ = handover::upgrade::start(&c.fleet.op, &c.artifact, policy)
        .await
        .unwrap();
    let s = c
        .fleet
        .wait_upgrade_over(Duration::from_secs(150))
        .await
        .unwrap();
    let up = s.upgrade.as_ref().unwrap();
    eprintln!("{}", handover::upgrade::render_status(&s));
    assert_eq!(
        up.status,
        Status::Finalized,
        "{}",
        handover::upgrade::render_status(&s)
    );
    let v = viewers.await.unwrap();
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
            (n.row.release.0, n.grant_now.as_str()),
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_release_1_to_2_waiting_for_events_loses_nothing() {
    upgrade_with(21, "wait", 25_000).await;
}
