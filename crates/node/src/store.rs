//! The node's durable state in `data_dir/node.db` (SQLite, WAL, synchronous=FULL).
//!
//! * `outbox` — records waiting to be shipped, oldest first; trimmed only
//!   after the controller acknowledged them.
//! * `journal` — a ledger of every record this node produced, kept after the
//!   outbox is trimmed so a checker can compare it with the database; bounded
//!   to [`JOURNAL_ROWS_MAX`] rows, oldest trimmed first.
//! * `kv` — credential, epoch, grant, `next_seq`, the parameter cache and the
//!   producer's progress.
//!
//! Every change is one transaction and synchronous=FULL makes a commit
//! durable before it returns, so a `kill -9` loses nothing that was
//! acknowledged (to the producer, or by the controller).

use handover_core::record::{encode, Observation, RecordError};
use handover_core::wire::OutboxState;
use handover_core::Schema;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Journal rows kept (about 100 bytes each, so about 500 MB at most); the
/// oldest are trimmed beyond this.
pub const JOURNAL_ROWS_MAX: u64 = 5_000_000;
/// How long a writer waits for SQLite's lock before giving up.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Connections to node.db: one writer at a time (see `Store::write`) plus readers.
pub const POOL_CONNECTIONS_MAX: u32 = 4;
/// How long a caller waits for a free connection.
pub const POOL_ACQUIRE_TIMEOUT_MS: u64 = 10_000;

/// The file inside the data dir.
pub const DB_FILE: &str = "node.db";

pub mod keys {
    //! Every key the node keeps in `kv`.
    /// The node id this data dir belongs to; a node refuses another's data.
    pub const NODE_ID: &str = "node_id";
    /// The next sequence number to assign; persisted with every append.
    pub const NEXT_SEQ: &str = "next_seq";
    /// The node's credential: chosen by the node at its first start, and
    /// accepted by the controller in exchange for the bootstrap token.
    pub const CREDENTIAL: &str = "credential";
    /// With an https controller: the node's client certificate and key
    /// (one PEM), made at its first start; the credential is then the
    /// certificate's digest.
    pub const CLIENT_IDENTITY: &str = "client_identity";
    /// Present while no controller accepted the chosen credential yet.
    pub const CREDENTIAL_UNCONFIRMED: &str = "credential_unconfirmed";
    /// The epoch and grant the node holds ("full", "deliver", "fenced").
    pub const EPOCH: &str = "epoch";
    pub const GRANT: &str = "grant";
    /// The parameter cache, one per schema (revision and the raw JSON as
    /// received), so a release switch that is rolled back finds its own
    /// cache intact.
    pub fn params_revision(schema: handover_core::Schema) -> String {
        format!("params_revision/{}", schema.0)
    }
    pub fn params_json(schema: handover_core::Schema) -> String {
        format!("params_json/{}", schema.0)
    }
    /// Prefix of one JSON row per event: started/finished flags, last published media seq.
    pub const PROGRESS_PREFIX: &str = "progress/";
    /// The last whole second for which viewer_stats were written.
    pub const LAST_STATS_SECOND: &str = "last_stats_second";
    /// A switch this node's supervisor refused (JSON: artifact, release,
    /// reason, at_ms). A worker restarted on the old release does not try
    /// that switch again until the controller withdraws it and asks anew.
    pub const SWITCH_FAILED: &str = "switch_failed";

    pub fn progress(event_id: i64) -> String {
        format!("{PROGRESS_PREFIX}{event_id}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("node database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no node database at {0}")]
    Missing(String),
    #[error("node database is inconsistent: {0}")]
    Corrupt(String),
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the data dir: {0}")]
    Private(#[from] handover_private::PrivateError),
}

/// One record ready to append: its body in some schema, plus what the journal keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRecord {
    pub schema: Schema,
    pub body: serde_json::Value,
    pub kind: &'static str,
    pub natural_key: String,
    pub produced_at_ms: i64,
}

impl NewRecord {
    /// Encodes an observation in `schema` (the node's own) with core's encoder.
    pub fn encode(schema: Schema, node_id: &str, obs: &Observation) -> Result<Self, RecordError> {
        Ok(NewRecord {
            schema,
            body: encode(schema, node_id, obs)?,
            kind: obs.kind.as_str(),
            natural_key: obs.natural_key(),
            produced_at_ms: obs.at_ms,
        })
    }
}

/// One atomic change: records to append and kv rows to write or delete.
#[derive(Clone, Debug, Default)]
pub struct Commit {
    pub records: Vec<NewRecord>,
    pub put: Vec<(String, String)>,
    pub delete: Vec<String>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.put.is_empty() && self.delete.is_empty()
    }
}

/// A record read back from the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    pub seq: u64,
    pub schema: Schema,
    pub body: serde_json::Value,
    /// Length of the stored JSON text, so the shipper can bound batch bytes.
    pub body_bytes: usize,
}

