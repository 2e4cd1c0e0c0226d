//! Group commit, as SQLite's writer does it: whoever holds the writer
//! commits every waiting write of a kind (hellos, record batches) in one
//! transaction, and each is answered only after that commit; a failed group
//! is retried write by write, so one bad write fails alone.

use super::rows::insert_rows;
use super::PostgresStore;
use crate::sqlite::rows::{json, to_i64};
use crate::{NodeRegistration, Result, StoreError};
use handover_core::record::AnyRecord;
use handover_core::Schema;
use sqlx::postgres::PgConnection;
use sqlx::PgPool;
use std::collections::HashMap;

/// Hellos committed in one transaction at most; more wait for the next.
/// A burst of reconnecting nodes then costs a few commits, and one
/// transaction never holds thousands of row locks for long.
pub(super) const REGISTRATIONS_PER_COMMIT_MAX: usize = 2_000;
/// Record batches (each at most `wire::limits::BATCH_RECORDS_MAX` records)
/// committed in one transaction at most: bounds the transaction's size and
/// the latency of the last batch in it.
pub(super) const BATCHES_PER_COMMIT_MAX: usize = 16;

/// A write that may share its transaction with others of its kind.
pub(super) trait Grouped: Send + Sync + 'static {
    type Out: Send + 'static;
    fn apply(
        &self,
        conn: &mut PgConnection,
    ) -> impl std::future::Future<Output = Result<Self::Out>> + Send;
}

pub(super) type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// Writes of one kind waiting for the writer, with their answers.
pub(super) struct Queue<J: Grouped> {
    pending: std::sync::Mutex<Vec<(J, Reply<J::Out>)>>,
    /// Writes per transaction at most.
    max: usize,
}

impl<J: Grouped> Queue<J> {
    pub(super) fn new(max: usize) -> Queue<J> {
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

impl PostgresStore {
    /// Queues `job`; once this caller holds the writer it commits every job
    /// waiting in `queue` (its own, unless an earlier holder took it).
    /// Answers after the commit that holds `job`.
    pub(super) async fn grouped<J: Grouped>(&self, queue: &Queue<J>, job: J) -> Result<J::Out> {
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
async fn commit_group<J: Grouped>(pool: PgPool, batch: Vec<(J, Reply<J::Out>)>) {
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
pub(super) struct Registration(pub(super) NodeRegistration);

impl Grouped for Registration {
    type Out = ();
    async fn apply(&self, conn: &mut PgConnection) -> Result<()> {
        upsert_node(conn, &self.0).await
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

impl Grouped for Rows {
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
