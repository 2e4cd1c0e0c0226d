//! The store on both backends (a SQLite file, a PostgreSQL schema of the
//! test's own): idempotent batches, translation on the redundant channel,
//! and the migrations 1 → 2 and 2 → 3. Each test runs on each backend
//! ([`on_both!`]: `name::sqlite`, `name::postgres`).

mod support;

use handover_core::api::{ChannelSpec, EventSpec};
use handover_core::identity::SecretDigest;
use handover_core::params::{events_for_group, Group};
use handover_core::record::{encode, v2::Kind, v3::Severity, Observation};
use handover_core::wire::OutboxState;
use handover_core::{Grant, ProtocolRange, Release, ReleaseInfo, Schema};
use handover_store::{NodeRegistration, Store, StoreError};
use support::{Backend, Db};

/// `release` refuses the store `db`, which is at the newer schema `schema`.
async fn assert_schema_ahead(db: &Db, release: u32, schema: u32) {
    let err = db.try_open(release).await.err().unwrap();
    assert!(
        matches!(err, StoreError::SchemaAhead { db: d, release: r } if (d, r) == (schema, release)),
        "{err}"
    );
}

/// A release-1 store in `db`, [`seed`]ed, holding `count` segment
/// records of node `n1`.
async fn release_1_with_segments(db: &Db, count: u64) -> Box<dyn Store> {
    let store = db.open(1).await;
    seed(&*store).await;
    store
        .store_batch("n1", Schema(1), 1, &segments(1, None, 0..count), 1)
        .await
        .unwrap();
    store
}

async fn seed(store: &dyn Store) {
    store
        .create_channel(&ChannelSpec {
            name: "news".into(),
            title: None,
            segment_ms: 2000,
            ladder: vec![],
            window_segments: None,
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
            supervisor_sha256: None,
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
            severity: None,
        };
        encode(Schema(schema), "n1", &o).unwrap()
    })
    .collect()
}

on_both! {
    async fn batches_are_idempotent_on_node_and_seq(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        let batch = segments(2, Some(1), 0..10);
        let first = store.store_batch("n1", Schema(2), 1, &batch, 1).await.unwrap();
        assert_eq!(
            (first.acked_through, first.stored, first.translated),
            (10, 10, 0)
        );
        let again = store.store_batch("n1", Schema(2), 1, &batch, 1).await.unwrap();
        assert_eq!((again.acked_through, again.stored), (10, 0));
        let overlap = store
            .store_batch("n1", Schema(2), 6, &segments(2, Some(1), 5..15), 1)
            .await
            .unwrap();
        assert_eq!((overlap.acked_through, overlap.stored), (15, 5));
        let rows = store.records("n1", 0, 100).await.unwrap();
        assert_eq!(rows.len(), 15);
        assert_eq!(rows[0].natural_key, "segment_published/news/0");
        assert_eq!(store.nodes().await.unwrap()[0].acked_through, 15);
    }
}

on_both! {
    async fn redundant_channel_translates_release_1_records(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        let out = store
            .store_batch("n1", Schema(1), 1, &segments(1, None, 0..4), 1)
            .await
            .unwrap();
        assert_eq!((out.stored, out.translated), (4, 4));
        let rows = store.records("n1", 0, 100).await.unwrap();
        assert!(rows.iter().all(|r| r.translated_from == Some(1)));
        assert_eq!(rows[3].natural_key, "segment_published/news/3");
    }
}

on_both! {
    async fn a_bad_record_refuses_the_whole_batch(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        let mut batch = segments(1, None, 0..3);
        batch[2]["channel"] = serde_json::json!("nowhere");
        let err = store
            .store_batch("n1", Schema(1), 1, &batch, 1)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Untranslatable { seq: 3, .. }),
            "{err}"
        );
        assert!(store.records("n1", 0, 100).await.unwrap().is_empty());
    }
}

