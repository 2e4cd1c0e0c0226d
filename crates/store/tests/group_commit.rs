//! Registrations and heartbeats arriving together are committed together
//! (one transaction for a burst), each answered only after its commit; one
//! bad registration fails only its own hello.

use handover_core::wire::{OutboxState, Role};
use handover_core::{Grant, Release, Schema};
use handover_store::NodeRegistration;
use std::sync::Arc;

mod support;

fn registration(node: &str, epoch: u64) -> NodeRegistration {
    NodeRegistration {
        node_id: node.into(),
        release: Release(2),
        schema: Schema(2),
        role: Role::Primary,
        group: "g1".into(),
        hls_url: "http://127.0.0.2:7000".into(),
        grant: Grant::Full,
        epoch,
        outbox: OutboxState::default(),
        current_events: vec![],
        staged: vec![],
        now_ms: 1,
        binary_sha256: None,
        supervisor_sha256: None,
    }
}

on_both! {
async fn a_burst_of_registrations_is_stored_and_one_bad_row_fails_alone(db) {
    let store: Arc<dyn handover_store::Store> = Arc::from(db.open(2).await);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..300u64 {
        let store = store.clone();
        // Node 150's epoch does not fit a 64-bit signed integer: its row fails.
        let epoch = if k == 150 { u64::MAX } else { 1 };
        tasks.spawn(async move {
            let r = store
                .register_node(&registration(&format!("n{k}"), epoch))
                .await;
            (k, r.is_ok())
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (k, ok) = r.unwrap();
        assert_eq!(ok, k != 150, "registration of n{k}");
    }
    let nodes = store.nodes().await.unwrap();
    assert_eq!(nodes.len(), 299);
    assert!(nodes.iter().all(|n| n.node_id != "n150"));
    for k in [0u64, 149, 151, 299] {
        let row = nodes.iter().find(|n| n.node_id == format!("n{k}"));
        assert_eq!(row.map(|n| n.epoch), Some(1), "n{k}");
    }
}
}

on_both! {
/// Heartbeats share transactions like hellos: a burst from 300 nodes is
/// stored whole, each answered after its commit, and a heartbeat of a node
/// that is not registered changes nothing.
async fn a_burst_of_heartbeats_is_stored(db) {
    use handover_core::wire::Heartbeat;
    let store: Arc<dyn handover_store::Store> = Arc::from(db.open(2).await);
    for k in 0..300u64 {
        store
            .register_node(&registration(&format!("n{k}"), 1))
            .await
            .unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..301u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let hb = Heartbeat {
                v: 1,
                node_id: format!("n{k}"),
                epoch: 2,
                outbox: OutboxState {
                    next_seq: k + 10,
                    oldest_unacked_seq: Some(k + 1),
                    count: 9,
                },
                current_events: vec![],
                staged: vec![],
                hls_requests: None,
            };
            store
                .heartbeat(&format!("n{k}"), &hb, Grant::Deliver, 1_000 + k as i64)
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let nodes = store.nodes().await.unwrap();
    assert_eq!(nodes.len(), 300, "n300 was never registered");
    for n in &nodes {
        let k: u64 = n.node_id[1..].parse().unwrap();
        assert_eq!(n.outbox.next_seq, k + 10, "{}", n.node_id);
        assert_eq!(n.grant, Grant::Deliver, "{}", n.node_id);
        assert_eq!(n.epoch, 2, "{}", n.node_id);
    }
}
}

/// `count` schema-2 segment records of `node` on channel `channel_id`
/// (named `channel`), media sequences `from` onwards.
fn segments(
    node: &str,
    channel: &str,
    channel_id: i64,
    from: u64,
    count: u64,
) -> Vec<serde_json::Value> {
    use handover_core::record::{encode, v2::Kind, Observation};
    (from..from + count)
        .map(|s| {
            let o = Observation {
                kind: Kind::SegmentPublished,
                channel: channel.into(),
                channel_id: Some(channel_id),
                at_ms: 1_795_000_002_000 + s as i64 * 2000,
                media_seq: Some(s),
                duration_ms: Some(2000),
                viewers: None,
                event_id: None,
                message: None,
                severity: None,
            };
            encode(Schema(2), node, &o).unwrap()
        })
        .collect()
}

/// Creates channel `name`; a fresh database numbers its channels from 1
/// in the order they were made.
async fn channel(store: &dyn handover_store::Store, name: &str) {
    store
        .create_channel(&handover_core::api::ChannelSpec {
            name: name.into(),
            title: None,
            segment_ms: 2000,
            ladder: vec![],
            window_segments: None,
        })
        .await
        .unwrap();
}

on_both! {
/// Batches arriving together share a transaction, written in a few
/// statements whatever their number: 20 nodes each send three batches at
/// once, the second overlapping the first and the third repeating it, and
/// every record is stored once and counted once (by the batch that stored
/// it), every node acknowledged through its last. A batch naming a channel
/// made after the store decoded its first batch is stored (the store's
/// channels are read again), and one naming no channel fails alone.
async fn a_burst_of_batches_stores_every_record_once(db) {
    let store: Arc<dyn handover_store::Store> = Arc::from(db.open(2).await);
    channel(&*store, "news").await;
    for k in 0..20u64 {
        store
            .register_node(&registration(&format!("n{k}"), 1))
            .await
            .unwrap();
    }
    // Decoded with the channels as they are now ("news" only).
    let first = store
        .store_batch("n0", Schema(2), 1, &segments("n0", "news", 1, 0, 1), 1)
        .await
        .unwrap();
    assert_eq!(first.stored, 1);
    channel(&*store, "sport").await;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..20u64 {
        let node = format!("n{k}");
        // (n0's first record is stored already.)
        for (first_seq, count) in [(1, 50), (26, 50), (1, 50)] {
            let (store, node) = (store.clone(), node.clone());
            tasks.spawn(async move {
                let batch = segments(&node, "news", 1, first_seq, count);
                let out = store
                    .store_batch(&node, Schema(2), first_seq, &batch, 1)
                    .await;
                (node, out)
            });
        }
    }
    let (store2, late) = (store.clone(), segments("n1", "sport", 2, 1000, 5));
    tasks.spawn(async move { ("n1".to_owned(), store2.store_batch("n1", Schema(2), 1000, &late, 1).await) });
    let (store3, lost) = (store.clone(), segments("n2", "nowhere", 3, 2000, 5));
    tasks.spawn(async move { ("n2-lost".to_owned(), store3.store_batch("n2", Schema(2), 2000, &lost, 1).await) });
    let mut stored = std::collections::HashMap::<String, u64>::new();
    while let Some(r) = tasks.join_next().await {
        let (node, out) = r.unwrap();
        if node == "n2-lost" {
            let err = out.unwrap_err();
            assert!(
                matches!(err, handover_store::StoreError::Untranslatable { seq: 2000, .. }),
                "{err}"
            );
            continue;
        }
        *stored.entry(node).or_default() += out.unwrap().stored;
    }
    for k in 0..20u64 {
        let node = format!("n{k}");
        let rows = store.records(&node, 0, 1_000).await.unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        let mut want: Vec<u64> = (1..=75).collect();
        if k == 1 {
            want.extend(1000..1005);
        }
        assert_eq!(seqs, want, "{node}'s records");
        let counted = stored[&node] + u64::from(k == 0);
        assert_eq!(counted, want.len() as u64, "{node}'s records counted as stored");
    }
    let nodes = store.nodes().await.unwrap();
    for n in &nodes {
        let want = match n.node_id.as_str() {
            "n1" => 1004,
            _ => 75,
        };
        assert_eq!(n.acked_through, want, "{}", n.node_id);
    }
}
}
