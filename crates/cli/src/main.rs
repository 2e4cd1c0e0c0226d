//! `handover`: the one binary. Each role is a subcommand; the operator
//! commands talk to the controller's API.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use handover::client::{self, Operator};
use handover::{demo, roles, secret, viewers};
use handover_core::api::{ChannelSpec, EventSpec, UpgradeRequest, UpgradeStatus};
use handover_core::artifact::SignaturePolicy;
use handover_core::release::{ReleaseInfo, NEWEST, RELEASES};
use handover_core::upgrade::Phase;
use handover_core::wire::Role;
use handover_core::Release;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Upgrade a live content fleet and its controller to an incompatible
/// release with no viewer disruption and no record lost or duplicated.
///
/// Start with `handover demo`: it runs a whole local release-1 cluster
/// (controller, three groups of primary + backup nodes, viewers), upgrades it
/// to release 2, does the same by hand for comparison, prints what viewers
/// saw and what the database holds, and stops everything again.
#[derive(Parser)]
#[command(
    name = "handover",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upgrade a live local cluster with handover, then by hand, and compare.
    Demo(demo::DemoArgs),
    /// Measure the design's limits on this machine; writes docs/benchmarks.md.
    Bench(handover::bench::BenchArgs),
    /// Create a cluster's CA and the controller's TLS certificate (first step of a secure set-up).
    Init(InitArgs),
    /// Run the controller: owns the database, serves nodes and operators.
    Controller(ControllerArgs),
    /// Run a content node: serves HLS, produces records, ships them.
    Node(NodeArgs),
    /// Run HLS viewers against a group's nodes and report what they saw.
    Viewers(ViewersArgs),
    /// Show the controller, the cluster epoch and every node.
    Status(StatusArgs),
    /// Create and list channels.
    #[command(subcommand)]
    Channel(ChannelCmd),
    /// Create and list redundancy groups (one primary, one backup).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Create and list events (a channel live on a group for a while).
    #[command(subcommand)]
    Event(EventCmd),
    /// Fence the cluster: epoch + 1, every node stops writing and queues.
    Fence(OperatorArgs),
    /// Lift the fence: nodes get their grants back at the same epoch.
    Unfence(OperatorArgs),
    /// What the database holds, per node.
    Records(RecordsArgs),
    /// List the releases this binary can run as (`--release N`).
    Releases(JsonFlag),
    /// Build, sign, verify, upload and list upgrade artifacts (a binary, its manifest, its signature).
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Upgrade the cluster to an artifact's release: plan, start, watch, pause, resume, abort.
    #[command(subcommand)]
    Upgrade(UpgradeCmd),
    /// The controller's PostgreSQL store: its pre-upgrade copies, and
    /// putting one back.
    #[command(subcommand)]
    Db(DbCmd),
}

/// The store a `handover db` command works on.
#[derive(Args)]
struct DatabaseArg {
    /// The controller's --database: postgres://USER@HOST[:PORT]/DB[?schema=NAME].
    #[arg(long, value_name = "URL", env = DATABASE_ENV, hide_env_values = true)]
    database: String,
}

