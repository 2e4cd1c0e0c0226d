//! Migrations of the product tables from one schema to the next, and the
//! pre-upgrade copy. Everything runs inside the caller's one transaction
//! (PostgreSQL's DDL is transactional): the copy, every step and every
//! self-check commit together or not at all.

use super::rows::{insert_columns, v1_from_row, v2_from_row};
use super::tables::{SCHEMA_2, SCHEMA_3};
use super::SchemaName;
use crate::sqlite::migration::MIGRATE_ROWS_PER_PAGE;
use crate::sqlite::rows::{to_u64, Columns, RUNG_HEIGHT_DEFAULT};
use crate::{Result, StoreError};
use handover_core::params::{v2, v3};
use handover_core::record::{self, ChannelDirectory, ChannelRef};
use handover_core::timefmt;
use handover_core::Schema;
use sqlx::postgres::PgConnection;
use sqlx::Row;
use std::collections::HashMap;

/// Tables (and identity columns) one schema holds at most: the copy walks
/// them all, and a schema of ours has ten. More is not a store of ours:
/// refused, never copied in part.
const TABLES_PER_SCHEMA_MAX: usize = 64;

/// `found` (rows of a catalog query read with [`catalog_limit`]) unless
/// there were more than [`TABLES_PER_SCHEMA_MAX`].
fn within_limit<T>(found: Vec<T>, of: &SchemaName) -> Result<Vec<T>> {
    if found.len() > TABLES_PER_SCHEMA_MAX {
        return Err(StoreError::Invalid(format!(
            "PostgreSQL schema {} has more than {TABLES_PER_SCHEMA_MAX} tables: not a handover store",
            of.as_str()
        )));
    }
    Ok(found)
}

/// The LIMIT that lets [`within_limit`] see one row too many.
fn catalog_limit() -> i64 {
    i64::try_from(TABLES_PER_SCHEMA_MAX).unwrap_or(i64::MAX) + 1
}

