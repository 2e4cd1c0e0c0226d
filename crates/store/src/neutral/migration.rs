//! What both backends' migrations do alike: the refusal of a database too
//! old, the test hooks before the commit, and the steps' statements over
//! the old tables, wherever each backend parks them (SQLite renames them
//! `<table>_v<N>`; PostgreSQL moves them to `<schema>_migrating`).

use super::rows::{insert_columns, v2_from_row, Columns, RUNG_HEIGHT_DEFAULT};
use super::{Affected, Dialect};
use crate::{Result, StoreError};
use handover_core::params::{v2, v3};
use handover_core::record::{self, ChannelDirectory, ChannelRef};
use handover_core::release::RELEASES;
use handover_core::timefmt;
use handover_core::{ReleaseInfo, Schema};
use sqlx::Row;
use std::collections::HashMap;

/// Rows of `records` a migration reads and writes at once: bounds its memory
/// whatever the size of the table.
pub(crate) const MIGRATE_ROWS_PER_PAGE: i64 = 10_000;

/// The refusal of a database older than every schema `info` migrates from,
/// naming the release to start on it first.
pub(crate) fn schema_behind(info: &ReleaseInfo, db: u32) -> StoreError {
    let migrates_from = info
        .migrates_from
        .iter()
        .map(|s| s.0.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    // A release this binary carries that takes the database one step on.
    let via = RELEASES.iter().find(|r| {
        r.release < info.release
            && info.migrates_from.contains(&r.schema)
            && r.migrates_from.contains(&Schema(db))
    });
    let advice = match via {
        Some(r) => format!(
            "upgrade the cluster to release {} first (it migrates schema {db} to {}), then to release {}",
            r.release, r.schema, info.release
        ),
        None => format!(
            "upgrade the cluster to a release of schema {migrates_from} first, then to release {}",
            info.release
        ),
    };
    StoreError::SchemaBehind {
        db,
        release: info.release.0,
        migrates_from,
        advice,
    }
}

/// Test hook, read only by the fault-injection process tests
/// (`crates/cli/tests/faults.rs`), which set it for one release through an
/// artifact whose binary is a wrapper script: a comma-separated list of
/// `name` or `name:value`. Compiled only with the `test-hooks` feature,
/// which `cargo test` turns on and no `cargo build` does: a shipped binary
/// does not read it. Here: `migrate_slow_ms:N` holds the migration
/// transaction open N ms before its commit; `migrate_fail` refuses to
/// commit it.
#[cfg(feature = "test-hooks")]
pub const TEST_FAULT_ENV: &str = "HANDOVER_TEST_FAULT";

/// The value of test fault `name` in [`TEST_FAULT_ENV`] ("" for a bare name).
#[cfg(feature = "test-hooks")]
pub(crate) fn test_fault(name: &str) -> Option<String> {
    let all = std::env::var(TEST_FAULT_ENV).ok()?;
    all.split(',').find_map(|f| {
        let (n, v) = f.split_once(':').unwrap_or((f, ""));
        (n.trim() == name).then(|| v.trim().to_owned())
    })
}

/// The test hooks of [`TEST_FAULT_ENV`], just before a migration from
/// `from` to `to` commits: an error refuses the commit (the caller drops
/// its transaction, and every step rolls back). Nothing without the
/// `test-hooks` feature.
#[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
pub(crate) async fn before_commit(from: u32, to: u32) -> Result<()> {
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = test_fault("migrate_slow_ms").and_then(|v| v.parse::<u64>().ok()) {
        tracing::warn!(
            ms,
            "test hook: holding the migration open before its commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    #[cfg(feature = "test-hooks")]
    if test_fault("migrate_fail").is_some() {
        return Err(StoreError::Migration {
            from,
            to,
            reason: format!("refused before commit by the test hook {TEST_FAULT_ENV}=migrate_fail"),
        });
    }
    Ok(())
}

/// Schema 1 → 2, channels: ids, ms durations and a one-rung ladder, from
/// the old table `old_channels`. Returns the new directory.
pub(crate) async fn channels_1_to_2<DB: sqlx::Database>(
    tx: &mut DB::Connection,
    old_channels: &str,
) -> Result<ChannelDirectory>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String, i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut dir = ChannelDirectory::new();
    let channels = sqlx::query_as::<DB, (String, i64, String, i64)>(&format!(
        "SELECT name, segment_seconds, resolution, bitrate_kbps FROM {old_channels} ORDER BY name"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for (name, secs, resolution, kbps) in channels {
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
        let (id,) = sqlx::query_as::<DB, (i64,)>(
            "INSERT INTO channels (name, segment_ms, ladder) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(name.clone())
        .bind(secs * 1000)
        .bind(ladder)
        .fetch_one(&mut *tx)
        .await?;
        let segment_ms = u32::try_from(secs * 1000).unwrap_or(u32::MAX);
        dir.insert(name, ChannelRef { id, segment_ms });
    }
    Ok(dir)
}

/// Schema 1 → 2, events: keyed by the id of their channel in `dir`, from
/// the old table `old_events`.
pub(crate) async fn events_1_to_2<DB: sqlx::Database>(
    tx: &mut DB::Connection,
    old_events: &str,
    dir: &ChannelDirectory,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64, String, String, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let events = sqlx::query_as::<DB, (i64, String, String, String, i64)>(&format!(
        "SELECT id, channel, group_name, start, duration_s FROM {old_events}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for (id, channel, group_name, start, duration_s) in events {
        let channel_id = dir.get(&channel).map(|c| c.id).ok_or_else(|| {
            StoreError::Corrupt(format!("event names unknown channel {channel:?}"))
        })?;
        let start_ms =
            timefmt::ms_from_rfc3339(&start).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(channel_id)
        .bind(group_name)
        .bind(start_ms)
        .bind(duration_s * 1000)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Schema 2 → 3, into the new tables from the old ones `old(table)` names:
/// channels get release 2's window (`WINDOW_SEGMENTS`), events are
/// unchanged, records go through the upcaster the redundant channel uses
/// (alerts become `warning`), a page at a time, so a migrated row equals a
/// translated one. A record keeps the schema its node wrote it in as
/// `translated_from` (2 for a native schema-2 row); its natural key must
/// not change (the self-check).
pub(crate) async fn tables_2_to_3<DB: Dialect>(
    tx: &mut DB::Connection,
    old: impl Fn(&str) -> String,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    Option<i64>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    sqlx::query(&format!(
        "INSERT INTO channels (id, name, segment_ms, ladder, window_segments)
         SELECT id, name, segment_ms, ladder, $1 FROM {}",
        old("channels")
    ))
    .bind(i64::from(v3::WINDOW_SEGMENTS_DEFAULT))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms)
         SELECT id, channel_id, group_name, start_ms, duration_ms FROM {}",
        old("events")
    ))
    .execute(&mut *tx)
    .await?;
    let by_id: HashMap<i64, String> =
        sqlx::query_as::<DB, (i64, String)>("SELECT id, name FROM channels")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let columns = format!(
        "SELECT node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms,
        viewers, event_id, message, natural_key, translated_from FROM {}",
        old("records")
    );
    let first_page = format!("{columns} ORDER BY node_id, seq LIMIT $1");
    let next_page =
        format!("{columns} WHERE (node_id, seq) > ($1, $2) ORDER BY node_id, seq LIMIT $3");
    let mut after: Option<(String, i64)> = None;
    loop {
        let page = match &after {
            None => sqlx::query::<DB>(&first_page).bind(MIGRATE_ROWS_PER_PAGE),
            Some((node, seq)) => sqlx::query::<DB>(&next_page)
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
            insert_columns::<DB>(tx, node, Schema(3), rows).await?;
        }
    }
    Ok(())
}

/// After a step, in the migration's transaction: the database is at
/// schema `schema`.
pub(crate) async fn stepped<DB: sqlx::Database>(tx: &mut DB::Connection, schema: u32) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'schema'")
        .bind(i64::from(schema))
        .execute(&mut *tx)
        .await?;
    Ok(())
}