#[derive(Subcommand)]
enum DbCmd {
    /// List the pre-upgrade copies of the store: the schema each was taken
    /// at, just before a newer release migrated the store from it.
    Copies(DatabaseArg),
    /// Put back the copy taken before the store was migrated from schema
    /// N, in one transaction: the store is then as it was just before that
    /// migration, for a controller of the release of schema N (`handover
    /// releases`). Stop every controller of the store first (refused while
    /// one is connected): what was written since the migration is
    /// replaced. The copy stays.
    RestorePreUpgrade {
        #[command(flatten)]
        db: DatabaseArg,
        /// The schema the store was migrated from.
        #[arg(long, value_name = "N")]
        schema: u32,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Issue a single-use, expiring bootstrap token for each node id (its
    /// group must exist). Shown once; the controller keeps only its digest.
    Add {
        #[command(flatten)]
        op: OperatorArgs,
        /// Node ids, as their groups name them.
        #[arg(required = true)]
        ids: Vec<String>,
        /// How long each token is good (1m to 7d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Also for a node that holds a credential (it lost its data dir):
        /// the new token, once traded, replaces that credential.
        #[arg(long)]
        replace: bool,
    },
    /// Revoke a node: its credential and token stop working at once and its
    /// registration is forgotten (the records it delivered stay).
    Remove {
        #[command(flatten)]
        op: OperatorArgs,
        id: String,
    },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    /// Make an artifact directory: the binary and a manifest with its
    /// release, schema, protocol range, SHA-256 and size.
    Create {
        /// The binary to ship (e.g. target/release/handover of the new
        /// build). It is asked for its facts (`BINARY releases --json`), so
        /// it may carry releases this CLI has never heard of.
        #[arg(long)]
        binary: PathBuf,
        /// The release it runs as; default: the newest the binary carries.
        #[arg(long)]
        release: Option<u32>,
        /// Directory to create (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Make an Ed25519 (minisign) key pair for signing artifacts:
    /// DIR/handover.key (secret, not password-protected: keep it offline) and
    /// DIR/handover.pub (give it to the controller and nodes with --trusted-key).
    Keygen {
        /// Directory to write the two key files into (created if missing;
        /// existing key files are never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an artifact directory: writes DIR/manifest.json.minisig, a minisign
    /// signature of manifest.json (which names the binary's SHA-256).
    Sign {
        dir: PathBuf,
        /// The secret key (handover.key; a password-protected minisign key
        /// takes its password from HANDOVER_KEY_PASSWORD).
        #[arg(long)]
        key: PathBuf,
    },
    /// Check an artifact directory as a controller or node trusting these keys
    /// would: its signature, then its binary's size and SHA-256.
    Verify {
        dir: PathBuf,
        /// A public key to trust (handover.pub); repeat for several.
        #[arg(long, required = true)]
        pubkey: Vec<PathBuf>,
    },
    /// Upload an artifact directory to the controller (checked on both ends).
    Upload {
        #[command(flatten)]
        op: OperatorArgs,
        dir: PathBuf,
    },
    /// The artifacts the controller holds.
    List(OperatorArgs),
}

#[derive(Args, Clone)]
struct UpgradeTarget {
    /// Artifact id on the controller, or an artifact directory (uploaded first).
    #[arg(long)]
    to: String,
    /// When primaries switch: `wait` for their current events to end,
    /// `failover` as soon as their backup passed its health gate, or
    /// `deadline=MS` (wait at most MS, then fail over).
    #[arg(long, default_value = "wait")]
    policy: String,
    /// Pause at the start of these phases (e.g. `--pause-at primaries`) to look before going on.
    #[arg(long, value_delimiter = ',', value_parser = Phase::parse)]
    pause_at: Vec<Phase>,
}

impl UpgradeTarget {
    async fn request(&self, o: &Operator) -> anyhow::Result<UpgradeRequest> {
        let id = handover::upgrade::resolve_artifact(o, &self.to).await?;
        Ok(UpgradeRequest {
            artifact: id,
            policy: Some(self.policy.clone()),
            pause_at: self.pause_at.clone(),
        })
    }
}

#[derive(Subcommand)]
enum UpgradeCmd {
    /// Dry run: the ordered steps per group, what each waits for, and whether preflight passes.
    Plan {
        #[command(flatten)]
        op: OperatorArgs,
        #[command(flatten)]
        target: UpgradeTarget,
    },
    /// Start the upgrade (then follow it with `upgrade status --watch`).
    Start {
        #[command(flatten)]
        op: OperatorArgs,
        #[command(flatten)]
        target: UpgradeTarget,
        /// Follow it live until it is over.
        #[arg(long)]
        watch: bool,
    },
    /// Phase, per-node progress, outbox depths and what the upgrade waits for.
    Status {
        #[command(flatten)]
        op: OperatorArgs,
        /// Live progress bars until the upgrade is over.
        #[arg(long)]
        watch: bool,
    },
    /// Pause at the next step; nothing new is started until resume.
    Pause(OperatorArgs),
    Resume(OperatorArgs),
    /// Stop the upgrade; says what can still be undone (refused mid-switch and after finalize).
    Abort(OperatorArgs),
}

#[derive(Args, Clone)]
struct OperatorArgs {
    /// Controller base URL.
    #[arg(
        long,
        env = "HANDOVER_CONTROLLER",
        default_value = "http://127.0.0.1:7400"
    )]
    controller: String,
    /// File holding the operator token (the controller's), readable only by
    /// its owner; without it, the token is taken from HANDOVER_OPERATOR_TOKEN.
    #[arg(long, value_name = "FILE")]
    operator_token_file: Option<PathBuf>,
    /// Refused: a token on the command line is visible to every user.
    #[arg(long = "token", value_name = "TOKEN", hide = true)]
    token_on_argv: Option<String>,
    /// The cluster CA (ca.crt of `handover init`) an https controller's
    /// certificate must chain to.
    #[arg(long = "ca", value_name = "FILE", env = CA_ENV)]
    ca: Option<PathBuf>,
    /// Your client certificate and key, one PEM file (operator.pem or
    /// read-only.pem of `handover init`, mode 0600), pinned by the
    /// controller's --operator-cert or --read-only-cert: then no token is
    /// needed. https only.
    #[arg(long = "identity", value_name = "FILE", env = "HANDOVER_IDENTITY")]
    identity: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Where every client of the controller finds the cluster CA.
const CA_ENV: &str = "HANDOVER_CA";

/// The cluster CA from `--ca`, loaded and checked.
fn trust(ca: Option<&std::path::Path>) -> anyhow::Result<Option<handover_net::tls::ClientTrust>> {
    ca.map(handover_net::tls::ClientTrust::load)
        .transpose()
        .context("the cluster CA (--ca)")
}

/// Create a cluster's certificate authority and the controller's certificate.
///
/// Writes DIR/ca.crt (give it to every node and operator: --ca), DIR/ca.key
/// (keep it offline or with the controller's operator), DIR/controller.crt
/// and DIR/controller.key (the controller's --tls-cert and --tls-key), and
/// two operator identities: DIR/operator.pem and DIR/read-only.pem (client
/// certificate and key, for `--identity`), pinned by the controller with
/// --operator-cert DIR/operator.crt and --read-only-cert DIR/read-only.crt.
/// DIR is made 0700 and the keys 0600. Refuses a DIR that holds a cluster
/// already. Nodes make their own client certificates.
#[derive(Args)]
struct InitArgs {
    /// Where to write the files.
    #[arg(long)]
    dir: PathBuf,
    /// A DNS name or IP address nodes and operators reach the controller
    /// at; repeat for several.
    #[arg(long = "name", required = true)]
    names: Vec<String>,
}

impl OperatorArgs {
    /// The API client: with the client certificate of `--identity`, or the
    /// operator token from its file or the environment (both if given).
    fn operator(&self) -> anyhow::Result<Operator> {
        secret::refuse_on_argv(
            &secret::OPERATOR_TOKEN,
            "--token",
            self.token_on_argv.is_some(),
        )?;
        let token = match &self.identity {
            Some(_)
                if self.operator_token_file.is_none()
                    && std::env::var_os(secret::OPERATOR_TOKEN.env).is_none() =>
            {
                None
            }
            _ => Some(secret::secret_from(
                &secret::OPERATOR_TOKEN,
                self.operator_token_file.as_deref(),
            )?),
        };
        let mut trust = trust(self.ca.as_deref())?;
        if let Some(path) = &self.identity {
            crate::secret::check_private(path).context("--identity")?;
            let identity = handover_net::tls::ClientIdentity::load(path)
                .context("the client certificate (--identity)")?;
            trust = Some(
                trust
                    .context("--identity needs the cluster CA too (--ca or HANDOVER_CA)")?
                    .with_identity(identity),
            );
        }
        Operator::with_trust(&self.controller, token.as_deref(), trust.as_ref())
    }
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Run the controller.
///
/// The database lives in DATA_DIR/controller.db (SQLite, WAL), or on a
/// PostgreSQL server with --database; it is created on first start and
/// migrated forward (after a snapshot in DATA_DIR/snapshots, or a copy
/// schema on PostgreSQL) when a newer release opens an older database.
#[derive(Args)]
struct ControllerArgs {
    /// Keep the database on PostgreSQL: postgres://USER@HOST[:PORT]/DB,
    /// with ?schema=NAME for the PostgreSQL schema of its tables [default
    /// schema: handover]. Without it: SQLite in DATA_DIR/controller.db.
    /// Keep a password out of the URL (PGPASSWORD or ~/.pgpass): a command
    /// line is visible to every user.
    #[arg(long, value_name = "URL", env = DATABASE_ENV, hide_env_values = true)]
    database: Option<String>,
    /// Release to run as (this binary carries 1 to the newest).
    #[arg(long, default_value_t = NEWEST.0)]
    release: u32,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// The controller's TLS certificate chain (controller.crt of `handover
    /// init`). Without it the controller serves plain HTTP, which is
    /// refused unless --listen is a loopback address.
    #[arg(
        long,
        value_name = "FILE",
        env = "HANDOVER_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (controller.key, mode 0600).
    #[arg(
        long,
        value_name = "FILE",
        env = "HANDOVER_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// A client certificate (PEM) whose holder may do everything, like the
    /// operator token (operator.crt of `handover init`; the operator runs
    /// commands with --identity operator.pem). Repeat for several. TLS only.
    #[arg(long = "operator-cert", value_name = "FILE", requires = "tls_cert")]
    operator_certs: Vec<PathBuf>,
    /// A client certificate (PEM) whose holder may only read, like the
    /// read-only token (read-only.crt of `handover init`): dashboards,
    /// monitoring. Repeat for several. TLS only.
    #[arg(long = "read-only-cert", value_name = "FILE", requires = "tls_cert")]
    read_only_certs: Vec<PathBuf>,
    /// File holding the token operators present to the API (16+
    /// characters), readable only by its owner; without it, the token is
    /// taken from HANDOVER_OPERATOR_TOKEN. Never on the command line.
    #[arg(long, value_name = "FILE")]
    operator_token_file: Option<PathBuf>,
    /// Refused: an operator token on the command line is visible to every user.
    #[arg(long = "operator-token", value_name = "TOKEN", hide = true)]
    operator_token_on_argv: Option<String>,
    /// Read from the file or the environment by `main`.
    #[arg(skip)]
    operator_token: String,
    /// File holding a second token that may only read the API (GET:
    /// dashboards, status; 16+ characters, not the operator token), readable
    /// only by its owner; without it, taken from HANDOVER_READ_ONLY_TOKEN if
    /// set. Optional.
    #[arg(long, value_name = "FILE")]
    read_only_token_file: Option<PathBuf>,
    /// Refused: a read-only token on the command line is visible to every user.
    #[arg(long = "read-only-token", value_name = "TOKEN", hide = true)]
    read_only_token_on_argv: Option<String>,
    /// Read from the file or the environment by `main`, if given.
    #[arg(skip)]
    read_only_token: Option<String>,
    /// A node's grant holds this long without a heartbeat.
    #[arg(long, default_value_t = handover_controller::LEASE_MS_DEFAULT)]
    lease_ms: u64,
    /// Accept only artifacts signed by this minisign public key (a .pub file);
    /// repeat for several. Required, unless --allow-unsigned-artifacts.
    #[arg(
        long = "trusted-key",
        value_name = "FILE",
        env = "HANDOVER_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Vec<PathBuf>,
    #[command(flatten)]
    unsigned: AllowUnsigned,
    /// An upgrade pauses when a node has not come back healthy on the new
    /// release within this long.
    #[arg(
        long,
        env = "HANDOVER_NODE_SWITCH_WAIT_MS",
        default_value_t = handover_core::upgrade::NODE_SWITCH_WAIT_MS
    )]
    node_switch_wait_ms: u64,
    /// Connections the controller serves at once [default: 32768, kept
    /// below the open-file limit]. At the cap a new connection closes the
    /// one waiting longest without a request.
    #[arg(long, env = CONNECTIONS_MAX_ENV)]
    connections_max: Option<usize>,
    /// Run the controller in this process, binding the socket itself, instead
    /// of under a supervisor that can switch its release without refusing a
    /// connection.
    #[arg(long)]
    no_supervisor: bool,
}

/// Run a content node, or add and remove nodes (`node add`, `node remove`).
///
/// Its outbox, parameter cache and state live in DATA_DIR/node.db and survive
/// kill -9. Viewers fetch ADVERTISE/hls/CHANNEL/index.m3u8.
///
/// A node joins once: the operator creates its group, runs `handover node add
/// ID`, and starts the node with that token in HANDOVER_BOOTSTRAP_TOKEN (or
/// --bootstrap-token-file). Its first hello trades the token for its own
/// credential; the id, role and group must be the ones its group names.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct NodeArgs {
    #[command(subcommand)]
    cmd: Option<NodeCmd>,
    #[arg(long, default_value_t = NEWEST.0)]
    release: u32,
    // Options because `node add` and `node remove` leave them out; clap
    // requires each when a node runs.
    /// This node's id, as the group names it.
    #[arg(long, required = true)]
    id: Option<String>,
    /// Its role, as its group names it.
    #[arg(long, value_parser = parse_role, required = true)]
    role: Option<Role>,
    /// Its group.
    #[arg(long, required = true)]
    group: Option<String>,
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// Base URL viewers use to reach this node [default: http://LISTEN].
    #[arg(long)]
    advertise: Option<String>,
    /// Controller base URL; for replicas, several separated by commas
    /// (the node moves to the next one it can reach).
    #[arg(
        long,
        env = "HANDOVER_CONTROLLER",
        default_value = "http://127.0.0.1:7400"
    )]
    controller: String,
    /// The cluster CA (ca.crt of `handover init`) the controller's
    /// certificate must chain to; needed for an https --controller.
    #[arg(long = "ca", value_name = "FILE", env = CA_ENV)]
    ca: Option<PathBuf>,
    /// A file holding the single-use bootstrap token `handover node add ID`
    /// issued (or set HANDOVER_BOOTSTRAP_TOKEN). Needed only until the node
    /// holds its own credential, which it keeps in DATA_DIR.
    #[arg(long, value_name = "FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Run the node in this process, binding the socket itself, instead of
    /// under a supervisor that can switch its release without refusing a
    /// connection.
    #[arg(long)]
    no_supervisor: bool,
    /// Demo comparison only: drop records that cannot be stored at once,
    /// like nodes upgraded by hand today.
    #[arg(long, hide = true)]
    legacy: bool,
    /// Stage only artifacts signed by this minisign public key (a .pub file);
    /// repeat for several. Required, unless --allow-unsigned-artifacts.
    #[arg(
        long = "trusted-key",
        value_name = "FILE",
        env = "HANDOVER_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Vec<PathBuf>,
    /// Connections the node serves at once [default: 10000, kept below the
    /// open-file limit]. At the cap a new connection closes the one waiting
    /// longest without a request.
    #[arg(long, env = CONNECTIONS_MAX_ENV)]
    connections_max: Option<usize>,
    /// Do not serve the artifacts staged here to other nodes. By default a
    /// node serves them on its viewers' listener
    /// (/peer/v1/artifacts/ID/binary, at most 2 at once), so an upgrade
    /// does not download every binary from the controller; receivers check
    /// every byte against the controller's signed manifest.
    #[arg(
        long,
        env = NO_PEER_SERVING_ENV,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    no_peer_serving: bool,
    /// A directory this host's nodes share: the first node to stage an
    /// artifact downloads it and links its checked binary there; the
    /// host's other nodes link it (one copy on the disk and in memory)
    /// instead of downloading and writing it again. Each node still checks
    /// the SHA-256 of what it links against its own signed manifest. Only
    /// nodes run by one user can share it (it is made 0700).
    #[arg(long, env = ARTIFACT_CACHE_ENV, value_name = "DIR")]
    artifact_cache: Option<PathBuf>,
    #[command(flatten)]
    unsigned: AllowUnsigned,
}

