//! PostgreSQL backend: the same [`Store`] as SQLite's, for an operator who
//! runs the controller's database on a PostgreSQL server. Its tables live
//! in one PostgreSQL schema (the URL's `schema` parameter, default
//! `handover`), so one database can hold several stores (tests use one
//! each). Opening, creating and migrating run in one transaction
//! (transactional DDL) under an advisory lock; the migration is preceded,
//! in that same transaction, by a copy of the schema as it was
//! (`<schema>_pre_schema_<N>`), which [`restore_pre_upgrade`] puts back.

use crate::neutral;
use crate::replicas::{self, GuardCell, ReplicaBeat, ReplicaSync, UpgradeStep};
use crate::{
    BatchOutcome, ClusterState, NewBootstrapToken, NodeRegistration, NodeRow, Result, Store,
    StoreError,
};
use handover_core::api::{ChannelSpec, EventSpec, EventView, RecordSummary, StoredRecord};
use handover_core::identity::{BootstrapToken, SecretDigest};
use handover_core::params::Group;
use handover_core::record::ChannelDirectory;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::Heartbeat;
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::Mutex;

mod migration;
mod tables;
mod writer;

use tables::{product_tables, SHARED_TABLES};
pub use writer::copy_text;
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
impl neutral::Dialect for Postgres {
    /// One array per column, so no limit on parameters: a bound on the
    /// arrays one statement sends (a few MB at most).
    const INSERT_ROWS_PER_STATEMENT: usize = 10_000;
    fn insert_columns<'c>(
        conn: &'c mut Self::Connection,
        with_severity: bool,
        batches: &'c [(&'c str, &'c [neutral::rows::Columns])],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>>> + Send + 'c>> {
        Box::pin(writer::insert_records(conn, with_severity, batches))
    }
    const RAISE_ACK: &'static str =
        "UPDATE nodes SET acked_through = GREATEST(acked_through, $1) WHERE node_id = $2";
    /// A fence waits for the batches under way, and every batch after it
    /// sees it.
    const EPOCH_LOCK: &'static str = " FOR SHARE";
}
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
    /// Whose orchestrator writes this store makes (the lease's term).
    guard: GuardCell,
    /// Writes waiting for the writer, by kind (group commit, as SQLite's).
    registrations: Queue<Registration>,
    heartbeats: Queue<HeartbeatRow>,
    batches: Queue<Rows>,
    /// The channels batches are decoded with, kept between them.
    channels: neutral::writes::ChannelCache,
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
            guard: GuardCell::default(),
            registrations: Queue::new(REGISTRATIONS_PER_COMMIT_MAX),
            heartbeats: Queue::new(HEARTBEATS_PER_COMMIT_MAX),
            batches: Queue::new(BATCHES_PER_COMMIT_MAX),
            channels: Default::default(),
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
        neutral::add_counters::<Postgres>(&mut tx).await?;
        let Some(db_schema) = neutral::db_schema::<Postgres>(&mut tx).await? else {
            sqlx::raw_sql(product_tables(self.info.schema)?)
                .execute(&mut *tx)
                .await?;
            neutral::first_cluster_row::<Postgres>(&mut tx, self.info).await?;
            tx.commit().await?;
            return Ok(());
        };
        let target_schema = self.info.schema.0;
        if let Some(db_schema) = neutral::judge_schema(self.info, db_schema)? {
            let copy = live.pre_upgrade(db_schema);
            migration::hold_writes(&mut tx, live).await?;
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
        let mut conn = self.pool.acquire().await?;
        neutral::channel_directory::<Postgres>(&mut conn, self.info.schema).await
    }

    /// In a guarded write's transaction: the lease, locked against a
    /// takeover until the write commits, and judged (see [`replicas`]).
    async fn leading(&self, tx: &mut PgConnection) -> Result<Option<(String, u64)>> {
        replicas::check_lease::<sqlx::Postgres>(tx, &self.guard, " FOR SHARE").await
    }
}

