//! Migrations of the product tables from one schema to the next, and the
//! pre-upgrade copy. Everything runs inside the caller's one transaction
//! (PostgreSQL's DDL is transactional): the copy, every step and every
//! self-check commit together or not at all.

use super::tables::{SCHEMA_2, SCHEMA_3};
use super::SchemaName;
use crate::neutral::migration::{
    channels_1_to_2, events_1_to_2, tables_2_to_3, MIGRATE_ROWS_PER_PAGE,
};
use crate::neutral::rows::{insert_columns, to_u64, v1_from_row, Columns};
use crate::{Result, StoreError};
use handover_core::record;
use handover_core::Schema;
use sqlx::postgres::PgConnection;
use sqlx::{Postgres, Row};
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

/// How long one try at [`hold_writes`] waits for a lock: below PostgreSQL's
/// deadlock check (1 s by default), so a writer that holds one of the
/// tables and waits for another we hold is never aborted for us; we let go
/// and try again instead.
const HOLD_LOCK_WAIT_MS: u64 = 500;
/// Tries at [`hold_writes`] before the migration gives up (about 20 s of
/// writers that never let go).
const HOLD_TRIES_MAX: u32 = 40;
/// The tables a migration moves: locked against readers too, since
/// moving them needs that lock anyway.
const MOVED_TABLES: [&str; 3] = ["channels", "events", "records"];

/// Holds every write to the store in `live` (and every read of the tables
/// a migration moves) until the transaction ends, so the pre-upgrade copy,
/// the migration and their self-checks all see one state. Without it a
/// replica still on the old release (its heartbeat, its lease, a step it
/// logs) commits between a copy and its count, and the self-check fails a
/// sound migration, or a row written after the copy is missing from it.
pub(super) async fn hold_writes(tx: &mut PgConnection, live: &SchemaName) -> Result<()> {
    let tables = tables_of(tx, live).await?;
    let qualified = |names: &mut dyn Iterator<Item = &String>| {
        names
            .map(|t| format!("{}.{}", live.quoted(), quote(t)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let moved = qualified(&mut tables.iter().filter(|t| MOVED_TABLES.contains(&t.as_str())));
    let rest = qualified(
        &mut tables
            .iter()
            .filter(|t| !MOVED_TABLES.contains(&t.as_str())),
    );
    let mut locks = Vec::new();
    if !moved.is_empty() {
        locks.push(format!("LOCK TABLE {moved} IN ACCESS EXCLUSIVE MODE;"));
    }
    if !rest.is_empty() {
        locks.push(format!("LOCK TABLE {rest} IN SHARE MODE;"));
    }
    let locks = locks.concat();
    sqlx::raw_sql(&format!("SET LOCAL lock_timeout = '{HOLD_LOCK_WAIT_MS}ms'"))
        .execute(&mut *tx)
        .await?;
    for tried in 1..=HOLD_TRIES_MAX {
        sqlx::raw_sql("SAVEPOINT hold_writes")
            .execute(&mut *tx)
            .await?;
        match sqlx::raw_sql(&locks).execute(&mut *tx).await {
            Ok(_) => {
                sqlx::raw_sql("RELEASE SAVEPOINT hold_writes; SET LOCAL lock_timeout TO DEFAULT")
                    .execute(&mut *tx)
                    .await?;
                return Ok(());
            }
            Err(e) if lock_not_available(&e) && tried < HOLD_TRIES_MAX => {
                // Rolling back to the savepoint lets go of what this try took.
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT hold_writes")
                    .execute(&mut *tx)
                    .await?;
                tracing::debug!(tried, "the store is busy; trying again to hold its writes");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Invalid(format!(
        "could not hold the writes to {} for a migration in {HOLD_TRIES_MAX} tries",
        live.as_str()
    )))
}

/// PostgreSQL's `lock_not_available` (a `lock_timeout` ran out).
fn lock_not_available(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "55P03")
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
        crate::neutral::migration::stepped::<Postgres>(&mut *tx, step + 1).await?;
    }
    crate::neutral::bump_revision::<Postgres>(&mut *tx).await?;
    // An error here: the caller drops its transaction, every step rolls back.
    crate::neutral::migration::before_commit(from, to).await?;
    Ok(())
}

/// Schema 1 → 2: channels get ids, ms durations and a ladder; events and
/// records are keyed by channel id; records go through the same upcaster the
/// redundant channel uses, so a migrated row equals a translated one.
async fn migrate_1_to_2(tx: &mut PgConnection, old: &SchemaName) -> Result<()> {
    let old = old.quoted();
    sqlx::raw_sql(SCHEMA_2).execute(&mut *tx).await?;
    let dir = channels_1_to_2::<Postgres>(&mut *tx, &format!("{old}.channels")).await?;
    events_1_to_2::<Postgres>(&mut *tx, &format!("{old}.events"), &dir).await?;
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
            insert_columns::<sqlx::Postgres>(tx, node, Schema(2), rows).await?;
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
    tables_2_to_3::<Postgres>(&mut *tx, |table| format!("{old}.{table}")).await?;
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
