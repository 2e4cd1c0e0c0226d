//! The SQLite store against real database files: idempotent batches,
//! translation on the redundant channel, and the migration 1 → 2.

use handover_core::params::Group;
use handover_core::record::{encode, v2::Kind, Observation};
use handover_core::wire::OutboxState;
use handover_core::{Grant, Release, Schema};
use handover_store::sqlite::SqliteStore;
use handover_store::{ChannelSpec, EventSpec, NodeRegistration, Store, StoreError};

async fn open(dir: &tempfile::TempDir, release: u32) -> SqliteStore {
    SqliteStore::open(
        &dir.path().join("db.sqlite"),
        Release(release),
        &dir.path().join("snapshots"),
    )
    .await
    .unwrap()
}

async fn seed(store: &SqliteStore) {
    store
        .create_channel(&ChannelSpec {
            name: "news".into(),
            title: None,
            segment_ms: 2000,
            ladder: vec![],
        })
        .await
        .unwrap();
    store
        .create_group(&Group {
            name: "g1".into(),
            primary: "n1".into(),
            backup: "n2".into(),
        })
        .await
        .unwrap();
    store
        .create_event(&EventSpec {
            channel: "news".into(),
            group: "g1".into(),
            start_ms: 1_795_000_000_000,
            duration_ms: 60_000,
        })
        .await
        .unwrap();
    store
        .register_node(&NodeRegistration {
            node_id: "n1".into(),
            credential: "c".into(),
            release: Release(1),
            schema: Schema(1),
            role: handover_core::wire::Role::Primary,
            group: "g1".into(),
            hls_url: "http://127.0.0.2:7000".into(),
            grant: Grant::Full,
            epoch: 1,
            outbox: OutboxState::default(),
            current_events: vec![],
            staged: vec![],
            now_ms: 0,
            binary_sha256: None,
        })
        .await
        .unwrap();
}

fn segments(
    schema: u32,
    channel_id: Option<i64>,
    seqs: std::ops::Range<u64>,
) -> Vec<serde_json::Value> {
    seqs.map(|s| {
        let o = Observation {
            kind: Kind::SegmentPublished,
            channel: "news".into(),
            channel_id,
            at_ms: 1_795_000_002_000 + s as i64 * 2000,
            media_seq: Some(s),
            duration_ms: Some(2000),
            viewers: None,
            event_id: None,
            message: None,
        };
        encode(Schema(schema), "n1", &o).unwrap()
    })
    .collect()
}

#[tokio::test]
async fn batches_are_idempotent_on_node_and_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 2).await;
    seed(&store).await;
    let batch = segments(2, Some(1), 0..10);
    let first = store.store_batch("n1", Schema(2), 1, &batch).await.unwrap();
    assert_eq!(
        (first.acked_through, first.stored, first.translated),
        (10, 10, 0)
    );
    let again = store.store_batch("n1", Schema(2), 1, &batch).await.unwrap();
    assert_eq!((again.acked_through, again.stored), (10, 0));
    let overlap = store
        .store_batch("n1", Schema(2), 6, &segments(2, Some(1), 5..15))
        .await
        .unwrap();
    assert_eq!((overlap.acked_through, overlap.stored), (15, 5));
    let rows = store.records("n1", 0, 100).await.unwrap();
    assert_eq!(rows.len(), 15);
    assert_eq!(rows[0].natural_key, "segment_published/news/0");
    assert_eq!(store.nodes().await.unwrap()[0].acked_through, 15);
}

#[tokio::test]
async fn redundant_channel_translates_release_1_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 2).await;
    seed(&store).await;
    let out = store
        .store_batch("n1", Schema(1), 1, &segments(1, None, 0..4))
        .await
        .unwrap();
    assert_eq!((out.stored, out.translated), (4, 4));
    let rows = store.records("n1", 0, 100).await.unwrap();
    assert!(rows.iter().all(|r| r.translated_from == Some(1)));
    assert_eq!(rows[3].natural_key, "segment_published/news/3");
}

#[tokio::test]
async fn a_bad_record_refuses_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 2).await;
    seed(&store).await;
    let mut batch = segments(1, None, 0..3);
    batch[2]["channel"] = serde_json::json!("nowhere");
    let err = store
        .store_batch("n1", Schema(1), 1, &batch)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Untranslatable { seq: 3, .. }),
        "{err}"
    );
    assert!(store.records("n1", 0, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn migration_1_to_2_translates_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir, 1).await;
        seed(&store).await;
        store
            .store_batch("n1", Schema(1), 1, &segments(1, None, 0..5))
            .await
            .unwrap();
        assert_eq!(store.cluster().await.unwrap().schema, Schema(1));
    }
    let store = open(&dir, 2).await;
    let cluster = store.cluster().await.unwrap();
    assert_eq!(cluster.schema, Schema(2));
    let rows = store.records("n1", 0, 100).await.unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows
        .iter()
        .all(|r| r.translated_from == Some(1) && r.kind == "segment_published"));
    let events = store.events().await.unwrap();
    assert_eq!(
        (
            events[0].channel.as_str(),
            events[0].start_ms,
            events[0].duration_ms
        ),
        ("news", 1_795_000_000_000, 60_000)
    );
    assert!(dir.path().join("snapshots/schema-1-0.db").exists());
    // The same records arriving again over the redundant channel are not duplicated.
    let again = store
        .store_batch("n1", Schema(1), 1, &segments(1, None, 0..5))
        .await
        .unwrap();
    assert_eq!(again.stored, 0);
    drop(store);
    let err = SqliteStore::open(
        &dir.path().join("db.sqlite"),
        Release(1),
        &dir.path().join("snapshots"),
    )
    .await
    .err()
    .unwrap();
    assert!(
        matches!(err, StoreError::SchemaAhead { db: 2, release: 1 }),
        "{err}"
    );
}

#[tokio::test]
async fn fence_bumps_the_epoch_and_unfence_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 2).await;
    let before = store.cluster().await.unwrap();
    let fenced = store.set_fence(true).await.unwrap();
    assert_eq!((fenced.epoch, fenced.fenced), (before.epoch + 1, true));
    let open_again = store.set_fence(false).await.unwrap();
    assert_eq!(
        (open_again.epoch, open_again.fenced),
        (before.epoch + 1, false)
    );
}

#[tokio::test]
async fn release_1_rejects_what_it_cannot_represent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, 1).await;
    let err = store
        .create_channel(&ChannelSpec {
            name: "x".into(),
            title: None,
            segment_ms: 1500,
            ladder: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    seed(&store).await;
    assert!(matches!(
        store
            .create_channel(&ChannelSpec {
                name: "news".into(),
                title: None,
                segment_ms: 2000,
                ladder: vec![]
            })
            .await,
        Err(StoreError::Exists { .. })
    ));
}
