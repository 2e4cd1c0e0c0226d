//! PostgreSQL backend: the same [`Store`] as SQLite's, for an operator who
//! runs the controller's database on a PostgreSQL server. Its tables live
//! in one PostgreSQL schema (the URL's `schema` parameter, default
//! `handover`), so one database can hold several stores (tests use one
//! each). Opening, creating and migrating run in one transaction
//! (transactional DDL) under an advisory lock; the migration is preceded,
//! in that same transaction, by a copy of the schema as it was
//! (`<schema>_pre_schema_<N>`), which [`restore_pre_upgrade`] puts back.

use crate::sqlite::migration::schema_behind;
use crate::sqlite::rows::{
    check_spec, event_views, json, ladder_channel, parse_grant, parse_role, stored_params, to_i64,
    to_u64, window_needs_schema_3, RUNG_HEIGHT_DEFAULT, RUNG_KBPS_DEFAULT,
};
use crate::{
    BatchOutcome, ClusterState, NewBootstrapToken, NodeRegistration, NodeRow, Result, Store,
    StoreError,
};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::identity::{BootstrapToken, SecretDigest, GROUPS_MAX};
use handover_core::params::{v1, v2, v3, Group};
use handover_core::record::{self, ChannelDirectory, ChannelRef};
use handover_core::timefmt;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{validate_id, Heartbeat, OutboxState};
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::Mutex;

mod migration;
mod rows;
mod tables;
mod writer;

use tables::{product_tables, SHARED_TABLES};
use writer::{
    HeartbeatRow, Queue, Registration, Rows, BATCHES_PER_COMMIT_MAX, HEARTBEATS_PER_COMMIT_MAX,
    REGISTRATIONS_PER_COMMIT_MAX,
};

/// Connections the controller holds to the server at most: readers in
/// parallel and the one writer; small, so many controllers (and tests)
/// share one server's `max_connections` (100 by default).
pub const POOL_CONNECTIONS_MAX: u32 = 8;
/// How long opening waits for a connection before it says the server is
/// unreachable; also the bound on any query waiting for a free connection.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Longest event: one week. Longer is a typo, not a live event.
const EVENT_DURATION_MS_MAX: u64 = 7 * 24 * 3_600_000;
/// The schema a URL without `?schema=` uses.
pub const SCHEMA_DEFAULT: &str = "handover";
/// Longest schema name: PostgreSQL's identifiers hold 63 bytes, and the
/// pre-upgrade copy appends `_pre_schema_<N>`.
const SCHEMA_NAME_BYTES_MAX: usize = 40;
/// The URL parameter that names the store's schema (ours, not libpq's).
const SCHEMA_PARAM: &str = "schema";