on_both! {
    async fn migration_1_to_2_translates_everything_once(db) {
        {
            let store = release_1_with_segments(&db, 5).await;
            assert_eq!(store.cluster().await.unwrap().schema, Schema(1));
        }
        let store = db.open(2).await;
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
        assert!(db.has_pre_upgrade_copy(1).await);
        // The same records arriving again over the redundant channel are not duplicated.
        let again = store
            .store_batch("n1", Schema(1), 1, &segments(1, None, 0..5), 1)
            .await
            .unwrap();
        assert_eq!(again.stored, 0);
        drop(store);
        assert_schema_ahead(&db, 1, 2).await;
    }
}

on_both! {
    /// Schema 1's reads (records, summary, parameters) in one SQL text for
    /// both backends.
    async fn a_release_1_store_reads_back_its_records_and_parameters(db) {
        let store = release_1_with_segments(&db, 3).await;
        let rows = store.records("n1", 0, 100).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(rows.iter().all(|r| r.translated_from.is_none()));
        assert_eq!(store.records("n1", 1, 1).await.unwrap()[0].seq, 2);
        let summary = store.record_summary().await.unwrap();
        assert_eq!(
            summary
                .iter()
                .map(|s| (s.node_id.as_str(), s.records, s.max_seq, s.translated))
                .collect::<Vec<_>>(),
            [("n1", 3, 3, 0)]
        );
        let channels = store.channels().await.unwrap();
        assert_eq!(
            (channels[0].name.as_str(), channels[0].segment_ms),
            ("news", 2000)
        );
        assert_eq!(store.events().await.unwrap().len(), 1);
    }
}

on_both! {
    async fn fence_bumps_the_epoch_and_unfence_keeps_it(db) {
        let store = db.open(2).await;
        let before = store.cluster().await.unwrap();
        let fenced = store.set_fence(true).await.unwrap();
        assert_eq!((fenced.epoch, fenced.fenced), (before.epoch + 1, true));
        let open_again = store.set_fence(false).await.unwrap();
        assert_eq!(
            (open_again.epoch, open_again.fenced),
            (before.epoch + 1, false)
        );
    }
}

on_both! {
    async fn release_1_rejects_what_it_cannot_represent(db) {
        let store = db.open(1).await;
        let err = store
            .create_channel(&ChannelSpec {
                name: "x".into(),
                title: None,
                segment_ms: 1500,
                ladder: vec![],
                window_segments: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)));
        seed(&*store).await;
        assert!(matches!(
            store
                .create_channel(&ChannelSpec {
                    name: "news".into(),
                    title: None,
                    segment_ms: 2000,
                    ladder: vec![],
                    window_segments: None,
                })
                .await,
            Err(StoreError::Exists { .. })
        ));
    }
}

/// Release 3 as `release.rs` defines it. The default build does not carry it
/// in `RELEASES` (only `--features next-release` does), so the store is
/// opened with these facts through `open_as`; a build that
/// carries it checks they are the same.
static RELEASE_3: ReleaseInfo = ReleaseInfo {
    release: Release(3),
    semver: "3.0.0",
    schema: Schema(3),
    protocol: ProtocolRange { min: 2, max: 3 },
    window_min_schema: Schema(2),
    migrates_from: &[Schema(2)],
};

#[test]
fn release_3_facts_match_the_release_table() {
    if let Ok(carried) = ReleaseInfo::of(Release(3)) {
        assert_eq!(carried, &RELEASE_3);
    }
}

async fn open_release_3(db: &Db) -> Result<Box<dyn Store>, StoreError> {
    db.open_as(&RELEASE_3).await
}

/// Every kind a node produces, for channel "news" (id 1), in `schema`.
fn every_kind(schema: u32, first_ms: i64) -> Vec<serde_json::Value> {
    let kinds = [
        Kind::EventStarted,
        Kind::SegmentPublished,
        Kind::ViewerStats,
        Kind::Alert,
        Kind::EventFinished,
    ];
    kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let o = Observation {
                kind,
                channel: "news".into(),
                channel_id: (schema >= 2).then_some(1),
                at_ms: first_ms + i as i64 * 1000,
                media_seq: (kind == Kind::SegmentPublished).then_some(i as u64),
                duration_ms: (kind == Kind::SegmentPublished).then_some(2000),
                viewers: (kind == Kind::ViewerStats).then_some(3),
                event_id: matches!(kind, Kind::EventStarted | Kind::EventFinished).then_some(1),
                message: (kind == Kind::Alert).then(|| "outbox above 80%".to_owned()),
                severity: (kind == Kind::Alert).then_some(Severity::Warning),
            };
            encode(Schema(schema), "n1", &o).unwrap()
        })
        .collect()
}