/// How `--artifact-cache` reaches a supervisor's workers (as
/// [`NO_PEER_SERVING_ENV`] does).
const ARTIFACT_CACHE_ENV: &str = "HANDOVER_ARTIFACT_CACHE";

/// How `--no-peer-serving` reaches a supervisor's workers (the worker's
/// command line is a contract between binaries; the environment is
/// inherited, and an older worker ignores it).
const NO_PEER_SERVING_ENV: &str = "HANDOVER_NO_PEER_SERVING";

/// The opt-out of artifact signatures, shared by `controller` and `node`.
#[derive(Args)]
struct AllowUnsigned {
    /// Run with no --trusted-key: upgrade artifacts are used WITHOUT a
    /// signature check. For local tests and demos only: refused unless
    /// --listen is a loopback address (127.0.0.0/8 or ::1), and warned
    /// about at start and for every artifact accepted or staged.
    #[arg(
        long = "allow-unsigned-artifacts",
        env = "HANDOVER_ALLOW_UNSIGNED_ARTIFACTS",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    allow: bool,
}

impl AllowUnsigned {
    /// The signature policy, decided before anything binds `listen`.
    fn check(&self, trusted_keys: usize, listen: SocketAddr) -> anyhow::Result<()> {
        SignaturePolicy::decide(trusted_keys, self.allow, listen.ip())?;
        Ok(())
    }