/// A validated PostgreSQL schema name: lowercase letters, digits and `_`,
/// starting with a letter or `_`, so it needs no escaping anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn new(name: &str) -> Result<SchemaName> {
        let ok = !name.is_empty()
            && name.len() <= SCHEMA_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && !name.starts_with("pg_");
        if ok {
            Ok(SchemaName(name.to_owned()))
        } else {
            Err(StoreError::Invalid(format!(
                "PostgreSQL schema {name:?}: use 1 to {SCHEMA_NAME_BYTES_MAX} lowercase letters, digits \
                 and _, not starting with a digit or pg_"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name in double quotes, for SQL text.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// Where a migration parks the old product tables while it runs.
    fn migrating(&self) -> SchemaName {
        SchemaName(format!("{}_migrating", self.0))
    }

    /// The copy taken before migrating from `schema`.
    pub fn pre_upgrade(&self, schema: u32) -> SchemaName {
        SchemaName(format!("{}_pre_schema_{schema}", self.0))
    }
}

/// Where a PostgreSQL store lives: the server and database of a
/// `postgres://` URL and the schema its `schema` parameter names.
#[derive(Clone)]
pub struct Target {
    options: PgConnectOptions,
    schema: SchemaName,
    /// The URL without its password: the only form ever shown or logged.
    redacted: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Target {
    /// Reads `postgres://user[:password]@host[:port]/db[?schema=name&…]`.
    pub fn parse(url: &str) -> Result<Target> {
        let invalid = |why: &str| {
            StoreError::Invalid(format!(
                "--database: {why}; give postgres://USER@HOST[:PORT]/DB[?schema=NAME]"
            ))
        };
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(invalid("not a postgres:// URL"));
        }
        let mut shown = parsed.clone();
        if shown.password().is_some() {
            // Never fails on a URL with a host, which a password implies.
            let _ = shown.set_password(Some("REDACTED"));
        }
        if shown.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "REDACTED".into()
                    } else {
                        v
                    };
                    (k.into_owned(), v.into_owned())
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        let mut schema = SCHEMA_DEFAULT.to_owned();
        let rest: Vec<(String, String)> = parsed
            .query_pairs()
            .filter_map(|(k, v)| {
                if k == SCHEMA_PARAM {
                    schema = v.into_owned();
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        let schema = SchemaName::new(&schema)?;
        let options = PgConnectOptions::from_str(parsed.as_str())
            .map_err(|e| invalid(&redact(&e.to_string(), parsed.password())))?
            // Every unqualified table name is the store's schema's.
            .options([("search_path", schema.as_str())]);
        Ok(Target {
            options,
            schema,
            redacted: shown.to_string(),
        })
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The URL as it may be shown: its password, if any, replaced.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// A pool of at most `max` connections for `who`, or an error an
    /// operator can act on. Its connections are named after `who` and the
    /// store (`application_name`), so a restore can see a controller of
    /// the store still connected.
    async fn pool(&self, who: Client, max: u32) -> Result<PgPool> {
        let name = format!("{}:{}", who.name(), self.schema.as_str());
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .connect_with(self.options.clone().application_name(&name))
            .await
            .map_err(|e| StoreError::Open {
                path: self.redacted.clone(),
                reason: format!(
                    "{e}; check that PostgreSQL runs and accepts this user from here \
                     (pg_isready -h {} -p {})",
                    self.options.get_host(),
                    self.options.get_port()
                ),
            })
    }

    /// Whether the server answers and takes this user: one connection,
    /// closed at once.
    pub async fn check(&self) -> Result<()> {
        self.pool(Client::Tool, 1).await?.close().await;
        Ok(())
    }

    /// The schemas the store has pre-upgrade copies of (`<schema>_pre_schema_<N>`).
    pub async fn pre_upgrade_copies(&self) -> Result<Vec<u32>> {
        let pool = self.pool(Client::Tool, 1).await?;
        let copies = self.copies_on(&pool).await;
        pool.close().await;
        copies
    }

    /// [`Target::pre_upgrade_copies`] over `pool`.
    async fn copies_on(&self, pool: &PgPool) -> Result<Vec<u32>> {
        let prefix = format!("{}_pre_schema_", self.schema.as_str());
        // starts_with, not LIKE: `_` in a schema name is no wildcard.
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT schema_name::TEXT FROM information_schema.schemata
             WHERE starts_with(schema_name, $1) ORDER BY schema_name",
        )
        .bind(&prefix)
        .fetch_all(pool)
        .await?;
        let mut copies: Vec<u32> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix)?.parse().ok())
            .collect();
        copies.sort_unstable();
        Ok(copies)
    }

    /// Whether a controller is opening the store right now (creating or
    /// migrating it: it holds the store's lock).
    pub async fn opening_now(&self) -> Result<bool> {
        let pool = self.pool(Client::Tool, 1).await?;
        let held: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((classid::BIGINT << 32) | objid::BIGINT) = hashtext('handover-store:' || $1)::BIGINT",
        )
        .bind(self.schema.as_str())
        .fetch_one(&pool)
        .await?;
        pool.close().await;
        Ok(held > 0)
    }

    /// Drops the store's schema and every pre-upgrade copy of it: for tests
    /// and for an operator retiring a store. Returns how many were dropped.
    pub async fn drop_schemas(&self) -> Result<u64> {
        let pool = self.pool(Client::Tool, 1).await?;
        let mut names: Vec<SchemaName> = self
            .copies_on(&pool)
            .await?
            .into_iter()
            .map(|n| self.schema.pre_upgrade(n))
            .collect();
        names.extend([self.schema.migrating(), self.schema.clone()]);
        let mut dropped = 0;
        for name in &names {
            let exists: Option<String> = sqlx::query_scalar(
                "SELECT schema_name::TEXT FROM information_schema.schemata WHERE schema_name = $1",
            )
            .bind(name.as_str())
            .fetch_optional(&pool)
            .await?;
            if exists.is_some() {
                sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", name.quoted()))
                    .execute(&pool)
                    .await?;
                dropped += 1;
            }
        }
        pool.close().await;
        Ok(dropped)
    }
}

/// Who connects to a store, as its connections' `application_name` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// A controller serving from the store.
    Controller,
    /// `handover db`, the tests' clean-up: short, one connection.
    Tool,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Controller => "handover-controller",
            Client::Tool => "handover-db",
        }
    }
}

/// `text` with `password` (if any) replaced, for errors that may quote a URL.
fn redact(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "REDACTED"),
        _ => text.to_owned(),
    }
}

