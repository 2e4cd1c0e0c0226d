//! What SQLite's group commit ([`crate::group_commit`]) commits: hellos,
//! heartbeats and record batches, as statements on a SQLite connection.

use super::SqliteStore;
use crate::neutral::rows::{json, to_i64};
pub(super) use crate::neutral::writes::{HeartbeatRow, Rows, HEARTBEATS_PER_COMMIT_MAX};
use crate::{NodeRegistration, Result};
use sqlx::Sqlite;

/// Hellos committed in one transaction at most; more wait for the next.
pub(super) const REGISTRATIONS_PER_COMMIT_MAX: usize = 2_000;
/// Record batches (each at most `wire::limits::BATCH_RECORDS_MAX` records)
/// committed in one transaction at most.
pub(super) const BATCHES_PER_COMMIT_MAX: usize = 16;

pub(super) use crate::group_commit::Grouped;

/// Writes of kind `J` waiting for this store's writer.
pub(super) type Queue<J> = crate::group_commit::Queue<J, <J as Grouped<Sqlite>>::Out>;

impl SqliteStore {
    /// [`crate::group_commit::grouped`] with this store's writer and pool.
    pub(super) async fn grouped<J: Grouped<Sqlite>>(
        &self,
        queue: &Queue<J>,
        job: J,
    ) -> Result<J::Out> {
        crate::group_commit::grouped(&self.writer, &self.pool, super::BEGIN_WRITE, queue, job).await
    }
}

/// A hello's row in the registry.
pub(super) struct Registration(pub(super) NodeRegistration);

impl Grouped<Sqlite> for Registration {
    type Out = ();
    fn apply(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        upsert_node(conn, &self.0)
    }
}

impl Grouped<Sqlite> for HeartbeatRow {
    type Out = ();
    async fn apply(&self, conn: &mut sqlx::SqliteConnection) -> Result<()> {
        self.write::<Sqlite>(conn).await
    }
}

impl Grouped<Sqlite> for Rows {
    type Out = u64;
    async fn apply(&self, conn: &mut sqlx::SqliteConnection) -> Result<u64> {
        let stored = Rows::write_all::<Sqlite>(std::slice::from_ref(self), conn).await?;
        Ok(stored.iter().sum())
    }
    async fn apply_all(jobs: &[Rows], conn: &mut sqlx::SqliteConnection) -> Result<Vec<u64>> {
        Rows::write_all::<Sqlite>(jobs, conn).await
    }
}

pub(super) async fn upsert_node<'e, E>(db: E, r: &NodeRegistration) -> Result<()>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query(
        "INSERT INTO nodes (node_id, credential, release, schema, role, group_name, hls_url, grant_name, epoch,
            outbox_next_seq, outbox_oldest, outbox_count, current_events, staged, last_seen_ms, binary_sha256,
            supervisor_sha256)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (node_id) DO UPDATE SET release = excluded.release,
            schema = excluded.schema, role = excluded.role, group_name = excluded.group_name, hls_url = excluded.hls_url,
            grant_name = excluded.grant_name, epoch = excluded.epoch, outbox_next_seq = excluded.outbox_next_seq,
            outbox_oldest = excluded.outbox_oldest, outbox_count = excluded.outbox_count,
            current_events = excluded.current_events, staged = excluded.staged, last_seen_ms = excluded.last_seen_ms,
            binary_sha256 = excluded.binary_sha256, supervisor_sha256 = excluded.supervisor_sha256",
    )
    .bind(&r.node_id)
    // Credentials live in `credentials`, as digests only.
    .bind("")
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
