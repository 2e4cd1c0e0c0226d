//! Process tests of release 3's content (schema 3), built only with
//! `--features next-release` (the binary that carries release 3): a release-3
//! group with its own channel window and `hls_requests` in heartbeats, and a
//! release-2 fleet delivering to a release-3 controller that migrated its
//! database 2 → 3.
#![cfg(feature = "next-release")]

mod common;

use common::*;
use handover::fleet::Fleet;
use handover_core::api::ChannelSpec;
use serde_json::Value;
use std::time::Duration;

/// The channel window of the release-3 test: more than release 2's 6.
const WINDOW_SEGMENTS: u32 = 10;

/// A controller of `controller_release` (bare processes), group `g1` of two
/// nodes of `node_release`, started, channel `ch1` (with `window_segments`),
/// one event soon.
async fn setup(
    name: &str,
    controller_release: u32,
    node_release: u32,
    window_segments: Option<u32>,
    event_ms: u64,
) -> Setup {
    let mut s = common::setup(
        name,
        SetupSpec {
            controller_release,
            node_release,
            event_ms,
            supervised: false,
            window_segments,
        },
    )
    .await;
    let created: ChannelSpec = serde_json::from_value(s.channel.clone()).unwrap();
    assert_eq!(
        created.window_segments,
        window_segments.or((controller_release >= 3).then_some(6))
    );
    start_nodes(&mut s.fleet).await;
    s
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_3_group_lists_its_channel_window_and_reports_hls_requests() {
    let mut s = setup("release 3 group", 3, 3, Some(WINDOW_SEGMENTS), 14_000).await;
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
    set_fence(&s.fleet, true).await;
    set_fence(&s.fleet, false).await;
    sleep_until(s.event_end_ms() + 1_500).await;
    let r = stop_and_check(&mut s.fleet, &s.name).await;
    assert_eq!(r.translated, 0, "{r:?}");
    let alerts = count_alerts(&s.fleet).await;
    assert_eq!(alerts, 2, "one fence alert per node");
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_nodes_deliver_to_a_release_3_controller_and_their_records_land_translated() {
    let mut s = setup("release 2 nodes, release 3 controller", 2, 2, None, 14_000).await;
    sleep_until(s.event_start_ms + 2_500).await;
    // Replace the controller with release 3 on the same database: it migrates 2 -> 3.
    replace_controller(&mut s.fleet, 3, "deliver").await;
    let status = s.fleet.op.status().await.unwrap();
    assert_eq!(status.controller.schema.0, 3);
    let channels: Vec<ChannelSpec> = s.fleet.op.get("/api/v1/channels").await.unwrap();
    assert_eq!(channels[0].window_segments, Some(6));
    // Release-2 nodes keep serving release 2's window from their cache.
    for n in &s.fleet.nodes {
        assert!(playlist_segments(&n.url()).await <= 6);
    }
    sleep_until(s.event_end_ms() + 1_500).await;
    let r = stop_and_check(&mut s.fleet, &s.name).await;
    assert_eq!(
        r.translated, r.stored,
        "every release-2 record is stored translated (migrated or delivered): {r:?}"
    );
    s.fleet.stop_all().await.unwrap();
}
