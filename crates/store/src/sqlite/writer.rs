//! What SQLite's group commit ([`crate::group_commit`]) commits: hellos,
//! heartbeats and record batches, as statements on a SQLite connection.

use super::rows::{insert_rows, json, to_i64};
use super::SqliteStore;
use crate::{NodeRegistration, Result};
use handover_core::record::AnyRecord;
use handover_core::Schema;
use sqlx::Sqlite;
use std::collections::HashMap;

/// Hellos committed in one transaction at most; more wait for the next.
pub(super) const REGISTRATIONS_PER_COMMIT_MAX: usize = 2_000;
/// Heartbeats committed in one transaction at most: 10,000 nodes beating
/// once a second are then a handful of commits a second, not 10,000 fsyncs.
pub(crate) const HEARTBEATS_PER_COMMIT_MAX: usize = 2_000;
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
        crate::group_commit::grouped(&self.writer, &self.pool, queue, job).await
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

/// A heartbeat's update of its node's row (outbox figures, events, grant).
pub(crate) struct HeartbeatRow {
    pub(crate) node_id: String,
    pub(crate) next_seq: i64,
    pub(crate) oldest: Option<i64>,
    pub(crate) count: i64,
    pub(crate) current_events: String,
    pub(crate) staged: String,
    pub(crate) grant: handover_core::Grant,
    pub(crate) epoch: i64,
    pub(crate) now_ms: i64,
}

impl HeartbeatRow {
    pub(crate) fn of(
        node_id: &str,
        hb: &handover_core::wire::Heartbeat,
        grant: handover_core::Grant,
        now_ms: i64,
    ) -> Result<HeartbeatRow> {
        Ok(HeartbeatRow {
            node_id: node_id.to_owned(),
            next_seq: to_i64(hb.outbox.next_seq, "next_seq")?,
            oldest: hb
                .outbox
                .oldest_unacked_seq
                .map(|s| to_i64(s, "oldest_unacked_seq"))
                .transpose()?,
            count: to_i64(hb.outbox.count, "count")?,
            current_events: json(&hb.current_events)?,
            staged: json(&hb.staged)?,
            grant,
            epoch: to_i64(hb.epoch, "epoch")?,
            now_ms,
        })
    }
}

impl Grouped<Sqlite> for HeartbeatRow {
    type Out = ();
    async fn apply(&self, conn: &mut sqlx::SqliteConnection) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET outbox_next_seq = ?, outbox_oldest = ?, outbox_count = ?, current_events = ?,
                staged = ?, grant_name = ?, epoch = ?, last_seen_ms = ? WHERE node_id = ?",
        )
        .bind(self.next_seq)
        .bind(self.oldest)
        .bind(self.count)
        .bind(&self.current_events)
        .bind(&self.staged)
        .bind(self.grant.as_str())
        .bind(self.epoch)
        .bind(self.now_ms)
        .bind(&self.node_id)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// One node's batch, decoded and translated, and the ack it earns.
pub(super) struct Rows {
    pub(super) node_id: String,
    pub(super) rows: Vec<(i64, AnyRecord)>,
    /// The database's schema, which every record is in.
    pub(super) schema: Schema,
    pub(super) translated_from: Option<u32>,
    pub(super) acked_through: i64,
    pub(super) channel_names: HashMap<i64, String>,
}

impl Grouped<Sqlite> for Rows {
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
