//! SQLite backend: the embedded default. WAL, `synchronous=FULL`, one writer
//! at a time (a mutex, so a read-then-write transaction never meets
//! SQLITE_BUSY), readers in parallel.

use crate::{BatchOutcome, ClusterState, NodeRegistration, NodeRow, Result, Store, StoreError};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::params::{v1, v2, v3, Group};
use handover_core::record::{self, AnyRecord, ChannelDirectory, ChannelRef};
use handover_core::record::{v1 as rv1, v2 as rv2, v3 as rv3};
use handover_core::release::RELEASES;
use handover_core::timefmt;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{validate_id, Heartbeat, OutboxState, Role};
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::Mutex;

/// Connections for concurrent readers; writes take the writer mutex.
const POOL_CONNECTIONS_MAX: u32 = 8;
const BUSY_TIMEOUT_MS: u64 = 10_000;

/// Tables every release shares; their shape never changes.
const SHARED_TABLES: &str = "
CREATE TABLE IF NOT EXISTS cluster (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, credential TEXT NOT NULL, release INTEGER NOT NULL, schema INTEGER NOT NULL,
    role TEXT NOT NULL, group_name TEXT NOT NULL, hls_url TEXT NOT NULL, grant_name TEXT NOT NULL,
    epoch INTEGER NOT NULL, outbox_next_seq INTEGER NOT NULL, outbox_oldest INTEGER, outbox_count INTEGER NOT NULL,
    current_events TEXT NOT NULL, staged TEXT NOT NULL DEFAULT '[]', last_seen_ms INTEGER NOT NULL,
    acked_through INTEGER NOT NULL DEFAULT 0, binary_sha256 TEXT, supervisor_sha256 TEXT);
CREATE TABLE IF NOT EXISTS node_desired (node_id TEXT PRIMARY KEY, desired TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upgrades (id INTEGER PRIMARY KEY, state TEXT NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, primary_node TEXT NOT NULL, backup_node TEXT NOT NULL);
";

const SCHEMA_1: &str = "
CREATE TABLE channels (name TEXT PRIMARY KEY, title TEXT NOT NULL, segment_seconds INTEGER NOT NULL,
    resolution TEXT NOT NULL, bitrate_kbps INTEGER NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, group_name TEXT NOT NULL,
    start TEXT NOT NULL, duration_s INTEGER NOT NULL);
CREATE TABLE records (node TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel TEXT NOT NULL,
    at TEXT NOT NULL, media_seq INTEGER, viewers INTEGER, event INTEGER, text TEXT NOT NULL,
    natural_key TEXT NOT NULL, PRIMARY KEY (node, seq));
";

const SCHEMA_2: &str = "
CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, segment_ms INTEGER NOT NULL,
    ladder TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL, group_name TEXT NOT NULL,
    start_ms INTEGER NOT NULL, duration_ms INTEGER NOT NULL);
CREATE TABLE records (node_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel_id INTEGER NOT NULL,
    produced_at_ms INTEGER NOT NULL, media_seq INTEGER, duration_ms INTEGER, viewers INTEGER, event_id INTEGER,
    message TEXT, natural_key TEXT NOT NULL, translated_from INTEGER, PRIMARY KEY (node_id, seq));
";

/// Schema 2's tables, and channels set their playlist window; alerts carry
/// a severity (NULL for every other kind, which the CHECK holds too).
const SCHEMA_3: &str = "
CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, segment_ms INTEGER NOT NULL,
    ladder TEXT NOT NULL, window_segments INTEGER NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL, group_name TEXT NOT NULL,
    start_ms INTEGER NOT NULL, duration_ms INTEGER NOT NULL);
CREATE TABLE records (node_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel_id INTEGER NOT NULL,
    produced_at_ms INTEGER NOT NULL, media_seq INTEGER, duration_ms INTEGER, viewers INTEGER, event_id INTEGER,
    message TEXT, natural_key TEXT NOT NULL, translated_from INTEGER,
    severity TEXT CHECK (CASE WHEN kind = 'alert' THEN COALESCE(severity IN ('info', 'warning', 'critical'), 0)
        ELSE severity IS NULL END),
    PRIMARY KEY (node_id, seq));
";

pub struct SqliteStore {
    pool: SqlitePool,
    info: &'static ReleaseInfo,
    writer: Mutex<()>,
    /// Writes waiting for the writer, by kind. Whoever takes the writer
    /// next commits every waiting write of its kind in one transaction
    /// (group commit): a burst of hellos or of record batches costs a few
    /// fsyncs, not one each. Each caller is answered only after the commit
    /// that holds its write.
    registrations: Queue<Registration>,
    batches: Queue<Rows>,
}