    /// The flag for a worker's argv, when given.
    fn worker_args(&self) -> Vec<String> {
        if self.allow {
            vec!["--allow-unsigned-artifacts".into()]
        } else {
            Vec::new()
        }
    }
}

/// How `--connections-max` reaches a supervisor's workers (their command
/// line is a contract between binaries; the environment is inherited).
const CONNECTIONS_MAX_ENV: &str = "HANDOVER_CONNECTIONS_MAX";
use roles::DATABASE_ENV;

/// Run viewers like players with redundant streams: poll the playlist,
/// fetch each new segment once, fail over to the other node on any error.
#[derive(Args)]
struct ViewersArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// Channels to watch [default: every channel with an event].
    #[arg(long, value_delimiter = ',')]
    channel: Vec<String>,
    /// Node base URLs to use instead of asking the controller (primary first).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    #[arg(long, default_value_t = 2)]
    per_channel: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    op: OperatorArgs,
}

#[derive(Subcommand)]
enum ChannelCmd {
    /// Create a channel, e.g. `channel create news --segment-ms 2000 --ladder 1080:6000,720:3000`.
    Create {
        #[command(flatten)]
        op: OperatorArgs,
        name: String,
        #[arg(long, default_value_t = 2000)]
        segment_ms: u32,
        /// Renditions HEIGHT:KBPS, highest first (release 1 keeps the first).
        #[arg(long, value_delimiter = ',', value_parser = parse_rung)]
        ladder: Vec<handover_core::params::v2::Rung>,
        #[arg(long)]
        title: Option<String>,
        /// Segments the live playlist lists (the DVR window, 3 to 720);
        /// release 3 and newer [default there: 6]. An older controller
        /// refuses it.
        #[arg(long)]
        window_segments: Option<u32>,
    },
    List(OperatorArgs),
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group, e.g. `group create g1 --primary g1-a --backup g1-b`.
    Create {
        #[command(flatten)]
        op: OperatorArgs,
        name: String,
        #[arg(long)]
        primary: String,
        #[arg(long)]
        backup: String,
    },
    List(OperatorArgs),
}

