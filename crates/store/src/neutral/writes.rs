//! What both backends' group commits ([`crate::group_commit`]) write, as
//! one text each: a heartbeat's update of its node's row, and a record
//! batch (judged against the epoch, inserted, acknowledged). Each backend
//! says how its queue applies them to its connection; hellos stay with
//! each backend, whose `nodes` tables differ.

use super::rows::{columns_of, json, to_i64, with_severity, Columns};
use super::{Affected, Dialect};
use crate::{BatchOutcome, Result, StoreError};
use handover_core::record::{self, AnyRecord, ChannelDirectory, RecordError};
use handover_core::Schema;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Heartbeats committed in one transaction at most: 10,000 nodes beating
/// once a second are then a handful of commits a second, not 10,000 fsyncs.
pub(crate) const HEARTBEATS_PER_COMMIT_MAX: usize = 2_000;

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

    /// Writes the beat in the group's transaction.
    pub(crate) async fn write<DB: sqlx::Database>(&self, conn: &mut DB::Connection) -> Result<()>
    where
        for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        sqlx::query(
            "UPDATE nodes SET outbox_next_seq = $1, outbox_oldest = $2, outbox_count = $3,
                current_events = $4, staged = $5, grant_name = $6, epoch = $7, last_seen_ms = $8
             WHERE node_id = $9",
        )
        .bind(self.next_seq)
        .bind(self.oldest)
        .bind(self.count)
        .bind(self.current_events.as_str())
        .bind(self.staged.as_str())
        .bind(self.grant.as_str())
        .bind(self.epoch)
        .bind(self.now_ms)
        .bind(self.node_id.as_str())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// One node's batch, decoded and translated, and the ack it earns.
pub(crate) struct Rows {
    pub(crate) node_id: String,
    pub(crate) rows: Vec<(i64, AnyRecord)>,
    /// The database's schema, which every record is in.
    pub(crate) schema: Schema,
    pub(crate) translated_from: Option<u32>,
    pub(crate) acked_through: i64,
    /// The directory the batch was decoded with, naming every channel of
    /// its records.
    pub(crate) channels: Arc<Channels>,
    /// The epoch the node sent the batch at: stored only if the cluster is
    /// still there, unfenced.
    pub(crate) epoch: i64,
}

/// A database's channels: by name (what the upcasters need) and names by
/// id (what a row's natural key needs).
pub(crate) struct Channels {
    pub(crate) by_name: ChannelDirectory,
    pub(crate) names: HashMap<i64, String>,
}

/// The channels a store's batches are decoded with, kept between batches
/// instead of read for each: channels are only ever added (never renamed,
/// changed or removed; a migration opens a new store), so a kept copy can
/// only lack a channel created since, and a batch that names one it lacks
/// reads them again ([`decode_batch`]).
#[derive(Default)]
pub(crate) struct ChannelCache(std::sync::Mutex<Option<Arc<Channels>>>);

impl ChannelCache {
    fn kept(&self) -> Option<Arc<Channels>> {
        // A plain slot: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn keep(&self, channels: Arc<Channels>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(channels);
    }
}

/// A batch of `node_id` sent at `epoch`, records `first_seq` onwards in
/// schema `from`, decoded and (from an older schema) translated into the
/// database's schema `to` with the channels `cache` keeps (read with
/// `read` when it has none, or lacks a channel the batch names). All or
/// nothing: the first record that does not decode refuses it. Returns the
/// rows and the last sequence.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decode_batch<F, Fut>(
    cache: &ChannelCache,
    read: F,
    node_id: &str,
    from: Schema,
    to: Schema,
    first_seq: u64,
    raw: &[serde_json::Value],
    epoch: u64,
) -> Result<(Rows, u64)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(ChannelDirectory, HashMap<i64, String>)>>,
{
    let fresh = || async {
        let (by_name, names) = read().await?;
        let channels = Arc::new(Channels { by_name, names });
        cache.keep(channels.clone());
        Ok::<_, StoreError>(channels)
    };
    let channels = match cache.kept() {
        Some(kept) => match batch(node_id, from, to, first_seq, raw, kept, epoch) {
            Err(StoreError::Untranslatable {
                source: RecordError::UnknownChannel(_),
                ..
            }) => fresh().await?,
            decoded => return decoded,
        },
        None => fresh().await?,
    };
    batch(node_id, from, to, first_seq, raw, channels, epoch)
}

