//! Rows and values both backends share: records of each schema as
//! `records` rows (read back, and multi-row inserts idempotent on
//! `(node, seq)`, generic over the sqlx database), and the small
//! conversions of other rows and specs, so a row means the same in both.

use super::{Affected, Dialect};
use crate::{Result, StoreError};
use handover_core::api::{ChannelSpec, EventView};
use handover_core::params::{v2, v3};
use handover_core::record::{self, AnyRecord};
use handover_core::record::{v1 as rv1, v2 as rv2, v3 as rv3};
use handover_core::timefmt;
use handover_core::wire::{validate_id, Role};
use handover_core::{Grant, Schema};
use sqlx::Row;
use std::collections::HashMap;

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is too large")))
}

pub(crate) fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn v1_from_row<R: Row>(row: &R) -> Result<rv1::Record>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
    String: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
{
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

pub(crate) fn v2_from_row<R: Row>(row: &R) -> Result<rv2::Record>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
    String: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
{
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

pub(crate) fn v1_kind_name(kind: rv1::Kind) -> &'static str {
    match kind {
        rv1::Kind::Segment => "segment",
        rv1::Kind::Stats => "stats",
        rv1::Kind::Alert => "alert",
        rv1::Kind::EventStart => "event_start",
        rv1::Kind::EventEnd => "event_end",
    }
}

pub(crate) fn v1_natural_key(r: &rv1::Record) -> String {
    let kind = rv2::Kind::from(r.kind);
    let at_ms = timefmt::ms_from_rfc3339(&r.at).unwrap_or(0);
    record::natural_key(kind, &r.channel, at_ms, r.seq, r.event)
}

/// One record of schema 2 or 3 as the columns of its `records` row.
pub(crate) struct Columns {
    pub(crate) seq: i64,
    pub(crate) kind: &'static str,
    pub(crate) channel_id: i64,
    pub(crate) produced_at_ms: i64,
    pub(crate) media_seq: Option<i64>,
    pub(crate) duration_ms: Option<i64>,
    pub(crate) viewers: Option<i64>,
    pub(crate) event_id: Option<i64>,
    pub(crate) message: Option<String>,
    pub(crate) natural_key: String,
    pub(crate) translated_from: Option<i64>,
    /// Schema 3 only.
    pub(crate) severity: Option<&'static str>,
}

impl Columns {
    /// A schema-2 row: the schema-3 columns without a severity.
    pub(crate) fn v2(
        seq: i64,
        r: &rv2::Record,
        translated_from: Option<u32>,
        channel_names: &HashMap<i64, String>,
    ) -> Result<Columns> {
        let as_columns = rv3::Record {
            kind: r.kind,
            channel_id: r.channel_id,
            node_id: String::new(),
            produced_at_ms: r.produced_at_ms,
            media_seq: r.media_seq,
            duration_ms: r.duration_ms,
            viewers: r.viewers,
            event_id: r.event_id,
            message: None,
            severity: None,
        };
        Ok(Columns {
            message: r.message.clone(),
            ..Columns::v3(seq, &as_columns, translated_from, channel_names)?
        })
    }

    pub(crate) fn v3(
        seq: i64,
        r: &rv3::Record,
        translated_from: Option<u32>,
        channel_names: &HashMap<i64, String>,
    ) -> Result<Columns> {
        let channel =
            channel_names
                .get(&r.channel_id)
                .ok_or_else(|| StoreError::Untranslatable {
                    seq: to_u64(seq),
                    source: record::RecordError::UnknownChannel(r.channel_id.to_string()),
                })?;
        Ok(Columns {
            seq,
            kind: r.kind.as_str(),
            channel_id: r.channel_id,
            produced_at_ms: r.produced_at_ms,
            media_seq: r.media_seq.map(|s| to_i64(s, "media_seq")).transpose()?,
            duration_ms: r.duration_ms.map(i64::from),
            viewers: r.viewers.map(i64::from),
            event_id: r.event_id,
            message: r.message.clone(),
            natural_key: record::natural_key(
                r.kind,
                channel,
                r.produced_at_ms,
                r.media_seq,
                r.event_id,
            ),
            translated_from: translated_from.map(i64::from),
            severity: r.severity.map(rv3::Severity::as_str),
        })
    }
}

/// Stores `rows` (seq, record) of one node in a database of `schema`;
/// returns how many were new. Every record must be of `schema`: the table
/// of one schema never holds another's record untranslated.
pub(crate) async fn insert_rows<DB: sqlx::Database + Dialect>(
    conn: &mut DB::Connection,
    node: &str,
    schema: Schema,
    rows: &[(i64, &AnyRecord)],
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<u64>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let (stored, columns) =
        columns_of::<DB>(conn, node, schema, rows, translated_from, channel_names).await?;
    Ok(stored + insert_columns::<DB>(conn, node, schema, &columns).await?)
}

/// `rows` (seq, record) of one node for a database of `schema`: schema-1
/// records stored at once (release 1's table, one statement each), and
/// returned with how many of them were new; the rest as the columns of
/// their rows, for [`Dialect::insert_columns`]. Every record must be of
/// `schema`: the table of one schema never holds another's record
/// untranslated.
pub(crate) async fn columns_of<DB: sqlx::Database + Dialect>(
    conn: &mut DB::Connection,
    node: &str,
    schema: Schema,
    rows: &[(i64, &AnyRecord)],
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<(u64, Vec<Columns>)>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
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
            AnyRecord::V1(r) => stored += insert_v1::<DB>(conn, node, *seq, r).await?,
            AnyRecord::V2(r) => columns.push(Columns::v2(*seq, r, translated_from, channel_names)?),
            AnyRecord::V3(r) => columns.push(Columns::v3(*seq, r, translated_from, channel_names)?),
        }
    }
    Ok((stored, columns))
}