on_both! {
    /// A release-2 database with native and translated records moves to
    /// schema 3 keeping every row, and each migrated row equals the row a
    /// release-3 controller stores when the same records arrive translated.
    async fn migration_2_to_3_keeps_every_row_as_translated(db) {
        let migrated = db;
        {
            let store = migrated.open(2).await;
            seed(&*store).await;
            store
                .store_batch("n1", Schema(2), 1, &every_kind(2, 1_795_000_001_000), 1)
                .await
                .unwrap();
            store
                .store_batch("n1", Schema(1), 6, &every_kind(1, 1_795_000_010_000), 1)
                .await
                .unwrap();
        }
        let store = open_release_3(&migrated).await.unwrap();
        assert_eq!(store.cluster().await.unwrap().schema, Schema(3));
        assert!(migrated.has_pre_upgrade_copy(2).await);
        let rows = store.records("n1", 0, 100).await.unwrap();
        assert_eq!(rows.len(), 10);
        let from: Vec<Option<u32>> = rows.iter().map(|r| r.translated_from).collect();
        assert_eq!(from, [[Some(2); 5], [Some(1); 5]].concat());
        let channels = store.channels().await.unwrap();
        assert_eq!(channels[0].window_segments, Some(6));
        let events = store.events().await.unwrap();
        assert_eq!(
            (
                events[0].channel.as_str(),
                events[0].start_ms,
                events[0].duration_ms
            ),
            ("news", 1_795_000_000_000, 60_000)
        );
        let live = events_for_group(Schema(3), &store.params().await.unwrap(), "g1").unwrap();
        assert_eq!(live[0].window_segments, 6);
        // The same records arriving again are not duplicated.
        let again = store
            .store_batch("n1", Schema(2), 1, &every_kind(2, 1_795_000_001_000), 1)
            .await
            .unwrap();
        assert_eq!((again.acked_through, again.stored), (5, 0));
        drop(store);

        let translated = Db::fresh(migrated.backend).await;
        {
            let store = open_release_3(&translated).await.unwrap();
            seed(&*store).await;
            let out = store
                .store_batch("n1", Schema(2), 1, &every_kind(2, 1_795_000_001_000), 1)
                .await
                .unwrap();
            assert_eq!((out.stored, out.translated), (5, 5));
            store
                .store_batch("n1", Schema(1), 6, &every_kind(1, 1_795_000_010_000), 1)
                .await
                .unwrap();
        }
        let migrated_rows = migrated.record_rows().await;
        assert!(
            migrated_rows[3].ends_with("Some(2) Some(\"warning\")"),
            "{}",
            migrated_rows[3]
        );
        assert_eq!(migrated_rows, translated.record_rows().await);

        // An older release no longer opens the migrated database.
        assert_schema_ahead(&migrated, 2, 3).await;
    }
}

on_both! {
    /// Release 3 migrates only from schema 2: a schema-1 database is refused,
    /// untouched, with what to do; through release 2 it gets there.
    async fn release_3_refuses_a_schema_1_database(db) {
        drop(release_1_with_segments(&db, 3).await);
        let err = open_release_3(&db).await.err().unwrap();
        assert!(
            matches!(
                err,
                StoreError::SchemaBehind {
                    db: 1,
                    release: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("upgrade the cluster to release 2 first"),
            "{err}"
        );
        assert!(!db.has_pre_upgrade_copy(1).await);
        drop(db.open(2).await);
        let store = open_release_3(&db).await.unwrap();
        let rows = store.records("n1", 0, 100).await.unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.translated_from == Some(1)));
    }
}