/// [`decode_batch`] with these `channels`: a record naming a channel they
/// lack is refused as [`RecordError::UnknownChannel`].
fn batch(
    node_id: &str,
    from: Schema,
    to: Schema,
    first_seq: u64,
    raw: &[serde_json::Value],
    channels: Arc<Channels>,
    epoch: u64,
) -> Result<(Rows, u64)> {
    let mut rows = Vec::with_capacity(raw.len());
    for (i, value) in raw.iter().enumerate() {
        let seq = first_seq + i as u64;
        let untranslatable = |source| StoreError::Untranslatable { seq, source };
        let rec =
            record::upcast(from, to, value, node_id, &channels.by_name).map_err(untranslatable)?;
        if let Some(id) = rec.channel_id() {
            if !channels.names.contains_key(&id) {
                return Err(untranslatable(RecordError::UnknownChannel(id.to_string())));
            }
        }
        rows.push((to_i64(seq, "seq")?, rec));
    }
    let last = first_seq + raw.len() as u64 - 1;
    let rows = Rows {
        node_id: node_id.to_owned(),
        rows,
        schema: to,
        translated_from: (from != to).then_some(from.0),
        acked_through: to_i64(last, "seq")?,
        channels,
        epoch: to_i64(epoch, "epoch")?,
    };
    Ok((rows, last))
}

/// The answer to a batch whose last sequence is `last`, of which `stored`
/// records were new.
pub(crate) fn outcome(last: u64, stored: u64, translated: bool) -> BatchOutcome {
    BatchOutcome {
        acked_through: last,
        stored,
        translated: if translated { stored } else { 0 },
    }
}

impl Rows {
    /// Stores a group's batches (all for this store's schema) in its
    /// transaction, if the cluster is still at each one's epoch, unfenced;
    /// returns how many records of each were new. One check of each epoch
    /// sent, one insert of every batch's rows (the backend's
    /// [`Dialect::insert_columns`]), one acknowledgement a batch.
    pub(crate) async fn write_all<DB: Dialect>(
        jobs: &[Rows],
        conn: &mut DB::Connection,
    ) -> Result<Vec<u64>>
    where
        for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
        DB::QueryResult: Affected,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        let epochs: BTreeSet<i64> = jobs.iter().map(|job| job.epoch).collect();
        for epoch in epochs {
            crate::replicas::check_epoch::<DB>(conn, epoch, DB::EPOCH_LOCK).await?;
        }
        let mut stored = Vec::with_capacity(jobs.len());
        let mut columns = Vec::with_capacity(jobs.len());
        for job in jobs {
            let rows: Vec<(i64, &AnyRecord)> = job.rows.iter().map(|(seq, r)| (*seq, r)).collect();
            let (v1_stored, of_job) = columns_of::<DB>(
                conn,
                &job.node_id,
                job.schema,
                &rows,
                job.translated_from,
                &job.channels.names,
            )
            .await?;
            stored.push(v1_stored);
            columns.push(of_job);
        }
        let with_columns: Vec<usize> = (0..jobs.len())
            .filter(|&i| !columns[i].is_empty())
            .collect();
        if let Some(&first) = with_columns.first() {
            let batches: Vec<(&str, &[Columns])> = with_columns
                .iter()
                .map(|&i| (jobs[i].node_id.as_str(), columns[i].as_slice()))
                .collect();
            let new =
                DB::insert_columns(conn, with_severity(jobs[first].schema)?, &batches).await?;
            for (&i, new) in with_columns.iter().zip(new) {
                stored[i] += new;
            }
        }
        for job in jobs {
            sqlx::query(DB::RAISE_ACK)
                .bind(job.acked_through)
                .bind(job.node_id.as_str())
                .execute(&mut *conn)
                .await?;
        }
        Ok(stored)
    }
}