#[derive(Subcommand)]
enum EventCmd {
    /// Create an event, e.g. `event create --channel news --group g1 --start-in 5s --duration 10m`.
    Create {
        #[command(flatten)]
        op: OperatorArgs,
        #[arg(long)]
        channel: String,
        #[arg(long)]
        group: String,
        /// Start this long from now.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        start_in: Duration,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    List(OperatorArgs),
}

#[derive(Args)]
struct RecordsArgs {
    #[command(flatten)]
    op: OperatorArgs,
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "primary" => Ok(Role::Primary),
        "backup" => Ok(Role::Backup),
        _ => Err("role is `primary` or `backup`".into()),
    }
}

fn parse_rung(s: &str) -> Result<handover_core::params::v2::Rung, String> {
    let (h, k) = s
        .split_once(':')
        .ok_or("a rung is HEIGHT:KBPS, e.g. 720:3000")?;
    Ok(handover_core::params::v2::Rung {
        height: h.parse().map_err(|_| format!("bad height {h:?}"))?,
        kbps: k.parse().map_err(|_| format!("bad kbps {k:?}"))?,
    })
}

/// Reads the `--trusted-key` files: their absolute paths (for a supervisor
/// to hand to its workers, of any release) and the keys' base64 lines.
fn trusted_keys(files: &[PathBuf]) -> anyhow::Result<(Vec<PathBuf>, Vec<String>)> {
    let mut paths = Vec::new();
    let mut keys = Vec::new();
    for f in files {
        let key = handover::artifact::read_public_key(f)
            .with_context(|| format!("--trusted-key {}", f.display()))?;
        paths.push(
            std::fs::canonicalize(f).with_context(|| format!("--trusted-key {}", f.display()))?,
        );
        keys.push(key.to_base64().to_owned());
    }
    Ok((paths, keys))
}

/// `--trusted-key PATH` pairs for a worker's argv.
fn trusted_key_args(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .flat_map(|p| ["--trusted-key".to_owned(), p.display().to_string()])
        .collect()
}

