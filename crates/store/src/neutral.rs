//! Statements both backends run, and the checks around them: one text each.
//!
//! SQLite's and PostgreSQL's stores differ in how they lock and connect,
//! not in what they ask: the SQL here is one text for both (`$N`
//! parameters, which sqlx's SQLite binds by number too), and the checks
//! and messages around it are written once. Each function takes the
//! backend's connection (a transaction's, when it writes) and is called as
//! `neutral::f::<Sqlite>(&mut tx, …)` or `::<Postgres>`; the caller keeps
//! its own locking (SQLite's writer mutex, PostgreSQL's table locks) and
//! its own transaction. Depends on neither backend.

use crate::{replicas, ClusterState, NewBootstrapToken, NodeRow, Result, StoreError};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::identity::{BootstrapToken, SecretDigest, GROUPS_MAX};
use handover_core::params::{v1, v2, v3, Group};
use handover_core::record::{ChannelDirectory, ChannelRef};
use handover_core::timefmt;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{validate_id, OutboxState};
use handover_core::{Release, ReleaseInfo, Schema};
use rows::{
    check_spec, event_views, json, ladder_channel, parse_grant, parse_role, stored_params, to_i64,
    to_u64, window_needs_schema_3, RUNG_HEIGHT_DEFAULT, RUNG_KBPS_DEFAULT,
};
use sqlx::Row;
use std::collections::HashMap;

pub(crate) mod migration;
pub(crate) mod rows;
pub(crate) mod writes;

/// What the backends say differently, where the rest is the same.
pub(crate) trait Dialect: sqlx::Database {
    /// Records of schema 2 or 3 one INSERT statement carries at most.
    const INSERT_ROWS_PER_STATEMENT: usize;
    /// Stores schema-2 or schema-3 rows (with their severity when
    /// `with_severity`) of each `(node, rows)` of `batches` (a group
    /// commit's, a node perhaps in several), idempotent on (node, seq), in
    /// statements of at most [`Dialect::INSERT_ROWS_PER_STATEMENT`] rows;
    /// returns how many of each batch's rows were new (a row in two
    /// batches counts for the first). The one statement the backends
    /// write differently: the drain's speed is in it.
    fn insert_columns<'c>(
        conn: &'c mut Self::Connection,
        with_severity: bool,
        batches: &'c [(&'c str, &'c [rows::Columns])],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>>> + Send + 'c>>;
    /// Raises a node's `acked_through` to `$1`, never lowering it
    /// (`node_id = $2`).
    const RAISE_ACK: &'static str;
    /// What a read of the cluster's epoch and fence in a batch's
    /// transaction appends, to hold them until the batch commits.
    const EPOCH_LOCK: &'static str;
}

/// How many rows a statement changed: each backend's result says it, but
/// not through a trait of sqlx's.
pub(crate) trait Affected {
    fn affected(&self) -> u64;
}

impl Affected for sqlx::sqlite::SqliteQueryResult {
    fn affected(&self) -> u64 {
        self.rows_affected()
    }
}

impl Affected for sqlx::postgres::PgQueryResult {
    fn affected(&self) -> u64 {
        self.rows_affected()
    }
}

/// Longest event: one week. Longer is a typo, not a live event.
const EVENT_DURATION_MS_MAX: u64 = 7 * 24 * 3_600_000;

/// The `cluster` row.
pub(crate) async fn cluster<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<ClusterState>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let map: HashMap<String, i64> =
        sqlx::query_as::<DB, (String, i64)>("SELECT key, value FROM cluster")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    let get = |k: &str| {
        map.get(k)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("cluster.{k} missing")))
    };
    Ok(ClusterState {
        release: Release(u32::try_from(get("release")?).unwrap_or(0)),
        schema: Schema(u32::try_from(get("schema")?).unwrap_or(0)),
        epoch: to_u64(get("epoch")?),
        fenced: get("fenced")? != 0,
        param_revision: to_u64(get("param_revision")?),
        // Created by this build's first open; 0 where an older one made the row.
        desired_revision: map.get("desired_revision").copied().map_or(0, to_u64),
        registry_revision: map.get("registry_revision").copied().map_or(0, to_u64),
    })
}