on_both! {
    async fn channel_windows_need_schema_3(db) {
        let spec = |name: &str, window_segments: Option<u32>| ChannelSpec {
            name: name.into(),
            title: None,
            segment_ms: 2000,
            ladder: vec![],
            window_segments,
        };
        let store = open_release_3(&db).await.unwrap();
        let default = store.create_channel(&spec("news", None)).await.unwrap();
        assert_eq!(default.window_segments, Some(6));
        let deep = store.create_channel(&spec("dvr", Some(720))).await.unwrap();
        assert_eq!(deep.window_segments, Some(720));
        for bad in [0, 2, 721] {
            let err = store
                .create_channel(&spec("bad", Some(bad)))
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Invalid(_)), "{bad}: {err}");
        }
        let windows: Vec<_> = store
            .channels()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.window_segments))
            .collect();
        assert_eq!(
            windows,
            [("news".to_owned(), Some(6)), ("dvr".to_owned(), Some(720))]
        );

        for release in [1, 2] {
            let db = Db::fresh(db.backend).await;
            let store = db.open(release).await;
            let err = store
                .create_channel(&spec("news", Some(30)))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::Invalid(m) if m.contains("needs schema 3")),
                "{err}"
            );
            let plain = store.create_channel(&spec("news", None)).await.unwrap();
            assert_eq!(plain.window_segments, None);
        }
    }
}

on_both! {
    /// Release 3's main channel stores alerts with their severity and refuses
    /// a release-2 alert presented as schema 3.
    async fn release_3_stores_severities(db) {
        let store = open_release_3(&db).await.unwrap();
        seed(&*store).await;
        let mut batch = every_kind(3, 1_795_000_001_000);
        batch[3]["severity"] = serde_json::json!("critical");
        let out = store.store_batch("n1", Schema(3), 1, &batch, 1).await.unwrap();
        assert_eq!((out.stored, out.translated), (5, 0));
        let v2_alert = every_kind(2, 1_795_000_020_000).remove(3);
        let err = store
            .store_batch("n1", Schema(3), 6, &[v2_alert], 1)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Untranslatable { seq: 6, .. }),
            "{err}"
        );
        drop(store);
        let rows = db.record_rows().await;
        assert_eq!(rows.len(), 5);
        assert!(rows[3].ends_with("None Some(\"critical\")"), "{}", rows[3]);
        assert!(rows[2].ends_with("None None"), "{}", rows[2]);
        // The table holds the rule too: severity on alerts, and only there.
        for (seq, kind, severity, ok) in [
            (10, "alert", None, false),
            (11, "alert", Some("fatal"), false),
            (12, "viewer_stats", Some("info"), false),
            (13, "alert", Some("info"), true),
            (14, "viewer_stats", None, true),
        ] {
            let done = db.insert_record_row(seq, kind, severity).await;
            assert_eq!(done, ok, "{kind} {severity:?}");
        }
    }
}

on_both! {
    /// More records than the migration reads at once (10,000 a page), over two
    /// nodes: every one arrives, in order, once.
    async fn migration_2_to_3_pages_through_a_large_table(db) {
        let per_node = 6_000u64;
        {
            let store = db.open(2).await;
            seed(&*store).await;
            for node in ["n1", "n2"] {
                for first in (0..per_node).step_by(1000) {
                    let batch: Vec<serde_json::Value> = segments(2, Some(1), first..first + 1000)
                        .into_iter()
                        .map(|mut r| {
                            r["node_id"] = serde_json::json!(node);
                            r
                        })
                        .collect();
                    store
                        .store_batch(node, Schema(2), first + 1, &batch, 1)
                        .await
                        .unwrap();
                }
            }
        }
        let store = open_release_3(&db).await.unwrap();
        let summary = store.record_summary().await.unwrap();
        let totals: Vec<(String, u64, u64, u64)> = summary
            .into_iter()
            .map(|s| (s.node_id, s.records, s.max_seq, s.translated))
            .collect();
        assert_eq!(
            totals,
            [
                ("n1".to_owned(), per_node, per_node, per_node),
                ("n2".to_owned(), per_node, per_node, per_node)
            ]
        );
    }
}