fn release(n: u32) -> anyhow::Result<Release> {
    Ok(ReleaseInfo::of(Release(n))?.release)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDOVER_LOG")
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on SIGINT or SIGTERM, so a daemon stops gracefully on either.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn main() -> anyhow::Result<()> {
    // An empty HANDOVER_TRUSTED_KEYS means no key (clap would want a value).
    if std::env::var_os("HANDOVER_TRUSTED_KEYS").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("HANDOVER_TRUSTED_KEYS");
    }
    let mut cli = Cli::parse();
    // Tokens come from their files or the environment, never argv; a
    // supervisor hands them to its workers through the environment (set
    // here, before any thread runs).
    match &mut cli.command {
        Command::Controller(a) => {
            let op = &secret::OPERATOR_TOKEN;
            secret::refuse_on_argv(op, "--operator-token", a.operator_token_on_argv.is_some())?;
            a.operator_token = secret::secret_from(op, a.operator_token_file.as_deref())?;
            std::env::set_var(op.env, &a.operator_token);
            let ro = &secret::READ_ONLY_TOKEN;
            secret::refuse_on_argv(ro, "--read-only-token", a.read_only_token_on_argv.is_some())?;
            if a.read_only_token_file.is_some() || std::env::var_os(ro.env).is_some() {
                let token = secret::secret_from(ro, a.read_only_token_file.as_deref())?;
                std::env::set_var(ro.env, &token);
                a.read_only_token = Some(token);
            }
            // Both checked before anything binds, in a supervisor too.
            handover_controller::auth::OperatorCredentials::new(
                a.operator_token.clone(),
                a.read_only_token.clone(),
            )?;
        }
        Command::Node(NodeArgs {
            cmd: None,
            bootstrap_token_file,
            ..
        }) => {
            // Needed only until the node holds a credential: read if given.
            let boot = &secret::BOOTSTRAP_TOKEN;
            if bootstrap_token_file.is_some() || std::env::var_os(boot.env).is_some() {
                let token = secret::secret_from(boot, bootstrap_token_file.as_deref())?;
                std::env::set_var(boot.env, token);
            }
        }
        _ => {}
    }
    // So is the connection cap (the worker's command line stays as it is).
    if let Command::Controller(ControllerArgs {
        connections_max: Some(n),
        ..
    })
    | Command::Node(NodeArgs {
        connections_max: Some(n),
        ..
    }) = &cli.command
    {
        std::env::set_var(CONNECTIONS_MAX_ENV, n.to_string());
    }
    if let Command::Node(NodeArgs {
        no_peer_serving: true,
        ..
    }) = &cli.command
    {
        std::env::set_var(NO_PEER_SERVING_ENV, "true");
    }
    if let Command::Node(NodeArgs {
        artifact_cache: Some(dir),
        ..
    }) = &cli.command
    {
        // Absolute: a worker need not start where the command did.
        let dir = std::path::absolute(dir)
            .with_context(|| format!("--artifact-cache {}", dir.display()))?;
        std::env::set_var(ARTIFACT_CACHE_ENV, dir);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bench(args) => handover::bench::run(args).await,
        Command::Init(a) => {
            let made = handover::init::init(&a.dir, &a.names)?;
            let d = made.dir.display();
            println!(
                "cluster CA and controller certificate for {} in {d}",
                made.names.join(", ")
            );
            println!(
                "  controller: --tls-cert {d}/controller.crt --tls-key {d}/controller.key \
                 --operator-cert {d}/operator.crt --read-only-cert {d}/read-only.crt"
            );
            println!("  nodes and operators: --ca {d}/ca.crt");
            println!(
                "  operators, no token needed: --identity {d}/operator.pem \
                 (dashboards: {d}/read-only.pem)"
            );
            println!("  keep {d}/ca.key away from every host but the operator's");
            Ok(())
        }
        Command::Demo(args) => {
            init_tracing("warn");
            demo::run(args).await
        }
        Command::Controller(a) => {
            init_tracing("info");
            let mode = roles::mode(a.no_supervisor);
            // Checked before anything starts; shown only redacted from here on.
            let database = a
                .database
                .as_deref()
                .map(handover_store::postgres::Target::parse)
                .transpose()?;
            let (key_paths, trusted_keys) = trusted_keys(&a.trusted_keys)?;
            a.unsigned.check(trusted_keys.len(), a.listen)?;
            if mode == roles::Mode::Supervisor {
                let mut args = vec![
                    "controller".into(),
                    "--data-dir".into(),
                    a.data_dir.display().to_string(),
                    "--listen".into(),
                    a.listen.to_string(),
                    "--lease-ms".into(),
                    a.lease_ms.to_string(),
                    "--node-switch-wait-ms".into(),
                    a.node_switch_wait_ms.to_string(),
                ];
                if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
                    let pins = a
                        .operator_certs
                        .iter()
                        .map(|p| ("--operator-cert", p))
                        .chain(a.read_only_certs.iter().map(|p| ("--read-only-cert", p)));
                    for (flag, path) in [("--tls-cert", cert), ("--tls-key", key)]
                        .into_iter()
                        .chain(pins)
                    {
                        args.push(flag.into());
                        args.push(path.display().to_string());
                    }
                }
                // The worker inherits HANDOVER_DATABASE; a URL given as
                // --database only is passed on the same way.
                if let Some(url) = &a.database {
                    if std::env::var(DATABASE_ENV).ok().as_ref() != Some(url) {
                        args.extend(["--database".into(), url.clone()]);
                    }
                }
                args.extend(trusted_key_args(&key_paths));
                args.extend(a.unsigned.worker_args());
                return roles::supervise(
                    "controller",
                    a.listen,
                    &a.data_dir,
                    release(a.release)?.0,
                    args,
                    a.tls_cert.is_some(),
                    shutdown_signal(),
                )
                .await;
            }
            let config = handover_controller::ControllerConfig {
                release: release(a.release)?,
                data_dir: a.data_dir,
                listen: a.listen,
                operator_token: a.operator_token,
                read_only_token: a.read_only_token,
                lease_ms: a.lease_ms,
                node_switch_wait_ms: a.node_switch_wait_ms,
                tls: a
                    .tls_cert
                    .zip(a.tls_key)
                    .map(|(cert, key)| handover_controller::TlsFiles {
                        cert,
                        key,
                        operator_certs: a.operator_certs,
                        read_only_certs: a.read_only_certs,
                    }),
                trusted_keys,
                limits: handover_net::Limits::CONTROLLER.with_connections_max(a.connections_max),
                allow_unsigned_artifacts: a.unsigned.allow,
                database,
            };
            let listener = roles::listener(mode, config.listen).await?;
            handover_controller::serve_on(config, listener, shutdown_signal()).await
        }
        Command::Node(NodeArgs {
            cmd:
                Some(NodeCmd::Add {
                    op,
                    ids,
                    ttl,
                    replace,
                }),
            ..
        }) => node_add(&op, ids, ttl, replace).await,
        Command::Node(NodeArgs {
            cmd: Some(NodeCmd::Remove { op, id }),
            ..
        }) => {
            let op_client = op.operator()?;
            let removed: handover_core::api::NodeRemoved =
                op_client.delete(&format!("/api/v1/nodes/{id}")).await?;
            if op.json {
                println!("{}", serde_json::to_string_pretty(&removed)?);
            } else {
                println!(
                    "node {} removed: its credential is revoked",
                    removed.node_id
                );
            }
            Ok(())
        }
        Command::Node(a) => {
            init_tracing("info");
            let (Some(id), Some(role), Some(group), Some(data_dir), Some(listen)) =
                (a.id, a.role, a.group, a.data_dir, a.listen)
            else {
                bail!("a node needs --id, --role, --group, --data-dir and --listen");
            };
            let mode = roles::mode(a.no_supervisor);
            // Test hook (handover_node::TEST_FAULT_ENV): a node release that dies at start.
            #[cfg(feature = "test-hooks")]
            if mode == roles::Mode::Worker && handover_node::test_fault("exit_at_start").is_some() {
                bail!(
                    "test hook HANDOVER_TEST_FAULT=exit_at_start: this node worker exits at start"
                );
            }
            let advertise = a
                .advertise
                .clone()
                .unwrap_or_else(|| format!("http://{}", listen));
            let (key_paths, trusted_keys) = trusted_keys(&a.trusted_keys)?;
            a.unsigned.check(trusted_keys.len(), listen)?;
            if mode == roles::Mode::Supervisor {
                let mut args = vec![
                    "node".into(),
                    "--id".into(),
                    id.clone(),
                    "--role".into(),
                    role.as_str().into(),
                    "--group".into(),
                    group.clone(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--listen".into(),
                    listen.to_string(),
                    "--advertise".into(),
                    advertise,
                    "--controller".into(),
                    a.controller.clone(),
                ];
                if let Some(ca) = &a.ca {
                    args.push("--ca".into());
                    args.push(ca.display().to_string());
                }
                args.extend(trusted_key_args(&key_paths));
                args.extend(a.unsigned.worker_args());
                return roles::supervise(
                    &id,
                    listen,
                    &data_dir,
                    release(a.release)?.0,
                    args,
                    false,
                    shutdown_signal(),
                )
                .await;
            }
            let config = handover_node::NodeConfig {
                node_id: id,
                release: release(a.release)?,
                role,
                group,
                data_dir,
                advertise_url: advertise,
                listen,
                controller: std::sync::Arc::new(
                    handover_net::controllers::ControllerUrls::parse(&a.controller)
                        .context("--controller")?,
                ),
                controller_ca: a.ca,
                bootstrap_token: std::env::var(BOOTSTRAP_TOKEN_ENV)
                    .ok()
                    .filter(|t| !t.is_empty()),
                legacy: a.legacy,
                trusted_keys,
                limits: handover_net::Limits::NODE.with_connections_max(a.connections_max),
                allow_unsigned_artifacts: a.unsigned.allow,
                peer_serving: !a.no_peer_serving,
                artifact_cache: a.artifact_cache,
            };
            let listener = roles::listener(mode, config.listen).await?;
            handover_node::serve_on(config, listener, shutdown_signal()).await
        }
        Command::Viewers(a) => {
            init_tracing("warn");
            run_viewers(a).await
        }
        Command::Status(a) => {
            let op = a.op.operator()?;
            let status = op.status().await?;
            if a.op.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", client::render_status(&status));
            }
            Ok(())
        }
        Command::Channel(ChannelCmd::Create {
            op,
            name,
            segment_ms,
            ladder,
            title,
            window_segments,
        }) => {
            let spec = ChannelSpec {
                name,
                title,
                segment_ms,
                ladder,
                window_segments,
            };
            api_post(&op, "/api/v1/channels", &spec).await
        }
        Command::Channel(ChannelCmd::List(op)) => api_get(&op, "/api/v1/channels").await,
        Command::Group(GroupCmd::Create {
            op,
            name,
            primary,
            backup,
        }) => {
            let g = handover_core::params::Group {
                name,
                primary,
                backup,
            };
            api_post(&op, "/api/v1/groups", &g).await
        }
        Command::Group(GroupCmd::List(op)) => api_get(&op, "/api/v1/groups").await,
        Command::Event(EventCmd::Create {
            op,
            channel,
            group,
            start_in,
            duration,
        }) => {
            let start_ms = client::now_ms()
                + i64::try_from(start_in.as_millis()).context("--start-in too large")?;
            let duration_ms =
                u64::try_from(duration.as_millis()).context("--duration too large")?;
            let spec = EventSpec {
                channel,
                group,
                start_ms,
                duration_ms,
            };
            api_post(&op, "/api/v1/events", &spec).await
        }
        Command::Event(EventCmd::List(op)) => api_get(&op, "/api/v1/events").await,
        Command::Fence(op) => api_post(&op, "/api/v1/fence", &serde_json::json!({})).await,
        Command::Unfence(op) => api_post(&op, "/api/v1/unfence", &serde_json::json!({})).await,
        Command::Records(a) => api_get(&a.op, "/api/v1/records/summary").await,
        Command::Artifact(ArtifactCmd::Create {
            binary,
            release,
            out,
        }) => {
            let m = handover::artifact::create(&binary, release, &out)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            eprintln!("artifact {} written to {}", m.id(), out.display());
            Ok(())
        }
        Command::Artifact(ArtifactCmd::Keygen { out }) => {
            let k = handover::artifact::keygen(&out)?;
            println!("{}", k.public.display());
            eprintln!(
                "key {} written: public {} (give it to the controller and every node with \
                 --trusted-key), secret {}",
                k.key_id,
                k.public.display(),
                k.secret.display()
            );
            eprintln!(
                "WARNING: {} is NOT password-protected: anyone who can read it can sign \
                 artifacts that every node will run. Keep it offline, readable only by \
                 you (it is mode 0600), and never on a controller or node.",
                k.secret.display()
            );
            Ok(())
        }
        Command::Artifact(ArtifactCmd::Sign { dir, key }) => {
            let s = handover::artifact::sign(&dir, &key)?;
            println!("{}", s.signature.display());
            eprintln!(
                "artifact {} (release {}) signed with key {}",
                s.manifest.id(),
                s.manifest.release,
                s.key_id
            );
            Ok(())
        }
        Command::Artifact(ArtifactCmd::Verify { dir, pubkey }) => {
            let (m, key_id) = handover::artifact::verify(&dir, &pubkey)?;
            println!(
                "artifact {} (release {}): signed by trusted key {key_id}; binary size and sha256 match",
                m.id(),
                m.release
            );
            Ok(())
        }
        Command::Artifact(ArtifactCmd::Upload { op, dir }) => {
            let m = handover::artifact::upload(&op.operator()?, &dir).await?;
            print_json_or(&op, &serde_json::to_value(&m)?)
        }
        Command::Artifact(ArtifactCmd::List(op)) => api_get(&op, "/api/v1/artifacts").await,
        Command::Upgrade(cmd) => run_upgrade(cmd).await,
        Command::Db(cmd) => run_db(cmd).await,
        Command::Releases(f) => {
            if f.json {
                let facts = handover_core::release::BinaryFacts::of_this_binary();
                println!("{}", serde_json::to_string_pretty(&facts)?);
            } else {
                for r in RELEASES {
                    let from: Vec<String> = r.migrates_from.iter().map(|s| s.to_string()).collect();
                    println!(
                        "release {} ({}): schema {}, protocol {}..={}, serves nodes of schema {}..={}, migrates databases of schema [{}]",
                        r.release, r.semver, r.schema, r.protocol.min, r.protocol.max, r.window_min_schema, r.schema, from.join(", ")
                    );
                }
            }
            Ok(())
        }
    }
}