/// Hellos committed in one transaction at most; more wait for the next.
const REGISTRATIONS_PER_COMMIT_MAX: usize = 2_000;
/// Record batches (each at most `wire::limits::BATCH_RECORDS_MAX` records)
/// committed in one transaction at most.
const BATCHES_PER_COMMIT_MAX: usize = 16;

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is too large")))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` for `release`,
    /// migrating an older schema forward after a snapshot in `snapshot_dir`.
    pub async fn open(path: &Path, release: Release, snapshot_dir: &Path) -> Result<SqliteStore> {
        let info = ReleaseInfo::of(release).map_err(|e| StoreError::Invalid(e.to_string()))?;
        SqliteStore::open_as(path, info, snapshot_dir).await
    }

    /// [`SqliteStore::open`] for a release given by its facts rather than
    /// looked up in this binary's `RELEASES` (tests of a release this build
    /// does not carry yet).
    pub async fn open_as(
        path: &Path,
        info: &'static ReleaseInfo,
        snapshot_dir: &Path,
    ) -> Result<SqliteStore> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS));
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let store = SqliteStore {
            pool,
            info,
            writer: Mutex::new(()),
            registrations: Queue::new(REGISTRATIONS_PER_COMMIT_MAX),
            batches: Queue::new(BATCHES_PER_COMMIT_MAX),
        };
        store.prepare(snapshot_dir).await?;
        Ok(store)
    }

    async fn prepare(&self, snapshot_dir: &Path) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(SHARED_TABLES).execute(&mut *tx).await?;
        // Shared tables only ever gain nullable columns, added by whichever
        // release opens the database first; every release reads them by name.
        for column in ["binary_sha256", "supervisor_sha256"] {
            let present: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pragma_table_info('nodes') WHERE name = ?",
            )
            .bind(column)
            .fetch_one(&mut *tx)
            .await?;
            if present == 0 {
                sqlx::query(&format!("ALTER TABLE nodes ADD COLUMN {column} TEXT"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let schema: Option<i64> =
            sqlx::query_scalar("SELECT value FROM cluster WHERE key = 'schema'")
                .fetch_optional(&mut *tx)
                .await?;
        let Some(db_schema) = schema else {
            sqlx::raw_sql(product_tables(self.info.schema)?)
                .execute(&mut *tx)
                .await?;
            for (key, value) in [
                ("release", i64::from(self.info.release.0)),
                ("schema", i64::from(self.info.schema.0)),
                ("epoch", 1),
                ("fenced", 0),
                ("param_revision", 1),
            ] {
                sqlx::query("INSERT INTO cluster (key, value) VALUES (?, ?)")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            return Ok(());
        };
        tx.commit().await?;
        let db_schema = u32::try_from(db_schema)
            .map_err(|_| StoreError::Corrupt(format!("schema {db_schema}")))?;
        let target = self.info.schema.0;
        if db_schema > target {
            return Err(StoreError::SchemaAhead {
                db: db_schema,
                release: target,
            });
        }
        if db_schema < target {
            if !self.info.migrates_from.contains(&Schema(db_schema)) {
                return Err(schema_behind(self.info, db_schema));
            }
            let snapshot = self.snapshot(snapshot_dir, db_schema).await?;
            tracing::info!(snapshot = %snapshot.display(), from = db_schema, to = target, "migrating database");
            migrate(&self.pool, db_schema, target).await?;
        }
        Ok(())
    }

    /// A consistent copy of the database, taken online with `VACUUM INTO`.
    pub async fn snapshot(&self, dir: &Path, schema: u32) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut n = 0u32;
        let path = loop {
            let candidate = dir.join(format!("schema-{schema}-{n}.db"));
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        let target = path
            .to_str()
            .ok_or_else(|| StoreError::Invalid("snapshot path is not UTF-8".into()))?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(path)
    }

    /// Channels by name (what the upcasters need) and names by id.
    pub async fn channel_directory(&self) -> Result<(ChannelDirectory, HashMap<i64, String>)> {
        let mut by_name = ChannelDirectory::new();
        let mut by_id = HashMap::new();
        match self.info.schema.0 {
            1 => {
                for row in sqlx::query("SELECT name, segment_seconds FROM channels")
                    .fetch_all(&self.pool)
                    .await?
                {
                    let name: String = row.try_get("name")?;
                    let secs: i64 = row.try_get("segment_seconds")?;
                    let segment_ms = u32::try_from(secs * 1000).unwrap_or(u32::MAX);
                    by_name.insert(name, ChannelRef { id: 0, segment_ms });
                }
            }
            2 | 3 => {
                for row in sqlx::query("SELECT id, name, segment_ms FROM channels")
                    .fetch_all(&self.pool)
                    .await?
                {
                    let id: i64 = row.try_get("id")?;
                    let name: String = row.try_get("name")?;
                    let segment_ms: i64 = row.try_get("segment_ms")?;
                    by_id.insert(id, name.clone());
                    by_name.insert(
                        name,
                        ChannelRef {
                            id,
                            segment_ms: u32::try_from(segment_ms).unwrap_or(u32::MAX),
                        },
                    );
                }
            }
            other => return Err(StoreError::UnknownSchema(other)),
        }
        Ok((by_name, by_id))
    }

    /// Inserts records already in this database's schema, `first_seq`
    /// onwards, in one transaction with the statements `store_batch` uses and
    /// nothing else: no decoding, no translation, no acknowledgement. The
    /// floor `handover bench` holds the redundant channel against.
    pub async fn insert_records(
        &self,
        node_id: &str,
        first_seq: u64,
        records: &[AnyRecord],
        translated_from: Option<u32>,
    ) -> Result<u64> {
        let (_, by_id) = self.channel_directory().await?;
        let rows = records
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((to_i64(first_seq + i as u64, "seq")?, r)))
            .collect::<Result<Vec<_>>>()?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let stored = insert_rows(
            &mut tx,
            node_id,
            self.info.schema,
            &rows,
            translated_from,
            &by_id,
        )
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// The channels of a schema-2 or schema-3 table, with the window of
    /// each when `with_window` (schema 3; 0 otherwise).
    async fn channels_by_id(&self, with_window: bool) -> Result<Vec<(v2::Channel, u32)>> {
        let sql = if with_window {
            "SELECT id, name, segment_ms, ladder, window_segments FROM channels ORDER BY id"
        } else {
            "SELECT id, name, segment_ms, ladder, 0 AS window_segments FROM channels ORDER BY id"
        };
        sqlx::query(sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let ladder: String = r.try_get("ladder")?;
                let window = r.try_get::<i64, _>("window_segments")?;
                let channel = v2::Channel {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    segment_ms: u32::try_from(r.try_get::<i64, _>("segment_ms")?).unwrap_or(0),
                    ladder: serde_json::from_str(&ladder)
                        .map_err(|e| StoreError::Corrupt(format!("ladder: {e}")))?,
                };
                let window = u32::try_from(window)
                    .map_err(|_| StoreError::Corrupt(format!("window_segments {window}")))?;
                Ok((channel, window))
            })
            .collect()
    }

    /// The events of a schema-2 or schema-3 table (the same shape).
    async fn events_by_id(&self) -> Result<Vec<v2::Event>> {
        sqlx::query(
            "SELECT id, channel_id, group_name, start_ms, duration_ms FROM events ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(v2::Event {
                id: r.try_get("id")?,
                channel_id: r.try_get("channel_id")?,
                group: r.try_get("group_name")?,
                start_ms: r.try_get("start_ms")?,
                duration_ms: to_u64(r.try_get("duration_ms")?),
            })
        })
        .collect()
    }

    async fn bump_revision(tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
        sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn product_tables(schema: Schema) -> Result<&'static str> {
    match schema.0 {
        1 => Ok(SCHEMA_1),
        2 => Ok(SCHEMA_2),
        3 => Ok(SCHEMA_3),
        other => Err(StoreError::UnknownSchema(other)),
    }
}