/// Fence (epoch + 1 and `fenced`) or unfence (the flag cleared, the epoch
/// kept), in the caller's guarded transaction.
pub(crate) async fn set_fence<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    fenced: bool,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if fenced {
        sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'epoch'")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'fenced'")
        .bind(i64::from(fenced))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The cluster release, in the caller's guarded transaction.
pub(crate) async fn set_cluster_release<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    release: Release,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'release'")
        .bind(i64::from(release.0))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The parameters changed: nodes read them again.
pub(crate) async fn bump_revision<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
{
    sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What a group must be before any database is asked: three valid ids,
/// two different nodes.
pub(crate) fn check_group(group: &Group) -> Result<()> {
    for (field, id) in [
        ("name", &group.name),
        ("primary", &group.primary),
        ("backup", &group.backup),
    ] {
        validate_id(field, id).map_err(|e| StoreError::Invalid(e.to_string()))?;
    }
    if group.primary == group.backup {
        return Err(StoreError::Invalid(
            "primary and backup must be different nodes".into(),
        ));
    }
    Ok(())
}

/// Adds a checked group in the caller's transaction (which keeps other
/// group creations out until it commits): a node is in one group, the
/// cluster has at most `GROUPS_MAX`, a name is taken once.
pub(crate) async fn insert_group<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    group: &Group,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String, String, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    // A node id is in one group only: the groups say who a node is.
    let taken = sqlx::query_as::<DB, (String, String, String)>(
        "SELECT name, primary_node, backup_node FROM groups
         WHERE primary_node IN ($1, $2) OR backup_node IN ($1, $2) LIMIT 1",
    )
    .bind(group.primary.clone())
    .bind(group.backup.clone())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((name, primary, backup)) = taken {
        let node = if [&primary, &backup].contains(&&group.primary) {
            &group.primary
        } else {
            &group.backup
        };
        let role = if *node == primary {
            "primary"
        } else {
            "backup"
        };
        return Err(StoreError::Invalid(format!(
            "node {node:?} is already the {role} of group {name:?}: a node is in one group"
        )));
    }
    let (count,) = sqlx::query_as::<DB, (i64,)>("SELECT COUNT(*) FROM groups")
        .fetch_one(&mut *conn)
        .await?;
    if usize::try_from(count).unwrap_or(usize::MAX) >= GROUPS_MAX {
        return Err(StoreError::Invalid(format!(
            "the cluster has {GROUPS_MAX} groups, the most one controller registers"
        )));
    }
    let done = sqlx::query(
        "INSERT INTO groups (name, primary_node, backup_node) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(group.name.clone())
    .bind(group.primary.clone())
    .bind(group.backup.clone())
    .execute(&mut *conn)
    .await?;
    if done.affected() == 0 {
        return Err(StoreError::Exists {
            what: "group",
            name: group.name.clone(),
        });
    }
    bump_revision::<DB>(conn).await
}

/// Every group, by name.
pub(crate) async fn groups<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<Vec<Group>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, String, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    Ok(sqlx::query_as::<DB, (String, String, String)>(
        "SELECT name, primary_node, backup_node FROM groups ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(name, primary, backup)| Group {
        name,
        primary,
        backup,
    })
    .collect())
}