/// Schema-2 or schema-3 rows of `node` into a database of `schema`,
/// idempotent on (node, seq): the backend's [`Dialect::insert_columns`].
pub(crate) async fn insert_columns<DB: sqlx::Database + Dialect>(
    conn: &mut DB::Connection,
    node: &str,
    schema: Schema,
    rows: &[Columns],
) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let stored = DB::insert_columns(conn, with_severity(schema)?, &[(node, rows)]).await?;
    Ok(stored.iter().sum())
}

/// Whether `records` rows of a database of `schema` (2 or 3) have a
/// `severity` column.
pub(crate) fn with_severity(schema: Schema) -> Result<bool> {
    match schema.0 {
        2 => Ok(false),
        3 => Ok(true),
        other => Err(StoreError::UnknownSchema(other)),
    }
}

/// The columns of a `records` row of schema 2 (then without `severity`)
/// or 3, in the order of [`Columns`].
pub(crate) fn record_columns(with_severity: bool) -> &'static str {
    if with_severity {
        "node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms, viewers, event_id, message, natural_key, translated_from, severity"
    } else {
        "node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms, viewers, event_id, message, natural_key, translated_from"
    }
}

/// Multi-row `INSERT … VALUES` of schema-2 or schema-3 rows, idempotent on
/// (node, seq): `DB::INSERT_ROWS_PER_STATEMENT` rows per statement (SQLite's
/// [`Dialect::insert_columns`]).
pub(crate) async fn insert_values<DB: sqlx::Database + Dialect>(
    conn: &mut DB::Connection,
    node: &str,
    with_severity: bool,
    rows: &[Columns],
) -> Result<u64>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let columns = if with_severity { 13 } else { 12 };
    let mut stored = 0;
    for chunk in rows.chunks(DB::INSERT_ROWS_PER_STATEMENT) {
        let mut sql = format!(
            "INSERT INTO records ({}) VALUES ",
            record_columns(with_severity)
        );
        // `$N` placeholders, one tuple a record.
        for i in 0..chunk.len() {
            let tuple: Vec<String> = (1..=columns)
                .map(|k| format!("${}", i * columns + k))
                .collect();
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            sql.push_str(&tuple.join(", "));
            sql.push(')');
        }
        sql.push_str(" ON CONFLICT (node_id, seq) DO NOTHING");
        let mut q = sqlx::query::<DB>(&sql);
        for c in chunk {
            q = q
                .bind(node)
                .bind(c.seq)
                .bind(c.kind)
                .bind(c.channel_id)
                .bind(c.produced_at_ms)
                .bind(c.media_seq)
                .bind(c.duration_ms)
                .bind(c.viewers)
                .bind(c.event_id)
                .bind(c.message.as_deref())
                .bind(c.natural_key.as_str())
                .bind(c.translated_from);
            if with_severity {
                q = q.bind(c.severity);
            }
        }
        stored += q.execute(&mut *conn).await?.affected();
    }
    Ok(stored)
}