/// The refusal of a database older than every schema `info` migrates from,
/// naming the release to start on it first.
fn schema_behind(info: &ReleaseInfo, db: u32) -> StoreError {
    let migrates_from = info
        .migrates_from
        .iter()
        .map(|s| s.0.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    // A release this binary carries that takes the database one step on.
    let via = RELEASES.iter().find(|r| {
        r.release < info.release
            && info.migrates_from.contains(&r.schema)
            && r.migrates_from.contains(&Schema(db))
    });
    let advice = match via {
        Some(r) => format!(
            "upgrade the cluster to release {} first (it migrates schema {db} to {}), then to release {}",
            r.release, r.schema, info.release
        ),
        None => format!(
            "upgrade the cluster to a release of schema {migrates_from} first, then to release {}",
            info.release
        ),
    };
    StoreError::SchemaBehind {
        db,
        release: info.release.0,
        migrates_from,
        advice,
    }
}

/// Moves the product tables from `from` to `to` one step at a time, all in
/// one transaction: a failure leaves the database exactly as it was.
pub async fn migrate(pool: &SqlitePool, from: u32, to: u32) -> Result<()> {
    let mut tx = pool.begin().await?;
    for step in from..to {
        match step {
            1 => migrate_1_to_2(&mut tx)
                .await
                .map_err(|e| StoreError::Migration {
                    from: 1,
                    to: 2,
                    reason: e.to_string(),
                })?,
            2 => migrate_2_to_3(&mut tx)
                .await
                .map_err(|e| StoreError::Migration {
                    from: 2,
                    to: 3,
                    reason: e.to_string(),
                })?,
            other => {
                return Err(StoreError::Migration {
                    from: other,
                    to: other + 1,
                    reason: "no such migration".into(),
                })
            }
        }
        sqlx::query("UPDATE cluster SET value = ? WHERE key = 'schema'")
            .bind(i64::from(step + 1))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
        .execute(&mut *tx)
        .await?;
    if let Some(ms) = test_fault("migrate_slow_ms").and_then(|v| v.parse::<u64>().ok()) {
        tracing::warn!(
            ms,
            "test hook: holding the migration open before its commit"
        );
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if test_fault("migrate_fail").is_some() {
        // Dropping `tx` rolls every step back.
        return Err(StoreError::Migration {
            from,
            to,
            reason: format!("refused before commit by the test hook {TEST_FAULT_ENV}=migrate_fail"),
        });
    }
    tx.commit().await?;
    Ok(())
}

/// Test hook, read only by the fault-injection process tests
/// (`crates/cli/tests/faults.rs`), which set it for one release through an
/// artifact whose binary is a wrapper script: a comma-separated list of
/// `name` or `name:value`. Unset in production, where it changes nothing.
/// Here: `migrate_slow_ms:N` holds the migration transaction open N ms
/// before its commit; `migrate_fail` refuses to commit it.
pub const TEST_FAULT_ENV: &str = "HANDOVER_TEST_FAULT";

/// The value of test fault `name` in [`TEST_FAULT_ENV`] ("" for a bare name).
fn test_fault(name: &str) -> Option<String> {
    let all = std::env::var(TEST_FAULT_ENV).ok()?;
    all.split(',').find_map(|f| {
        let (n, v) = f.split_once(':').unwrap_or((f, ""));
        (n.trim() == name).then(|| v.trim().to_owned())
    })
}

/// Schema 1 → 2: channels get ids, ms durations and a ladder; events and
/// records are keyed by channel id; records go through the same upcaster the
/// redundant channel uses, so a migrated row equals a translated one.
async fn migrate_1_to_2(tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
    sqlx::raw_sql(
        "ALTER TABLE channels RENAME TO channels_v1; ALTER TABLE events RENAME TO events_v1; ALTER TABLE records RENAME TO records_v1;",
    )
    .execute(&mut **tx)
    .await?;
    sqlx::raw_sql(SCHEMA_2).execute(&mut **tx).await?;
    let mut dir = ChannelDirectory::new();
    let channels = sqlx::query(
        "SELECT name, segment_seconds, resolution, bitrate_kbps FROM channels_v1 ORDER BY name",
    )
    .fetch_all(&mut **tx)
    .await?;
    for row in channels {
        let name: String = row.try_get("name")?;
        let secs: i64 = row.try_get("segment_seconds")?;
        let resolution: String = row.try_get("resolution")?;
        let kbps: i64 = row.try_get("bitrate_kbps")?;
        let height = resolution
            .split_once('x')
            .and_then(|(_, h)| h.parse::<u32>().ok())
            .unwrap_or(720);
        let ladder = vec![v2::Rung {
            height,
            kbps: u32::try_from(kbps).unwrap_or(0),
        }];
        let ladder =
            serde_json::to_string(&ladder).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO channels (name, segment_ms, ladder) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(&name)
        .bind(secs * 1000)
        .bind(ladder)
        .fetch_one(&mut **tx)
        .await?;
        dir.insert(
            name,
            ChannelRef {
                id,
                segment_ms: u32::try_from(secs * 1000).unwrap_or(u32::MAX),
            },
        );
    }
    let events = sqlx::query("SELECT id, channel, group_name, start, duration_s FROM events_v1")
        .fetch_all(&mut **tx)
        .await?;
    for row in events {
        let channel: String = row.try_get("channel")?;
        let start: String = row.try_get("start")?;
        let channel_id = dir.get(&channel).map(|c| c.id).ok_or_else(|| {
            StoreError::Corrupt(format!("event names unknown channel {channel:?}"))
        })?;
        let start_ms =
            timefmt::ms_from_rfc3339(&start).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(row.try_get::<i64, _>("id")?)
            .bind(channel_id)
            .bind(row.try_get::<String, _>("group_name")?)
            .bind(start_ms)
            .bind(row.try_get::<i64, _>("duration_s")? * 1000)
            .execute(&mut **tx)
            .await?;
    }
    let by_id: HashMap<i64, String> = dir.iter().map(|(n, c)| (c.id, n.clone())).collect();
    let records = sqlx::query("SELECT node, seq, kind, channel, at, media_seq, viewers, event, text FROM records_v1 ORDER BY node, seq")
        .fetch_all(&mut **tx)
        .await?;
    for row in records {
        let node: String = row.try_get("node")?;
        let seq: i64 = row.try_get("seq")?;
        let old = v1_from_row(&row)?;
        let new = record::upcast_1_to_2(old, &node, &dir).map_err(|source| {
            StoreError::Untranslatable {
                seq: to_u64(seq),
                source,
            }
        })?;
        insert_v2(tx, &node, seq, &new, Some(1), &by_id).await?;
    }
    check_moved(
        tx,
        &[
            ("channels_v1", "channels"),
            ("events_v1", "events"),
            ("records_v1", "records"),
        ],
    )
    .await?;
    sqlx::raw_sql("DROP TABLE records_v1; DROP TABLE events_v1; DROP TABLE channels_v1;")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Rows of `records` a migration reads and writes at once: bounds its memory
/// whatever the size of the table.
const MIGRATE_ROWS_PER_PAGE: i64 = 10_000;

/// Schema 2 → 3: channels get release 2's window (`WINDOW_SEGMENTS`),
/// events are unchanged, records go through the upcaster the redundant
/// channel uses (alerts become `warning`), so a migrated row equals a
/// translated one. A record keeps the schema its node wrote it in as
/// `translated_from` (2 for a native schema-2 row).
async fn migrate_2_to_3(tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
    sqlx::raw_sql(
        "ALTER TABLE channels RENAME TO channels_v2; ALTER TABLE events RENAME TO events_v2; ALTER TABLE records RENAME TO records_v2;",
    )
    .execute(&mut **tx)
    .await?;
    sqlx::raw_sql(SCHEMA_3).execute(&mut **tx).await?;
    sqlx::query(
        "INSERT INTO channels (id, name, segment_ms, ladder, window_segments)
         SELECT id, name, segment_ms, ladder, ? FROM channels_v2",
    )
    .bind(i64::from(v3::WINDOW_SEGMENTS_DEFAULT))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms)
         SELECT id, channel_id, group_name, start_ms, duration_ms FROM events_v2",
    )
    .execute(&mut **tx)
    .await?;
    let mut by_id = HashMap::new();
    for row in sqlx::query("SELECT id, name FROM channels")
        .fetch_all(&mut **tx)
        .await?
    {
        by_id.insert(
            row.try_get::<i64, _>("id")?,
            row.try_get::<String, _>("name")?,
        );
    }
    const COLUMNS: &str =
        "SELECT node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms,
        viewers, event_id, message, natural_key, translated_from FROM records_v2";
    let first_page = format!("{COLUMNS} ORDER BY node_id, seq LIMIT ?");
    let next_page =
        format!("{COLUMNS} WHERE (node_id, seq) > (?, ?) ORDER BY node_id, seq LIMIT ?");
    let mut after: Option<(String, i64)> = None;
    loop {
        let query = match &after {
            None => sqlx::query(&first_page),
            Some((node, seq)) => sqlx::query(&next_page).bind(node.clone()).bind(*seq),
        };
        let page = query
            .bind(MIGRATE_ROWS_PER_PAGE)
            .fetch_all(&mut **tx)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.try_get("node_id")?, last.try_get("seq")?));
        let mut by_node: Vec<(String, Vec<Columns>)> = Vec::new();
        for row in &page {
            let node: String = row.try_get("node_id")?;
            let seq: i64 = row.try_get("seq")?;
            let old_key: String = row.try_get("natural_key")?;
            let from = row
                .try_get::<Option<i64>, _>("translated_from")?
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(2);
            let new = record::upcast_2_to_3(v2_from_row(row)?);
            let cols = Columns::v3(seq, &new, Some(from), &by_id)?;
            if cols.natural_key != old_key {
                return Err(StoreError::Corrupt(format!(
                    "self-check: record ({node}, {seq}) changed its natural key: {old_key} to {}",
                    cols.natural_key
                )));
            }
            match by_node.last_mut() {
                Some((n, rows)) if *n == node => rows.push(cols),
                _ => by_node.push((node, vec![cols])),
            }
        }
        for (node, rows) in &by_node {
            insert_columns(tx, node, Schema(3), rows).await?;
        }
    }
    check_moved(
        tx,
        &[
            ("channels_v2", "channels"),
            ("events_v2", "events"),
            ("records_v2", "records"),
        ],
    )
    .await?;
    sqlx::raw_sql("DROP TABLE records_v2; DROP TABLE events_v2; DROP TABLE channels_v2;")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The migration's self-check, inside its transaction (so a failure leaves
/// the database as it was): every row of every old table arrived.
async fn check_moved(tx: &mut Transaction<'_, Sqlite>, pairs: &[(&str, &str)]) -> Result<()> {
    for (old, new) in pairs {
        let before: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {old}"))
            .fetch_one(&mut **tx)
            .await?;
        let after: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {new}"))
            .fetch_one(&mut **tx)
            .await?;
        if before != after {
            return Err(StoreError::Corrupt(format!(
                "self-check: {old} had {before} rows, {new} has {after}"
            )));
        }
    }
    Ok(())
}

fn v1_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<rv1::Record> {
    let kind: String = row.try_get("kind")?;
    let kind: rv1::Kind = serde_json::from_value(serde_json::Value::String(kind.clone()))
        .map_err(|_| StoreError::Corrupt(format!("record kind {kind:?}")))?;
    Ok(rv1::Record {
        kind,
        channel: row.try_get("channel")?,
        at: row.try_get("at")?,
        seq: row.try_get::<Option<i64>, _>("media_seq")?.map(to_u64),
        viewers: row
            .try_get::<Option<i64>, _>("viewers")?
            .map(|v| u32::try_from(v).unwrap_or(0)),
        event: row.try_get("event")?,
        text: row.try_get("text")?,
    })
}

fn v2_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<rv2::Record> {
    let kind: String = row.try_get("kind")?;
    let kind: rv2::Kind = serde_json::from_value(serde_json::Value::String(kind.clone()))
        .map_err(|_| StoreError::Corrupt(format!("record kind {kind:?}")))?;
    let small = |v: i64, what: &str| {
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("record {what} {v}")))
    };
    Ok(rv2::Record {
        kind,
        channel_id: row.try_get("channel_id")?,
        node_id: row.try_get("node_id")?,
        produced_at_ms: row.try_get("produced_at_ms")?,
        media_seq: row.try_get::<Option<i64>, _>("media_seq")?.map(to_u64),
        duration_ms: row
            .try_get::<Option<i64>, _>("duration_ms")?
            .map(|v| small(v, "duration_ms"))
            .transpose()?,
        viewers: row
            .try_get::<Option<i64>, _>("viewers")?
            .map(|v| small(v, "viewers"))
            .transpose()?,
        event_id: row.try_get("event_id")?,
        message: row.try_get("message")?,
    })
}

