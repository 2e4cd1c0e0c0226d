//! SQLite backend: the embedded default. WAL, `synchronous=FULL`, one writer
//! at a time (a mutex, so a read-then-write transaction never meets
//! SQLITE_BUSY), readers in parallel.

use crate::{
    BatchOutcome, ClusterState, NewBootstrapToken, NodeRegistration, NodeRow, Result, Store,
    StoreError,
};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::identity::{BootstrapToken, SecretDigest, GROUPS_MAX};
use handover_core::params::{v1, v2, v3, Group};
use handover_core::record::{self, AnyRecord, ChannelDirectory, ChannelRef};
use handover_core::timefmt;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{validate_id, Heartbeat, OutboxState};
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::Mutex;

pub(crate) mod migration;
pub(crate) mod rows;
mod tables;
pub(crate) mod writer;

pub use migration::migrate;
use migration::schema_behind;
#[cfg(feature = "test-hooks")]
pub use migration::TEST_FAULT_ENV;
use rows::{
    check_spec, event_views, insert_rows, json, ladder_channel, parse_grant, parse_role,
    stored_params, to_i64, to_u64, window_needs_schema_3, RUNG_HEIGHT_DEFAULT, RUNG_KBPS_DEFAULT,
};
use tables::{product_tables, SHARED_TABLES};
use writer::{
    HeartbeatRow, Queue, Registration, Rows, BATCHES_PER_COMMIT_MAX, HEARTBEATS_PER_COMMIT_MAX,
    REGISTRATIONS_PER_COMMIT_MAX,
};

/// Connections for concurrent readers; writes take the writer mutex.
const POOL_CONNECTIONS_MAX: u32 = 8;
/// How long a connection waits for a lock SQLite holds (a checkpoint, the
/// snapshot) before its query fails.
const BUSY_TIMEOUT_MS: u64 = 10_000;
/// Longest event: one week. Longer is a typo, not a live event.
const EVENT_DURATION_MS_MAX: u64 = 7 * 24 * 3_600_000;

pub struct SqliteStore {
    pool: SqlitePool,
    info: &'static ReleaseInfo,
    writer: Mutex<()>,
    /// Writes waiting for the writer, by kind. Whoever takes the writer
    /// next commits every waiting write of its kind in one transaction
    /// (group commit): a burst of hellos, heartbeats or record batches costs a few
    /// fsyncs, not one each. Each caller is answered only after the commit
    /// that holds its write.
    registrations: Queue<Registration>,
    heartbeats: Queue<HeartbeatRow>,
    batches: Queue<Rows>,
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
        // Private (0600) before SQLite opens it; its WAL and SHM files follow.
        handover_private::database(path).map_err(open_error)?;
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
            heartbeats: Queue::new(HEARTBEATS_PER_COMMIT_MAX),
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
        hash_plaintext_credentials(&mut tx).await?;
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

    /// A consistent copy of the database, taken online with `VACUUM INTO`,
    /// in a private `dir` (0700) and itself private (0600: it holds what
    /// the database holds).
    pub async fn snapshot(&self, dir: &Path, schema: u32) -> Result<PathBuf> {
        handover_private::dir(dir).map_err(open_error)?;
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
        // `VACUUM INTO` fills an empty file and keeps its mode.
        handover_private::file(&path).map_err(open_error)?;
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

    async fn credential_of(&self, node_id: &str) -> Result<Option<SecretDigest>> {
        let hex: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM credentials WHERE node_id = ?")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(hex.map(SecretDigest::from_stored))
    }

    async fn node_by_credential(
        &self,
        credential: &SecretDigest,
    ) -> Result<Option<(String, Schema)>> {
        // One lookup in the unique index on `credentials.sha256`.
        let row = sqlx::query(
            "SELECT n.node_id, n.schema FROM credentials c JOIN nodes n ON n.node_id = c.node_id
             WHERE c.sha256 = ?",
        )
        .bind(credential.as_str())
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

    async fn bootstrap_token(&self, node_id: &str) -> Result<Option<BootstrapToken>> {
        let row = sqlx::query(
            "SELECT sha256, expires_ms, used_ms FROM bootstrap_tokens WHERE node_id = ?",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BootstrapToken {
                digest: SecretDigest::from_stored(r.try_get("sha256")?),
                expires_ms: r.try_get("expires_ms")?,
                used_ms: r.try_get("used_ms")?,
            })
        })
        .transpose()
    }