/// One record into the schema-1 table.
pub(crate) async fn insert_v1<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    node: &str,
    seq: i64,
    r: &rv1::Record,
) -> Result<u64>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let done = sqlx::query(
        "INSERT INTO records (node, seq, kind, channel, at, media_seq, viewers, event, text, natural_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (node, seq) DO NOTHING",
    )
    .bind(node)
    .bind(seq)
    .bind(v1_kind_name(r.kind))
    .bind(r.channel.as_str())
    .bind(r.at.as_str())
    .bind(r.seq.map(|s| to_i64(s, "media_seq")).transpose()?)
    .bind(r.viewers.map(i64::from))
    .bind(r.event)
    .bind(r.text.as_str())
    .bind(v1_natural_key(r))
    .execute(&mut *conn)
    .await?;
    Ok(done.affected())
}

/// One translated record into the schema-2 table (migration 1 → 2).
pub(crate) async fn insert_v2<DB: sqlx::Database + Dialect>(
    conn: &mut DB::Connection,
    node: &str,
    seq: i64,
    r: &rv2::Record,
    translated_from: Option<u32>,
    channel_names: &HashMap<i64, String>,
) -> Result<u64>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let row = Columns::v2(seq, r, translated_from, channel_names)?;
    insert_columns::<DB>(conn, node, Schema(2), &[row]).await
}

/// The parameters as stored, read in the schema `T` describes; a document
/// that does not fit is a corrupt store.
pub(crate) fn stored_params<T: serde::de::DeserializeOwned>(
    params: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(params).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A channel of schema 2 or 3 (a ladder of rungs, no title) as the API
/// shows it; `window_segments` only from schema 3 on.
pub(crate) fn ladder_channel(
    name: String,
    segment_ms: u32,
    ladder: Vec<v2::Rung>,
    window_segments: Option<u32>,
) -> ChannelSpec {
    ChannelSpec {
        name,
        title: None,
        segment_ms,
        ladder,
        window_segments,
    }
}

pub(crate) fn event_views(
    events: Vec<v2::Event>,
    channel_names: &HashMap<i64, String>,
) -> Vec<EventView> {
    events
        .into_iter()
        .map(|e| EventView {
            id: e.id,
            channel: channel_names
                .get(&e.channel_id)
                .cloned()
                .unwrap_or_default(),
            group: e.group,
            start_ms: e.start_ms,
            duration_ms: e.duration_ms,
        })
        .collect()
}

pub(crate) fn parse_role(s: &str) -> Result<Role> {
    match s {
        "primary" => Ok(Role::Primary),
        "backup" => Ok(Role::Backup),
        other => Err(StoreError::Corrupt(format!("role {other:?}"))),
    }
}

pub(crate) fn parse_grant(s: &str) -> Result<Grant> {
    match s {
        "full" => Ok(Grant::Full),
        "deliver" => Ok(Grant::Deliver),
        "fenced" => Ok(Grant::Fenced),
        other => Err(StoreError::Corrupt(format!("grant {other:?}"))),
    }
}

/// Shortest segment: below half a second, playlist polling and per-segment
/// overhead dominate.
const SEGMENT_MS_MIN: u32 = 500;
/// Longest segment: a minute, beyond which a live stream lags too far.
const SEGMENT_MS_MAX: u32 = 60_000;
/// Rungs of a bitrate ladder at most: more than any player offers.
const LADDER_RUNGS_MAX: usize = 16;
/// Height of the one rung a channel created without a ladder gets (and of
/// a schema-1 channel whose resolution does not parse): 720p.
pub(crate) const RUNG_HEIGHT_DEFAULT: u32 = 720;
/// Bitrate of that rung: 3,000 kbit/s, usual for 720p.
pub(crate) const RUNG_KBPS_DEFAULT: u32 = 3000;

pub(crate) fn check_spec(spec: &ChannelSpec) -> Result<()> {
    validate_id("name", &spec.name).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if !(SEGMENT_MS_MIN..=SEGMENT_MS_MAX).contains(&spec.segment_ms) {
        return Err(StoreError::Invalid(format!(
            "segment_ms must be between {SEGMENT_MS_MIN} and {SEGMENT_MS_MAX}"
        )));
    }
    if spec.ladder.len() > LADDER_RUNGS_MAX {
        return Err(StoreError::Invalid(format!(
            "a ladder has at most {LADDER_RUNGS_MAX} rungs"
        )));
    }
    if let Some(window) = spec.window_segments {
        v3::check_window(window).map_err(StoreError::Invalid)?;
    }
    Ok(())
}

/// The refusal of a channel window on a database that has no place for it.
pub(crate) fn window_needs_schema_3(schema: u32) -> StoreError {
    StoreError::Invalid(format!(
        "window_segments needs schema 3 (release 3); this database is at schema {schema}, where every channel lists {} segments: leave it out",
        handover_core::hls::WINDOW_SEGMENTS
    ))
}