/// Handle to node.db. Cheap to share behind an `Arc`.
pub struct Store {
    pool: SqlitePool,
    /// Serialises writers: SQLite has one writer anyway, and a transaction
    /// that reads `next_seq` then writes must not race another writer
    /// (it would fail with SQLITE_BUSY instead of waiting).
    write: tokio::sync::Mutex<()>,
    /// Mirror of the outbox shape, updated under `write` after each commit,
    /// so hello, heartbeat and /status never touch the disk.
    state: Mutex<OutboxState>,
}

/// How every node.db is opened: WAL, `synchronous=FULL` (a commit is on
/// disk before it returns), created if missing.
fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
}

/// The floor `handover bench` holds [`Store::commit`] against: a file opened
/// like node.db (WAL, `synchronous=FULL`) with one table shaped like the
/// outbox, and one INSERT per record in one transaction per append; no
/// journal, kv or sequence bookkeeping. Not used by the node itself.
pub struct RawOutbox {
    pool: SqlitePool,
    next_seq: i64,
}

impl RawOutbox {
    /// Creates `dir/raw-outbox.db` (dir is created if missing).
    pub async fn open(dir: &Path) -> Result<RawOutbox, StoreError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| StoreError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect_options(&dir.join("raw-outbox.db")))
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, schema INTEGER NOT NULL, body TEXT NOT NULL)")
            .execute(&pool)
            .await?;
        Ok(RawOutbox { pool, next_seq: 1 })
    }

    /// Appends `records` in one durable transaction.
    pub async fn append(&mut self, records: &[NewRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for r in records {
            sqlx::query("INSERT INTO outbox (seq, schema, body) VALUES (?, ?, ?)")
                .bind(self.next_seq)
                .bind(i64::from(r.schema.0))
                .bind(r.body.to_string())
                .execute(&mut *tx)
                .await?;
            self.next_seq += 1;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

fn to_i64(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} exceeds SQLite's range")))
}

fn to_u64(what: &str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

impl Store {
    /// Opens (creating if missing) `data_dir/node.db` and its tables; the
    /// data dir is private to this user (0700) and node.db with its WAL
    /// and SHM files too (0600), tightened if found looser.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let db = data_dir.join(DB_FILE);
        handover_private::dir(data_dir)?;
        handover_private::database(&db)?;
        let opts = connect_options(&db);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .acquire_timeout(Duration::from_millis(POOL_ACQUIRE_TIMEOUT_MS))
            .connect_with(opts)
            .await?;
        let mut tx = pool.begin().await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, schema INTEGER NOT NULL, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, natural_key TEXT NOT NULL, produced_at_ms INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let store = Store {
            pool,
            write: tokio::sync::Mutex::new(()),
            state: Mutex::new(OutboxState::default()),
        };
        let state = store.load_outbox_state().await?;
        *store.lock_state() = state;
        Ok(store)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // A panic elsewhere cannot leave this plain value half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the outbox shape from disk. `next_seq` is the larger of the
    /// persisted value and one past any seq on disk, so a seq is never reused
    /// even if the kv row were lost.
    async fn load_outbox_state(&self) -> Result<OutboxState, StoreError> {
        let (min, count, max_outbox): (Option<i64>, i64, Option<i64>) =
            sqlx::query_as("SELECT MIN(seq), COUNT(*), MAX(seq) FROM outbox")
                .fetch_one(&self.pool)
                .await?;
        let (max_journal,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM journal")
            .fetch_one(&self.pool)
            .await?;
        let persisted = self.next_seq_persisted().await?;
        let on_disk = max_outbox.max(max_journal).unwrap_or(0);
        let next_seq = persisted.max(to_u64("seq", on_disk)?.saturating_add(1));
        Ok(OutboxState {
            next_seq,
            oldest_unacked_seq: min.map(|m| to_u64("seq", m)).transpose()?,
            count: to_u64("count", count)?,
        })
    }

    async fn next_seq_persisted(&self) -> Result<u64, StoreError> {
        match self.kv_get(keys::NEXT_SEQ).await? {
            None => Ok(1),
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("kv next_seq is {v:?}"))),
        }
    }

    /// The outbox as hello, heartbeat and /status report it.
    pub fn outbox_state(&self) -> OutboxState {
        *self.lock_state()
    }

    /// Appends records (consecutive seqs from `next_seq`) to outbox and
    /// journal, writes/deletes kv rows, persists `next_seq` and trims the
    /// journal — all in one transaction. Returns the seqs assigned.
    pub async fn commit(&self, c: &Commit) -> Result<Option<RangeInclusive<u64>>, StoreError> {
        if c.is_empty() {
            return Ok(None);
        }
        let _writer = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let (persisted,): (Option<String>,) =
            sqlx::query_as("SELECT (SELECT value FROM kv WHERE key = ?)")
                .bind(keys::NEXT_SEQ)
                .fetch_one(&mut *tx)
                .await?;
        let persisted = match persisted {
            None => 1,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("kv next_seq is {v:?}")))?,
        };
        let first = persisted.max(self.lock_state().next_seq);
        let mut seq = first;
        for r in &c.records {
            let s = to_i64("seq", seq)?;
            sqlx::query("INSERT INTO outbox (seq, schema, body) VALUES (?, ?, ?)")
                .bind(s)
                .bind(i64::from(r.schema.0))
                .bind(r.body.to_string())
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO journal (seq, kind, natural_key, produced_at_ms) VALUES (?, ?, ?, ?)",
            )
            .bind(s)
            .bind(r.kind)
            .bind(&r.natural_key)
            .bind(r.produced_at_ms)
            .execute(&mut *tx)
            .await?;
            seq = seq
                .checked_add(1)
                .ok_or_else(|| StoreError::Corrupt("sequence numbers exhausted".into()))?;
        }
        let next_seq = seq;
        if !c.records.is_empty() {
            sqlx::query("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
                .bind(keys::NEXT_SEQ)
                .bind(next_seq.to_string())
                .execute(&mut *tx)
                .await?;
            let keep_from = next_seq.saturating_sub(JOURNAL_ROWS_MAX);
            if keep_from > 1 {
                sqlx::query("DELETE FROM journal WHERE seq < ?")
                    .bind(to_i64("seq", keep_from)?)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for (k, v) in &c.put {
            sqlx::query("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await?;
        }
        for k in &c.delete {
            sqlx::query("DELETE FROM kv WHERE key = ?")
                .bind(k)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if c.records.is_empty() {
            return Ok(None);
        }
        let mut st = self.lock_state();
        st.next_seq = next_seq;
        st.count = st.count.saturating_add(c.records.len() as u64);
        st.oldest_unacked_seq.get_or_insert(first);
        Ok(Some(first..=next_seq - 1))
    }

    /// Writes kv rows (and nothing else) in one transaction.
    pub async fn kv_put(&self, put: Vec<(String, String)>) -> Result<(), StoreError> {
        self.commit(&Commit {
            put,
            ..Commit::default()
        })
        .await
        .map(|_| ())
    }

    pub async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(v,)| v))
    }

    /// Every kv row whose key starts with `prefix` (a literal, no wildcards).
    pub async fn kv_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key")
                .bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
                .bind(prefix)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// The oldest outbox records, at most `limit`, in seq order.
    pub async fn oldest(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let rows: Vec<(i64, i64, String)> =
            sqlx::query_as("SELECT seq, schema, body FROM outbox ORDER BY seq LIMIT ?")
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(seq, schema, body)| {
                let seq = to_u64("seq", seq)?;
                let schema = u32::try_from(schema)
                    .map_err(|_| StoreError::Corrupt(format!("outbox {seq}: schema {schema}")))?;
                let value = serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("outbox {seq}: body: {e}")))?;
                Ok(OutboxRow {
                    seq,
                    schema: Schema(schema),
                    body: value,
                    body_bytes: body.len(),
                })
            })
            .collect()
    }

    /// Deletes outbox records with `seq <= acked_through`; call only after an
    /// ack. The journal keeps them. Returns how many were deleted.
    pub async fn trim(&self, acked_through: u64) -> Result<u64, StoreError> {
        let _writer = self.write.lock().await;
        let through = to_i64("acked_through", acked_through.min(i64::MAX as u64))?;
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM outbox WHERE seq <= ?")
            .bind(through)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let (min,): (Option<i64>,) = sqlx::query_as("SELECT MIN(seq) FROM outbox")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut st = self.lock_state();
        st.count = st.count.saturating_sub(deleted);
        st.oldest_unacked_seq = min.map(|m| to_u64("seq", m)).transpose()?;
        Ok(deleted)
    }

    /// Every journal row, oldest first: (seq, natural key).
    pub async fn journal_keys(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, natural_key FROM journal ORDER BY seq")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(seq, key)| Ok((to_u64("seq", seq)?, key)))
            .collect()
    }

    /// The seqs still in the outbox, oldest first.
    pub async fn outbox_seqs(&self) -> Result<Vec<u64>, StoreError> {
        let rows: Vec<(i64,)> = sqlx::query_as("SELECT seq FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|(seq,)| to_u64("seq", seq)).collect()
    }

    /// Rows in the journal (for tests and checkers).
    pub async fn journal_len(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM journal")
            .fetch_one(&self.pool)
            .await?;
        to_u64("count", n)
    }

    /// Waits for in-flight writes, then closes every connection (which also
    /// checkpoints the WAL), so a stopped node leaves a tidy file.
    pub async fn close(&self) {
        let _writer = self.write.lock().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(n: i64) -> NewRecord {
        NewRecord {
            schema: Schema(1),
            body: json!({"n": n}),
            kind: "alert",
            natural_key: format!("alert/x/{n}"),
            produced_at_ms: n,
        }
    }

    fn commit(n: std::ops::Range<i64>) -> Commit {
        Commit {
            records: n.map(rec).collect(),
            ..Commit::default()
        }
    }

    #[tokio::test]
    async fn append_assigns_consecutive_seqs_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).await.unwrap();
        assert_eq!(s.outbox_state().next_seq, 1);
        assert_eq!(s.commit(&commit(0..3)).await.unwrap(), Some(1..=3));
        assert_eq!(s.commit(&commit(3..5)).await.unwrap(), Some(4..=5));
        let rows = s.oldest(10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(rows[4].body, json!({"n": 4}));
        assert_eq!(
            s.outbox_state(),
            OutboxState {
                next_seq: 6,
                oldest_unacked_seq: Some(1),
                count: 5
            }
        );
        assert_eq!(s.oldest(2).await.unwrap().len(), 2);
        s.close().await;
    }

    #[tokio::test]
    async fn survives_reopen_and_next_seq_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).await.unwrap();
            s.commit(&Commit {
                records: vec![rec(0), rec(1)],
                put: vec![("credential".into(), "c1".into())],
                delete: vec![],
            })
            .await
            .unwrap();
            s.trim(2).await.unwrap();
            s.close().await;
        }
        let s = Store::open(dir.path()).await.unwrap();
        assert_eq!(
            s.outbox_state(),
            OutboxState {
                next_seq: 3,
                oldest_unacked_seq: None,
                count: 0
            }
        );
        assert_eq!(s.kv_get("credential").await.unwrap().as_deref(), Some("c1"));
        // Seqs are never reused, even though the outbox is empty.
        assert_eq!(s.commit(&commit(0..1)).await.unwrap(), Some(3..=3));
        s.close().await;
        let s = Store::open(dir.path()).await.unwrap();
        assert_eq!(s.outbox_state().next_seq, 4);
        assert_eq!(s.oldest(10).await.unwrap()[0].seq, 3);
        s.close().await;
    }

    #[tokio::test]
    async fn trim_only_up_to_acked_and_journal_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).await.unwrap();
        s.commit(&commit(0..10)).await.unwrap();
        assert_eq!(s.trim(4).await.unwrap(), 4);
        let rows = s.oldest(100).await.unwrap();
        assert_eq!(rows.first().map(|r| r.seq), Some(5));
        assert_eq!(rows.len(), 6);
        assert_eq!(
            s.outbox_state(),
            OutboxState {
                next_seq: 11,
                oldest_unacked_seq: Some(5),
                count: 6
            }
        );
        // A repeated or older ack deletes nothing more.
        assert_eq!(s.trim(3).await.unwrap(), 0);
        assert_eq!(s.journal_len().await.unwrap(), 10);
        assert_eq!(s.outbox_seqs().await.unwrap(), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(s.trim(10).await.unwrap(), 6);
        assert_eq!(s.journal_len().await.unwrap(), 10);
        let journal = s.journal_keys().await.unwrap();
        assert_eq!(journal.first(), Some(&(1, "alert/x/0".to_owned())));
        assert!(s.outbox_seqs().await.unwrap().is_empty());
        assert_eq!(s.outbox_state().oldest_unacked_seq, None);
        s.close().await;
    }

    #[tokio::test]
    async fn kv_put_delete_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).await.unwrap();
        s.kv_put(vec![
            (keys::progress(1), "a".into()),
            (keys::progress(2), "b".into()),
            ("progressive".into(), "no".into()),
        ])
        .await
        .unwrap();
        s.commit(&Commit {
            put: vec![(keys::progress(2), "c".into())],
            delete: vec![keys::progress(1)],
            ..Commit::default()
        })
        .await
        .unwrap();
        assert_eq!(
            s.kv_prefix(keys::PROGRESS_PREFIX).await.unwrap(),
            vec![(keys::progress(2), "c".into())]
        );
        // kv-only commits assign no seqs.
        assert_eq!(s.outbox_state().next_seq, 1);
        s.close().await;
    }
}