/// Forgets a node in the caller's transaction: its credential, bootstrap
/// token, registration and desired state; every replica drops the
/// sessions it cached. False if nothing was known.
pub(crate) async fn remove_node<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    node_id: &str,
) -> Result<bool>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    DB::QueryResult: Affected,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut removed = 0;
    for table in ["credentials", "bootstrap_tokens", "nodes", "node_desired"] {
        let sql = format!("DELETE FROM {table} WHERE node_id = $1");
        removed += sqlx::query(&sql)
            .bind(node_id.to_owned())
            .execute(&mut *conn)
            .await?
            .affected();
    }
    // Every replica drops the sessions it cached, this node's among them.
    sqlx::query(replicas::BUMP)
        .bind("registry_revision".to_owned())
        .execute(&mut *conn)
        .await?;
    Ok(removed > 0)
}

/// What `node_id` is told to do about upgrades (default: hold).
pub(crate) async fn desired<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    node_id: &str,
) -> Result<Desired>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let raw =
        sqlx::query_as::<DB, (String,)>("SELECT desired FROM node_desired WHERE node_id = $1")
            .bind(node_id.to_owned())
            .fetch_optional(&mut *conn)
            .await?;
    match raw {
        Some((raw,)) => serde_json::from_str(&raw)
            .map_err(|e| StoreError::Corrupt(format!("desired state of {node_id}: {e}"))),
        None => Ok(Desired::default()),
    }
}

/// Stores a node's desired state in the caller's guarded transaction;
/// replicas that cached desired states read them again.
pub(crate) async fn set_desired<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    desired: &[(String, Desired)],
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for (node_id, desired) in desired {
        let desired =
            serde_json::to_string(desired).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO node_desired (node_id, desired) VALUES ($1, $2)
             ON CONFLICT (node_id) DO UPDATE SET desired = excluded.desired",
        )
        .bind(node_id.to_owned())
        .bind(desired)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(replicas::BUMP)
        .bind("desired_revision".to_owned())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The latest upgrade (id and state), if any was ever started.
pub(crate) async fn upgrade<DB: sqlx::Database>(
    conn: &mut DB::Connection,
) -> Result<Option<(i64, Upgrade)>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (i64, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let row = sqlx::query_as::<DB, (i64, String)>(
        "SELECT id, state FROM upgrades ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|(id, state)| {
        let up = serde_json::from_str(&state)
            .map_err(|e| StoreError::Corrupt(format!("upgrade state: {e}")))?;
        Ok((id, up))
    })
    .transpose()
}

/// The digest of the credential a node was issued, if any.
pub(crate) async fn credential_of<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    node_id: &str,
) -> Result<Option<SecretDigest>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let hex = sqlx::query_as::<DB, (String,)>("SELECT sha256 FROM credentials WHERE node_id = $1")
        .bind(node_id.to_owned())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(hex.map(|(hex,)| SecretDigest::from_stored(hex)))
}

/// The registered node (and its schema) a credential belongs to.
pub(crate) async fn node_by_credential<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    credential: &SecretDigest,
) -> Result<Option<(String, Schema)>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    // One lookup in the unique index on `credentials.sha256`.
    let row = sqlx::query_as::<DB, (String, i64)>(
        "SELECT n.node_id, n.schema FROM credentials c JOIN nodes n ON n.node_id = c.node_id
         WHERE c.sha256 = $1",
    )
    .bind(credential.as_str().to_owned())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(node_id, schema)| (node_id, Schema(u32::try_from(schema).unwrap_or(0)))))
}

/// The bootstrap token issued for a node, used or not.
pub(crate) async fn bootstrap_token<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    node_id: &str,
) -> Result<Option<BootstrapToken>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String, i64, Option<i64>): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let row = sqlx::query_as::<DB, (String, i64, Option<i64>)>(
        "SELECT sha256, expires_ms, used_ms FROM bootstrap_tokens WHERE node_id = $1",
    )
    .bind(node_id.to_owned())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(sha256, expires_ms, used_ms)| BootstrapToken {
        digest: SecretDigest::from_stored(sha256),
        expires_ms,
        used_ms,
    }))
}