/// Serializes opens (and restores) of one store across processes, inside
/// their transaction: two controllers never create or migrate it at once.
async fn lock_store(tx: &mut PgConnection, schema: &SchemaName) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('handover-store:' || $1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Puts back the copy of the store a migration from schema `schema` took
/// (`<schema>_pre_schema_<N>`), in one transaction: the store is then at
/// schema `schema`, as it was just before that migration, for a controller
/// of that release. Stop every controller of the store first: what they
/// wrote since the migration is replaced. The copy itself stays.
pub async fn restore_pre_upgrade(url: &str, schema: u32) -> Result<ClusterState> {
    let target = Target::parse(url)?;
    let pool = target.pool(Client::Tool, 1).await?;
    let live = target.schema.clone();
    let copy = live.pre_upgrade(schema);
    // A controller still serving would go on writing over the restored
    // tables (or fail on them): stopped first, always. One that has just
    // stopped leaves its server processes for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(CONTROLLER_GONE_WAIT_MS);
    while controller_connected(&pool, &live).await?.is_some()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(CONTROLLER_GONE_POLL_MS)).await;
    }
    let mut tx = pool.begin().await?;
    lock_store(&mut tx, &live).await?;
    if let Some((pid, addr)) = controller_connected(&mut *tx, &live).await? {
        return Err(StoreError::Invalid(format!(
            "a controller is connected to this store (server process {pid}, from {}): stop \
             every controller of the store, then restore",
            addr.as_deref().unwrap_or("a local socket")
        )));
    }
    if !migration::schema_exists(&mut tx, &copy).await? {
        return Err(StoreError::Missing {
            what: "pre-upgrade copy (PostgreSQL schema)",
            name: copy.as_str().to_owned(),
        });
    }
    migration::copy_schema(&mut tx, &copy, &live).await?;
    tx.commit().await?;
    let cluster = read_cluster(&pool).await?;
    pool.close().await;
    tracing::info!(store = %target.redacted, copy = copy.as_str(), "restored the pre-upgrade copy");
    Ok(cluster)
}

/// How long a restore waits for the server processes of a controller that
/// has just stopped to go, before it refuses.
const CONTROLLER_GONE_WAIT_MS: u64 = 3_000;
/// Pause between two looks for them.
const CONTROLLER_GONE_POLL_MS: u64 = 100;

/// A server process of a controller serving `store`, if any (its pid and
/// client address). Read outside a transaction to see the present: the
/// activity view is a snapshot per transaction.
async fn controller_connected<'e, E>(
    db: E,
    store: &SchemaName,
) -> Result<Option<(i32, Option<String>)>>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    Ok(sqlx::query_as(
        "SELECT pid, client_addr::TEXT FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1 LIMIT 1",
    )
    .bind(format!("{}:{}", Client::Controller.name(), store.as_str()))
    .fetch_optional(db)
    .await?)
}

pub struct PostgresStore {
    pool: PgPool,
    info: &'static ReleaseInfo,
    /// One writer at a time in this process, as SQLite has: a
    /// read-then-write transaction (a group, a channel) never races another.
    writer: Mutex<()>,
    /// Writes waiting for the writer, by kind (group commit, as SQLite's).
    registrations: Queue<Registration>,
    heartbeats: Queue<HeartbeatRow>,
    batches: Queue<Rows>,
}

impl PostgresStore {
    /// Opens (creating if needed) the store at `url` for `release`,
    /// migrating an older schema forward after a copy of it.
    pub async fn open(url: &str, release: Release) -> Result<PostgresStore> {
        let info = ReleaseInfo::of(release).map_err(|e| StoreError::Invalid(e.to_string()))?;
        PostgresStore::open_as(url, info).await
    }

    /// [`PostgresStore::open`] for a release given by its facts (tests of a
    /// release this build does not carry yet).
    pub async fn open_as(url: &str, info: &'static ReleaseInfo) -> Result<PostgresStore> {
        PostgresStore::open_at(&Target::parse(url)?, info).await
    }

    /// [`PostgresStore::open_as`] at a parsed [`Target`].
    pub async fn open_at(target: &Target, info: &'static ReleaseInfo) -> Result<PostgresStore> {
        let pool = target
            .pool(Client::Controller, POOL_CONNECTIONS_MAX)
            .await?;
        let store = PostgresStore {
            pool,
            info,
            writer: Mutex::new(()),
            registrations: Queue::new(REGISTRATIONS_PER_COMMIT_MAX),
            heartbeats: Queue::new(HEARTBEATS_PER_COMMIT_MAX),
            batches: Queue::new(BATCHES_PER_COMMIT_MAX),
        };
        store.prepare(target).await?;
        Ok(store)
    }