fn token(node: &str, secret: &str, expires_ms: i64) -> handover_store::NewBootstrapToken {
    handover_store::NewBootstrapToken {
        node_id: node.into(),
        digest: SecretDigest::of(secret),
        expires_ms,
    }
}

on_both! {
    async fn a_bootstrap_token_is_traded_once_for_a_credential(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        store
            .add_bootstrap_tokens(&[token("n1", "hob_t1", 1_000)])
            .await
            .unwrap();
        let t = store.bootstrap_token("n1").await.unwrap().unwrap();
        assert_eq!(t.digest, SecretDigest::of("hob_t1"));
        assert_eq!((t.expires_ms, t.used_ms), (1_000, None));
        let (tok, cred) = (SecretDigest::of("hob_t1"), SecretDigest::of("cred-1"));
        // Expired, or another token: nothing happens.
        assert!(!store
            .trade_bootstrap_token("n1", &tok, &cred, 1_000)
            .await
            .unwrap());
        let other = SecretDigest::of("hob_other");
        assert!(!store
            .trade_bootstrap_token("n1", &other, &cred, 10)
            .await
            .unwrap());
        assert_eq!(store.credential_of("n1").await.unwrap(), None);
        // Once, then never again.
        assert!(store
            .trade_bootstrap_token("n1", &tok, &cred, 10)
            .await
            .unwrap());
        let cred2 = SecretDigest::of("cred-2");
        assert!(!store
            .trade_bootstrap_token("n1", &tok, &cred2, 11)
            .await
            .unwrap());
        assert_eq!(store.credential_of("n1").await.unwrap(), Some(cred.clone()));
        assert_eq!(
            store.bootstrap_token("n1").await.unwrap().unwrap().used_ms,
            Some(10)
        );
        // The registered node is found by its credential's digest only.
        assert_eq!(
            store
                .node_by_credential(&cred)
                .await
                .unwrap()
                .map(|(n, _)| n),
            Some("n1".to_owned())
        );
        assert_eq!(store.node_by_credential(&cred2).await.unwrap(), None);
        // A replacement token, traded, replaces the credential.
        store
            .add_bootstrap_tokens(&[token("n1", "hob_t2", 1_000)])
            .await
            .unwrap();
        let tok2 = SecretDigest::of("hob_t2");
        assert!(store
            .trade_bootstrap_token("n1", &tok2, &cred2, 20)
            .await
            .unwrap());
        assert_eq!(store.node_by_credential(&cred).await.unwrap(), None);
        assert!(store.node_by_credential(&cred2).await.unwrap().is_some());
    }
}

on_both! {
    async fn removing_a_node_revokes_it_and_keeps_its_records(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        store
            .add_bootstrap_tokens(&[token("n1", "hob_t1", 1_000)])
            .await
            .unwrap();
        let cred = SecretDigest::of("cred-1");
        let tok = SecretDigest::of("hob_t1");
        assert!(store
            .trade_bootstrap_token("n1", &tok, &cred, 1)
            .await
            .unwrap());
        store
            .store_batch("n1", Schema(2), 1, &segments(2, Some(1), 1..4), 1)
            .await
            .unwrap();
        assert!(store.remove_node("n1").await.unwrap());
        assert_eq!(store.node_by_credential(&cred).await.unwrap(), None);
        assert_eq!(store.credential_of("n1").await.unwrap(), None);
        assert_eq!(store.bootstrap_token("n1").await.unwrap(), None);
        assert!(store
            .nodes()
            .await
            .unwrap()
            .iter()
            .all(|n| n.node_id != "n1"));
        assert_eq!(store.records("n1", 0, 10).await.unwrap().len(), 3);
        assert!(
            !store.remove_node("n1").await.unwrap(),
            "nothing left to remove"
        );
    }
}