/// Stores new bootstrap tokens in the caller's transaction, each
/// replacing the node's previous one (used or not).
pub(crate) async fn add_bootstrap_tokens<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    tokens: &[NewBootstrapToken],
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for t in tokens {
        // One token per node: a new one replaces an unused or used one.
        sqlx::query(
            "INSERT INTO bootstrap_tokens (node_id, sha256, expires_ms, used_ms) VALUES ($1, $2, $3, NULL)
             ON CONFLICT (node_id) DO UPDATE SET sha256 = excluded.sha256,
                expires_ms = excluded.expires_ms, used_ms = NULL",
        )
        .bind(t.node_id.clone())
        .bind(t.digest.as_str().to_owned())
        .bind(t.expires_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Every registered node, by group, primary first.
pub(crate) async fn nodes<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<Vec<NodeRow>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
    i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    String: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
{
    let rows = sqlx::query::<DB>("SELECT * FROM nodes ORDER BY group_name, role DESC, node_id")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let events: String = row.try_get("current_events")?;
            Ok(NodeRow {
                node_id: row.try_get("node_id")?,
                release: Release(u32::try_from(row.try_get::<i64, _>("release")?).unwrap_or(0)),
                schema: Schema(u32::try_from(row.try_get::<i64, _>("schema")?).unwrap_or(0)),
                role: parse_role(&row.try_get::<String, _>("role")?)?,
                group: row.try_get("group_name")?,
                hls_url: row.try_get("hls_url")?,
                grant: parse_grant(&row.try_get::<String, _>("grant_name")?)?,
                epoch: to_u64(row.try_get("epoch")?),
                outbox: OutboxState {
                    next_seq: to_u64(row.try_get("outbox_next_seq")?),
                    oldest_unacked_seq: row.try_get::<Option<i64>, _>("outbox_oldest")?.map(to_u64),
                    count: to_u64(row.try_get("outbox_count")?),
                },
                current_events: serde_json::from_str(&events).unwrap_or_default(),
                staged: serde_json::from_str(&row.try_get::<String, _>("staged")?)
                    .unwrap_or_default(),
                last_seen_ms: row.try_get("last_seen_ms")?,
                acked_through: to_u64(row.try_get("acked_through")?),
                binary_sha256: row.try_get("binary_sha256")?,
                supervisor_sha256: row.try_get("supervisor_sha256")?,
            })
        })
        .collect()
}

/// Channels by name (what the upcasters need) and names by id, in a
/// database of `schema`.
pub(crate) async fn channel_directory<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
) -> Result<(ChannelDirectory, HashMap<i64, String>)>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut by_name = ChannelDirectory::new();
    let mut by_id = HashMap::new();
    match schema.0 {
        1 => {
            for (name, secs) in
                sqlx::query_as::<DB, (String, i64)>("SELECT name, segment_seconds FROM channels")
                    .fetch_all(&mut *conn)
                    .await?
            {
                let segment_ms = u32::try_from(secs * 1000).unwrap_or(u32::MAX);
                by_name.insert(name, ChannelRef { id: 0, segment_ms });
            }
        }
        2 | 3 => {
            for (id, name, segment_ms) in sqlx::query_as::<DB, (i64, String, i64)>(
                "SELECT id, name, segment_ms FROM channels",
            )
            .fetch_all(&mut *conn)
            .await?
            {
                by_id.insert(id, name.clone());
                let segment_ms = u32::try_from(segment_ms).unwrap_or(u32::MAX);
                by_name.insert(name, ChannelRef { id, segment_ms });
            }
        }
        other => return Err(StoreError::UnknownSchema(other)),
    }
    Ok((by_name, by_id))
}