    /// Creates the schema and tables, or checks and migrates them: one
    /// transaction, so a failure anywhere leaves the database as it was.
    async fn prepare(&self, target: &Target) -> Result<()> {
        let live = &target.schema;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        lock_store(&mut tx, live).await?;
        // Created only when missing: a user who owns a schema an
        // administrator made needs no CREATE on the database to run in it
        // (a migration's copy still does).
        if !migration::schema_exists(&mut tx, live).await? {
            sqlx::raw_sql(&format!("CREATE SCHEMA {}", live.quoted()))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::raw_sql(SHARED_TABLES).execute(&mut *tx).await?;
        let schema: Option<i64> =
            sqlx::query_scalar("SELECT value FROM cluster WHERE key = 'schema'")
                .fetch_optional(&mut *tx)
                .await?;
        let Some(db_schema) = schema else {
            sqlx::raw_sql(product_tables(self.info.schema)?)
                .execute(&mut *tx)
                .await?;
            for (key, value) in [
                ("release", i64::from(self.info.release.0)),
                ("schema", i64::from(self.info.schema.0)),
                ("epoch", 1),
                ("fenced", 0),
                ("param_revision", 1),
            ] {
                sqlx::query("INSERT INTO cluster (key, value) VALUES ($1, $2)")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            return Ok(());
        };
        let db_schema = u32::try_from(db_schema)
            .map_err(|_| StoreError::Corrupt(format!("schema {db_schema}")))?;
        let target_schema = self.info.schema.0;
        if db_schema > target_schema {
            return Err(StoreError::SchemaAhead {
                db: db_schema,
                release: target_schema,
            });
        }
        if db_schema < target_schema {
            if !self.info.migrates_from.contains(&Schema(db_schema)) {
                return Err(schema_behind(self.info, db_schema));
            }
            let copy = live.pre_upgrade(db_schema);
            migration::copy_schema(&mut tx, live, &copy).await?;
            migration::migrate(&mut tx, live, db_schema, target_schema).await?;
            tx.commit().await?;
            tracing::info!(
                copy = copy.as_str(),
                from = db_schema,
                to = target_schema,
                "migrated the database (the copy restores with `handover db restore-pre-upgrade`)"
            );
            return Ok(());
        }
        tx.commit().await?;
        Ok(())
    }

    /// Closes every connection (and waits for it): the store is done with.
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// Channels by name (what the upcasters need) and names by id.
    pub async fn channel_directory(&self) -> Result<(ChannelDirectory, HashMap<i64, String>)> {
        let mut by_name = ChannelDirectory::new();
        let mut by_id = HashMap::new();
        match self.info.schema.0 {
            1 => {
                for row in sqlx::query("SELECT name, segment_seconds FROM channels")
                    .fetch_all(&self.pool)
                    .await?
                {
                    let name: String = row.try_get("name")?;
                    let secs: i64 = row.try_get("segment_seconds")?;
                    let segment_ms = u32::try_from(secs * 1000).unwrap_or(u32::MAX);
                    by_name.insert(name, ChannelRef { id: 0, segment_ms });
                }
            }
            2 | 3 => {
                for row in sqlx::query("SELECT id, name, segment_ms FROM channels")
                    .fetch_all(&self.pool)
                    .await?
                {
                    let id: i64 = row.try_get("id")?;
                    let name: String = row.try_get("name")?;
                    let segment_ms: i64 = row.try_get("segment_ms")?;
                    by_id.insert(id, name.clone());
                    let segment_ms = u32::try_from(segment_ms).unwrap_or(u32::MAX);
                    by_name.insert(name, ChannelRef { id, segment_ms });
                }
            }
            other => return Err(StoreError::UnknownSchema(other)),
        }
        Ok((by_name, by_id))
    }

    /// The channels of a schema-2 or schema-3 table, with the window of
    /// each when `with_window` (schema 3; 0 otherwise).
    async fn channels_by_id(&self, with_window: bool) -> Result<Vec<(v2::Channel, u32)>> {
        let sql = if with_window {
            "SELECT id, name, segment_ms, ladder, window_segments FROM channels ORDER BY id"
        } else {
            "SELECT id, name, segment_ms, ladder, 0::BIGINT AS window_segments FROM channels ORDER BY id"
        };
        sqlx::query(sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let ladder: String = r.try_get("ladder")?;
                let window = r.try_get::<i64, _>("window_segments")?;
                let channel = v2::Channel {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    segment_ms: u32::try_from(r.try_get::<i64, _>("segment_ms")?).unwrap_or(0),
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
    async fn events_by_id(&self) -> Result<Vec<v2::Event>> {
        sqlx::query(
            "SELECT id, channel_id, group_name, start_ms, duration_ms FROM events ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(v2::Event {
                id: r.try_get("id")?,
                channel_id: r.try_get("channel_id")?,
                group: r.try_get("group_name")?,
                start_ms: r.try_get("start_ms")?,
                duration_ms: to_u64(r.try_get("duration_ms")?),
            })
        })
        .collect()
    }

    async fn bump_revision(tx: &mut PgConnection) -> Result<()> {
        sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'param_revision'")
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// The `cluster` row of the store `pool` reaches.
async fn read_cluster(pool: &PgPool) -> Result<ClusterState> {
    let rows = sqlx::query("SELECT key, value FROM cluster")
        .fetch_all(pool)
        .await?;
    let mut map = HashMap::new();
    for row in rows {
        map.insert(
            row.try_get::<String, _>("key")?,
            row.try_get::<i64, _>("value")?,
        );
    }
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
    })
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn schema(&self) -> Schema {
        self.info.schema
    }

    async fn cluster(&self) -> Result<ClusterState> {
        read_cluster(&self.pool).await
    }

    async fn set_fence(&self, fenced: bool) -> Result<ClusterState> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        if fenced {
            sqlx::query("UPDATE cluster SET value = value + 1 WHERE key = 'epoch'")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'fenced'")
            .bind(i64::from(fenced))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        drop(_w);
        self.cluster().await
    }

    async fn register_node(&self, r: &NodeRegistration) -> Result<()> {
        self.grouped(&self.registrations, Registration(r.clone()))
            .await
    }

    async fn credential_of(&self, node_id: &str) -> Result<Option<SecretDigest>> {
        let hex: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM credentials WHERE node_id = $1")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(hex.map(SecretDigest::from_stored))
    }

    async fn node_by_credential(
        &self,
        credential: &SecretDigest,
    ) -> Result<Option<(String, Schema)>> {
        // One lookup in the unique index on `credentials.sha256`.
        let row = sqlx::query(
            "SELECT n.node_id, n.schema FROM credentials c JOIN nodes n ON n.node_id = c.node_id
             WHERE c.sha256 = $1",
        )
        .bind(credential.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok((
                r.try_get("node_id")?,
                Schema(u32::try_from(r.try_get::<i64, _>("schema")?).unwrap_or(0)),
            ))
        })
        .transpose()
    }

    async fn bootstrap_token(&self, node_id: &str) -> Result<Option<BootstrapToken>> {
        let row = sqlx::query(
            "SELECT sha256, expires_ms, used_ms FROM bootstrap_tokens WHERE node_id = $1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BootstrapToken {
                digest: SecretDigest::from_stored(r.try_get("sha256")?),
                expires_ms: r.try_get("expires_ms")?,
                used_ms: r.try_get("used_ms")?,
            })
        })
        .transpose()
    }

    async fn add_bootstrap_tokens(&self, tokens: &[NewBootstrapToken]) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        for t in tokens {
            // One token per node: a new one replaces an unused or used one.
            sqlx::query(
                "INSERT INTO bootstrap_tokens (node_id, sha256, expires_ms, used_ms) VALUES ($1, $2, $3, NULL)
                 ON CONFLICT (node_id) DO UPDATE SET sha256 = excluded.sha256,
                    expires_ms = excluded.expires_ms, used_ms = NULL",
            )
            .bind(&t.node_id)
            .bind(t.digest.as_str())
            .bind(t.expires_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn trade_bootstrap_token(
        &self,
        node_id: &str,
        token: &SecretDigest,
        credential: &SecretDigest,
        now_ms: i64,
    ) -> Result<bool> {
        // One statement: the token is used (once: the row lock makes a
        // second trade see `used_ms` set) and the credential replaces the
        // node's old one only if it was.
        let traded: Option<String> = sqlx::query_scalar(
            "WITH used AS (
                UPDATE bootstrap_tokens SET used_ms = $1
                WHERE node_id = $2 AND sha256 = $3 AND used_ms IS NULL AND expires_ms > $1
                RETURNING node_id)
             INSERT INTO credentials (node_id, sha256) SELECT node_id, $4 FROM used
             ON CONFLICT (node_id) DO UPDATE SET sha256 = excluded.sha256
             RETURNING node_id",
        )
        .bind(now_ms)
        .bind(node_id)
        .bind(token.as_str())
        .bind(credential.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(traded.is_some())
    }

    async fn remove_node(&self, node_id: &str) -> Result<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let mut removed = 0;
        for table in ["credentials", "bootstrap_tokens", "nodes", "node_desired"] {
            removed += sqlx::query(&format!("DELETE FROM {table} WHERE node_id = $1"))
                .bind(node_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed > 0)
    }

    async fn heartbeat(
        &self,
        node_id: &str,
        hb: &Heartbeat,
        grant: Grant,
        now_ms: i64,
    ) -> Result<()> {
        let row = HeartbeatRow::of(node_id, hb, grant, now_ms)?;
        self.grouped(&self.heartbeats, row).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query("SELECT * FROM nodes ORDER BY group_name, role DESC, node_id")
            .fetch_all(&self.pool)
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
                        oldest_unacked_seq: row
                            .try_get::<Option<i64>, _>("outbox_oldest")?
                            .map(to_u64),
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

    async fn desired(&self, node_id: &str) -> Result<Desired> {
        let raw: Option<String> =
            sqlx::query_scalar("SELECT desired FROM node_desired WHERE node_id = $1")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        match raw {
            Some(raw) => serde_json::from_str(&raw)
                .map_err(|e| StoreError::Corrupt(format!("desired state of {node_id}: {e}"))),
            None => Ok(Desired::default()),
        }
    }

    async fn set_desired(&self, node_id: &str, desired: &Desired) -> Result<()> {
        sqlx::query("INSERT INTO node_desired (node_id, desired) VALUES ($1, $2) ON CONFLICT (node_id) DO UPDATE SET desired = excluded.desired")
            .bind(node_id)
            .bind(json(desired)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn upgrade(&self) -> Result<Option<(i64, Upgrade)>> {
        let row = sqlx::query("SELECT id, state FROM upgrades ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let state: String = r.try_get("state")?;
            let up = serde_json::from_str(&state)
                .map_err(|e| StoreError::Corrupt(format!("upgrade state: {e}")))?;
            Ok((r.try_get("id")?, up))
        })
        .transpose()
    }

    async fn save_upgrade(&self, id: Option<i64>, state: &Upgrade, now_ms: i64) -> Result<i64> {
        let state = json(state)?;
        match id {
            Some(id) => {
                sqlx::query("UPDATE upgrades SET state = $1, updated_ms = $2 WHERE id = $3")
                    .bind(state)
                    .bind(now_ms)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(id)
            }
            None => Ok(sqlx::query_scalar(
                "INSERT INTO upgrades (state, updated_ms) VALUES ($1, $2) RETURNING id",
            )
            .bind(state)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?),
        }
    }

    async fn set_cluster_release(&self, release: Release) -> Result<()> {
        sqlx::query("UPDATE cluster SET value = $1 WHERE key = 'release'")
            .bind(i64::from(release.0))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<ChannelSpec> {
        check_spec(spec)?;
        if spec.window_segments.is_some() && self.info.schema < Schema(3) {
            return Err(window_needs_schema_3(self.info.schema.0));
        }
        let mut spec = spec.clone();
        if spec.ladder.is_empty() {
            spec.ladder = vec![v2::Rung {
                height: RUNG_HEIGHT_DEFAULT,
                kbps: RUNG_KBPS_DEFAULT,
            }];
        }
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT name FROM channels WHERE name = $1")
                .bind(&spec.name)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_some() {
            return Err(StoreError::Exists {
                what: "channel",
                name: spec.name,
            });
        }
        match self.info.schema.0 {
            1 => {
                if spec.segment_ms % 1000 != 0 {
                    return Err(StoreError::Invalid("release 1 supports whole-second segments only (segment_ms a multiple of 1000)".into()));
                }
                let top = spec.ladder[0];
                spec.ladder.truncate(1);
                sqlx::query("INSERT INTO channels (name, title, segment_seconds, resolution, bitrate_kbps) VALUES ($1, $2, $3, $4, $5)")
                    .bind(&spec.name)
                    .bind(spec.title.clone().unwrap_or_else(|| spec.name.clone()))
                    .bind(i64::from(spec.segment_ms / 1000))
                    .bind(format!("{}x{}", top.height * 16 / 9, top.height))
                    .bind(i64::from(top.kbps))
                    .execute(&mut *tx)
                    .await?;
            }
            2 => {
                sqlx::query("INSERT INTO channels (name, segment_ms, ladder) VALUES ($1, $2, $3)")
                    .bind(&spec.name)
                    .bind(i64::from(spec.segment_ms))
                    .bind(json(&spec.ladder)?)
                    .execute(&mut *tx)
                    .await?;
                spec.title = None;
            }
            3 => {
                let window = *spec
                    .window_segments
                    .get_or_insert(v3::WINDOW_SEGMENTS_DEFAULT);
                sqlx::query("INSERT INTO channels (name, segment_ms, ladder, window_segments) VALUES ($1, $2, $3, $4)")
                    .bind(&spec.name)
                    .bind(i64::from(spec.segment_ms))
                    .bind(json(&spec.ladder)?)
                    .bind(i64::from(window))
                    .execute(&mut *tx)
                    .await?;
                spec.title = None;
            }
            other => return Err(StoreError::UnknownSchema(other)),
        }
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(spec)
    }

    async fn channels(&self) -> Result<Vec<ChannelSpec>> {
        let params = self.params().await?;
        match self.info.schema.0 {
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
                    .map(|c| {
                        ladder_channel(c.name, c.segment_ms, c.ladder, Some(c.window_segments))
                    })
                    .collect())
            }
            other => Err(StoreError::UnknownSchema(other)),
        }
    }

    async fn create_group(&self, group: &Group) -> Result<Group> {
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
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        // Another process's group creation waits here: the check and the
        // insert below see every group committed before.
        sqlx::query("LOCK TABLE groups IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        // A node id is in one group only: the groups say who a node is.
        let taken: Option<(String, String, String)> = sqlx::query_as(
            "SELECT name, primary_node, backup_node FROM groups
             WHERE primary_node IN ($1, $2) OR backup_node IN ($1, $2) LIMIT 1",
        )
        .bind(&group.primary)
        .bind(&group.backup)
        .fetch_optional(&mut *tx)
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
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM groups")
            .fetch_one(&mut *tx)
            .await?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= GROUPS_MAX {
            return Err(StoreError::Invalid(format!(
                "the cluster has {GROUPS_MAX} groups, the most one controller registers"
            )));
        }
        let done = sqlx::query("INSERT INTO groups (name, primary_node, backup_node) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(&group.name)
            .bind(&group.primary)
            .bind(&group.backup)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Exists {
                what: "group",
                name: group.name.clone(),
            });
        }
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(group.clone())
    }

    async fn groups(&self) -> Result<Vec<Group>> {
        let rows = sqlx::query("SELECT name, primary_node, backup_node FROM groups ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Group {
                    name: r.try_get("name")?,
                    primary: r.try_get("primary_node")?,
                    backup: r.try_get("backup_node")?,
                })
            })
            .collect()
    }

    async fn create_event(&self, spec: &EventSpec) -> Result<EventView> {
        if spec.duration_ms == 0 || spec.duration_ms > EVENT_DURATION_MS_MAX {
            return Err(StoreError::Invalid(
                "duration_ms must be between 1 and one week".into(),
            ));
        }
        let (dir, _) = self.channel_directory().await?;
        let channel = dir.get(&spec.channel).ok_or_else(|| StoreError::Missing {
            what: "channel",
            name: spec.channel.clone(),
        })?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let group: Option<String> = sqlx::query_scalar("SELECT name FROM groups WHERE name = $1")
            .bind(&spec.group)
            .fetch_optional(&mut *tx)
            .await?;
        if group.is_none() {
            return Err(StoreError::Missing {
                what: "group",
                name: spec.group.clone(),
            });
        }
        let id: i64 = match self.info.schema.0 {
            1 => {
                if spec.duration_ms % 1000 != 0 {
                    return Err(StoreError::Invalid("release 1 supports whole-second durations only".into()));
                }
                let start = timefmt::rfc3339_from_ms(spec.start_ms).map_err(|e| StoreError::Invalid(e.to_string()))?;
                sqlx::query_scalar("INSERT INTO events (channel, group_name, start, duration_s) VALUES ($1, $2, $3, $4) RETURNING id")
                    .bind(&spec.channel)
                    .bind(&spec.group)
                    .bind(start)
                    .bind(to_i64(spec.duration_ms / 1000, "duration")?)
                    .fetch_one(&mut *tx)
                    .await?
            }
            2 | 3 => {
                sqlx::query_scalar("INSERT INTO events (channel_id, group_name, start_ms, duration_ms) VALUES ($1, $2, $3, $4) RETURNING id")
                    .bind(channel.id)
                    .bind(&spec.group)
                    .bind(spec.start_ms)
                    .bind(to_i64(spec.duration_ms, "duration")?)
                    .fetch_one(&mut *tx)
                    .await?
            }
            other => return Err(StoreError::UnknownSchema(other)),
        };
        Self::bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(EventView {
            id,
            channel: spec.channel.clone(),
            group: spec.group.clone(),
            start_ms: spec.start_ms,
            duration_ms: spec.duration_ms,
        })
    }

    async fn events(&self) -> Result<Vec<EventView>> {
        let (_, by_id) = self.channel_directory().await?;
        let params = self.params().await?;
        match self.info.schema.0 {
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
                Ok(event_views(p.events, &by_id))
            }
            3 => {
                let p: v3::Params = stored_params(params)?;
                Ok(event_views(p.events, &by_id))
            }
            other => Err(StoreError::UnknownSchema(other)),
        }
    }

    async fn params(&self) -> Result<serde_json::Value> {
        let revision = self.cluster().await?.param_revision;
        let groups = self.groups().await?;
        let value = match self.info.schema.0 {
            1 => {
                let channels = sqlx::query("SELECT name, title, segment_seconds, resolution, bitrate_kbps FROM channels ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(v1::Channel {
                            name: r.try_get("name")?,
                            title: r.try_get("title")?,
                            segment_seconds: u32::try_from(r.try_get::<i64, _>("segment_seconds")?).unwrap_or(0),
                            resolution: r.try_get("resolution")?,
                            bitrate_kbps: u32::try_from(r.try_get::<i64, _>("bitrate_kbps")?).unwrap_or(0),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let events = sqlx::query(
                    "SELECT id, channel, group_name, start, duration_s FROM events ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(v1::Event {
                        id: r.try_get("id")?,
                        channel: r.try_get("channel")?,
                        group: r.try_get("group_name")?,
                        start: r.try_get("start")?,
                        duration_s: u32::try_from(r.try_get::<i64, _>("duration_s")?).unwrap_or(0),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
                serde_json::to_value(v1::Params {
                    revision,
                    channels,
                    groups,
                    events,
                })
            }
            2 => {
                let channels = self
                    .channels_by_id(false)
                    .await?
                    .into_iter()
                    .map(|(c, _)| c)
                    .collect();
                serde_json::to_value(v2::Params {
                    revision,
                    channels,
                    groups,
                    events: self.events_by_id().await?,
                })
            }
            3 => {
                let channels = self
                    .channels_by_id(true)
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
                    events: self.events_by_id().await?,
                })
            }
            other => return Err(StoreError::UnknownSchema(other)),
        };
        value.map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    async fn store_batch(
        &self,
        node_id: &str,
        from: Schema,
        first_seq: u64,
        raw: &[serde_json::Value],
    ) -> Result<BatchOutcome> {
        let (dir, by_id) = self.channel_directory().await?;
        let to = self.info.schema;
        let mut decoded = Vec::with_capacity(raw.len());
        for (i, value) in raw.iter().enumerate() {
            let seq = first_seq + i as u64;
            let rec = record::upcast(from, to, value, node_id, &dir)
                .map_err(|source| StoreError::Untranslatable { seq, source })?;
            decoded.push((to_i64(seq, "seq")?, rec));
        }
        let translated_from = (from != to).then_some(from.0);
        let last = first_seq + raw.len() as u64 - 1;
        let rows = Rows {
            node_id: node_id.to_owned(),
            rows: decoded,
            schema: to,
            translated_from,
            acked_through: to_i64(last, "seq")?,
            channel_names: by_id,
        };
        let stored = self.grouped(&self.batches, rows).await?;
        let translated = if translated_from.is_some() { stored } else { 0 };
        Ok(BatchOutcome {
            acked_through: last,
            stored,
            translated,
        })
    }

    async fn record_summary(&self) -> Result<Vec<RecordSummary>> {
        let sql = match self.info.schema.0 {
            1 => "SELECT node AS node_id, COUNT(*) AS n, MAX(seq) AS max_seq, 0::BIGINT AS translated FROM records GROUP BY node ORDER BY node",
            2 | 3 => "SELECT node_id, COUNT(*) AS n, MAX(seq) AS max_seq, COUNT(translated_from) AS translated FROM records GROUP BY node_id ORDER BY node_id",
            other => return Err(StoreError::UnknownSchema(other)),
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(RecordSummary {
                    node_id: r.try_get("node_id")?,
                    records: to_u64(r.try_get("n")?),
                    max_seq: to_u64(r.try_get("max_seq")?),
                    translated: to_u64(r.try_get("translated")?),
                })
            })
            .collect()
    }

    async fn records(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>> {
        let sql = match self.info.schema.0 {
            1 => "SELECT node AS node_id, seq, kind, natural_key, NULL::BIGINT AS translated_from FROM records WHERE node = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            2 | 3 => "SELECT node_id, seq, kind, natural_key, translated_from FROM records WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            other => return Err(StoreError::UnknownSchema(other)),
        };
        let rows = sqlx::query(sql)
            .bind(node_id)
            .bind(to_i64(after_seq, "after_seq")?)
            .bind(i64::from(limit.min(crate::RECORDS_PAGE_MAX)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredRecord {
                    node_id: r.try_get("node_id")?,
                    seq: to_u64(r.try_get("seq")?),
                    kind: r.try_get("kind")?,
                    natural_key: r.try_get("natural_key")?,
                    translated_from: r
                        .try_get::<Option<i64>, _>("translated_from")?
                        .map(|v| u32::try_from(v).unwrap_or(0)),
                })
            })
            .collect()
    }
}
