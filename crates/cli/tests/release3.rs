//! Process tests of release 3's content (schema 3), built only with
//! `--features next-release` (the binary that carries release 3): a release-3
//! group with its own channel window and `hls_requests` in heartbeats, and a
//! release-2 fleet delivering to a release-3 controller that migrated its
//! database 2 → 3.
#![cfg(feature = "next-release")]

use handover::check::CheckReport;
use handover::fleet::Fleet;
use handover_core::api::{ChannelSpec, EventSpec};
use handover_core::params::Group;
use handover_core::wire::Role;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const SEGMENT_MS: u32 = 1000;
/// The channel window of the release-3 test: more than release 2's 6.
const WINDOW_SEGMENTS: u32 = 10;

fn now_ms() -> i64 {
    handover::client::now_ms()
}

async fn sleep_until(at_ms: i64) {
    let wait = u64::try_from(at_ms - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

struct Setup {
    fleet: Fleet,
    _dir: tempfile::TempDir,
    event_start_ms: i64,
    event_end_ms: i64,
}

/// A controller of `controller_release`, group `g1` of two nodes of
/// `node_release`, channel `ch1` (with `window_segments`), one event soon.
async fn setup(
    subnet: u8,
    controller_release: u32,
    node_release: u32,
    window_segments: Option<u32>,
    event_ms: u64,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new(
        &PathBuf::from(env!("CARGO_BIN_EXE_handover")),
        dir.path(),
        subnet,
    )
    .unwrap();
    fleet.supervised = false;
    fleet.start_controller(controller_release).await.unwrap();
    let group = Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let spec = ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: SEGMENT_MS,
        ladder: vec![],
        window_segments,
    };
    let created: ChannelSpec = fleet.op.post("/api/v1/channels", &spec).await.unwrap();
    assert_eq!(
        created.window_segments,
        window_segments.or((controller_release >= 3).then_some(6))
    );
    let event_start_ms = now_ms() + 2_000;
    let ev = EventSpec {
        channel: "ch1".into(),
        group: "g1".into(),
        start_ms: event_start_ms,
        duration_ms: event_ms,
    };
    let _: Value = fleet.op.post("/api/v1/events", &ev).await.unwrap();
    fleet.add_node("g1-a", Role::Primary, "g1", node_release);
    fleet.add_node("g1-b", Role::Backup, "g1", node_release);
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await.unwrap();
    }
    fleet.wait_nodes_registered().await.unwrap();
    Setup {
        fleet,
        _dir: dir,
        event_start_ms,
        event_end_ms: event_start_ms + i64::try_from(event_ms).unwrap(),
    }
}

fn assert_exact(r: &CheckReport) {
    assert!(r.produced > 0, "{r:?}");
    assert_eq!((r.lost, r.duplicated, r.unexpected), (0, 0, 0), "{r:?}");
    assert_eq!((r.queued, r.stored), (0, r.produced), "{r:?}");
}

async fn playlist_segments(node_url: &str) -> usize {
    let body = reqwest::get(format!("{node_url}/hls/ch1/index.m3u8"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines().filter(|l| l.ends_with(".ts")).count()
}

/// Alerts the database holds, over every node.
async fn count_alerts(fleet: &Fleet) -> usize {
    let mut n = 0;
    for node in &fleet.nodes {
        let rows: Vec<Value> = fleet
            .op
            .get(&format!("/api/v1/records?node={}", node.id))
            .await
            .unwrap();
        n += rows.iter().filter(|r| r["kind"] == "alert").count();
    }
    n
}

async fn node_status(url: &str) -> Value {
    reqwest::get(format!("{url}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_node_grant(url: &str, grant: &str) {
    for _ in 0..200 {
        if node_status(url).await["grant"] == grant {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {url} never reported grant {grant}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_3_group_lists_its_channel_window_and_reports_hls_requests() {
    let mut s = setup(90, 3, 3, Some(WINDOW_SEGMENTS), 14_000).await;
    // Eight segments done: release 2 would list 6, this channel lists all 8.
    sleep_until(s.event_start_ms + 8 * i64::from(SEGMENT_MS) + 400).await;
    for n in &s.fleet.nodes {
        let listed = playlist_segments(&n.url()).await;
        assert!(
            (8..=usize::try_from(WINDOW_SEGMENTS).unwrap()).contains(&listed),
            "{} lists {listed} segments",
            n.id
        );
    }
    // Heartbeats (every lease / 3) bring the requests to the controller.
    let mut reported = None;
    for _ in 0..100 {
        let status = s.fleet.op.status().await.unwrap();
        reported = status
            .nodes
            .iter()
            .map(|n| n.hls_requests)
            .collect::<Option<Vec<u64>>>();
        if reported.as_ref().is_some_and(|r| r.iter().all(|&n| n > 0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reported.as_ref().is_some_and(|r| r.iter().all(|&n| n > 0)),
        "{reported:?}"
    );
    // A fence makes every node write its alert (severity `warning` in
    // schema 3); after the unfence they land with everything else.
    let _: Value = s
        .fleet
        .op
        .post("/api/v1/fence", &serde_json::json!({}))
        .await
        .unwrap();
    for n in &s.fleet.nodes {
        wait_node_grant(&n.url(), "fenced").await;
    }
    let _: Value = s
        .fleet
        .op
        .post("/api/v1/unfence", &serde_json::json!({}))
        .await
        .unwrap();
    for n in &s.fleet.nodes {
        wait_node_grant(&n.url(), "full").await;
    }
    sleep_until(s.event_end_ms + 1_500).await;
    s.fleet.stop_nodes().await.unwrap();
    let r = s.fleet.check().await.unwrap();
    assert_exact(&r);
    assert_eq!(r.translated, 0, "{r:?}");
    let alerts = count_alerts(&s.fleet).await;
    assert_eq!(alerts, 2, "one fence alert per node");
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_nodes_deliver_to_a_release_3_controller_and_their_records_land_translated() {
    let mut s = setup(91, 2, 2, None, 14_000).await;
    sleep_until(s.event_start_ms + 2_500).await;
    // Replace the controller with release 3 on the same database: it migrates 2 -> 3.
    s.fleet
        .controller
        .take()
        .unwrap()
        .terminate()
        .await
        .unwrap();
    s.fleet.start_controller(3).await.unwrap();
    for n in &s.fleet.nodes {
        wait_node_grant(&n.url(), "deliver").await;
    }
    let status = s.fleet.op.status().await.unwrap();
    assert_eq!(status.controller.schema.0, 3);
    let channels: Vec<ChannelSpec> = s.fleet.op.get("/api/v1/channels").await.unwrap();
    assert_eq!(channels[0].window_segments, Some(6));
    // Release-2 nodes keep serving release 2's window from their cache.
    for n in &s.fleet.nodes {
        assert!(playlist_segments(&n.url()).await <= 6);
    }
    sleep_until(s.event_end_ms + 1_500).await;
    s.fleet.stop_nodes().await.unwrap();
    let r = s.fleet.check().await.unwrap();
    assert_exact(&r);
    assert_eq!(
        r.translated, r.stored,
        "every release-2 record is stored translated (migrated or delivered): {r:?}"
    );
    s.fleet.stop_all().await.unwrap();
}