/// Where a node worker finds its bootstrap token (never on a command line).
const BOOTSTRAP_TOKEN_ENV: &str = secret::BOOTSTRAP_TOKEN.env;

async fn node_add(
    op: &OperatorArgs,
    ids: Vec<String>,
    ttl: Duration,
    replace: bool,
) -> anyhow::Result<()> {
    let req = handover_core::api::NodeAddRequest {
        ids,
        ttl_ms: Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        replace,
    };
    let answer: handover_core::api::NodeAddAnswer =
        op.operator()?.post("/api/v1/nodes", &req).await?;
    if op.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    for t in &answer.tokens {
        println!(
            "{} ({} of group {}), good once until {}:\n  {}",
            t.node_id,
            t.role.as_str(),
            t.group,
            client::fmt_time_ms(t.expires_at_ms),
            t.token
        );
    }
    println!(
        "\nStart each node with its token in {BOOTSTRAP_TOKEN_ENV} (or a 0600 file given to \
         --bootstrap-token-file); it trades it for its own credential at its first hello."
    );
    Ok(())
}

async fn api_get(op: &OperatorArgs, path: &str) -> anyhow::Result<()> {
    print_json_or(op, &op.operator()?.get(path).await?)
}

async fn api_post<B: serde::Serialize + Sync>(
    op: &OperatorArgs,
    path: &str,
    body: &B,
) -> anyhow::Result<()> {
    print_json_or(op, &op.operator()?.post(path, body).await?)
}

