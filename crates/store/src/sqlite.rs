//! SQLite backend: the embedded default. WAL, `synchronous=FULL`, one writer
//! at a time (a mutex, so a read-then-write transaction never meets
//! SQLITE_BUSY), readers in parallel.

use crate::neutral;
use crate::replicas::{self, GuardCell, ReplicaBeat, ReplicaSync, UpgradeStep};
use crate::{
    BatchOutcome, ClusterState, NewBootstrapToken, NodeRegistration, NodeRow, Result, Store,
    StoreError,
};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::identity::{BootstrapToken, SecretDigest};
use handover_core::params::Group;
use handover_core::record::{AnyRecord, ChannelDirectory};
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::Heartbeat;
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::Mutex;

pub(crate) mod migration;
mod tables;
pub(crate) mod writer;

#[cfg(feature = "test-hooks")]
pub use crate::neutral::migration::TEST_FAULT_ENV;
use crate::neutral::rows::{insert_rows, to_i64};
pub use migration::migrate;
use tables::{product_tables, SHARED_TABLES};
use writer::{
    HeartbeatRow, Queue, Registration, Rows, BATCHES_PER_COMMIT_MAX, HEARTBEATS_PER_COMMIT_MAX,
    REGISTRATIONS_PER_COMMIT_MAX,
};

/// How every write transaction begins: with the write lock, waiting for it
/// up to the busy timeout. A deferred transaction that reads first and
/// writes later fails at once ("database is locked") when another process
/// wrote in between, as the old and the new worker of a switching
/// controller both do for a moment.
pub(crate) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Connections for concurrent readers; writes take the writer mutex.
const POOL_CONNECTIONS_MAX: u32 = 8;
/// How long a connection waits for a lock SQLite holds (a checkpoint, the
/// snapshot) before its query fails.
const BUSY_TIMEOUT_MS: u64 = 10_000;
impl neutral::Dialect for Sqlite {
    /// 13 values each at most, far below SQLite's 32,766: one statement,
    /// and one round trip to the connection's thread, per this many
    /// records instead of one per record.
    const INSERT_ROWS_PER_STATEMENT: usize = 100;
    /// One batch after another: SQLite's statements cost no round trip.
    fn insert_columns<'c>(
        conn: &'c mut Self::Connection,
        with_severity: bool,
        batches: &'c [(&'c str, &'c [neutral::rows::Columns])],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>>> + Send + 'c>> {
        Box::pin(async move {
            let mut stored = Vec::with_capacity(batches.len());
            for (node, rows) in batches {
                stored.push(
                    neutral::rows::insert_values::<Sqlite>(conn, node, with_severity, rows).await?,
                );
            }
            Ok(stored)
        })
    }
    const RAISE_ACK: &'static str =
        "UPDATE nodes SET acked_through = MAX(acked_through, $1) WHERE node_id = $2";
    /// One process writes, under the writer mutex: nothing to lock.
    const EPOCH_LOCK: &'static str = "";
}

