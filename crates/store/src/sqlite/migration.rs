//! Migrations of the product tables from one schema to the next, all steps
//! in one transaction after a `VACUUM INTO` snapshot, each checked before
//! its commit.

use super::tables::{SCHEMA_2, SCHEMA_3};
use crate::neutral::migration::{channels_1_to_2, events_1_to_2, tables_2_to_3};
use crate::neutral::rows::{insert_v2, to_u64, v1_from_row};
use crate::{Result, StoreError};
use handover_core::record;
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use std::collections::HashMap;

/// Moves the product tables from `from` to `to` one step at a time, all in
/// one transaction: a failure leaves the database exactly as it was.
pub async fn migrate(pool: &SqlitePool, from: u32, to: u32) -> Result<()> {
    let mut tx = pool.begin_with(super::BEGIN_WRITE).await?;
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
        crate::neutral::migration::stepped::<Sqlite>(&mut tx, step + 1).await?;
    }
    crate::neutral::bump_revision::<Sqlite>(&mut tx).await?;
    crate::neutral::migration::before_commit(from, to).await?;
    tx.commit().await?;
    Ok(())
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
    let dir = channels_1_to_2::<Sqlite>(&mut **tx, "channels_v1").await?;
    events_1_to_2::<Sqlite>(&mut **tx, "events_v1", &dir).await?;
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
        insert_v2::<Sqlite>(tx, &node, seq, &new, Some(1), &by_id).await?;
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
    tables_2_to_3::<Sqlite>(&mut **tx, |table| format!("{table}_v2")).await?;
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
