//! Migrations of the product tables from one schema to the next, all steps
//! in one transaction after a `VACUUM INTO` snapshot, each checked before
//! its commit.

use super::rows::{
    insert_columns, insert_v2, to_u64, v1_from_row, v2_from_row, Columns, RUNG_HEIGHT_DEFAULT,
};
use super::tables::{SCHEMA_2, SCHEMA_3};
use crate::{Result, StoreError};
use handover_core::params::{v2, v3};
use handover_core::record::{self, ChannelDirectory, ChannelRef};
use handover_core::release::RELEASES;
use handover_core::timefmt;
use handover_core::{ReleaseInfo, Schema};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use std::collections::HashMap;

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

/// Moves the product tables from `from` to `to` one step at a time, all in
/// one transaction: a failure leaves the database exactly as it was.
pub async fn migrate(pool: &SqlitePool, from: u32, to: u32) -> Result<()> {
    let mut tx = pool.begin().await?;
    for step in from..to {
        match step {
            1 => migrate_1_to_2(&mut tx)
                .await
                .map_err(|e| StoreError::Migration {
                    from: 1,
                    to: 2,
                    reason: e.to_string(),
                })?,
            2 => migrate_2_to_3(&mut tx)
                .await
                .map_err(|e| StoreError::Migration {
                    from: 2,
                    to: 3,
                    reason: e.to_string(),
                })?,
            other => {
                return Err(StoreError::Migration {
                    from: other,
                    to: other + 1,
                    reason: "no such migration".into(),
                })
            }
        }
        sqlx::query("UPDATE cluster SET value = ? WHERE key = 'schema'")
            .bind(i64::from(step + 1))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
        .execute(&mut *tx)
        .await?;
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
        // Dropping `tx` rolls every step back.
        return Err(StoreError::Migration {
            from,
            to,
            reason: format!("refused before commit by the test hook {TEST_FAULT_ENV}=migrate_fail"),
        });
    }
    tx.commit().await?;
    Ok(())
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

/// Schema 1 → 2: channels get ids, ms durations and a ladder; events and
/// records are keyed by channel id; records go through the same upcaster the
/// redundant channel uses, so a migrated row equals a translated one.
pub(super) async fn migrate_1_to_2(tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
    sqlx::raw_sql(
        "ALTER TABLE channels RENAME TO channels_v1; ALTER TABLE events RENAME TO events_v1; ALTER TABLE records RENAME TO records_v1;",
    )
    .execute(&mut **tx)
    .await?;
    sqlx::raw_sql(SCHEMA_2).execute(&mut **tx).await?;
    let mut dir = ChannelDirectory::new();
    let channels = sqlx::query(
        "SELECT name, segment_seconds, resolution, bitrate_kbps FROM channels_v1 ORDER BY name",
    )
    .fetch_all(&mut **tx)
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
            "INSERT INTO channels (name, segment_ms, ladder) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(&name)
        .bind(secs * 1000)
        .bind(ladder)
        .fetch_one(&mut **tx)
        .await?;
        dir.insert(
            name,
            ChannelRef {
                id,
                segment_ms: u32::try_from(secs * 1000).unwrap_or(u32::MAX),
            },
        );
    }
    let events = sqlx::query("SELECT id, channel, group_name, start, duration_s FROM events_v1")
        .fetch_all(&mut **tx)
        .await?;
    for row in events {
        let channel: String = row.try_get("channel")?;
        let start: String = row.try_get("start")?;
        let channel_id = dir.get(&channel).map(|c| c.id).ok_or_else(|| {
            StoreError::Corrupt(format!("event names unknown channel {channel:?}"))
        })?;
        let start_ms =
            timefmt::ms_from_rfc3339(&start).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(row.try_get::<i64, _>("id")?)
            .bind(channel_id)
            .bind(row.try_get::<String, _>("group_name")?)
            .bind(start_ms)
            .bind(row.try_get::<i64, _>("duration_s")? * 1000)
            .execute(&mut **tx)
            .await?;
    }
    let by_id: HashMap<i64, String> = dir.iter().map(|(n, c)| (c.id, n.clone())).collect();
    let records = sqlx::query("SELECT node, seq, kind, channel, at, media_seq, viewers, event, text FROM records_v1 ORDER BY node, seq")
        .fetch_all(&mut **tx)
        .await?;
    for row in records {
        let node: String = row.try_get("node")?;
        let seq: i64 = row.try_get("seq")?;
        let old = v1_from_row(&row)?;
        let new = record::upcast_1_to_2(old, &node, &dir).map_err(|source| {
            StoreError::Untranslatable {
                seq: to_u64(seq),
                source,
            }
        })?;
        insert_v2(tx, &node, seq, &new, Some(1), &by_id).await?;
    }
    check_moved(
        tx,
        &[
            ("channels_v1", "channels"),
            ("events_v1", "events"),
            ("records_v1", "records"),
        ],
    )
    .await?;
    sqlx::raw_sql("DROP TABLE records_v1; DROP TABLE events_v1; DROP TABLE channels_v1;")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Rows of `records` a migration reads and writes at once: bounds its memory
/// whatever the size of the table.
pub(crate) const MIGRATE_ROWS_PER_PAGE: i64 = 10_000;

/// Schema 2 → 3: channels get release 2's window (`WINDOW_SEGMENTS`),
/// events are unchanged, records go through the upcaster the redundant
/// channel uses (alerts become `warning`), so a migrated row equals a
/// translated one. A record keeps the schema its node wrote it in as
/// `translated_from` (2 for a native schema-2 row).
pub(super) async fn migrate_2_to_3(tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
    sqlx::raw_sql(
        "ALTER TABLE channels RENAME TO channels_v2; ALTER TABLE events RENAME TO events_v2; ALTER TABLE records RENAME TO records_v2;",
    )
    .execute(&mut **tx)
    .await?;
    sqlx::raw_sql(SCHEMA_3).execute(&mut **tx).await?;
    sqlx::query(
        "INSERT INTO channels (id, name, segment_ms, ladder, window_segments)
         SELECT id, name, segment_ms, ladder, ? FROM channels_v2",
    )
    .bind(i64::from(v3::WINDOW_SEGMENTS_DEFAULT))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO events (id, channel_id, group_name, start_ms, duration_ms)
         SELECT id, channel_id, group_name, start_ms, duration_ms FROM events_v2",
    )
    .execute(&mut **tx)
    .await?;
    let mut by_id = HashMap::new();
    for row in sqlx::query("SELECT id, name FROM channels")
        .fetch_all(&mut **tx)
        .await?
    {
        by_id.insert(
            row.try_get::<i64, _>("id")?,
            row.try_get::<String, _>("name")?,
        );
    }
    const COLUMNS: &str =
        "SELECT node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms,
        viewers, event_id, message, natural_key, translated_from FROM records_v2";
    let first_page = format!("{COLUMNS} ORDER BY node_id, seq LIMIT ?");
    let next_page =
        format!("{COLUMNS} WHERE (node_id, seq) > (?, ?) ORDER BY node_id, seq LIMIT ?");
    let mut after: Option<(String, i64)> = None;
    loop {
        let query = match &after {
            None => sqlx::query(&first_page),
            Some((node, seq)) => sqlx::query(&next_page).bind(node.clone()).bind(*seq),
        };
        let page = query
            .bind(MIGRATE_ROWS_PER_PAGE)
            .fetch_all(&mut **tx)
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
    check_moved(
        tx,
        &[
            ("channels_v2", "channels"),
            ("events_v2", "events"),
            ("records_v2", "records"),
        ],
    )
    .await?;
    sqlx::raw_sql("DROP TABLE records_v2; DROP TABLE events_v2; DROP TABLE channels_v2;")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The migration's self-check, inside its transaction (so a failure leaves
/// the database as it was): every row of every old table arrived.
pub(super) async fn check_moved(
    tx: &mut Transaction<'_, Sqlite>,
    pairs: &[(&str, &str)],
) -> Result<()> {
    for (old, new) in pairs {
        let before: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {old}"))
            .fetch_one(&mut **tx)
            .await?;
        let after: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {new}"))
            .fetch_one(&mut **tx)
            .await?;
        if before != after {
            return Err(StoreError::Corrupt(format!(
                "self-check: {old} had {before} rows, {new} has {after}"
            )));
        }
    }
    Ok(())
}
