//! The controller's database. Only the controller process opens it.
//!
//! [`Store`] is the boundary: the controller speaks to it in release-neutral
//! terms (channel specs, batches of raw records with their schema) and the
//! backend writes the schema its database is at. Tables that every release
//! shares (`cluster`, `nodes`) keep one shape forever; the product tables
//! (`channels`, `events`, `records`) change with the schema and are moved by
//! the migrations in [`sqlite::migrate`].
//!
//! The operator API's types are not the store's: it takes and gives the
//! specs and views of [`handover_core::api`] where they are exactly what it
//! stores or reads, and keeps its own rows ([`ClusterState`], [`NodeRow`])
//! for what the controller works with, converted into the API's
//! [`ClusterInfo`] and [`NodeInfo`] here.

mod group_commit;
mod neutral;
pub mod postgres;
pub mod replicas;
pub mod sqlite;

use handover_core::api::{
    ChannelSpec, ClusterInfo, EventSpec, EventView, NodeInfo, RecordSummary, StoredRecord,
};
use handover_core::identity::{BootstrapToken, SecretDigest};
use handover_core::params::Group;
use handover_core::record::RecordError;
use handover_core::upgrade::{Desired, Upgrade};
use handover_core::wire::{Heartbeat, OutboxState, Role};
use handover_core::{Grant, Release, Schema};
use replicas::{ReplicaBeat, ReplicaSync, UpgradeStep};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot open the database at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the database is at schema {db}, but this release runs schema {release}; start the release that matches (or newer)")]
    SchemaAhead { db: u32, release: u32 },
    /// The database is older than this release's schema, and this release
    /// does not migrate from it (outside its `migrates_from`).
    #[error("the database is at schema {db}, which release {release} does not migrate (it migrates from schema {migrates_from}); {advice}")]
    SchemaBehind {
        db: u32,
        release: u32,
        migrates_from: String,
        advice: String,
    },
    /// A schema this store has no tables for: a release newer than the
    /// store's code, or a corrupt `cluster.schema`.
    #[error("this store has no tables for schema {0}")]
    UnknownSchema(u32),
    #[error("migration from schema {from} to {to} failed: {reason}")]
    Migration { from: u32, to: u32, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {name:?} already exists")]
    Exists { what: &'static str, name: String },
    #[error("{what} {name:?} does not exist")]
    Missing { what: &'static str, name: String },
    #[error("record {seq} of the batch cannot be stored: {source}")]
    Untranslatable { seq: u64, source: RecordError },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A write of the upgrade orchestrator by a replica that does not hold
    /// the lease (any more): the fencing token refused it, nothing changed.
    #[error("this controller replica does not lead the upgrade{}; the lease is held by {leader}: send upgrade and fence commands to the leader (a client given every replica's URL moves on by itself)", term.map(|t| format!(" (its term {t} is over)")).unwrap_or_default())]
    NotLeader { term: Option<u64>, leader: String },
    /// A batch sent at an epoch the cluster has left, or under a fence:
    /// checked in the batch's own transaction, whichever replica took it.
    #[error("the batch was sent at epoch {sent}, the cluster is at epoch {current}{}; say hello again", if *fenced { " and fenced" } else { "" })]
    StaleEpoch {
        sent: u64,
        current: u64,
        fenced: bool,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Cluster-wide state, the same in every release: the `cluster` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterState {
    /// The cluster release: moves only when an upgrade finalizes.
    pub release: Release,
    pub schema: Schema,
    pub epoch: u64,
    pub fenced: bool,
    pub param_revision: u64,
    /// Moves with every change of a node's desired state, so replicas that
    /// cache desired states know to read them again.
    pub desired_revision: u64,
    /// Moves when a node is removed, so replicas drop cached sessions.
    pub registry_revision: u64,
}

/// What the controller learns from a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRegistration {
    pub node_id: String,
    pub release: Release,
    pub schema: Schema,
    pub role: Role,
    pub group: String,
    pub hls_url: String,
    pub grant: Grant,
    pub epoch: u64,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub staged: Vec<String>,
    pub now_ms: i64,
    /// SHA-256 of the binary the node's worker runs, if it says.
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary the node's supervisor runs, if it says.
    pub supervisor_sha256: Option<String>,
}

/// A bootstrap token to store (`handover node add`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBootstrapToken {
    pub node_id: String,
    pub digest: SecretDigest,
    pub expires_ms: i64,
}

/// One row of the node registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub release: Release,
    pub schema: Schema,
    pub role: Role,
    pub group: String,
    pub hls_url: String,
    pub grant: Grant,
    pub epoch: u64,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub staged: Vec<String>,
    pub last_seen_ms: i64,
    /// Highest sequence acknowledged to this node.
    pub acked_through: u64,
    /// SHA-256 of the binary the node's worker runs, if it said.
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary the node's supervisor runs, if it said.
    pub supervisor_sha256: Option<String>,
}

/// The cluster row as the operator API shows it.
impl From<ClusterState> for ClusterInfo {
    fn from(c: ClusterState) -> ClusterInfo {
        ClusterInfo {
            release: c.release,
            schema: c.schema,
            epoch: c.epoch,
            fenced: c.fenced,
            param_revision: c.param_revision,
        }
    }
}

/// The registry row as the operator API shows it.
impl From<NodeRow> for NodeInfo {
    fn from(n: NodeRow) -> NodeInfo {
        NodeInfo {
            node_id: n.node_id,
            release: n.release,
            schema: n.schema,
            role: n.role,
            group: n.group,
            hls_url: n.hls_url,
            grant: n.grant,
            epoch: n.epoch,
            outbox: n.outbox,
            current_events: n.current_events,
            staged: n.staged,
            last_seen_ms: n.last_seen_ms,
            acked_through: n.acked_through,
            binary_sha256: n.binary_sha256,
            supervisor_sha256: n.supervisor_sha256,
        }
    }
}

/// The answer to a stored batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOutcome {
    pub acked_through: u64,
    pub stored: u64,
    pub translated: u64,
}