/// Moves the product tables of the store in `live` from `from` to `to`,
/// one step at a time, inside `tx`: a failure (returned before the caller
/// commits) leaves the database exactly as it was.
pub(super) async fn migrate(
    tx: &mut PgConnection,
    live: &SchemaName,
    from: u32,
    to: u32,
) -> Result<()> {
    for step in from..to {
        let scratch = live.migrating();
        let moved = async {
            sqlx::raw_sql(&format!(
                "DROP SCHEMA IF EXISTS {scratch} CASCADE; CREATE SCHEMA {scratch};
                 ALTER TABLE channels SET SCHEMA {scratch}; ALTER TABLE events SET SCHEMA {scratch};
                 ALTER TABLE records SET SCHEMA {scratch};",
                scratch = scratch.quoted()
            ))
            .execute(&mut *tx)
            .await?;
            match step {
                1 => migrate_1_to_2(tx, &scratch).await?,
                2 => migrate_2_to_3(tx, &scratch).await?,
                other => {
                    return Err(StoreError::Invalid(format!(
                        "no migration from schema {other}"
                    )))
                }
            }
            check_moved(tx, &scratch, live, &["channels", "events", "records"]).await?;
            reset_identities(tx, live).await?;
            sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", scratch.quoted()))
                .execute(&mut *tx)
                .await?;
            Ok(())
        }
        .await;
        moved.map_err(|e| StoreError::Migration {
            from: step,
            to: step + 1,
            reason: e.to_string(),
        })?;
        sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'schema'")
            .bind(i64::from(step + 1))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
        .execute(&mut *tx)
        .await?;
    #[cfg(feature = "test-hooks")]
    if let Some(ms) =
        crate::sqlite::migration::test_fault("migrate_slow_ms").and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(
            ms,
            "test hook: holding the migration open before its commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    #[cfg(feature = "test-hooks")]
    if crate::sqlite::migration::test_fault("migrate_fail").is_some() {
        // The caller drops its transaction: every step rolls back.
        return Err(StoreError::Migration {
            from,
            to,
            reason: format!(
                "refused before commit by the test hook {}=migrate_fail",
                crate::sqlite::migration::TEST_FAULT_ENV
            ),
        });
    }
    Ok(())
}

/// Schema 1 → 2: channels get ids, ms durations and a ladder; events and
/// records are keyed by channel id; records go through the same upcaster the
/// redundant channel uses, so a migrated row equals a translated one.
async fn migrate_1_to_2(tx: &mut PgConnection, old: &SchemaName) -> Result<()> {
    let old = old.quoted();
    sqlx::raw_sql(SCHEMA_2).execute(&mut *tx).await?;
    let mut dir = ChannelDirectory::new();
    let channels = sqlx::query(&format!(
        "SELECT name, segment_seconds, resolution, bitrate_kbps FROM {old}.channels ORDER BY name"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for row in channels {
        let name: String = row.try_get("name")?;
        let secs: i64 = row.try_get("segment_seconds")?;
        let resolution: String = row.try_get("resolution")?;
        let kbps: i64 = row.try_get("bitrate_kbps")?;
        let height = resolution
            .split_once('x')
            .and_then(|(_, h)| h.parse::<u32>().ok())
            .unwrap_or(RUNG_HEIGHT_DEFAULT);
        let ladder = vec![v2::Rung {
            height,
            kbps: u32::try_from(kbps).unwrap_or(0),
        }];
        let ladder =
            serde_json::to_string(&ladder).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO channels (name, segment_ms, ladder) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(&name)
        .bind(secs * 1000)
        .bind(ladder)
        .fetch_one(&mut *tx)
        .await?;
        let segment_ms = u32::try_from(secs * 1000).unwrap_or(u32::MAX);
        dir.insert(name, ChannelRef { id, segment_ms });
    }
    let events = sqlx::query(&format!(
        "SELECT id, channel, group_name, start, duration_s FROM {old}.events"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for row in events {
        let channel: String = row.try_get("channel")?;
        let start: String = row.try_get("start")?;
        let channel_id = dir.get(&channel).map(|c| c.id).ok_or_else(|| {
            StoreError::Corrupt(format!("event names unknown channel {channel:?}"))
        })?;
        let start_ms =
            timefmt::ms_from_rfc3339(&start).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(row.try_get::<i64, _>("id")?)
            .bind(channel_id)
            .bind(row.try_get::<String, _>("group_name")?)
            .bind(start_ms)
            .bind(row.try_get::<i64, _>("duration_s")? * 1000)
            .execute(&mut *tx)
            .await?;
    }
    let by_id: HashMap<i64, String> = dir.iter().map(|(n, c)| (c.id, n.clone())).collect();
    let columns = "SELECT node, seq, kind, channel, at, media_seq, viewers, event, text FROM";
    let first_page = format!("{columns} {old}.records ORDER BY node, seq LIMIT $1");
    let next_page =
        format!("{columns} {old}.records WHERE (node, seq) > ($1, $2) ORDER BY node, seq LIMIT $3");
    let mut after: Option<(String, i64)> = None;
    loop {
        let page = match &after {
            None => sqlx::query(&first_page).bind(MIGRATE_ROWS_PER_PAGE),
            Some((node, seq)) => sqlx::query(&next_page)
                .bind(node.clone())
                .bind(*seq)
                .bind(MIGRATE_ROWS_PER_PAGE),
        }
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.try_get("node")?, last.try_get("seq")?));
        let mut by_node: Vec<(String, Vec<Columns>)> = Vec::new();
        for row in &page {
            let node: String = row.try_get("node")?;
            let seq: i64 = row.try_get("seq")?;
            let new = record::upcast_1_to_2(v1_from_row(row)?, &node, &dir).map_err(|source| {
                StoreError::Untranslatable {
                    seq: to_u64(seq),
                    source,
                }
            })?;
            let cols = Columns::v2(seq, &new, Some(1), &by_id)?;
            match by_node.last_mut() {
                Some((n, rows)) if *n == node => rows.push(cols),
                _ => by_node.push((node, vec![cols])),
            }
        }
        for (node, rows) in &by_node {
            insert_columns(tx, node, Schema(2), rows).await?;
        }
    }
    Ok(())
}

/// Schema 2 → 3: channels get release 2's window (`WINDOW_SEGMENTS`),
/// events are unchanged, records go through the upcaster the redundant
/// channel uses (alerts become `warning`), so a migrated row equals a
/// translated one. A record keeps the schema its node wrote it in as
/// `translated_from` (2 for a native schema-2 row).
async fn migrate_2_to_3(tx: &mut PgConnection, old: &SchemaName) -> Result<()> {
    let old = old.quoted();
    sqlx::raw_sql(SCHEMA_3).execute(&mut *tx).await?;
    sqlx::query(&format!(
        "INSERT INTO channels (id, name, segment_ms, ladder, window_segments)
         SELECT id, name, segment_ms, ladder, $1 FROM {old}.channels"
    ))
    .bind(i64::from(v3::WINDOW_SEGMENTS_DEFAULT))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms)
         SELECT id, channel_id, group_name, start_ms, duration_ms FROM {old}.events"
    ))
    .execute(&mut *tx)
    .await?;
    let mut by_id = HashMap::new();
    for row in sqlx::query("SELECT id, name FROM channels")
        .fetch_all(&mut *tx)
        .await?
    {
        by_id.insert(
            row.try_get::<i64, _>("id")?,
            row.try_get::<String, _>("name")?,
        );
    }
    let columns = "SELECT node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms,
        viewers, event_id, message, natural_key, translated_from FROM";
    let first_page = format!("{columns} {old}.records ORDER BY node_id, seq LIMIT $1");
    let next_page = format!(
        "{columns} {old}.records WHERE (node_id, seq) > ($1, $2) ORDER BY node_id, seq LIMIT $3"
    );
    let mut after: Option<(String, i64)> = None;
    loop {
        let page = match &after {
            None => sqlx::query(&first_page).bind(MIGRATE_ROWS_PER_PAGE),
            Some((node, seq)) => sqlx::query(&next_page)
                .bind(node.clone())
                .bind(*seq)
                .bind(MIGRATE_ROWS_PER_PAGE),
        }
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.try_get("node_id")?, last.try_get("seq")?));
        let mut by_node: Vec<(String, Vec<Columns>)> = Vec::new();
        for row in &page {
            let node: String = row.try_get("node_id")?;
            let seq: i64 = row.try_get("seq")?;
            let old_key: String = row.try_get("natural_key")?;
            let from = row
                .try_get::<Option<i64>, _>("translated_from")?
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(2);
            let new = record::upcast_2_to_3(v2_from_row(row)?);
            let cols = Columns::v3(seq, &new, Some(from), &by_id)?;
            if cols.natural_key != old_key {
                return Err(StoreError::Corrupt(format!(
                    "self-check: record ({node}, {seq}) changed its natural key: {old_key} to {}",
                    cols.natural_key
                )));
            }
            match by_node.last_mut() {
                Some((n, rows)) if *n == node => rows.push(cols),
                _ => by_node.push((node, vec![cols])),
            }
        }
        for (node, rows) in &by_node {
            insert_columns(tx, node, Schema(3), rows).await?;
        }
    }
    Ok(())
}

