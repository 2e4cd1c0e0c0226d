//! Records as PostgreSQL `records` rows: read back (for the migrations) and
//! multi-row inserts, idempotent on `(node, seq)`. The column values are
//! SQLite's ([`Columns`]), so a row means the same in both backends.

use crate::sqlite::rows::{to_u64, v1_kind_name, v1_natural_key, Columns};
use crate::{Result, StoreError};
use handover_core::record::v1 as rv1;
use handover_core::record::v2 as rv2;
use handover_core::record::AnyRecord;
use handover_core::Schema;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Postgres, Row};
use std::collections::HashMap;

/// Records of schema 2 or 3 a multi-row INSERT carries at once (13
/// parameters each, far below PostgreSQL's 65,535 per statement): one
/// statement, one round trip, per this many records.
pub(super) const INSERT_ROWS_PER_STATEMENT: usize = 500;

pub(super) fn v1_from_row(row: &PgRow) -> Result<rv1::Record> {
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

pub(super) fn v2_from_row(row: &PgRow) -> Result<rv2::Record> {
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

/// Stores `rows` (seq, record) of one node in a database of `schema`;
/// returns how many were new. Every record must be of `schema`.
pub(super) async fn insert_rows(
    conn: &mut PgConnection,
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
pub(super) async fn insert_columns(
    conn: &mut PgConnection,
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
        let mut q = sqlx::QueryBuilder::<Postgres>::new(if with_severity {
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

pub(super) async fn insert_v1(
    conn: &mut PgConnection,
    node: &str,
    seq: i64,
    r: &rv1::Record,
) -> Result<u64> {
    let done = sqlx::query(
        "INSERT INTO records (node, seq, kind, channel, at, media_seq, viewers, event, text, natural_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (node, seq) DO NOTHING",
    )
    .bind(node)
    .bind(seq)
    .bind(v1_kind_name(r.kind))
    .bind(&r.channel)
    .bind(&r.at)
    .bind(r.seq.map(|s| crate::sqlite::rows::to_i64(s, "media_seq")).transpose()?)
    .bind(r.viewers.map(i64::from))
    .bind(r.event)
    .bind(&r.text)
    .bind(v1_natural_key(r))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}