fn v1_kind_name(kind: rv1::Kind) -> &'static str {
    match kind {
        rv1::Kind::Segment => "segment",
        rv1::Kind::Stats => "stats",
        rv1::Kind::Alert => "alert",
        rv1::Kind::EventStart => "event_start",
        rv1::Kind::EventEnd => "event_end",
    }
}

fn v1_natural_key(r: &rv1::Record) -> String {
    let kind = rv2::Kind::from(r.kind);
    let at_ms = timefmt::ms_from_rfc3339(&r.at).unwrap_or(0);
    record::natural_key(kind, &r.channel, at_ms, r.seq, r.event)
}

/// Records of schema 2 or 3 a multi-row INSERT carries at once (13 values
/// each at most, far below SQLite's 32,766): one statement, and one round
/// trip to the connection's thread, per this many records instead of one
/// per record.
const INSERT_ROWS_PER_STATEMENT: usize = 100;

/// One record of schema 2 or 3 as the columns of its `records` row.
struct Columns {
    seq: i64,
    kind: &'static str,
    channel_id: i64,
    produced_at_ms: i64,
    media_seq: Option<i64>,
    duration_ms: Option<i64>,
    viewers: Option<i64>,
    event_id: Option<i64>,
    message: Option<String>,
    natural_key: String,
    translated_from: Option<i64>,
    /// Schema 3 only.
    severity: Option<&'static str>,
}

impl Columns {
    /// A schema-2 row: the schema-3 columns without a severity.
    fn v2(
        seq: i64,
        r: &rv2::Record,
        translated_from: Option<u32>,
        channel_names: &HashMap<i64, String>,
    ) -> Result<Columns> {
        let as_columns = rv3::Record {
            kind: r.kind,
            channel_id: r.channel_id,
            node_id: String::new(),
            produced_at_ms: r.produced_at_ms,
            media_seq: r.media_seq,
            duration_ms: r.duration_ms,
            viewers: r.viewers,
            event_id: r.event_id,
            message: None,
            severity: None,
        };
        Ok(Columns {
            message: r.message.clone(),
            ..Columns::v3(seq, &as_columns, translated_from, channel_names)?
        })
    }

    fn v3(
        seq: i64,
        r: &rv3::Record,
        translated_from: Option<u32>,
        channel_names: &HashMap<i64, String>,
    ) -> Result<Columns> {
        let channel =
            channel_names
                .get(&r.channel_id)
                .ok_or_else(|| StoreError::Untranslatable {
                    seq: to_u64(seq),
                    source: record::RecordError::UnknownChannel(r.channel_id.to_string()),
                })?;
        Ok(Columns {
            seq,
            kind: r.kind.as_str(),
            channel_id: r.channel_id,
            produced_at_ms: r.produced_at_ms,
            media_seq: r.media_seq.map(|s| to_i64(s, "media_seq")).transpose()?,
            duration_ms: r.duration_ms.map(i64::from),
            viewers: r.viewers.map(i64::from),
            event_id: r.event_id,
            message: r.message.clone(),
            natural_key: record::natural_key(
                r.kind,
                channel,
                r.produced_at_ms,
                r.media_seq,
                r.event_id,
            ),
            translated_from: translated_from.map(i64::from),
            severity: r.severity.map(rv3::Severity::as_str),
        })
    }
}