/// Operator commands print what the controller answered: pretty JSON is
/// both the script form and a readable one for these small objects.
fn print_json_or(op: &OperatorArgs, value: &serde_json::Value) -> anyhow::Result<()> {
    if op.json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

/// `handover db`: works on the PostgreSQL store directly, no controller involved.
async fn run_db(cmd: DbCmd) -> anyhow::Result<()> {
    init_tracing("warn");
    match cmd {
        DbCmd::Copies(a) => {
            let target = handover_store::postgres::Target::parse(&a.database)?;
            let copies = target.pre_upgrade_copies().await?;
            if copies.is_empty() {
                println!("{target:?}: no pre-upgrade copy");
            }
            for schema in copies {
                println!(
                    "schema {schema}: {} (restore-pre-upgrade --schema {schema})",
                    target.schema().pre_upgrade(schema).as_str()
                );
            }
        }
        DbCmd::RestorePreUpgrade { db, schema } => {
            let c = handover_store::postgres::restore_pre_upgrade(&db.database, schema).await?;
            println!(
                "restored: the store is at schema {}, cluster release {}, epoch {}; start a \
                 controller of release {}{}",
                c.schema,
                c.release,
                c.epoch,
                c.release,
                if c.fenced {
                    ", then lift the fence (`handover unfence`): the copy was taken fenced"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

async fn run_upgrade(cmd: UpgradeCmd) -> anyhow::Result<()> {
    use handover::upgrade as up;
    match cmd {
        UpgradeCmd::Plan { op, target } => {
            let o = op.operator()?;
            let p = up::plan(&o, &target.request(&o).await?).await?;
            if op.json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                print!("{}", up::render_plan(&p));
            }
            Ok(())
        }
        UpgradeCmd::Start { op, target, watch } => {
            let o = op.operator()?;
            let started = up::start(&o, &target.request(&o).await?).await?;
            if !op.json {
                eprintln!("upgrade to release {} started", started.plan.target.release);
            }
            let s = if watch {
                up::watch(&o).await?
            } else {
                up::status(&o).await?
            };
            show_upgrade(&op, &s)
        }
        UpgradeCmd::Status { op, watch } => {
            let o = op.operator()?;
            let s = if watch {
                up::watch(&o).await?
            } else {
                up::status(&o).await?
            };
            show_upgrade(&op, &s)
        }
        UpgradeCmd::Pause(op) => control(&op, "pause").await,
        UpgradeCmd::Resume(op) => control(&op, "resume").await,
        UpgradeCmd::Abort(op) => control(&op, "abort").await,
    }
}

/// Pause, resume or abort; prints the status that follows.
async fn control(op: &OperatorArgs, verb: &str) -> anyhow::Result<()> {
    let o = op.operator()?;
    let _: serde_json::Value = o
        .post(&format!("/api/v1/upgrade/{verb}"), &serde_json::json!({}))
        .await?;
    show_upgrade(op, &handover::upgrade::status(&o).await?)
}

fn show_upgrade(op: &OperatorArgs, s: &UpgradeStatus) -> anyhow::Result<()> {
    if op.json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        print!("{}", handover::upgrade::render_status(s));
    }
    Ok(())
}

async fn run_viewers(a: ViewersArgs) -> anyhow::Result<()> {
    let targets = if a.nodes.is_empty() {
        let op = a.op.operator()?;
        viewers::targets(&op, &a.channel).await?
    } else {
        if a.channel.is_empty() {
            bail!("with --nodes, name the channels to watch with --channel");
        }
        a.channel
            .iter()
            .map(|c| viewers::ChannelTarget {
                channel: c.clone(),
                node_urls: a.nodes.clone(),
            })
            .collect()
    };
    if targets.is_empty() {
        bail!("no channel to watch: create an event first, or pass --channel");
    }
    let config = viewers::ViewerConfig {
        targets,
        viewers_per_channel: a.per_channel,
        duration: a.duration,
        request_timeout: viewers::REQUEST_TIMEOUT,
        steady: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let report = viewers::run(&config, stop_rx).await?;
    if a.op.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", demo::render_viewers(&report));
    }
    Ok(())
}
