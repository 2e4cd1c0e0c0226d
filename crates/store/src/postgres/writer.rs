//! What PostgreSQL's group commit ([`crate::group_commit`]) commits:
//! hellos, heartbeats and record batches, as statements on a PostgreSQL
//! connection.

use super::rows::insert_rows;
use super::PostgresStore;
use crate::sqlite::rows::{json, to_i64};
pub(super) use crate::sqlite::writer::{HeartbeatRow, HEARTBEATS_PER_COMMIT_MAX};
use crate::{NodeRegistration, Result};
use handover_core::record::AnyRecord;
use handover_core::Schema;
use sqlx::postgres::PgConnection;
use std::collections::HashMap;

/// Hellos committed in one transaction at most; more wait for the next.
/// A burst of reconnecting nodes then costs a few commits, and one
/// transaction never holds thousands of row locks for long.
pub(super) const REGISTRATIONS_PER_COMMIT_MAX: usize = 2_000;
/// Record batches (each at most `wire::limits::BATCH_RECORDS_MAX` records)
/// committed in one transaction at most: bounds the transaction's size and
/// the latency of the last batch in it.
pub(super) const BATCHES_PER_COMMIT_MAX: usize = 16;

pub(super) use crate::group_commit::Grouped;

/// Writes of kind `J` waiting for this store's writer.
pub(super) type Queue<J> = crate::group_commit::Queue<J, <J as Grouped<sqlx::Postgres>>::Out>;

impl PostgresStore {
    /// [`crate::group_commit::grouped`] with this store's writer and pool.
    pub(super) async fn grouped<J: Grouped<sqlx::Postgres>>(
        &self,
        queue: &Queue<J>,
        job: J,
    ) -> Result<J::Out> {
        crate::group_commit::grouped(&self.writer, &self.pool, queue, job).await
    }
}

/// A hello's row in the registry.
pub(super) struct Registration(pub(super) NodeRegistration);

impl Grouped<sqlx::Postgres> for Registration {
    type Out = ();
    async fn apply(&self, conn: &mut PgConnection) -> Result<()> {
        upsert_node(conn, &self.0).await
    }
}

impl Grouped<sqlx::Postgres> for HeartbeatRow {
    type Out = ();
    async fn apply(&self, conn: &mut PgConnection) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET outbox_next_seq = $1, outbox_oldest = $2, outbox_count = $3,
                current_events = $4, staged = $5, grant_name = $6, epoch = $7, last_seen_ms = $8
             WHERE node_id = $9",
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

impl Grouped<sqlx::Postgres> for Rows {
    type Out = u64;
    async fn apply(&self, conn: &mut PgConnection) -> Result<u64> {
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
        sqlx::query(
            "UPDATE nodes SET acked_through = GREATEST(acked_through, $1) WHERE node_id = $2",
        )
        .bind(self.acked_through)
        .bind(&self.node_id)
        .execute(&mut *conn)
        .await?;
        Ok(stored)
    }
}

async fn upsert_node(conn: &mut PgConnection, r: &NodeRegistration) -> Result<()> {
    sqlx::query(
        "INSERT INTO nodes (node_id, release, schema, role, group_name, hls_url, grant_name, epoch,
            outbox_next_seq, outbox_oldest, outbox_count, current_events, staged, last_seen_ms, binary_sha256,
            supervisor_sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         ON CONFLICT (node_id) DO UPDATE SET release = excluded.release,
            schema = excluded.schema, role = excluded.role, group_name = excluded.group_name, hls_url = excluded.hls_url,
            grant_name = excluded.grant_name, epoch = excluded.epoch, outbox_next_seq = excluded.outbox_next_seq,
            outbox_oldest = excluded.outbox_oldest, outbox_count = excluded.outbox_count,
            current_events = excluded.current_events, staged = excluded.staged, last_seen_ms = excluded.last_seen_ms,
            binary_sha256 = excluded.binary_sha256, supervisor_sha256 = excluded.supervisor_sha256",
    )
    .bind(&r.node_id)
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}