/// The channels of a schema-2 or schema-3 table, with the window of each
/// when `with_window` (schema 3; 0 otherwise).
async fn channels_by_id<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    with_window: bool,
) -> Result<Vec<(v2::Channel, u32)>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (i64, String, i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let sql = if with_window {
        "SELECT id, name, segment_ms, ladder, window_segments FROM channels ORDER BY id"
    } else {
        "SELECT id, name, segment_ms, ladder, CAST(0 AS BIGINT) AS window_segments FROM channels ORDER BY id"
    };
    sqlx::query_as::<DB, (i64, String, i64, String, i64)>(sql)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, name, segment_ms, ladder, window)| {
            let channel = v2::Channel {
                id,
                name,
                segment_ms: u32::try_from(segment_ms).unwrap_or(0),
                ladder: serde_json::from_str(&ladder)
                    .map_err(|e| StoreError::Corrupt(format!("ladder: {e}")))?,
            };
            let window = u32::try_from(window)
                .map_err(|_| StoreError::Corrupt(format!("window_segments {window}")))?;
            Ok((channel, window))
        })
        .collect()
}

/// The events of a schema-2 or schema-3 table (the same shape).
async fn events_by_id<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<Vec<v2::Event>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (i64, i64, String, i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    Ok(sqlx::query_as::<DB, (i64, i64, String, i64, i64)>(
        "SELECT id, channel_id, group_name, start_ms, duration_ms FROM events ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(id, channel_id, group, start_ms, duration_ms)| v2::Event {
        id,
        channel_id,
        group,
        start_ms,
        duration_ms: to_u64(duration_ms),
    })
    .collect())
}