/// The `cluster` row of the store `pool` reaches.
async fn read_cluster(pool: &PgPool) -> Result<ClusterState> {
    let mut conn = pool.acquire().await?;
    neutral::cluster::<Postgres>(&mut conn).await
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
        self.leading(&mut tx).await?;
        neutral::set_fence::<Postgres>(&mut tx, fenced).await?;
        tx.commit().await?;
        drop(_w);
        self.cluster().await
    }

    async fn register_node(&self, r: &NodeRegistration) -> Result<()> {
        self.grouped(&self.registrations, Registration(r.clone()))
            .await
    }

    async fn credential_of(&self, node_id: &str) -> Result<Option<SecretDigest>> {
        let mut conn = self.pool.acquire().await?;
        neutral::credential_of::<Postgres>(&mut conn, node_id).await
    }

    async fn node_by_credential(
        &self,
        credential: &SecretDigest,
    ) -> Result<Option<(String, Schema)>> {
        let mut conn = self.pool.acquire().await?;
        neutral::node_by_credential::<Postgres>(&mut conn, credential).await
    }

    async fn bootstrap_token(&self, node_id: &str) -> Result<Option<BootstrapToken>> {
        let mut conn = self.pool.acquire().await?;
        neutral::bootstrap_token::<Postgres>(&mut conn, node_id).await
    }

    async fn add_bootstrap_tokens(&self, tokens: &[NewBootstrapToken]) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        neutral::add_bootstrap_tokens::<Postgres>(&mut tx, tokens).await?;
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
        let removed = neutral::remove_node::<Postgres>(&mut tx, node_id).await?;
        tx.commit().await?;
        Ok(removed)
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
        let mut conn = self.pool.acquire().await?;
        neutral::nodes::<Postgres>(&mut conn).await
    }

    async fn desired(&self, node_id: &str) -> Result<Desired> {
        let mut conn = self.pool.acquire().await?;
        neutral::desired::<Postgres>(&mut conn, node_id).await
    }

    async fn set_desired(&self, desired: &[(String, Desired)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.leading(&mut tx).await?;
        neutral::set_desired::<Postgres>(&mut tx, desired).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn upgrade(&self) -> Result<Option<(i64, Upgrade)>> {
        let mut conn = self.pool.acquire().await?;
        neutral::upgrade::<Postgres>(&mut conn).await
    }

    async fn save_upgrade(&self, id: Option<i64>, up: &Upgrade, now_ms: i64) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let leader = self.leading(&mut tx).await?;
        let id = replicas::save_upgrade::<sqlx::Postgres>(&mut tx, leader, id, up, now_ms).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn set_cluster_release(&self, release: Release) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.leading(&mut tx).await?;
        neutral::set_cluster_release::<Postgres>(&mut tx, release).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sync_replica(&self, beat: &ReplicaBeat) -> Result<ReplicaSync> {
        let mut conn = self.pool.acquire().await?;
        // The database server's clock judges every replica's lease.
        let now_ms: i64 =
            sqlx::query_scalar("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")
                .fetch_one(&mut *conn)
                .await?;
        let (leader, leading, replicas) =
            replicas::sync::<sqlx::Postgres>(&mut conn, &self.guard, beat, now_ms).await?;
        drop(conn);
        Ok(ReplicaSync {
            cluster: self.cluster().await?,
            leader,
            leading,
            replicas,
        })
    }

    async fn upgrade_steps(&self, id: i64) -> Result<Vec<UpgradeStep>> {
        let mut conn = self.pool.acquire().await?;
        replicas::steps::<sqlx::Postgres>(&mut conn, id).await
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<ChannelSpec> {
        let spec = neutral::channel_to_create(self.info.schema, spec)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let spec = neutral::insert_channel::<Postgres>(&mut tx, self.info.schema, spec).await?;
        tx.commit().await?;
        Ok(spec)
    }

    async fn channels(&self) -> Result<Vec<ChannelSpec>> {
        let params = self.params().await?;
        neutral::channels_of(self.info.schema, params)
    }

    async fn create_group(&self, group: &Group) -> Result<Group> {
        neutral::check_group(group)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        // Another process's group creation waits here: the check and the
        // insert below see every group committed before.
        sqlx::query("LOCK TABLE groups IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        neutral::insert_group::<Postgres>(&mut tx, group).await?;
        tx.commit().await?;
        Ok(group.clone())
    }

    async fn groups(&self) -> Result<Vec<Group>> {
        let mut conn = self.pool.acquire().await?;
        neutral::groups::<Postgres>(&mut conn).await
    }

    async fn create_event(&self, spec: &EventSpec) -> Result<EventView> {
        neutral::check_event(spec)?;
        let (dir, _) = self.channel_directory().await?;
        let channel = neutral::event_channel(&dir, spec)?;
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        let event =
            neutral::insert_event::<Postgres>(&mut tx, self.info.schema, spec, channel).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn events(&self) -> Result<Vec<EventView>> {
        let (_, by_id) = self.channel_directory().await?;
        let params = self.params().await?;
        neutral::events_of(self.info.schema, params, &by_id)
    }

    async fn params(&self) -> Result<serde_json::Value> {
        let revision = self.cluster().await?.param_revision;
        let groups = self.groups().await?;
        let mut conn = self.pool.acquire().await?;
        neutral::params::<Postgres>(&mut conn, self.info.schema, revision, groups).await
    }

    async fn store_batch(
        &self,
        node_id: &str,
        from: Schema,
        first_seq: u64,
        raw: &[serde_json::Value],
        epoch: u64,
    ) -> Result<BatchOutcome> {
        let (rows, last) = neutral::writes::decode_batch(
            &self.channels,
            || self.channel_directory(),
            node_id,
            from,
            self.info.schema,
            first_seq,
            raw,
            epoch,
        )
        .await?;
        let translated = rows.translated_from.is_some();
        let stored = self.grouped(&self.batches, rows).await?;
        Ok(neutral::writes::outcome(last, stored, translated))
    }

    async fn record_summary(&self) -> Result<Vec<RecordSummary>> {
        let mut conn = self.pool.acquire().await?;
        neutral::record_summary::<Postgres>(&mut conn, self.info.schema).await
    }

    async fn records(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>> {
        let mut conn = self.pool.acquire().await?;
        neutral::records::<Postgres>(&mut conn, self.info.schema, node_id, after_seq, limit).await
    }
}