/// The self-check, inside the transaction (so a failure leaves the
/// database as it was): every row of every `tables` in `from` arrived in
/// `to`.
async fn check_moved(
    tx: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
    tables: &[&str],
) -> Result<()> {
    for table in tables {
        let before: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}.{table}", from.quoted()))
                .fetch_one(&mut *tx)
                .await?;
        let after: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}.{table}", to.quoted()))
                .fetch_one(&mut *tx)
                .await?;
        if before != after {
            return Err(StoreError::Corrupt(format!(
                "self-check: {}.{table} had {before} rows, {}.{table} has {after}",
                from.as_str(),
                to.as_str()
            )));
        }
    }
    Ok(())
}

/// The base tables of schema `of`, by name.
async fn tables_of(tx: &mut PgConnection, of: &SchemaName) -> Result<Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::TEXT FROM information_schema.tables
         WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY table_name LIMIT $2",
    )
    .bind(of.as_str())
    .bind(catalog_limit())
    .fetch_all(&mut *tx)
    .await?;
    within_limit(tables, of)
}

/// Whether schema `name` exists in the database.
pub(super) async fn schema_exists(tx: &mut PgConnection, name: &SchemaName) -> Result<bool> {
    let found: Option<String> = sqlx::query_scalar(
        "SELECT schema_name::TEXT FROM information_schema.schemata WHERE schema_name = $1",
    )
    .bind(name.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    Ok(found.is_some())
}

/// Replaces schema `to` with a copy of every table of `from` (columns,
/// keys, checks, identities, rows), checked row count by row count. The
/// pre-upgrade copy, and its restore.
pub(super) async fn copy_schema(
    tx: &mut PgConnection,
    from: &SchemaName,
    to: &SchemaName,
) -> Result<()> {
    let tables = tables_of(tx, from).await?;
    let (f, t) = (from.quoted(), to.quoted());
    sqlx::raw_sql(&format!(
        "DROP SCHEMA IF EXISTS {t} CASCADE; CREATE SCHEMA {t};"
    ))
    .execute(&mut *tx)
    .await?;
    for table in &tables {
        let table = quote(table);
        sqlx::raw_sql(&format!(
            "CREATE TABLE {t}.{table} (LIKE {f}.{table} INCLUDING ALL);
             INSERT INTO {t}.{table} SELECT * FROM {f}.{table};"
        ))
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<&str> = tables.iter().map(String::as_str).collect();
    let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
    let quoted: Vec<&str> = quoted.iter().map(String::as_str).collect();
    check_moved(tx, from, to, &quoted).await?;
    reset_identities(tx, to).await
}

/// Every identity column of schema `of` continues after its largest value:
/// rows copied or migrated with their ids leave the sequence behind.
async fn reset_identities(tx: &mut PgConnection, of: &SchemaName) -> Result<()> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
         WHERE table_schema = $1 AND is_identity = 'YES' LIMIT $2",
    )
    .bind(of.as_str())
    .bind(catalog_limit())
    .fetch_all(&mut *tx)
    .await?;
    for (table, column) in within_limit(columns, of)? {
        let qualified = format!("{}.{}", of.quoted(), quote(&table));
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence($1, $2), COALESCE(MAX({}), 0) + 1, false)
             FROM {qualified}",
            quote(&column)
        ))
        .bind(&qualified)
        .bind(&column)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// An identifier PostgreSQL reads as exactly `name` (catalog names here).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