/// The parameters of a database of `schema`, in that schema, as its nodes
/// read them: `revision` and `groups` read by the caller.
pub(crate) async fn params<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
    revision: u64,
    groups: Vec<Group>,
) -> Result<serde_json::Value>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, String, i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, String, String, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, String, i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, i64, String, i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let value = match schema.0 {
        1 => {
            let channels = sqlx::query_as::<DB, (String, String, i64, String, i64)>(
                "SELECT name, title, segment_seconds, resolution, bitrate_kbps FROM channels ORDER BY name",
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(
                |(name, title, segment_seconds, resolution, bitrate_kbps)| v1::Channel {
                    name,
                    title,
                    segment_seconds: u32::try_from(segment_seconds).unwrap_or(0),
                    resolution,
                    bitrate_kbps: u32::try_from(bitrate_kbps).unwrap_or(0),
                },
            )
            .collect();
            let events = sqlx::query_as::<DB, (i64, String, String, String, i64)>(
                "SELECT id, channel, group_name, start, duration_s FROM events ORDER BY id",
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|(id, channel, group, start, duration_s)| v1::Event {
                id,
                channel,
                group,
                start,
                duration_s: u32::try_from(duration_s).unwrap_or(0),
            })
            .collect();
            serde_json::to_value(v1::Params {
                revision,
                channels,
                groups,
                events,
            })
        }
        2 => {
            let channels = channels_by_id::<DB>(conn, false)
                .await?
                .into_iter()
                .map(|(c, _)| c)
                .collect();
            serde_json::to_value(v2::Params {
                revision,
                channels,
                groups,
                events: events_by_id::<DB>(conn).await?,
            })
        }
        3 => {
            let channels = channels_by_id::<DB>(conn, true)
                .await?
                .into_iter()
                .map(|(c, window_segments)| v3::Channel {
                    id: c.id,
                    name: c.name,
                    segment_ms: c.segment_ms,
                    ladder: c.ladder,
                    window_segments,
                })
                .collect();
            serde_json::to_value(v3::Params {
                revision,
                channels,
                groups,
                events: events_by_id::<DB>(conn).await?,
            })
        }
        other => return Err(StoreError::UnknownSchema(other)),
    };
    value.map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The channels the parameters of a database of `schema` list, as the
/// API shows them.
pub(crate) fn channels_of(schema: Schema, params: serde_json::Value) -> Result<Vec<ChannelSpec>> {
    match schema.0 {
        1 => {
            let p: v1::Params = stored_params(params)?;
            Ok(p.channels
                .into_iter()
                .map(|c| {
                    let height = c
                        .resolution
                        .split_once('x')
                        .and_then(|(_, h)| h.parse().ok())
                        .unwrap_or(0);
                    ChannelSpec {
                        name: c.name,
                        title: Some(c.title),
                        segment_ms: c.segment_seconds.saturating_mul(1000),
                        ladder: vec![v2::Rung {
                            height,
                            kbps: c.bitrate_kbps,
                        }],
                        window_segments: None,
                    }
                })
                .collect())
        }
        2 => {
            let p: v2::Params = stored_params(params)?;
            Ok(p.channels
                .into_iter()
                .map(|c| ladder_channel(c.name, c.segment_ms, c.ladder, None))
                .collect())
        }
        3 => {
            let p: v3::Params = stored_params(params)?;
            Ok(p.channels
                .into_iter()
                .map(|c| ladder_channel(c.name, c.segment_ms, c.ladder, Some(c.window_segments)))
                .collect())
        }
        other => Err(StoreError::UnknownSchema(other)),
    }
}

/// The events the parameters of a database of `schema` list, as the API
/// shows them (`channel_names`: names by id, schemas 2 and 3).
pub(crate) fn events_of(
    schema: Schema,
    params: serde_json::Value,
    channel_names: &HashMap<i64, String>,
) -> Result<Vec<EventView>> {
    match schema.0 {
        1 => {
            let p: v1::Params = stored_params(params)?;
            p.events
                .into_iter()
                .map(|e| {
                    Ok(EventView {
                        id: e.id,
                        channel: e.channel,
                        group: e.group,
                        start_ms: timefmt::ms_from_rfc3339(&e.start)
                            .map_err(|err| StoreError::Corrupt(err.to_string()))?,
                        duration_ms: u64::from(e.duration_s) * 1000,
                    })
                })
                .collect()
        }
        2 => {
            let p: v2::Params = stored_params(params)?;
            Ok(event_views(p.events, channel_names))
        }
        3 => {
            let p: v3::Params = stored_params(params)?;
            Ok(event_views(p.events, channel_names))
        }
        other => Err(StoreError::UnknownSchema(other)),
    }
}

/// A channel spec as a database of `schema` would store it, checked before
/// any database is asked: valid, a window only from schema 3 on, one
/// default rung when it names none.
pub(crate) fn channel_to_create(schema: Schema, spec: &ChannelSpec) -> Result<ChannelSpec> {
    check_spec(spec)?;
    if spec.window_segments.is_some() && schema < Schema(3) {
        return Err(window_needs_schema_3(schema.0));
    }
    let mut spec = spec.clone();
    if spec.ladder.is_empty() {
        spec.ladder = vec![v2::Rung {
            height: RUNG_HEIGHT_DEFAULT,
            kbps: RUNG_KBPS_DEFAULT,
        }];
    }
    Ok(spec)
}

/// Adds a channel (from [`channel_to_create`]) in the caller's
/// transaction; returns it as stored (schema 1: its one rung and title;
/// schemas 2 and 3: no title; schema 3: its window).
pub(crate) async fn insert_channel<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
    mut spec: ChannelSpec,
) -> Result<ChannelSpec>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let exists = sqlx::query_as::<DB, (String,)>("SELECT name FROM channels WHERE name = $1")
        .bind(spec.name.clone())
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_some() {
        return Err(StoreError::Exists {
            what: "channel",
            name: spec.name,
        });
    }
    match schema.0 {
        1 => {
            if spec.segment_ms % 1000 != 0 {
                return Err(StoreError::Invalid(
                    "release 1 supports whole-second segments only (segment_ms a multiple of 1000)"
                        .into(),
                ));
            }
            let top = spec.ladder[0];
            spec.ladder.truncate(1);
            sqlx::query(
                "INSERT INTO channels (name, title, segment_seconds, resolution, bitrate_kbps)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(spec.name.clone())
            .bind(spec.title.clone().unwrap_or_else(|| spec.name.clone()))
            .bind(i64::from(spec.segment_ms / 1000))
            .bind(format!("{}x{}", top.height * 16 / 9, top.height))
            .bind(i64::from(top.kbps))
            .execute(&mut *conn)
            .await?;
        }
        2 => {
            sqlx::query("INSERT INTO channels (name, segment_ms, ladder) VALUES ($1, $2, $3)")
                .bind(spec.name.clone())
                .bind(i64::from(spec.segment_ms))
                .bind(json(&spec.ladder)?)
                .execute(&mut *conn)
                .await?;
            spec.title = None;
        }
        3 => {
            let window = *spec
                .window_segments
                .get_or_insert(v3::WINDOW_SEGMENTS_DEFAULT);
            sqlx::query(
                "INSERT INTO channels (name, segment_ms, ladder, window_segments)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(spec.name.clone())
            .bind(i64::from(spec.segment_ms))
            .bind(json(&spec.ladder)?)
            .bind(i64::from(window))
            .execute(&mut *conn)
            .await?;
            spec.title = None;
        }
        other => return Err(StoreError::UnknownSchema(other)),
    }
    bump_revision::<DB>(conn).await?;
    Ok(spec)
}

/// What an event must be before any database is asked: between a
/// millisecond and a week long.
pub(crate) fn check_event(spec: &EventSpec) -> Result<()> {
    if spec.duration_ms == 0 || spec.duration_ms > EVENT_DURATION_MS_MAX {
        return Err(StoreError::Invalid(
            "duration_ms must be between 1 and one week".into(),
        ));
    }
    Ok(())
}

/// The channel an event is on, from the directory read before its
/// transaction.
pub(crate) fn event_channel(dir: &ChannelDirectory, spec: &EventSpec) -> Result<ChannelRef> {
    dir.get(&spec.channel)
        .copied()
        .ok_or_else(|| StoreError::Missing {
            what: "channel",
            name: spec.channel.clone(),
        })
}

/// Adds a checked event on `channel` in the caller's transaction: its
/// group must exist. Returns it as stored, with its id.
pub(crate) async fn insert_event<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
    spec: &EventSpec,
    channel: ChannelRef,
) -> Result<EventView>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let group = sqlx::query_as::<DB, (String,)>("SELECT name FROM groups WHERE name = $1")
        .bind(spec.group.clone())
        .fetch_optional(&mut *conn)
        .await?;
    if group.is_none() {
        return Err(StoreError::Missing {
            what: "group",
            name: spec.group.clone(),
        });
    }
    let (id,) = match schema.0 {
        1 => {
            if spec.duration_ms % 1000 != 0 {
                return Err(StoreError::Invalid(
                    "release 1 supports whole-second durations only".into(),
                ));
            }
            let start = timefmt::rfc3339_from_ms(spec.start_ms)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            sqlx::query_as::<DB, (i64,)>(
                "INSERT INTO events (channel, group_name, start, duration_s)
                 VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(spec.channel.clone())
            .bind(spec.group.clone())
            .bind(start)
            .bind(to_i64(spec.duration_ms / 1000, "duration")?)
            .fetch_one(&mut *conn)
            .await?
        }
        2 | 3 => {
            sqlx::query_as::<DB, (i64,)>(
                "INSERT INTO events (channel_id, group_name, start_ms, duration_ms)
                 VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(channel.id)
            .bind(spec.group.clone())
            .bind(spec.start_ms)
            .bind(to_i64(spec.duration_ms, "duration")?)
            .fetch_one(&mut *conn)
            .await?
        }
        other => return Err(StoreError::UnknownSchema(other)),
    };
    bump_revision::<DB>(conn).await?;
    Ok(EventView {
        id,
        channel: spec.channel.clone(),
        group: spec.group.clone(),
        start_ms: spec.start_ms,
        duration_ms: spec.duration_ms,
    })
}

/// Per node of a database of `schema`: how many records, the highest
/// sequence and how many were translated.
pub(crate) async fn record_summary<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
) -> Result<Vec<RecordSummary>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, i64, i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let sql = match schema.0 {
        1 => "SELECT node AS node_id, COUNT(*) AS n, MAX(seq) AS max_seq, CAST(0 AS BIGINT) AS translated FROM records GROUP BY node ORDER BY node",
        2 | 3 => "SELECT node_id, COUNT(*) AS n, MAX(seq) AS max_seq, COUNT(translated_from) AS translated FROM records GROUP BY node_id ORDER BY node_id",
        other => return Err(StoreError::UnknownSchema(other)),
    };
    Ok(sqlx::query_as::<DB, (String, i64, i64, i64)>(sql)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(node_id, n, max_seq, translated)| RecordSummary {
            node_id,
            records: to_u64(n),
            max_seq: to_u64(max_seq),
            translated: to_u64(translated),
        })
        .collect())
}