    async fn add_bootstrap_tokens(&self, tokens: &[NewBootstrapToken]) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        for t in tokens {
            // One token per node: a new one replaces an unused or used one.
            sqlx::query(
                "INSERT INTO bootstrap_tokens (node_id, sha256, expires_ms, used_ms) VALUES (?, ?, ?, NULL)
                 ON CONFLICT (node_id) DO UPDATE SET sha256 = excluded.sha256,
                    expires_ms = excluded.expires_ms, used_ms = NULL",
            )
            .bind(&t.node_id)
            .bind(t.digest.as_str())
            .bind(t.expires_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn trade_bootstrap_token(
        &self,
        node_id: &str,
        token: &SecretDigest,
        credential: &SecretDigest,
        now_ms: i64,
    ) -> Result<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let used = sqlx::query(
            "UPDATE bootstrap_tokens SET used_ms = ?
             WHERE node_id = ? AND sha256 = ? AND used_ms IS NULL AND expires_ms > ?",
        )
        .bind(now_ms)
        .bind(node_id)
        .bind(token.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if used != 1 {
            return Ok(false);
        }
        // The new credential replaces the node's old one, which stops working.
        sqlx::query(
            "INSERT INTO credentials (node_id, sha256) VALUES (?, ?)
             ON CONFLICT (node_id) DO UPDATE SET sha256 = excluded.sha256",
        )
        .bind(node_id)
        .bind(credential.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn remove_node(&self, node_id: &str) -> Result<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let mut removed = 0;
        for table in ["credentials", "bootstrap_tokens", "nodes", "node_desired"] {
            removed += sqlx::query(&format!("DELETE FROM {table} WHERE node_id = ?"))
                .bind(node_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed > 0)
    }

    async fn heartbeat(
        &self,
        node_id: &str,
        hb: &Heartbeat,
        grant: Grant,
        now_ms: i64,
    ) -> Result<()> {
        let row = HeartbeatRow::of(node_id, hb, grant, now_ms)?;
        self.grouped(&self.heartbeats, row).await
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
                height: RUNG_HEIGHT_DEFAULT,
                kbps: RUNG_KBPS_DEFAULT,
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
                let p: v1::Params = stored_params(params)?;
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
                let p: v2::Params = stored_params(params)?;
                Ok(p.channels
                    .into_iter()
                    .map(|c| ladder_channel(c.name, c.segment_ms, c.ladder, None))
                    .collect())
            }
            3 => {
                let p: v3::Params = stored_params(params)?;
                Ok(p.channels
                    .into_iter()
                    .map(|c| {
                        ladder_channel(c.name, c.segment_ms, c.ladder, Some(c.window_segments))
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
        // A node id is in one group only: the groups say who a node is.
        let taken: Option<(String, String, String)> = sqlx::query_as(
            "SELECT name, primary_node, backup_node FROM groups
             WHERE primary_node IN (?, ?) OR backup_node IN (?, ?) LIMIT 1",
        )
        .bind(&group.primary)
        .bind(&group.backup)
        .bind(&group.primary)
        .bind(&group.backup)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((name, primary, backup)) = taken {
            let node = if [&primary, &backup].contains(&&group.primary) {
                &group.primary
            } else {
                &group.backup
            };
            let role = if *node == primary {
                "primary"
            } else {
                "backup"
            };
            return Err(StoreError::Invalid(format!(
                "node {node:?} is already the {role} of group {name:?}: a node is in one group"
            )));
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM groups")
            .fetch_one(&mut *tx)
            .await?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= GROUPS_MAX {
            return Err(StoreError::Invalid(format!(
                "the cluster has {GROUPS_MAX} groups, the most one controller registers"
            )));
        }
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
        if spec.duration_ms == 0 || spec.duration_ms > EVENT_DURATION_MS_MAX {
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
                let p: v1::Params = stored_params(params)?;
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
                let p: v2::Params = stored_params(params)?;
                Ok(event_views(p.events, &by_id))
            }
            3 => {
                let p: v3::Params = stored_params(params)?;
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

/// Credentials an older build stored in plain text (`nodes.credential`)
/// become digests in `credentials`, and the plain text is blanked. Runs at
/// every open; a no-op once done.
async fn hash_plaintext_credentials(tx: &mut sqlx::SqliteConnection) -> Result<()> {
    let plain: Vec<(String, String)> =
        sqlx::query_as("SELECT node_id, credential FROM nodes WHERE credential != ''")
            .fetch_all(&mut *tx)
            .await?;
    for (node_id, credential) in &plain {
        sqlx::query("INSERT OR IGNORE INTO credentials (node_id, sha256) VALUES (?, ?)")
            .bind(node_id)
            .bind(SecretDigest::of(credential).as_str())
            .execute(&mut *tx)
            .await?;
    }
    if !plain.is_empty() {
        sqlx::query("UPDATE nodes SET credential = ''")
            .execute(&mut *tx)
            .await?;
        tracing::info!(
            nodes = plain.len(),
            "stored credentials replaced by their digests"
        );
    }
    Ok(())
}

fn open_error(e: handover_private::PrivateError) -> StoreError {
    StoreError::Open {
        path: e.path.display().to_string(),
        reason: format!("cannot {}: {}", e.op, e.source),
    }
}