#[tokio::test]
/// SQLite only: no PostgreSQL store was ever written by such a build.
async fn credentials_an_older_build_stored_in_plain_text_become_digests() {
    let db = Db::fresh(Backend::Sqlite).await;
    {
        let store = db.open(2).await;
        seed(&*store).await;
    }
    // What a build before digests left: the credential in `nodes`.
    let path = db.sqlite_path();
    {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE nodes SET credential = 'plain-cred' WHERE node_id = 'n1'")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = db.open(2).await;
    assert_eq!(
        store.credential_of("n1").await.unwrap(),
        Some(SecretDigest::of("plain-cred"))
    );
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let left: String = sqlx::query_scalar("SELECT credential FROM nodes WHERE node_id = 'n1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, "", "no plain text left");
}

on_both! {
    async fn a_node_is_in_one_group_only(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        let err = store
            .create_group(&Group {
                name: "g2".into(),
                primary: "n9".into(),
                backup: "n1".into(),
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("already the primary of group \"g1\""),
            "{err}"
        );
    }
}

/// PostgreSQL only (SQLite's snapshot is a file an operator copies back):
/// the copy a migration took is restored by `restore_pre_upgrade`, never
/// while a controller is connected, and the store is then as it was before
/// the migration, for the release it was at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_upgrade_copy_is_restored_on_postgres() {
    use handover_store::postgres::{restore_pre_upgrade, PostgresStore, Target};
    let db = Db::fresh(Backend::Postgres).await;
    let first = PostgresStore::open(db.url(), Release(1)).await.unwrap();
    seed(&first).await;
    first
        .store_batch("n1", Schema(1), 1, &segments(1, None, 0..5), 1)
        .await
        .unwrap();
    first.close().await;
    let migrated = PostgresStore::open(db.url(), Release(2)).await.unwrap();
    migrated
        .store_batch("n1", Schema(1), 6, &segments(1, None, 5..8), 1)
        .await
        .unwrap();
    assert_eq!(migrated.records("n1", 0, 100).await.unwrap().len(), 8);
    let target = Target::parse(db.url()).unwrap();
    assert_eq!(target.pre_upgrade_copies().await.unwrap(), [1]);

    let err = restore_pre_upgrade(db.url(), 1).await.unwrap_err();
    assert!(
        err.to_string().contains("a controller is connected"),
        "{err}"
    );
    migrated.close().await;
    let err = restore_pre_upgrade(db.url(), 2).await.unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");

    let cluster = restore_pre_upgrade(db.url(), 1).await.unwrap();
    assert_eq!((cluster.release, cluster.schema), (Release(1), Schema(1)));
    let store = db.open(1).await;
    let rows = store.records("n1", 0, 100).await.unwrap();
    assert_eq!(
        rows.len(),
        5,
        "what release 2 stored after the copy is gone"
    );
    assert_eq!(store.events().await.unwrap().len(), 1);
    // Ids go on after the restored ones.
    let event = store
        .create_event(&EventSpec {
            channel: "news".into(),
            group: "g1".into(),
            start_ms: 1_795_000_100_000,
            duration_ms: 60_000,
        })
        .await
        .unwrap();
    assert_eq!(event.id, 2);
    drop(store);
    // The copy stays, and the store migrates again.
    assert_eq!(target.pre_upgrade_copies().await.unwrap(), [1]);
    let again = db.open(2).await;
    assert_eq!(again.records("n1", 0, 100).await.unwrap().len(), 5);
}

/// A URL's password never shows: not in the redacted form, not in the
/// error of a server that refuses it.
#[tokio::test]
async fn a_postgres_password_is_never_shown() {
    use handover_store::postgres::{PostgresStore, Target};
    let url = "postgres://u:s3cret-pw@127.0.0.1:1/db?schema=x";
    let target = Target::parse(url).unwrap();
    assert_eq!(
        target.redacted(),
        "postgres://u:REDACTED@127.0.0.1:1/db?schema=x"
    );
    assert!(!format!("{target:?}").contains("s3cret-pw"));
    assert_eq!(target.schema().as_str(), "x");
    let err = PostgresStore::open(url, Release(2)).await.err().unwrap();
    let text = err.to_string();
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(text.contains("pg_isready -h 127.0.0.1 -p 1"), "{text}");
    let in_query = Target::parse("postgres://u@h/db?password=s3cret-pw&schema=x").unwrap();
    assert!(!in_query.redacted().contains("s3cret-pw"), "{in_query:?}");
    for bad in [
        "postgres://u@h/db?schema=Bad",
        "postgres://u@h/db?schema=pg_x",
        "mysql://u@h/db",
    ] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
}

/// Dropping a store's schemas (its copies included) leaves every other
/// schema alone, also one whose name matches if `_` were a wildcard.
#[tokio::test]
async fn dropping_a_postgres_store_leaves_other_schemas_alone() {
    use handover_store::postgres::Target;
    let db = Db::fresh(Backend::Postgres).await;
    drop(db.open(2).await);
    let target = Target::parse(db.url()).unwrap();
    let lookalike = format!(
        "{}_pre_schema_1",
        target.schema().as_str().replacen('_', "x", 1)
    );
    let pool = db.pg_pool().await.unwrap();
    let exists = |name: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT schema_name::TEXT FROM information_schema.schemata WHERE schema_name = $1",
            )
            .bind(name)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .is_some()
        }
    };
    sqlx::raw_sql(&format!("CREATE SCHEMA \"{lookalike}\""))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(target.drop_schemas().await.unwrap(), 1);
    assert!(!exists(target.schema().as_str().to_owned()).await);
    assert!(exists(lookalike.clone()).await);
    sqlx::raw_sql(&format!("DROP SCHEMA \"{lookalike}\""))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