/// Records of one node with `seq > after_seq`, in order, at most `limit`
/// (and at most `RECORDS_PAGE_MAX`).
pub(crate) async fn records<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    schema: Schema,
    node_id: &str,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<StoredRecord>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String, i64, String, String, Option<i64>): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let sql = match schema.0 {
        1 => "SELECT node AS node_id, seq, kind, natural_key, CAST(NULL AS BIGINT) AS translated_from FROM records WHERE node = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        2 | 3 => "SELECT node_id, seq, kind, natural_key, translated_from FROM records WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        other => return Err(StoreError::UnknownSchema(other)),
    };
    Ok(
        sqlx::query_as::<DB, (String, i64, String, String, Option<i64>)>(sql)
            .bind(node_id.to_owned())
            .bind(to_i64(after_seq, "after_seq")?)
            .bind(i64::from(limit.min(crate::RECORDS_PAGE_MAX)))
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(
                |(node_id, seq, kind, natural_key, translated_from)| StoredRecord {
                    node_id,
                    seq: to_u64(seq),
                    kind,
                    natural_key,
                    translated_from: translated_from.map(|v| u32::try_from(v).unwrap_or(0)),
                },
            )
            .collect(),
    )
}

/// At every open, in its transaction: the cluster counters a build added
/// after the database was made, at 0 where missing.
pub(crate) async fn add_counters<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for key in replicas::COUNTERS {
        sqlx::query("INSERT INTO cluster (key, value) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The schema the database is at, if it was ever created.
pub(crate) async fn db_schema<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<Option<i64>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    Ok(
        sqlx::query_as::<DB, (i64,)>("SELECT value FROM cluster WHERE key = 'schema'")
            .fetch_optional(&mut *conn)
            .await?
            .map(|(v,)| v),
    )
}

/// The cluster row of a database just created for `info`'s release.
pub(crate) async fn first_cluster_row<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    info: &ReleaseInfo,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for (key, value) in [
        ("release", i64::from(info.release.0)),
        ("schema", i64::from(info.schema.0)),
        ("epoch", 1),
        ("fenced", 0),
        ("param_revision", 1),
    ] {
        sqlx::query("INSERT INTO cluster (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Whether `info`'s release opens a database at schema `db`: Ok(None) as
/// it is, Ok(Some(db)) after migrating it from `db`; refused when the
/// database is ahead, or behind every schema the release migrates from.
pub(crate) fn judge_schema(info: &ReleaseInfo, db: i64) -> Result<Option<u32>> {
    let db = u32::try_from(db).map_err(|_| StoreError::Corrupt(format!("schema {db}")))?;
    let target = info.schema.0;
    if db > target {
        return Err(StoreError::SchemaAhead {
            db,
            release: target,
        });
    }
    if db == target {
        return Ok(None);
    }
    if !info.migrates_from.contains(&Schema(db)) {
        return Err(migration::schema_behind(info, db));
    }
    Ok(Some(db))
}
