//! What PostgreSQL's group commit ([`crate::group_commit`]) commits:
//! hellos, heartbeats and record batches, as statements on a PostgreSQL
//! connection.

use super::PostgresStore;
use crate::neutral::rows::{json, record_columns, to_i64, Columns};
pub(super) use crate::neutral::writes::{HeartbeatRow, Rows, HEARTBEATS_PER_COMMIT_MAX};
use crate::neutral::Dialect;
use crate::{NodeRegistration, Result};
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
        crate::group_commit::grouped(&self.writer, &self.pool, "BEGIN", queue, job).await
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
        self.write::<sqlx::Postgres>(conn).await
    }
}

impl Grouped<sqlx::Postgres> for Rows {
    type Out = u64;
    async fn apply(&self, conn: &mut PgConnection) -> Result<u64> {
        let stored = Rows::write_all::<sqlx::Postgres>(std::slice::from_ref(self), conn).await?;
        Ok(stored.iter().sum())
    }
    async fn apply_all(jobs: &[Rows], conn: &mut PgConnection) -> Result<Vec<u64>> {
        Rows::write_all::<sqlx::Postgres>(jobs, conn).await
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

/// Schema-2 or schema-3 rows of each `(node, rows)` of `batches`,
/// idempotent on (node, seq): PostgreSQL's [`Dialect::insert_columns`],
/// a group commit's batches in a handful of statements whatever their
/// number. The nodes' registry rows are locked first, in name order, so
/// another replica storing the same nodes' records waits for this
/// transaction and then sees them (and two replicas locking the same nodes
/// queue rather than deadlock). Rows above their node's highest stored seq
/// (the drain's every row) cannot conflict, so they go in by `COPY`
/// (streamed, no statement to plan); only the rest pay for `INSERT … ON
/// CONFLICT DO NOTHING`'s speculative insertion.
pub(super) async fn insert_records(
    conn: &mut PgConnection,
    with_severity: bool,
    batches: &[(&str, &[Columns])],
) -> Result<Vec<u64>> {
    let mut nodes: Vec<&str> = batches.iter().map(|(node, _)| *node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    sqlx::query("SELECT 1 FROM nodes WHERE node_id = ANY($1) ORDER BY node_id FOR UPDATE")
        .bind(&nodes)
        .fetch_all(&mut *conn)
        .await?;
    let highest: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT u.node, (SELECT MAX(seq) FROM records WHERE records.node_id = u.node) \
         FROM UNNEST($1::TEXT[]) AS u(node)",
    )
    .bind(&nodes)
    .fetch_all(&mut *conn)
    .await?;
    let mut high_water: HashMap<String, i64> = highest
        .into_iter()
        .map(|(node, seq)| (node, seq.unwrap_or(i64::MIN)))
        .collect();
    let mut stored = vec![0; batches.len()];
    let (mut fresh, mut seen) = (Vec::new(), vec![Vec::new(); batches.len()]);
    for (i, (node, rows)) in batches.iter().enumerate() {
        let high = high_water.entry((*node).to_owned()).or_insert(i64::MIN);
        for row in rows.iter() {
            if row.seq > *high {
                *high = row.seq;
                fresh.push((*node, row));
                stored[i] += 1;
            } else {
                seen[i].push(row);
            }
        }
    }
    // The fresh rows first: a row seen twice in one group then conflicts
    // with its first copy and is skipped.
    let copied = copy_fresh(conn, with_severity, &fresh).await?;
    if copied != fresh.len() as u64 {
        return Err(crate::StoreError::Invalid(format!(
            "COPY stored {copied} of {} records",
            fresh.len()
        )));
    }
    for ((node, _), (seen, stored)) in batches.iter().zip(seen.iter().zip(&mut stored)) {
        if !seen.is_empty() {
            *stored += unnest_statement(conn, node, with_severity, seen).await?;
        }
    }
    Ok(stored)
}

/// `rows` (each with its node) by `COPY records … FROM STDIN` in text
/// format, in one `COPY` per [`Dialect::INSERT_ROWS_PER_STATEMENT`] rows;
/// every one is stored.
async fn copy_fresh(
    conn: &mut PgConnection,
    with_severity: bool,
    rows: &[(&str, &Columns)],
) -> Result<u64> {
    let statement = format!(
        "COPY records ({}) FROM STDIN",
        record_columns(with_severity)
    );
    let mut stored = 0;
    let mut text = String::new();
    for chunk in rows.chunks(<sqlx::Postgres as Dialect>::INSERT_ROWS_PER_STATEMENT) {
        text.clear();
        for (node, row) in chunk {
            copy_line(&mut text, node, row, with_severity);
        }
        let mut copy = conn.copy_in_raw(&statement).await?;
        copy.send(text.as_bytes()).await?;
        stored += copy.finish().await?;
    }
    Ok(stored)
}

/// Records of one node as the rows `copy_fresh` sends: `COPY records
/// ({columns}) FROM STDIN` text for `(seq, record)` of schema 2 or 3,
/// translated from `translated_from`, all of the first one's schema. The
/// drain benchmark's raw `COPY` sends the same text.
pub fn copy_text(
    node: &str,
    records: &[(i64, &handover_core::record::AnyRecord)],
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<(&'static str, String)> {
    use handover_core::record::AnyRecord;
    let mut text = String::new();
    let schema = records.first().map(|(_, r)| r.schema());
    let with_severity = schema == Some(Schema(3));
    for (seq, rec) in records {
        let row = match rec {
            AnyRecord::V2(r) if schema == Some(Schema(2)) => {
                Columns::v2(*seq, r, translated_from, channel_names)?
            }
            AnyRecord::V3(r) if with_severity => {
                Columns::v3(*seq, r, translated_from, channel_names)?
            }
            other => {
                return Err(crate::StoreError::Invalid(format!(
                    "record {seq} is of schema {}: COPY writes the rows of one schema, 2 or 3",
                    other.schema()
                )))
            }
        };
        copy_line(&mut text, node, &row, with_severity);
    }
    Ok((record_columns(with_severity), text))
}

/// One row of [`record_columns`] in `COPY`'s text format: tab-separated,
/// `\N` for NULL.
fn copy_line(out: &mut String, node: &str, row: &Columns, with_severity: bool) {
    use std::fmt::Write as _;
    copy_escaped(out, node);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "\t{}\t{}\t{}\t{}\t",
        row.seq, row.kind, row.channel_id, row.produced_at_ms
    );
    for number in [row.media_seq, row.duration_ms, row.viewers, row.event_id] {
        match number {
            Some(n) => {
                let _ = write!(out, "{n}\t");
            }
            None => out.push_str(COPY_NULL_TAB),
        }
    }
    match &row.message {
        Some(m) => copy_escaped(out, m),
        None => out.push_str(COPY_NULL),
    }
    out.push('\t');
    copy_escaped(out, &row.natural_key);
    out.push('\t');
    match row.translated_from {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str(COPY_NULL),
    }
    if with_severity {
        out.push('\t');
        match row.severity {
            Some(s) => copy_escaped(out, s),
            None => out.push_str(COPY_NULL),
        }
    }
    out.push('\n');
}

/// NULL in `COPY`'s text format.
const COPY_NULL: &str = "\\N";
const COPY_NULL_TAB: &str = "\\N\t";

/// A text value escaped for `COPY`'s text format.
fn copy_escaped(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// `rows` by `INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING`, one
/// array per column (13 parameters whatever the count), in statements of
/// [`Dialect::INSERT_ROWS_PER_STATEMENT`]; how many were new.
async fn unnest_statement(
    conn: &mut PgConnection,
    node: &str,
    with_severity: bool,
    rows: &[&Columns],
) -> Result<u64> {
    let sql = format!(
        "INSERT INTO records ({}) SELECT $1, * FROM UNNEST($2::BIGINT[], $3::TEXT[], \
         $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], \
         $10::TEXT[], $11::TEXT[], $12::BIGINT[]{}) ON CONFLICT (node_id, seq) DO NOTHING",
        record_columns(with_severity),
        if with_severity { ", $13::TEXT[]" } else { "" }
    );
    let mut stored = 0;
    for chunk in rows.chunks(<sqlx::Postgres as Dialect>::INSERT_ROWS_PER_STATEMENT) {
        let column =
            |f: fn(&Columns) -> Option<i64>| chunk.iter().map(|c| f(c)).collect::<Vec<_>>();
        let mut q = sqlx::query(&sql)
            .bind(node)
            .bind(chunk.iter().map(|c| c.seq).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.kind).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.channel_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.produced_at_ms).collect::<Vec<_>>())
            .bind(column(|c| c.media_seq))
            .bind(column(|c| c.duration_ms))
            .bind(column(|c| c.viewers))
            .bind(column(|c| c.event_id))
            .bind(
                chunk
                    .iter()
                    .map(|c| c.message.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|c| c.natural_key.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(column(|c| c.translated_from));
        if with_severity {
            q = q.bind(chunk.iter().map(|c| c.severity).collect::<Vec<_>>());
        }
        stored += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::copy_escaped;

    #[test]
    fn copy_text_escapes_what_the_text_format_reads_as_syntax() {
        for (input, expected) in [
            ("plain 1080p/6000 kbps", "plain 1080p/6000 kbps"),
            ("a\tb", "a\\tb"),
            ("a\nb\rc", "a\\nb\\rc"),
            ("back\\slash", "back\\\\slash"),
            ("\\N", "\\\\N"),
        ] {
            let mut out = String::new();
            copy_escaped(&mut out, input);
            assert_eq!(out, expected, "{input:?}");
        }
    }
}