/// Records read at most per page of [`Store::records`].
pub const RECORDS_PAGE_MAX: u32 = 10_000;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    fn schema(&self) -> Schema;
    async fn cluster(&self) -> Result<ClusterState>;
    /// Fence: epoch + 1 and `fenced`; unfence clears the flag and keeps the
    /// epoch. Guarded by the lease (see [`replicas`]), as are
    /// `set_desired`, `save_upgrade` and `set_cluster_release`.
    async fn set_fence(&self, fenced: bool) -> Result<ClusterState>;

    /// One replica's sync: its beat, its bid for the orchestrator's lease,
    /// and what it must know of the cluster and the other replicas. From
    /// the first sync on, the guarded writes are this replica's.
    async fn sync_replica(&self, beat: &ReplicaBeat) -> Result<ReplicaSync>;
    /// The transitions of upgrade `id`, in the order their leaders wrote them.
    async fn upgrade_steps(&self, id: i64) -> Result<Vec<UpgradeStep>>;

    async fn register_node(&self, reg: &NodeRegistration) -> Result<()>;
    /// The digest of the credential a node was issued, if any.
    async fn credential_of(&self, node_id: &str) -> Result<Option<SecretDigest>>;
    /// The registered node (and its schema) a credential belongs to: one
    /// indexed lookup, so unknown credentials are refused cheaply.
    async fn node_by_credential(
        &self,
        credential: &SecretDigest,
    ) -> Result<Option<(String, Schema)>>;
    /// The bootstrap token issued for a node, used or not.
    async fn bootstrap_token(&self, node_id: &str) -> Result<Option<BootstrapToken>>;
    /// Stores new bootstrap tokens (one transaction), each replacing the
    /// node's previous one.
    async fn add_bootstrap_tokens(&self, tokens: &[NewBootstrapToken]) -> Result<()>;
    /// Marks the node's bootstrap token used and makes `credential` the
    /// node's credential, in one transaction; false (and nothing written)
    /// unless that token is the node's, unused and unexpired at `now_ms`.
    async fn trade_bootstrap_token(
        &self,
        node_id: &str,
        token: &SecretDigest,
        credential: &SecretDigest,
        now_ms: i64,
    ) -> Result<bool>;
    /// Forgets a node: its credential, bootstrap token, registration and
    /// desired state (its stored records stay). False if nothing was known.
    async fn remove_node(&self, node_id: &str) -> Result<bool>;
    async fn heartbeat(
        &self,
        node_id: &str,
        hb: &Heartbeat,
        grant: Grant,
        now_ms: i64,
    ) -> Result<()>;
    async fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// What `node` is told to do about upgrades (default: hold).
    async fn desired(&self, node_id: &str) -> Result<Desired>;
    /// Stores what each node is told, all in one transaction (an upgrade
    /// step tells every node at once: one commit, not one per node).
    async fn set_desired(&self, desired: &[(String, Desired)]) -> Result<()>;
    /// The latest upgrade (id and state), if any was ever started.
    async fn upgrade(&self) -> Result<Option<(i64, Upgrade)>>;
    /// Stores an upgrade's state: a new row when `id` is None. Returns the id.
    async fn save_upgrade(&self, id: Option<i64>, state: &Upgrade, now_ms: i64) -> Result<i64>;
    async fn set_cluster_release(&self, release: Release) -> Result<()>;

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<ChannelSpec>;
    async fn channels(&self) -> Result<Vec<ChannelSpec>>;
    async fn create_group(&self, group: &Group) -> Result<Group>;
    async fn groups(&self) -> Result<Vec<Group>>;
    async fn create_event(&self, spec: &EventSpec) -> Result<EventView>;
    async fn events(&self) -> Result<Vec<EventView>>;

    /// The parameters in this database's own schema, as nodes of that schema read them.
    async fn params(&self) -> Result<serde_json::Value>;

    /// Stores a batch idempotently on (node, seq), translating records of an
    /// older schema first. All or nothing: a record that cannot be decoded
    /// or translated refuses the whole batch and writes nothing, and so
    /// does a batch sent at `epoch` when the cluster is fenced or at another
    /// epoch ([`StoreError::StaleEpoch`], judged in the batch's transaction).
    async fn store_batch(
        &self,
        node_id: &str,
        from: Schema,
        first_seq: u64,
        records: &[serde_json::Value],
        epoch: u64,
    ) -> Result<BatchOutcome>;

    async fn record_summary(&self) -> Result<Vec<RecordSummary>>;
    /// Records of one node with `seq > after_seq`, in order, at most `limit`.
    async fn records(&self, node_id: &str, after_seq: u64, limit: u32)
        -> Result<Vec<StoredRecord>>;
}