pub struct SqliteStore {
    pool: SqlitePool,
    info: &'static ReleaseInfo,
    writer: Mutex<()>,
    /// Whose orchestrator writes this store makes (the lease's term).
    guard: GuardCell,
    /// Writes waiting for the writer, by kind. Whoever takes the writer
    /// next commits every waiting write of its kind in one transaction
    /// (group commit): a burst of hellos, heartbeats or record batches costs a few
    /// fsyncs, not one each. Each caller is answered only after the commit
    /// that holds its write.
    registrations: Queue<Registration>,
    heartbeats: Queue<HeartbeatRow>,
    batches: Queue<Rows>,
    /// The channels batches are decoded with, kept between them.
    channels: neutral::writes::ChannelCache,
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
            guard: GuardCell::default(),
            registrations: Queue::new(REGISTRATIONS_PER_COMMIT_MAX),
            heartbeats: Queue::new(HEARTBEATS_PER_COMMIT_MAX),
            batches: Queue::new(BATCHES_PER_COMMIT_MAX),
            channels: Default::default(),
        };
        store.prepare(snapshot_dir).await?;
        Ok(store)
    }

    async fn prepare(&self, snapshot_dir: &Path) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
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
        neutral::add_counters::<Sqlite>(&mut tx).await?;
        let Some(db_schema) = neutral::db_schema::<Sqlite>(&mut tx).await? else {
            sqlx::raw_sql(product_tables(self.info.schema)?)
                .execute(&mut *tx)
                .await?;
            neutral::first_cluster_row::<Sqlite>(&mut tx, self.info).await?;
            tx.commit().await?;
            return Ok(());
        };
        tx.commit().await?;
        let target = self.info.schema.0;
        if let Some(db_schema) = neutral::judge_schema(self.info, db_schema)? {
            let snapshot = self.snapshot(snapshot_dir, db_schema).await?;
            tracing::info!(snapshot = %snapshot.display(), from = db_schema, to = target, "migrating database");
            migrate(&self.pool, db_schema, target).await?;
        }
        Ok(())
    }

    /// In a guarded write's transaction: the lease, judged (see
    /// [`replicas`]); one process writes SQLite, under the writer mutex.
    async fn leading(&self, tx: &mut sqlx::SqliteConnection) -> Result<Option<(String, u64)>> {
        replicas::check_lease::<Sqlite>(tx, &self.guard, "").await
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
        let mut conn = self.pool.acquire().await?;
        neutral::channel_directory::<Sqlite>(&mut conn, self.info.schema).await
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let stored = insert_rows::<Sqlite>(
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
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn schema(&self) -> Schema {
        self.info.schema
    }

    async fn cluster(&self) -> Result<ClusterState> {
        let mut conn = self.pool.acquire().await?;
        neutral::cluster::<Sqlite>(&mut conn).await
    }

    async fn set_fence(&self, fenced: bool) -> Result<ClusterState> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        self.leading(&mut tx).await?;
        neutral::set_fence::<Sqlite>(&mut tx, fenced).await?;
        tx.commit().await?;
        drop(_w);
        self.cluster().await
    }

    async fn register_node(&self, r: &NodeRegistration) -> Result<()> {
        self.grouped(&self.registrations, Registration(r.clone()))
            .await
    }

    async fn credential_of(&self, node_id: &str) -> Result<Option<SecretDigest>> {
        let mut conn = self.pool.acquire().await?;
        neutral::credential_of::<Sqlite>(&mut conn, node_id).await
    }

    async fn node_by_credential(
        &self,
        credential: &SecretDigest,
    ) -> Result<Option<(String, Schema)>> {
        let mut conn = self.pool.acquire().await?;
        neutral::node_by_credential::<Sqlite>(&mut conn, credential).await
    }

    async fn bootstrap_token(&self, node_id: &str) -> Result<Option<BootstrapToken>> {
        let mut conn = self.pool.acquire().await?;
        neutral::bootstrap_token::<Sqlite>(&mut conn, node_id).await
    }

    async fn add_bootstrap_tokens(&self, tokens: &[NewBootstrapToken]) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        neutral::add_bootstrap_tokens::<Sqlite>(&mut tx, tokens).await?;
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let removed = neutral::remove_node::<Sqlite>(&mut tx, node_id).await?;
        tx.commit().await?;
        Ok(removed)
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
        let mut conn = self.pool.acquire().await?;
        neutral::desired::<Sqlite>(&mut conn, node_id).await
    }

    async fn set_desired(&self, desired: &[(String, Desired)]) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        self.leading(&mut tx).await?;
        neutral::set_desired::<Sqlite>(&mut tx, desired).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn upgrade(&self) -> Result<Option<(i64, Upgrade)>> {
        let mut conn = self.pool.acquire().await?;
        neutral::upgrade::<Sqlite>(&mut conn).await
    }

    async fn save_upgrade(&self, id: Option<i64>, up: &Upgrade, now_ms: i64) -> Result<i64> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let leader = self.leading(&mut tx).await?;
        let id = replicas::save_upgrade::<Sqlite>(&mut tx, leader, id, up, now_ms).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn set_cluster_release(&self, release: Release) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        self.leading(&mut tx).await?;
        neutral::set_cluster_release::<Sqlite>(&mut tx, release).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sync_replica(&self, beat: &ReplicaBeat) -> Result<ReplicaSync> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let (leader, leading, replicas) = {
            let _w = self.writer.lock().await;
            let mut conn = self.pool.acquire().await?;
            replicas::sync::<Sqlite>(&mut conn, &self.guard, beat, now_ms).await?
        };
        Ok(ReplicaSync {
            cluster: self.cluster().await?,
            leader,
            leading,
            replicas,
        })
    }

    async fn upgrade_steps(&self, id: i64) -> Result<Vec<UpgradeStep>> {
        let mut conn = self.pool.acquire().await?;
        replicas::steps::<Sqlite>(&mut conn, id).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut conn = self.pool.acquire().await?;
        neutral::nodes::<Sqlite>(&mut conn).await
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<ChannelSpec> {
        let spec = neutral::channel_to_create(self.info.schema, spec)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let spec = neutral::insert_channel::<Sqlite>(&mut tx, self.info.schema, spec).await?;
        tx.commit().await?;
        Ok(spec)
    }

    async fn channels(&self) -> Result<Vec<ChannelSpec>> {
        let params = self.params().await?;
        neutral::channels_of(self.info.schema, params)
    }

    async fn create_group(&self, group: &Group) -> Result<Group> {
        neutral::check_group(group)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        neutral::insert_group::<Sqlite>(&mut tx, group).await?;
        tx.commit().await?;
        Ok(group.clone())
    }

    async fn groups(&self) -> Result<Vec<Group>> {
        let mut conn = self.pool.acquire().await?;
        neutral::groups::<Sqlite>(&mut conn).await
    }

    async fn create_event(&self, spec: &EventSpec) -> Result<EventView> {
        neutral::check_event(spec)?;
        let (dir, _) = self.channel_directory().await?;
        let channel = neutral::event_channel(&dir, spec)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let event =
            neutral::insert_event::<Sqlite>(&mut tx, self.info.schema, spec, channel).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn events(&self) -> Result<Vec<EventView>> {
        let (_, by_id) = self.channel_directory().await?;
        let params = self.params().await?;
        neutral::events_of(self.info.schema, params, &by_id)
    }

    async fn params(&self) -> Result<serde_json::Value> {
        let revision = self.cluster().await?.param_revision;
        let groups = self.groups().await?;
        let mut conn = self.pool.acquire().await?;
        neutral::params::<Sqlite>(&mut conn, self.info.schema, revision, groups).await
    }

    async fn store_batch(
        &self,
        node_id: &str,
        from: Schema,
        first_seq: u64,
        raw: &[serde_json::Value],
        epoch: u64,
    ) -> Result<BatchOutcome> {
        let (rows, last) = neutral::writes::decode_batch(
            &self.channels,
            || self.channel_directory(),
            node_id,
            from,
            self.info.schema,
            first_seq,
            raw,
            epoch,
        )
        .await?;
        let translated = rows.translated_from.is_some();
        let stored = self.grouped(&self.batches, rows).await?;
        Ok(neutral::writes::outcome(last, stored, translated))
    }

    async fn record_summary(&self) -> Result<Vec<RecordSummary>> {
        let mut conn = self.pool.acquire().await?;
        neutral::record_summary::<Sqlite>(&mut conn, self.info.schema).await
    }

    async fn records(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>> {
        let mut conn = self.pool.acquire().await?;
        neutral::records::<Sqlite>(&mut conn, self.info.schema, node_id, after_seq, limit).await
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