/// Stores `rows` (seq, record) of one node in a database of `schema`;
/// returns how many were new. Every record must be of `schema`: the table
/// of one schema never holds another's record untranslated.
async fn insert_rows(
    conn: &mut sqlx::SqliteConnection,
    node: &str,
    schema: Schema,
    rows: &[(i64, &AnyRecord)],
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<u64> {
    let mut stored = 0;
    let mut columns = Vec::with_capacity(rows.len());
    for (seq, rec) in rows {
        if rec.schema() != schema {
            return Err(StoreError::Invalid(format!(
                "record {seq} is of schema {}, the database of schema {schema}",
                rec.schema()
            )));
        }
        match rec {
            AnyRecord::V1(r) => stored += insert_v1(conn, node, *seq, r).await?,
            AnyRecord::V2(r) => columns.push(Columns::v2(*seq, r, translated_from, channel_names)?),
            AnyRecord::V3(r) => columns.push(Columns::v3(*seq, r, translated_from, channel_names)?),
        }
    }
    if !columns.is_empty() {
        stored += insert_columns(conn, node, schema, &columns).await?;
    }
    Ok(stored)
}

/// Multi-row INSERTs of schema-2 or schema-3 rows, idempotent on (node, seq).
async fn insert_columns(
    conn: &mut sqlx::SqliteConnection,
    node: &str,
    schema: Schema,
    rows: &[Columns],
) -> Result<u64> {
    let with_severity = match schema.0 {
        2 => false,
        3 => true,
        other => return Err(StoreError::UnknownSchema(other)),
    };
    let mut stored = 0;
    for chunk in rows.chunks(INSERT_ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(if with_severity {
            "INSERT INTO records (node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms, viewers, event_id, message, natural_key, translated_from, severity) "
        } else {
            "INSERT INTO records (node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms, viewers, event_id, message, natural_key, translated_from) "
        });
        q.push_values(chunk, |mut row, c| {
            row.push_bind(node)
                .push_bind(c.seq)
                .push_bind(c.kind)
                .push_bind(c.channel_id)
                .push_bind(c.produced_at_ms)
                .push_bind(c.media_seq)
                .push_bind(c.duration_ms)
                .push_bind(c.viewers)
                .push_bind(c.event_id)
                .push_bind(c.message.as_deref())
                .push_bind(c.natural_key.as_str())
                .push_bind(c.translated_from);
            if with_severity {
                row.push_bind(c.severity);
            }
        });
        q.push(" ON CONFLICT (node_id, seq) DO NOTHING");
        stored += q.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(stored)
}

async fn insert_v1(
    conn: &mut sqlx::SqliteConnection,
    node: &str,
    seq: i64,
    r: &rv1::Record,
) -> Result<u64> {
    let done = sqlx::query(
        "INSERT INTO records (node, seq, kind, channel, at, media_seq, viewers, event, text, natural_key)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, seq) DO NOTHING",
    )
    .bind(node)
    .bind(seq)
    .bind(v1_kind_name(r.kind))
    .bind(&r.channel)
    .bind(&r.at)
    .bind(r.seq.map(|s| to_i64(s, "media_seq")).transpose()?)
    .bind(r.viewers.map(i64::from))
    .bind(r.event)
    .bind(&r.text)
    .bind(v1_natural_key(r))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// One translated record into the schema-2 table (migration 1 → 2).
async fn insert_v2(
    tx: &mut Transaction<'_, Sqlite>,
    node: &str,
    seq: i64,
    r: &rv2::Record,
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<u64> {
    let row = Columns::v2(seq, r, translated_from, channel_names)?;
    insert_columns(tx, node, Schema(2), &[row]).await
}

/// A write that may share its transaction with others of its kind.
trait Grouped: Send + Sync + 'static {
    type Out: Send + 'static;
    fn apply(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> impl std::future::Future<Output = Result<Self::Out>> + Send;
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// Writes of one kind waiting for the writer, with their answers.
struct Queue<J: Grouped> {
    pending: std::sync::Mutex<Vec<(J, Reply<J::Out>)>>,
    /// Writes per transaction at most.
    max: usize,
}

impl<J: Grouped> Queue<J> {
    fn new(max: usize) -> Queue<J> {
        Queue {
            pending: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(J, Reply<J::Out>)>> {
        // A plain queue: a panic elsewhere cannot leave it half-written.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SqliteStore {
    /// Queues `job`; once this caller holds the writer it commits every job
    /// waiting in `queue` (its own, unless an earlier holder took it). Answers
    /// after the commit that holds `job`.
    async fn grouped<J: Grouped>(&self, queue: &Queue<J>, job: J) -> Result<J::Out> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue.lock().push((job, reply));
        {
            let _w = self.writer.lock().await;
            let batch = {
                let mut pending = queue.lock();
                let n = pending.len().min(queue.max);
                pending.drain(..n).collect::<Vec<_>>()
            };
            if !batch.is_empty() {
                // In a task of its own, so a caller that goes away (its client
                // hung up) cannot cancel the commit the others wait for.
                let _ = tokio::spawn(commit_group(self.pool.clone(), batch)).await;
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Invalid(
                "the write was not stored (its commit failed); send it again".into(),
            ))
        })
    }
}

/// One transaction for every job in `batch`, each answered after the commit.
/// If it fails, each job is tried in a transaction of its own, so one bad
/// job fails only its own caller.
async fn commit_group<J: Grouped>(pool: SqlitePool, batch: Vec<(J, Reply<J::Out>)>) {
    let together = async {
        let mut tx = pool.begin().await?;
        let mut outs = Vec::with_capacity(batch.len());
        for (job, _) in &batch {
            outs.push(job.apply(&mut tx).await?);
        }
        tx.commit().await?;
        Ok::<_, StoreError>(outs)
    }
    .await;
    match together {
        Ok(outs) => {
            for ((_, reply), out) in batch.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some((_, reply)) = batch.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(_) => {
            for (job, reply) in batch {
                let alone = async {
                    let mut tx = pool.begin().await?;
                    let out = job.apply(&mut tx).await?;
                    tx.commit().await?;
                    Ok(out)
                }
                .await;
                let _ = reply.send(alone);
            }
        }
    }
}

/// A hello's row in the registry.
struct Registration(NodeRegistration);

impl Grouped for Registration {
    type Out = ();
    fn apply(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        upsert_node(conn, &self.0)
    }
}

/// One node's batch, decoded and translated, and the ack it earns.
struct Rows {
    node_id: String,
    rows: Vec<(i64, AnyRecord)>,
    /// The database's schema, which every record is in.
    schema: Schema,
    translated_from: Option<u32>,
    acked_through: i64,
    channel_names: HashMap<i64, String>,
}

impl Grouped for Rows {
    type Out = u64;
    async fn apply(&self, conn: &mut sqlx::SqliteConnection) -> Result<u64> {
        let rows: Vec<(i64, &AnyRecord)> = self.rows.iter().map(|(seq, r)| (*seq, r)).collect();
        let stored = insert_rows(
            conn,
            &self.node_id,
            self.schema,
            &rows,
            self.translated_from,
            &self.channel_names,
        )
        .await?;
        sqlx::query("UPDATE nodes SET acked_through = MAX(acked_through, ?) WHERE node_id = ?")
            .bind(self.acked_through)
            .bind(&self.node_id)
            .execute(&mut *conn)
            .await?;
        Ok(stored)
    }
}

async fn upsert_node<'e, E>(db: E, r: &NodeRegistration) -> Result<()>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query(
        "INSERT INTO nodes (node_id, credential, release, schema, role, group_name, hls_url, grant_name, epoch,
            outbox_next_seq, outbox_oldest, outbox_count, current_events, staged, last_seen_ms, binary_sha256,
            supervisor_sha256)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (node_id) DO UPDATE SET credential = excluded.credential, release = excluded.release,
            schema = excluded.schema, role = excluded.role, group_name = excluded.group_name, hls_url = excluded.hls_url,
            grant_name = excluded.grant_name, epoch = excluded.epoch, outbox_next_seq = excluded.outbox_next_seq,
            outbox_oldest = excluded.outbox_oldest, outbox_count = excluded.outbox_count,
            current_events = excluded.current_events, staged = excluded.staged, last_seen_ms = excluded.last_seen_ms,
            binary_sha256 = excluded.binary_sha256, supervisor_sha256 = excluded.supervisor_sha256",
    )
    .bind(&r.node_id)
    .bind(&r.credential)
    .bind(i64::from(r.release.0))
    .bind(i64::from(r.schema.0))
    .bind(r.role.as_str())
    .bind(&r.group)
    .bind(&r.hls_url)
    .bind(r.grant.as_str())
    .bind(to_i64(r.epoch, "epoch")?)
    .bind(to_i64(r.outbox.next_seq, "next_seq")?)
    .bind(r.outbox.oldest_unacked_seq.map(|s| to_i64(s, "oldest_unacked_seq")).transpose()?)
    .bind(to_i64(r.outbox.count, "count")?)
    .bind(json(&r.current_events)?)
    .bind(json(&r.staged)?)
    .bind(r.now_ms)
    .bind(r.binary_sha256.as_deref())
    .bind(r.supervisor_sha256.as_deref())
    .execute(db)
    .await?;
    Ok(())
}

fn event_views(events: Vec<v2::Event>, channel_names: &HashMap<i64, String>) -> Vec<EventView> {
    events
        .into_iter()
        .map(|e| EventView {
            id: e.id,
            channel: channel_names
                .get(&e.channel_id)
                .cloned()
                .unwrap_or_default(),
            group: e.group,
            start_ms: e.start_ms,
            duration_ms: e.duration_ms,
        })
        .collect()
}

fn parse_role(s: &str) -> Result<Role> {
    match s {
        "primary" => Ok(Role::Primary),
        "backup" => Ok(Role::Backup),
        other => Err(StoreError::Corrupt(format!("role {other:?}"))),
    }
}

fn parse_grant(s: &str) -> Result<Grant> {
    match s {
        "full" => Ok(Grant::Full),
        "deliver" => Ok(Grant::Deliver),
        "fenced" => Ok(Grant::Fenced),
        other => Err(StoreError::Corrupt(format!("grant {other:?}"))),
    }
}

fn check_spec(spec: &ChannelSpec) -> Result<()> {
    validate_id("name", &spec.name).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if !(500..=60_000).contains(&spec.segment_ms) {
        return Err(StoreError::Invalid(
            "segment_ms must be between 500 and 60000".into(),
        ));
    }
    if spec.ladder.len() > 16 {
        return Err(StoreError::Invalid("a ladder has at most 16 rungs".into()));
    }
    if let Some(window) = spec.window_segments {
        v3::check_window(window).map_err(StoreError::Invalid)?;
    }
    Ok(())
}

/// The refusal of a channel window on a database that has no place for it.
fn window_needs_schema_3(schema: u32) -> StoreError {
    StoreError::Invalid(format!(
        "window_segments needs schema 3 (release 3); this database is at schema {schema}, where every channel lists {} segments: leave it out",
        handover_core::hls::WINDOW_SEGMENTS
    ))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn schema(&self) -> Schema {
        self.info.schema
    }

    async fn cluster(&self) -> Result<ClusterState> {
        let rows = sqlx::query("SELECT key, value FROM cluster")
            .fetch_all(&self.pool)
            .await?;
        let mut map = HashMap::new();
        for row in rows {
            map.insert(
                row.try_get::<String, _>("key")?,
                row.try_get::<i64, _>("value")?,
            );
        }
        let get = |k: &str| {
            map.get(k)
                .copied()
                .ok_or_else(|| StoreError::Corrupt(format!("cluster.{k} missing")))
        };
        Ok(ClusterState {
            release: Release(u32::try_from(get("release")?).unwrap_or(0)),
            schema: Schema(u32::try_from(get("schema")?).unwrap_or(0)),
            epoch: to_u64(get("epoch")?),
            fenced: get("fenced")? != 0,
            param_revision: to_u64(get("param_revision")?),
        })
    }

    async fn set_fence(&self, fenced: bool) -> Result<ClusterState> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        if fenced {
            sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'epoch'")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE cluster SET value = ? WHERE key = 'fenced'")
            .bind(i64::from(fenced))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        drop(_w);
        self.cluster().await
    }

    async fn register_node(&self, r: &NodeRegistration) -> Result<()> {
        self.grouped(&self.registrations, Registration(r.clone()))
            .await
    }

    async fn node_credential(&self, node_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT credential FROM nodes WHERE node_id = ?")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn node_by_credential(&self, credential: &str) -> Result<Option<(String, Schema)>> {
        let row = sqlx::query("SELECT node_id, schema FROM nodes WHERE credential = ?")
            .bind(credential)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                r.try_get("node_id")?,
                Schema(u32::try_from(r.try_get::<i64, _>("schema")?).unwrap_or(0)),
            ))
        })
        .transpose()
    }

    async fn heartbeat(
        &self,
        node_id: &str,
        hb: &Heartbeat,
        grant: Grant,
        now_ms: i64,
    ) -> Result<()> {
        let _w = self.writer.lock().await;
        sqlx::query(
            "UPDATE nodes SET outbox_next_seq = ?, outbox_oldest = ?, outbox_count = ?, current_events = ?, staged = ?,
                grant_name = ?, epoch = ?, last_seen_ms = ? WHERE node_id = ?",
        )
        .bind(to_i64(hb.outbox.next_seq, "next_seq")?)
        .bind(hb.outbox.oldest_unacked_seq.map(|s| to_i64(s, "oldest_unacked_seq")).transpose()?)
        .bind(to_i64(hb.outbox.count, "count")?)
        .bind(json(&hb.current_events)?)
        .bind(json(&hb.staged)?)
        .bind(grant.as_str())
        .bind(to_i64(hb.epoch, "epoch")?)
        .bind(now_ms)
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn desired(&self, node_id: &str) -> Result<Desired> {
        let raw: Option<String> =
            sqlx::query_scalar("SELECT desired FROM node_desired WHERE node_id = ?")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        match raw {
            Some(raw) => serde_json::from_str(&raw)
                .map_err(|e| StoreError::Corrupt(format!("desired state of {node_id}: {e}"))),
            None => Ok(Desired::default()),
        }
    }

    async fn set_desired(&self, node_id: &str, desired: &Desired) -> Result<()> {
        let _w = self.writer.lock().await;
        sqlx::query("INSERT INTO node_desired (node_id, desired) VALUES (?, ?) ON CONFLICT (node_id) DO UPDATE SET desired = excluded.desired")
            .bind(node_id)
            .bind(json(desired)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn upgrade(&self) -> Result<Option<(i64, Upgrade)>> {
        let row = sqlx::query("SELECT id, state FROM upgrades ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let state: String = r.try_get("state")?;
            let up = serde_json::from_str(&state)
                .map_err(|e| StoreError::Corrupt(format!("upgrade state: {e}")))?;
            Ok((r.try_get("id")?, up))
        })
        .transpose()
    }

    async fn save_upgrade(&self, id: Option<i64>, state: &Upgrade, now_ms: i64) -> Result<i64> {
        let _w = self.writer.lock().await;
        let state = json(state)?;
        match id {
            Some(id) => {
                sqlx::query("UPDATE upgrades SET state = ?, updated_ms = ? WHERE id = ?")
                    .bind(state)
                    .bind(now_ms)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(id)
            }
            None => Ok(sqlx::query_scalar(
                "INSERT INTO upgrades (state, updated_ms) VALUES (?, ?) RETURNING id",
            )
            .bind(state)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?),
        }
    }

    async fn set_cluster_release(&self, release: Release) -> Result<()> {
        let _w = self.writer.lock().await;
        sqlx::query("UPDATE cluster SET value = ? WHERE key = 'release'")
            .bind(i64::from(release.0))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query("SELECT * FROM nodes ORDER BY group_name, role DESC, node_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let events: String = row.try_get("current_events")?;
                Ok(NodeRow {
                    node_id: row.try_get("node_id")?,
                    release: Release(u32::try_from(row.try_get::<i64, _>("release")?).unwrap_or(0)),
                    schema: Schema(u32::try_from(row.try_get::<i64, _>("schema")?).unwrap_or(0)),
                    role: parse_role(&row.try_get::<String, _>("role")?)?,
                    group: row.try_get("group_name")?,
                    hls_url: row.try_get("hls_url")?,
                    grant: parse_grant(&row.try_get::<String, _>("grant_name")?)?,
                    epoch: to_u64(row.try_get("epoch")?),
                    outbox: OutboxState {
                        next_seq: to_u64(row.try_get("outbox_next_seq")?),
                        oldest_unacked_seq: row
                            .try_get::<Option<i64>, _>("outbox_oldest")?
                            .map(to_u64),
                        count: to_u64(row.try_get("outbox_count")?),
                    },
                    current_events: serde_json::from_str(&events).unwrap_or_default(),
                    staged: serde_json::from_str(&row.try_get::<String, _>("staged")?)
                        .unwrap_or_default(),
                    last_seen_ms: row.try_get("last_seen_ms")?,
                    acked_through: to_u64(row.try_get("acked_through")?),
                    binary_sha256: row.try_get("binary_sha256")?,
                    supervisor_sha256: row.try_get("supervisor_sha256")?,
                })
            })
            .collect()
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<ChannelSpec> {
        check_spec(spec)?;
        if spec.window_segments.is_some() && self.info.schema < Schema(3) {
            return Err(window_needs_schema_3(self.info.schema.0));
        }
        let mut spec = spec.clone();
        if spec.ladder.is_empty() {
            spec.ladder = vec![v2::Rung {
                height: 720,
                kbps: 3000,
            }];
        }
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM channels WHERE name = ?")
            .bind(&spec.name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Exists {
                what: "channel",
                name: spec.name,
            });
        }
        match self.info.schema.0 {
            1 => {
                if spec.segment_ms % 1000 != 0 {
                    return Err(StoreError::Invalid("release 1 supports whole-second segments only (segment_ms a multiple of 1000)".into()));
                }
                let top = spec.ladder[0];
                spec.ladder.truncate(1);
                sqlx::query("INSERT INTO channels (name, title, segment_seconds, resolution, bitrate_kbps) VALUES (?, ?, ?, ?, ?)")
                    .bind(&spec.name)
                    .bind(spec.title.clone().unwrap_or_else(|| spec.name.clone()))
                    .bind(i64::from(spec.segment_ms / 1000))
                    .bind(format!("{}x{}", top.height * 16 / 9, top.height))
                    .bind(i64::from(top.kbps))
                    .execute(&mut *tx)
                    .await?;
            }
            2 => {
                let ladder = serde_json::to_string(&spec.ladder)
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
                sqlx::query("INSERT INTO channels (name, segment_ms, ladder) VALUES (?, ?, ?)")
                    .bind(&spec.name)
                    .bind(i64::from(spec.segment_ms))
                    .bind(ladder)
                    .execute(&mut *tx)
                    .await?;
                spec.title = None;
            }
            3 => {
                let ladder = serde_json::to_string(&spec.ladder)
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
                let window = *spec
                    .window_segments
                    .get_or_insert(v3::WINDOW_SEGMENTS_DEFAULT);
                sqlx::query("INSERT INTO channels (name, segment_ms, ladder, window_segments) VALUES (?, ?, ?, ?)")
                    .bind(&spec.name)
                    .bind(i64::from(spec.segment_ms))
                    .bind(ladder)
                    .bind(i64::from(window))
                    .execute(&mut *tx)
                    .await?;
                spec.title = None;
            }
            other => return Err(StoreError::UnknownSchema(other)),
        }
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(spec)
    }

    async fn channels(&self) -> Result<Vec<ChannelSpec>> {
        let params = self.params().await?;
        match self.info.schema.0 {
            1 => {
                let p: v1::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(p.channels
                    .into_iter()
                    .map(|c| {
                        let height = c
                            .resolution
                            .split_once('x')
                            .and_then(|(_, h)| h.parse().ok())
                            .unwrap_or(0);
                        ChannelSpec {
                            name: c.name,
                            title: Some(c.title),
                            segment_ms: c.segment_seconds.saturating_mul(1000),
                            ladder: vec![v2::Rung {
                                height,
                                kbps: c.bitrate_kbps,
                            }],
                            window_segments: None,
                        }
                    })
                    .collect())
            }
            2 => {
                let p: v2::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(p.channels
                    .into_iter()
                    .map(|c| ChannelSpec {
                        name: c.name,
                        title: None,
                        segment_ms: c.segment_ms,
                        ladder: c.ladder,
                        window_segments: None,
                    })
                    .collect())
            }
            3 => {
                let p: v3::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(p.channels
                    .into_iter()
                    .map(|c| ChannelSpec {
                        name: c.name,
                        title: None,
                        segment_ms: c.segment_ms,
                        ladder: c.ladder,
                        window_segments: Some(c.window_segments),
                    })
                    .collect())
            }
            other => Err(StoreError::UnknownSchema(other)),
        }
    }

    async fn create_group(&self, group: &Group) -> Result<Group> {
        for (field, id) in [
            ("name", &group.name),
            ("primary", &group.primary),
            ("backup", &group.backup),
        ] {
            validate_id(field, id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        }
        if group.primary == group.backup {
            return Err(StoreError::Invalid(
                "primary and backup must be different nodes".into(),
            ));
        }
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("INSERT INTO groups (name, primary_node, backup_node) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(&group.name)
            .bind(&group.primary)
            .bind(&group.backup)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Exists {
                what: "group",
                name: group.name.clone(),
            });
        }
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(group.clone())
    }

    async fn groups(&self) -> Result<Vec<Group>> {
        let rows = sqlx::query("SELECT name, primary_node, backup_node FROM groups ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Group {
                    name: r.try_get("name")?,
                    primary: r.try_get("primary_node")?,
                    backup: r.try_get("backup_node")?,
                })
            })
            .collect()
    }

    async fn create_event(&self, spec: &EventSpec) -> Result<EventView> {
        if spec.duration_ms == 0 || spec.duration_ms > 7 * 24 * 3_600_000 {
            return Err(StoreError::Invalid(
                "duration_ms must be between 1 and one week".into(),
            ));
        }
        let (dir, _) = self.channel_directory().await?;
        let channel = dir.get(&spec.channel).ok_or_else(|| StoreError::Missing {
            what: "channel",
            name: spec.channel.clone(),
        })?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let group: Option<i64> = sqlx::query_scalar("SELECT 1 FROM groups WHERE name = ?")
            .bind(&spec.group)
            .fetch_optional(&mut *tx)
            .await?;
        if group.is_none() {
            return Err(StoreError::Missing {
                what: "group",
                name: spec.group.clone(),
            });
        }
        let id: i64 = match self.info.schema.0 {
            1 => {
                if spec.duration_ms % 1000 != 0 {
                    return Err(StoreError::Invalid("release 1 supports whole-second durations only".into()));
                }
                let start = timefmt::rfc3339_from_ms(spec.start_ms).map_err(|e| StoreError::Invalid(e.to_string()))?;
                sqlx::query_scalar("INSERT INTO events (channel, group_name, start, duration_s) VALUES (?, ?, ?, ?) RETURNING id")
                    .bind(&spec.channel)
                    .bind(&spec.group)
                    .bind(start)
                    .bind(to_i64(spec.duration_ms / 1000, "duration")?)
                    .fetch_one(&mut *tx)
                    .await?
            }
            2 | 3 => {
                sqlx::query_scalar("INSERT INTO events (channel_id, group_name, start_ms, duration_ms) VALUES (?, ?, ?, ?) RETURNING id")
                    .bind(channel.id)
                    .bind(&spec.group)
                    .bind(spec.start_ms)
                    .bind(to_i64(spec.duration_ms, "duration")?)
                    .fetch_one(&mut *tx)
                    .await?
            }
            other => return Err(StoreError::UnknownSchema(other)),
        };
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(EventView {
            id,
            channel: spec.channel.clone(),
            group: spec.group.clone(),
            start_ms: spec.start_ms,
            duration_ms: spec.duration_ms,
        })
    }

    async fn events(&self) -> Result<Vec<EventView>> {
        let (_, by_id) = self.channel_directory().await?;
        let params = self.params().await?;
        match self.info.schema.0 {
            1 => {
                let p: v1::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                p.events
                    .into_iter()
                    .map(|e| {
                        Ok(EventView {
                            id: e.id,
                            channel: e.channel,
                            group: e.group,
                            start_ms: timefmt::ms_from_rfc3339(&e.start)
                                .map_err(|err| StoreError::Corrupt(err.to_string()))?,
                            duration_ms: u64::from(e.duration_s) * 1000,
                        })
                    })
                    .collect()
            }
            2 => {
                let p: v2::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(event_views(p.events, &by_id))
            }
            3 => {
                let p: v3::Params = serde_json::from_value(params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(event_views(p.events, &by_id))
            }
            other => Err(StoreError::UnknownSchema(other)),
        }
    }

    async fn params(&self) -> Result<serde_json::Value> {
        let revision = self.cluster().await?.param_revision;
        let groups = self.groups().await?;
        let value = match self.info.schema.0 {
            1 => {
                let channels = sqlx::query("SELECT name, title, segment_seconds, resolution, bitrate_kbps FROM channels ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(v1::Channel {
                            name: r.try_get("name")?,
                            title: r.try_get("title")?,
                            segment_seconds: u32::try_from(r.try_get::<i64, _>("segment_seconds")?).unwrap_or(0),
                            resolution: r.try_get("resolution")?,
                            bitrate_kbps: u32::try_from(r.try_get::<i64, _>("bitrate_kbps")?).unwrap_or(0),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let events = sqlx::query(
                    "SELECT id, channel, group_name, start, duration_s FROM events ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(v1::Event {
                        id: r.try_get("id")?,
                        channel: r.try_get("channel")?,
                        group: r.try_get("group_name")?,
                        start: r.try_get("start")?,
                        duration_s: u32::try_from(r.try_get::<i64, _>("duration_s")?).unwrap_or(0),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
                serde_json::to_value(v1::Params {
                    revision,
                    channels,
                    groups,
                    events,
                })
            }
            2 => {
                let channels = self
                    .channels_by_id(false)
                    .await?
                    .into_iter()
                    .map(|(c, _)| c)
                    .collect();
                serde_json::to_value(v2::Params {
                    revision,
                    channels,
                    groups,
                    events: self.events_by_id().await?,
                })
            }
            3 => {
                let channels = self
                    .channels_by_id(true)
                    .await?
                    .into_iter()
                    .map(|(c, window_segments)| v3::Channel {
                        id: c.id,
                        name: c.name,
                        segment_ms: c.segment_ms,
                        ladder: c.ladder,
                        window_segments,
                    })
                    .collect();
                serde_json::to_value(v3::Params {
                    revision,
                    channels,
                    groups,
                    events: self.events_by_id().await?,
                })
            }
            other => return Err(StoreError::UnknownSchema(other)),
        };
        value.map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    async fn store_batch(
        &self,
        node_id: &str,
        from: Schema,
        first_seq: u64,
        raw: &[serde_json::Value],
    ) -> Result<BatchOutcome> {
        let (dir, by_id) = self.channel_directory().await?;
        let to = self.info.schema;
        let mut decoded = Vec::with_capacity(raw.len());
        for (i, value) in raw.iter().enumerate() {
            let seq = first_seq + i as u64;
            let rec = record::upcast(from, to, value, node_id, &dir)
                .map_err(|source| StoreError::Untranslatable { seq, source })?;
            decoded.push((to_i64(seq, "seq")?, rec));
        }
        let translated_from = (from != to).then_some(from.0);
        let last = first_seq + raw.len() as u64 - 1;
        let rows = Rows {
            node_id: node_id.to_owned(),
            rows: decoded,
            schema: to,
            translated_from,
            acked_through: to_i64(last, "seq")?,
            channel_names: by_id,
        };
        let stored = self.grouped(&self.batches, rows).await?;
        let translated = if translated_from.is_some() { stored } else { 0 };
        Ok(BatchOutcome {
            acked_through: last,
            stored,
            translated,
        })
    }

    async fn record_summary(&self) -> Result<Vec<RecordSummary>> {
        let sql = match self.info.schema.0 {
            1 => "SELECT node AS node_id, COUNT(*) AS n, MAX(seq) AS max_seq, 0 AS translated FROM records GROUP BY node ORDER BY node",
            2 | 3 => "SELECT node_id, COUNT(*) AS n, MAX(seq) AS max_seq, COUNT(translated_from) AS translated FROM records GROUP BY node_id ORDER BY node_id",
            other => return Err(StoreError::UnknownSchema(other)),
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(RecordSummary {
                    node_id: r.try_get("node_id")?,
                    records: to_u64(r.try_get("n")?),
                    max_seq: to_u64(r.try_get("max_seq")?),
                    translated: to_u64(r.try_get("translated")?),
                })
            })
            .collect()
    }

    async fn records(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>> {
        let sql = match self.info.schema.0 {
            1 => "SELECT node AS node_id, seq, kind, natural_key, NULL AS translated_from FROM records WHERE node = ? AND seq > ? ORDER BY seq LIMIT ?",
            2 | 3 => "SELECT node_id, seq, kind, natural_key, translated_from FROM records WHERE node_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            other => return Err(StoreError::UnknownSchema(other)),
        };
        let rows = sqlx::query(sql)
            .bind(node_id)
            .bind(to_i64(after_seq, "after_seq")?)
            .bind(i64::from(limit.min(crate::RECORDS_PAGE_MAX)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredRecord {
                    node_id: r.try_get("node_id")?,
                    seq: to_u64(r.try_get("seq")?),
                    kind: r.try_get("kind")?,
                    natural_key: r.try_get("natural_key")?,
                    translated_from: r
                        .try_get::<Option<i64>, _>("translated_from")?
                        .map(|v| u32::try_from(v).unwrap_or(0)),
                })
            })
            .collect()
    }
}