on_both! {
    /// Trades of one token at once: exactly one wins, and its credential is
    /// the node's.
    async fn a_bootstrap_token_traded_at_once_by_many_is_traded_once(db) {
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::from(db.open(2).await);
        seed(&*store).await;
        store
            .add_bootstrap_tokens(&[token("n1", "hob_t1", 1_000)])
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..8 {
            let store = store.clone();
            tasks.spawn(async move {
                let cred = SecretDigest::of(&format!("cred-{k}"));
                let won = store
                    .trade_bootstrap_token("n1", &SecretDigest::of("hob_t1"), &cred, 10)
                    .await
                    .unwrap();
                (won, cred)
            });
        }
        let mut winners = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (won, cred) = r.unwrap();
            if won {
                winners.push(cred);
            }
        }
        assert_eq!(winners.len(), 1, "one trade wins");
        assert_eq!(store.credential_of("n1").await.unwrap(), winners.pop());
    }
}

on_both! {
    async fn a_batch_at_an_epoch_the_cluster_left_is_refused_whole(db) {
        let store = db.open(2).await;
        seed(&*store).await;
        let epoch = store.cluster().await.unwrap().epoch;
        let batch = |seq: u64| segments(2, Some(1), seq..seq + 1);
        let stored = store.store_batch("n1", Schema(2), 1, &batch(1), epoch).await.unwrap();
        assert_eq!(stored.stored, 1);
        let fenced = store.set_fence(true).await.unwrap();
        for sent in [epoch, fenced.epoch] {
            let refused = store.store_batch("n1", Schema(2), 2, &batch(2), sent).await;
            assert!(matches!(refused, Err(StoreError::StaleEpoch { .. })), "{refused:?}");
        }
        store.set_fence(false).await.unwrap();
        let refused = store.store_batch("n1", Schema(2), 2, &batch(2), epoch).await;
        assert!(
            matches!(refused, Err(StoreError::StaleEpoch { fenced: false, .. })),
            "{refused:?}"
        );
        let stored = store.store_batch("n1", Schema(2), 2, &batch(2), fenced.epoch).await.unwrap();
        assert_eq!(stored.stored, 1);
        let summary = store.record_summary().await.unwrap();
        assert_eq!(summary.iter().map(|s| s.records).sum::<u64>(), 2);
    }
}
