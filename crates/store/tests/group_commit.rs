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
