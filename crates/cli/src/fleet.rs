//! A local fleet of real processes: one controller and nodes, each its own
//! OS process on its own 127.x.y.z address and data dir. The demo and the
//! process tests drive the same code. Every child is killed when the fleet is
//! dropped, so nothing outlives a panic or Ctrl-C.

use crate::check::{check_node, CheckReport};
use crate::client::Operator;
use crate::viewers::ChannelTarget;
use anyhow::{bail, Context};
use handover_core::api::{ChannelSpec, EventSpec, Status, StoredRecord, UpgradeStatus};
use handover_core::params::Group;
use handover_core::wire::Role;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// Longest wait for a process to answer its health check.
pub const HEALTHY_WAIT_MS: u64 = 15_000;
/// Grace a SIGTERM'd process gets before SIGKILL.
pub const TERMINATE_GRACE_MS: u64 = 10_000;
const CONTROLLER_PORT: u16 = 7400;
/// Pause between two looks while waiting for a process or an answer (every
/// such wait is bounded by its own deadline).
const POLL_MS: u64 = 50;
/// Pause between two looks at the upgrade's status.
const STATUS_POLL_MS: u64 = 200;
/// Bound on one health probe.
const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Events of [`Fleet::start_live_groups`] start this long after they are
/// created, so every node has them.
const LIVE_LEAD_MS: i64 = 2_000;
const NODE_PORT: u16 = 7500;
const BOOTSTRAP_TOKEN_ENV: &str = crate::secret::BOOTSTRAP_TOKEN.env;
const OPERATOR_TOKEN_ENV: &str = crate::secret::OPERATOR_TOKEN.env;
/// Node n listens on host `NODE_HOST_FIRST + n` of the fleet's subnet
/// (below: the controller's); past `NODE_HOST_LAST` nodes share the last.
const NODE_HOST_FIRST: usize = 10;
const NODE_HOST_LAST: u8 = 250;
/// Bytes read at a time while hashing a binary: large reads, bounded memory.
const HASH_READ_BYTES: usize = 256 << 10;

/// One child process with its log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(exe: &Path, name: &str, args: &[String], log: PathBuf) -> anyhow::Result<Proc> {
        Proc::spawn_with_env(exe, name, args, &[], log)
    }

    /// [`Proc::spawn`] with extra environment variables (e.g. a test fault).
    pub fn spawn_with_env(
        exe: &Path,
        name: &str,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create log {}", log.display()))?;
        let err = out.try_clone().context("cannot share the log file")?;
        let child = Command::new(exe)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", exe.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} has already exited", self.name))?;
        kill(pid, sig).with_context(|| format!("cannot send {sig} to {}", self.name))
    }

    /// SIGTERM, then SIGKILL if the process has not exited within the grace.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if self.pid().is_some() {
            self.signal(Signal::SIGTERM)?;
        }
        match tokio::time::timeout(Duration::from_millis(TERMINATE_GRACE_MS), self.child.wait())
            .await
        {
            Ok(status) => status.with_context(|| format!("cannot wait for {}", self.name)),
            Err(_) => {
                tracing::warn!(name = %self.name, "did not stop within the grace; killing");
                self.kill().await
            }
        }
    }

    /// SIGKILL: the crash a test wants.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.child.start_kill().ok();
        self.child
            .wait()
            .await
            .with_context(|| format!("cannot wait for {}", self.name))
    }
}

/// `DIR/logs/STEM.log`, or `STEM.N.log` when a process of that name was
/// started before (a restart keeps the log of the one before it).
fn unique_log(dir: &Path, stem: &str) -> PathBuf {
    let logs = dir.join("logs");
    let first = logs.join(format!("{stem}.log"));
    if !first.exists() {
        return first;
    }
    (1u32..)
        .map(|n| logs.join(format!("{stem}.{n}.log")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// Every worker a supervisor runs (none if it does not answer).
/// Controller replicas a fleet has at most (besides its controller): their
/// addresses are in the fleet's certificate.
pub const REPLICAS_MAX: u8 = 4;

/// The control socket of the supervisor whose data dir is `data_dir`.
fn supervisor_at(data_dir: &Path) -> handover_supervisor::SupervisorClient {
    handover_supervisor::SupervisorClient::new(
        data_dir.join("supervisor").join("control.sock"),
        handover_supervisor::DEFAULT_READY_TIMEOUT_MS,
    )
}

async fn worker_pids(client: &handover_supervisor::SupervisorClient) -> Vec<u32> {
    match client.status().await {
        Ok(s) => s
            .active_pid
            .into_iter()
            .chain(s.starting_pid)
            .chain(s.retiring_pids)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits (bounded) until none of `pids` runs any more: a worker killed by
/// its supervisor's death (PDEATHSIG) still holds the role's socket until
/// it is gone. A zombie holds nothing.
async fn wait_gone(pids: &[u32]) -> anyhow::Result<()> {
    let running = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(TERMINATE_GRACE_MS);
    while pids.iter().any(running) {
        if tokio::time::Instant::now() > deadline {
            bail!("workers {pids:?} still run {TERMINATE_GRACE_MS} ms after their supervisor died");
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    Ok(())
}

/// Polls `url` until it answers 200 or the wait ends.
pub async fn wait_healthy(url: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(PROBE_TIMEOUT_MS))
        .no_proxy()
        .build()?;
    wait_healthy_with(url, proc, &http).await
}

/// [`wait_healthy`] with the client given (one that trusts the cluster CA).
pub async fn wait_healthy_with(
    url: &str,
    proc: &mut Proc,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(HEALTHY_WAIT_MS);
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!(
                "{} exited with {status} before it was healthy; see {}",
                proc.name,
                proc.log.display()
            );
        }
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} did not become healthy at {url} within {HEALTHY_WAIT_MS} ms; see {}",
                proc.name,
                proc.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

pub struct NodeProc {
    pub id: String,
    pub role: Role,
    pub group: String,
    pub release: u32,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
    /// The controller URL this node is given, when not the fleet's own
    /// (e.g. a fault proxy in front of the controller).
    pub controller_url: Option<String>,
    /// Extra environment of this node's supervisor (inherited by its workers).
    pub env: Vec<(String, String)>,
    /// Set once the node was started with a bootstrap token: it holds its
    /// own credential in its data dir from then on.
    pub joined: bool,
}

impl NodeProc {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A controller and its nodes on `127.<subnet>.0.<n>`.
pub struct Fleet {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub subnet: u8,
    pub operator_token: String,
    pub controller_release: u32,
    /// Run every process under its supervisor (the default) or bare.
    pub supervised: bool,
    /// Nodes drop what they cannot store at once (the demo's manual procedure).
    pub legacy: bool,
    /// Public key files the controller and nodes trust (`--trusted-key`);
    /// empty: `--allow-unsigned-artifacts` (artifacts not signature-checked).
    pub trusted_keys: Vec<PathBuf>,
    pub controller: Option<Proc>,
    /// More controller replicas on the fleet's PostgreSQL store
    /// ([`Fleet::start_replica`]), on `127.<subnet>.1.<k + 1>`.
    pub replicas: Vec<Option<Proc>>,
    pub nodes: Vec<NodeProc>,
    pub op: Operator,
    /// Extra environment of the controller's supervisor (and its workers).
    pub controller_env: Vec<(String, String)>,
    /// The cluster CA and the controller's certificate (`handover init`,
    /// in DIR/pki): the controller serves TLS and every client trusts that
    /// CA only. None: plain HTTP on loopback ([`Fleet::plain_http`]).
    pub pki: Option<PathBuf>,
    /// The controller's PostgreSQL store ([`Fleet::use_postgres`]); None:
    /// SQLite in its data dir. Last, so it is dropped after the processes.
    pub database: Option<FleetDatabase>,
    /// Another URL of that store for one controller process, by its name
    /// (`controller`, `controller-1`, …): a test's proxy in front of the
    /// server, to cut that replica off from it.
    pub database_routes: Vec<(String, String)>,
    /// A directory every node of the fleet shares as its host's artifact
    /// cache (`--artifact-cache`); None: each node downloads its own copy.
    pub artifact_cache: Option<PathBuf>,
}

/// A PostgreSQL schema of one fleet's own, for its controller's store
/// (given as `HANDOVER_DATABASE`), or of one benchmark's; dropped, with its
/// pre-upgrade copies, when this is dropped.
pub struct FleetDatabase {
    url: String,
}

impl FleetDatabase {
    /// A new schema name `<prefix>_<pid>_<nanos>` on the server of
    /// `server_url` (a `postgres://` URL without `schema`), which nothing
    /// else uses; the store creates it when it opens. Fails, saying to start
    /// it, when the server does not answer.
    pub async fn create(server_url: &str, prefix: &str) -> anyhow::Result<FleetDatabase> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!("{prefix}_{}_{nanos}", std::process::id());
        let sep = if server_url.contains('?') { '&' } else { '?' };
        let url = format!("{server_url}{sep}schema={schema}");
        let target = handover_store::postgres::Target::parse(&url)?;
        target.check().await.with_context(|| {
            format!(
                "PostgreSQL is not reachable at {}: start it (`pg_ctlcluster 15 main start`; \
                 .ci/run does)",
                target.redacted()
            )
        })?;
        Ok(FleetDatabase { url })
    }

    /// The `--database` URL, this fleet's schema included.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store's place on the server, to look at it.
    pub fn target(&self) -> anyhow::Result<handover_store::postgres::Target> {
        Ok(handover_store::postgres::Target::parse(&self.url)?)
    }
}

impl Drop for FleetDatabase {
    /// On a thread with a runtime of its own: a test's runtime may be
    /// shutting down, or this may run in a panic.
    fn drop(&mut self) {
        let url = self.url.clone();
        let dropped = std::thread::spawn(move || -> anyhow::Result<u64> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let target = handover_store::postgres::Target::parse(&url)?;
                Ok(target.drop_schemas().await?)
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop the fleet's PostgreSQL schema: {e:#}");
        }
    }
}

fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Fleet {
    /// `dir` must exist; every process gets a data dir and a log below it.
    /// TLS from the start: the CA and the controller's certificate are made
    /// in DIR/pki for the controller's address.
    pub fn new(exe: &Path, dir: &Path, subnet: u8) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(dir.join("logs")).context("cannot create the log dir")?;
        let pki = dir.join("pki");
        // The controller and every replica it may have serve one certificate.
        let names: Vec<String> = std::iter::once(Ipv4Addr::new(127, subnet, 0, 1))
            .chain((1..=REPLICAS_MAX).map(|k| Ipv4Addr::new(127, subnet, 1, k)))
            .map(|a| a.to_string())
            .collect();
        crate::init::init(&pki, &names).context("cannot make the fleet's CA")?;
        let mut fleet = Fleet {
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            subnet,
            operator_token: token(),
            controller_release: 0,
            supervised: true,
            legacy: false,
            trusted_keys: Vec::new(),
            controller: None,
            replicas: Vec::new(),
            nodes: Vec::new(),
            op: Operator::with("http://127.0.0.1:1", "-")?,
            controller_env: Vec::new(),
            pki: Some(pki),
            database: None,
            database_routes: Vec::new(),
            artifact_cache: None,
        };
        fleet.op = fleet.operator()?;
        Ok(fleet)
    }

    /// The controller serves plain HTTP (loopback only): for tests whose
    /// proxy reads the node protocol, and the bench's raw HTTP/1 clients.
    pub fn plain_http(&mut self) -> anyhow::Result<()> {
        self.pki = None;
        self.op = self.operator()?;
        Ok(())
    }

    /// The cluster CA clients trust, if the controller serves TLS.
    pub fn trust(&self) -> anyhow::Result<Option<handover_net::tls::ClientTrust>> {
        self.pki
            .as_ref()
            .map(|p| handover_net::tls::ClientTrust::load(&p.join(crate::init::CA_CERT)))
            .transpose()
            .context("the fleet's CA")
    }

    fn operator(&self) -> anyhow::Result<Operator> {
        Operator::with_trust(
            &self.controller_urls(),
            Some(&self.operator_token),
            self.trust()?.as_ref(),
        )
    }

    /// `HANDOVER_CA` for a `handover` command run against this fleet.
    pub fn ca_env(&self) -> Vec<(String, String)> {
        self.pki
            .iter()
            .map(|p| {
                (
                    "HANDOVER_CA".to_owned(),
                    p.join(crate::init::CA_CERT).display().to_string(),
                )
            })
            .collect()
    }

    /// An HTTP client of the controller (its CA trusted), for tests that
    /// send what the operator client does not.
    pub fn http(&self) -> reqwest::Client {
        self.op.http().clone()
    }

    /// [`Fleet::http`] with a new connection for every request: for bad
    /// input, after which the controller may close a connection (an unread
    /// oversized body) while a pooled client would send on it again.
    pub fn http_unpooled(&self) -> anyhow::Result<reqwest::Client> {
        let builder = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0);
        Ok(
            handover_net::tls::client_for(&self.controller_url(), self.trust()?.as_ref(), builder)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .build()?,
        )
    }

    /// The controller keeps its store in a new PostgreSQL schema of this
    /// fleet's own on the server of `server_url` (a `postgres://` URL
    /// without `schema`), dropped with the fleet. Fails, saying to start
    /// it, when the server does not answer.
    pub async fn use_postgres(&mut self, server_url: &str) -> anyhow::Result<()> {
        let prefix = format!("fleet_{}", self.subnet);
        self.database = Some(FleetDatabase::create(server_url, &prefix).await?);
        Ok(())
    }

    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, self.subnet, 0, 1), CONTROLLER_PORT))
    }

    pub fn controller_url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.controller_addr())
    }

    /// Replica `k`'s address (the first replica is `k = 0`).
    pub fn replica_addr(&self, k: usize) -> SocketAddr {
        let host = u8::try_from(k + 1).unwrap_or(u8::MAX);
        SocketAddr::from((Ipv4Addr::new(127, self.subnet, 1, host), CONTROLLER_PORT))
    }

    /// Every controller URL, `a,b,c`: the controller's, then its replicas'.
    pub fn controller_urls(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        std::iter::once(self.controller_url())
            .chain((0..self.replicas.len()).map(|k| format!("{scheme}://{}", self.replica_addr(k))))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts another controller replica on the fleet's PostgreSQL store,
    /// with a data dir of its own; from then on the operator client and
    /// every node started later take every replica's URL.
    pub async fn start_replica(&mut self, release: u32) -> anyhow::Result<usize> {
        anyhow::ensure!(
            self.database.is_some(),
            "replicas share a PostgreSQL store: use_postgres first"
        );
        let k = self.replicas.len();
        anyhow::ensure!(
            k < usize::from(REPLICAS_MAX),
            "at most {REPLICAS_MAX} replicas"
        );
        self.replicas.push(None);
        let p = self
            .spawn_controller(
                release,
                &format!("controller-{}", k + 1),
                self.replica_addr(k),
            )
            .await?;
        self.replicas[k] = Some(p);
        self.op = self.operator()?;
        Ok(k)
    }

    /// The data dir of the controller (`None`) or of replica `k`.
    pub fn controller_dir(&self, replica: Option<usize>) -> PathBuf {
        match replica {
            None => self.dir.join("controller"),
            Some(k) => self.dir.join(format!("controller-{}", k + 1)),
        }
    }

    /// SIGKILL of replica `k`'s supervisor and workers.
    pub async fn kill_replica(&mut self, k: usize) -> anyhow::Result<()> {
        let workers = worker_pids(&supervisor_at(&self.controller_dir(Some(k)))).await;
        if let Some(mut p) = self.replicas.get_mut(k).and_then(Option::take) {
            p.kill().await?;
        }
        wait_gone(&workers).await
    }

    pub async fn start_controller(&mut self, release: u32) -> anyhow::Result<()> {
        let p = self
            .spawn_controller(release, "controller", self.controller_addr())
            .await?;
        self.controller = Some(p);
        self.controller_release = release;
        Ok(())
    }

    /// A controller at `addr` with the data dir `DIR/<name>`, once healthy.
    async fn spawn_controller(
        &self,
        release: u32,
        name: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<Proc> {
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--release".into(),
            release.to_string(),
            "--data-dir".into(),
            self.dir.join(name).display().to_string(),
            "--listen".into(),
            addr.to_string(),
        ];
        if !self.supervised {
            args.push("--no-supervisor".into());
        }
        args.extend(self.trusted_key_args());
        if let Some(pki) = &self.pki {
            for (flag, file) in [
                ("--tls-cert", crate::init::CONTROLLER_CERT),
                ("--tls-key", crate::init::CONTROLLER_KEY),
                ("--operator-cert", crate::init::OPERATOR_CERT),
                ("--read-only-cert", crate::init::READ_ONLY_CERT),
            ] {
                args.push(flag.into());
                args.push(pki.join(file).display().to_string());
            }
        }
        // Secrets travel in the environment, never on argv.
        let mut env = self.controller_env.clone();
        env.push((OPERATOR_TOKEN_ENV.into(), self.operator_token.clone()));
        if let Some(db) = &self.database {
            let url = self
                .database_routes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(&db.url, |(_, url)| url);
            env.push((crate::roles::DATABASE_ENV.into(), url.clone()));
        }
        let log = unique_log(&self.dir, &format!("{name}-r{release}"));
        let mut p = Proc::spawn_with_env(&self.exe, name, &args, &env, log)?;
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        wait_healthy_with(&format!("{scheme}://{addr}/healthz"), &mut p, &self.http()).await?;
        Ok(p)
    }

    /// Creates group `g{g}` (nodes `g{g}-a` primary, `g{g}-b` backup, declared
    /// at `release`, not started) with channels `names`, each with one event
    /// from `start_ms` for `duration_ms`. Returns what viewers watch.
    pub async fn add_live_group(
        &mut self,
        g: u64,
        names: &[String],
        release: u32,
        segment_ms: u32,
        start_ms: i64,
        duration_ms: u64,
    ) -> anyhow::Result<Vec<ChannelTarget>> {
        let group = Group {
            name: format!("g{g}"),
            primary: format!("g{g}-a"),
            backup: format!("g{g}-b"),
        };
        let _: serde_json::Value = self.op.post("/api/v1/groups", &group).await?;
        let a = self.add_node(&group.primary, Role::Primary, &group.name, release);
        let b = self.add_node(&group.backup, Role::Backup, &group.name, release);
        let mut targets = Vec::new();
        for channel in names {
            let spec = ChannelSpec {
                name: channel.clone(),
                title: None,
                segment_ms,
                ladder: vec![],
                window_segments: None,
            };
            let _: serde_json::Value = self.op.post("/api/v1/channels", &spec).await?;
            let ev = EventSpec {
                channel: channel.clone(),
                group: group.name.clone(),
                start_ms,
                duration_ms,
            };
            let _: serde_json::Value = self.op.post("/api/v1/events", &ev).await?;
            targets.push(ChannelTarget {
                channel: channel.clone(),
                node_urls: vec![self.nodes[a].url(), self.nodes[b].url()],
            });
        }
        Ok(targets)
    }

    /// `groups` groups of `release` (`g{g}`, one channel `ch{g}` each, one
    /// event of `event_ms` from two seconds from now), their nodes started
    /// and registered. Returns what viewers watch and when the events start.
    pub async fn start_live_groups(
        &mut self,
        groups: u64,
        release: u32,
        segment_ms: u32,
        event_ms: u64,
    ) -> anyhow::Result<(Vec<ChannelTarget>, i64)> {
        let start_ms = crate::client::now_ms() + LIVE_LEAD_MS;
        let mut targets = Vec::new();
        for g in 1..=groups {
            let names = [format!("ch{g}")];
            targets.extend(
                self.add_live_group(g, &names, release, segment_ms, start_ms, event_ms)
                    .await?,
            );
        }
        for i in 0..self.nodes.len() {
            self.start_node(i).await?;
        }
        self.wait_nodes_registered().await?;
        Ok((targets, start_ms))
    }

    /// Waits (bounded by `timeout`) until the upgrade pauses at `phase`;
    /// an error if it ends first.
    pub async fn wait_paused_at(
        &self,
        phase: handover_core::upgrade::Phase,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(s) = crate::upgrade::status(&self.op).await {
                if let Some(up) = &s.upgrade {
                    if up.phase == phase && up.status == handover_core::upgrade::Status::Paused {
                        return Ok(());
                    }
                    if up.status.is_over() {
                        bail!("the upgrade ended before pausing at {phase:?}: {up:?}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
        bail!("the upgrade did not pause at {phase:?} within {timeout:?}")
    }

    /// Declares a node (its address and data dir) without starting it.
    pub fn add_node(&mut self, id: &str, role: Role, group: &str, release: u32) -> usize {
        let n = u8::try_from(self.nodes.len() + NODE_HOST_FIRST).unwrap_or(NODE_HOST_LAST);
        self.nodes.push(NodeProc {
            id: id.to_owned(),
            role,
            group: group.to_owned(),
            release,
            addr: SocketAddr::from((Ipv4Addr::new(127, self.subnet, 0, n), NODE_PORT)),
            data_dir: self.dir.join(id),
            proc: None,
            controller_url: None,
            env: Vec::new(),
            joined: false,
        });
        self.nodes.len() - 1
    }

    /// `--trusted-key` per key; with none, the loopback-only opt-out of
    /// signatures (every fleet address is 127.x).
    fn trusted_key_args(&self) -> Vec<String> {
        if self.trusted_keys.is_empty() {
            return vec!["--allow-unsigned-artifacts".to_owned()];
        }
        self.trusted_keys
            .iter()
            .flat_map(|p| ["--trusted-key".to_owned(), p.display().to_string()])
            .collect()
    }

    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let own = self.controller_urls();
        let controller = self
            .nodes
            .get(i)
            .and_then(|n| n.controller_url.clone())
            .unwrap_or(own);
        let supervised = self.supervised;
        let mut key_args = self.trusted_key_args();
        if let Some(pki) = &self.pki {
            key_args.push("--ca".into());
            key_args.push(pki.join(crate::init::CA_CERT).display().to_string());
        }
        // First start: the operator's `node add`, its token in the environment.
        let id = &self.nodes.get(i).context("no such node")?.id;
        let bootstrap = match self.nodes.get(i).is_some_and(|n| !n.joined) {
            true => Some(self.bootstrap_tokens(std::slice::from_ref(id)).await?),
            false => None,
        };
        let node = self.nodes.get_mut(i).context("no such node")?;
        let mut env = node.env.clone();
        if let Some(token) = bootstrap.and_then(|t| t.into_iter().next()) {
            env.push((BOOTSTRAP_TOKEN_ENV.into(), token));
        }
        let mut args = vec![
            "node".into(),
            "--release".into(),
            node.release.to_string(),
            "--id".into(),
            node.id.clone(),
            "--role".into(),
            node.role.as_str().into(),
            "--group".into(),
            node.group.clone(),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
            "--listen".into(),
            node.addr.to_string(),
            "--controller".into(),
            controller,
        ];
        if !supervised {
            args.push("--no-supervisor".into());
        }
        if self.legacy {
            args.push("--legacy".into());
        }
        if let Some(cache) = &self.artifact_cache {
            args.push("--artifact-cache".into());
            args.push(cache.display().to_string());
        }
        args.extend(key_args);
        let log = unique_log(&self.dir, &format!("{}-r{}", node.id, node.release));
        let mut p = Proc::spawn_with_env(&self.exe, &node.id, &args, &env, log)?;
        wait_healthy(&format!("{}/healthz", node.url()), &mut p).await?;
        node.proc = Some(p);
        node.joined = true;
        Ok(())
    }

    /// `handover node add` for `ids` (any number; sent in batches of the
    /// most one request takes): their bootstrap tokens, in order.
    pub async fn bootstrap_tokens(&self, ids: &[String]) -> anyhow::Result<Vec<String>> {
        let mut tokens = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(handover_core::identity::NODE_ADD_BATCH_MAX) {
            let req = handover_core::api::NodeAddRequest {
                ids: chunk.to_vec(),
                ttl_ms: None,
                replace: false,
            };
            let answer: handover_core::api::NodeAddAnswer =
                self.op.post("/api/v1/nodes", &req).await?;
            tokens.extend(answer.tokens.into_iter().map(|t| t.token));
        }
        Ok(tokens)
    }

    /// Nodes that exist only as HTTP clients (the bench's simulated nodes):
    /// each the primary of a group of its own name (backup `ID-b`, never
    /// started), with its bootstrap token, in order.
    pub async fn add_simulated_nodes(&self, ids: &[String]) -> anyhow::Result<Vec<String>> {
        for id in ids {
            let group = Group {
                name: id.clone(),
                primary: id.clone(),
                backup: format!("{id}-b"),
            };
            let _: serde_json::Value = self.op.post("/api/v1/groups", &group).await?;
        }
        self.bootstrap_tokens(ids).await
    }

    pub fn node(&mut self, id: &str) -> anyhow::Result<&mut NodeProc> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    /// Waits until every started node holds a grant the controller agrees with.
    pub async fn wait_nodes_registered(&self) -> anyhow::Result<Status> {
        let want = self.nodes.iter().filter(|n| n.proc.is_some()).count();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(HEALTHY_WAIT_MS);
        loop {
            let status = self.op.status().await?;
            if status.nodes.iter().filter(|n| !n.lease_expired).count() >= want {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "only {} of {want} nodes registered with the controller",
                    status.nodes.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
    }

    /// Every record the database holds for `node`, page by page.
    pub async fn stored_records(&self, node: &str) -> anyhow::Result<Vec<StoredRecord>> {
        let mut all: Vec<StoredRecord> = Vec::new();
        loop {
            let after = all.last().map(|r| r.seq).unwrap_or(0);
            let page: Vec<StoredRecord> = self
                .op
                .get(&format!("/api/v1/records?node={node}&after_seq={after}"))
                .await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// The exactly-once check over every node, from each node's own ledger
    /// (read from its data dir: stop the node first) and the database.
    pub async fn check(&self) -> anyhow::Result<CheckReport> {
        let mut total = CheckReport::default();
        for n in &self.nodes {
            let ledger = handover_node::ledger(&n.data_dir)
                .await
                .with_context(|| format!("cannot read the ledger of {}", n.id))?;
            let stored = self.stored_records(&n.id).await?;
            total.add(&check_node(&ledger.produced, &ledger.queued, &stored));
        }
        Ok(total)
    }

    /// Makes an artifact of this fleet's binary for `release` and uploads it;
    /// returns its id.
    pub async fn upload_artifact(&self, release: u32) -> anyhow::Result<String> {
        let out = self.dir.join(format!("artifact-r{release}"));
        if !out.join(handover_core::artifact::MANIFEST_FILE).is_file() {
            crate::artifact::create(&self.exe, Some(release), &out)?;
        }
        Ok(crate::artifact::upload(&self.op, &out).await?.id())
    }

    /// Like [`Fleet::upload_artifact`], but the artifact's binary is a
    /// wrapper script that runs this fleet's binary with `env` added, so a
    /// test fault (`HANDOVER_TEST_FAULT`) affects only the processes that
    /// run this release: the new controller and the nodes' new workers, not
    /// the release they switch from. Wrappers `exec`, as the supervisor
    /// requires (same pid, same inherited socket). Returns the artifact id.
    pub async fn upload_artifact_with_env(
        &self,
        release: u32,
        env: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
        let exe = std::fs::canonicalize(&self.exe)
            .with_context(|| format!("cannot resolve {}", self.exe.display()))?;
        let mut script = String::from(
            "#!/bin/sh\n# A test release: this binary with a test environment.\nexec env",
        );
        for (k, v) in env {
            anyhow::ensure!(
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "bad environment variable name {k:?}"
            );
            script.push_str(&format!(" {k}={}", quote(v)));
        }
        script.push_str(&format!(" {} \"$@\"\n", quote(&exe.display().to_string())));
        let n = (1u32..)
            .find(|n| {
                !self
                    .dir
                    .join(format!("artifact-r{release}-env{n}"))
                    .exists()
            })
            .unwrap_or(0);
        let wrapper = self.dir.join(format!("wrapper-r{release}-env{n}.sh"));
        std::fs::write(&wrapper, &script)
            .with_context(|| format!("cannot write {}", wrapper.display()))?;
        let out = self.dir.join(format!("artifact-r{release}-env{n}"));
        crate::artifact::create(&wrapper, Some(release), &out)?;
        Ok(crate::artifact::upload(&self.op, &out).await?.id())
    }

    /// The control socket of the controller's supervisor.
    pub fn controller_supervisor(&self) -> handover_supervisor::SupervisorClient {
        supervisor_at(&self.controller_dir(None))
    }

    /// The control socket of node `id`'s supervisor.
    pub fn node_supervisor(
        &self,
        id: &str,
    ) -> anyhow::Result<handover_supervisor::SupervisorClient> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))?;
        Ok(handover_supervisor::SupervisorClient::new(
            n.data_dir.join("supervisor").join("control.sock"),
            handover_supervisor::DEFAULT_READY_TIMEOUT_MS,
        ))
    }

    /// The pid of the worker serving node `id`'s active release (bounded wait
    /// while it restarts).
    pub async fn node_worker_pid(&self, id: &str) -> anyhow::Result<Pid> {
        active_worker(&self.node_supervisor(id)?, id).await
    }

    /// The pid of the controller's active worker (bounded wait while it restarts).
    pub async fn controller_worker_pid(&self) -> anyhow::Result<Pid> {
        active_worker(&self.controller_supervisor(), "the controller").await
    }

    /// Every process of the fleet, supervisors and workers alike, with the
    /// release it runs and the SHA-256 of the binary the kernel says it
    /// executes (`/proc/PID/exe`): what "no process of the old binary is
    /// left" is judged by.
    pub async fn processes(&self) -> anyhow::Result<Vec<ProcessInfo>> {
        let mut roles = vec![(
            "controller".to_owned(),
            self.controller.as_ref().and_then(Proc::pid),
            self.controller_supervisor(),
        )];
        for n in &self.nodes {
            roles.push((
                n.id.clone(),
                n.proc.as_ref().and_then(Proc::pid),
                self.node_supervisor(&n.id)?,
            ));
        }
        let mut out = Vec::new();
        for (name, supervisor_pid, client) in roles {
            let Some(supervisor_pid) = supervisor_pid else {
                continue;
            };
            let status = client
                .status()
                .await
                .with_context(|| format!("cannot ask {name}'s supervisor for its status"))?;
            let worker_pid = status
                .active_pid
                .with_context(|| format!("{name}'s supervisor runs no worker"))?;
            for (role, pid) in [
                (format!("{name} supervisor"), supervisor_pid.as_raw()),
                (
                    format!("{name} worker"),
                    i32::try_from(worker_pid).unwrap_or(0),
                ),
            ] {
                out.push(ProcessInfo {
                    role,
                    pid,
                    release: status.active.release,
                    sha256: exe_sha256(pid)?,
                });
            }
        }
        Ok(out)
    }
}

impl Fleet {
    /// SIGKILL of node `id`'s supervisor (its workers die with it): a
    /// crash. Returns once the workers are gone too, so the node can be
    /// started again on the same address at once.
    pub async fn kill_node(&mut self, id: &str) -> anyhow::Result<()> {
        let workers = worker_pids(&self.node_supervisor(id)?).await;
        let node = self.node(id)?;
        if let Some(mut p) = node.proc.take() {
            p.kill().await?;
        }
        wait_gone(&workers).await
    }

    /// SIGKILL of the controller's supervisor (its workers die with it);
    /// returns once the workers are gone too.
    pub async fn kill_controller(&mut self) -> anyhow::Result<()> {
        let workers = worker_pids(&self.controller_supervisor()).await;
        if let Some(mut p) = self.controller.take() {
            p.kill().await?;
        }
        wait_gone(&workers).await
    }

    /// Polls the upgrade until it is over, tolerating the controller's own
    /// switch; bounded by `timeout`.
    pub async fn wait_upgrade_over(&self, timeout: Duration) -> anyhow::Result<UpgradeStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            match crate::upgrade::status(&self.op).await {
                Ok(s) if s.upgrade.as_ref().is_some_and(|u| u.status.is_over()) => return Ok(s),
                Ok(s) => last = Some(s),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(STATUS_POLL_MS)).await;
        }
        bail!("the upgrade was not over within {timeout:?}; last status: {last:#?}")
    }

    /// Stops every node (SIGTERM: they flush their outbox first), then the
    /// controller and its replicas.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        self.stop_nodes().await?;
        if let Some(mut c) = self.controller.take() {
            c.terminate().await?;
        }
        for r in &mut self.replicas {
            if let Some(mut c) = r.take() {
                c.terminate().await?;
            }
        }
        Ok(())
    }

    pub async fn stop_nodes(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.terminate().await?;
            }
        }
        Ok(())
    }
}

/// One running process of a fleet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// e.g. "controller supervisor", "g1-a worker".
    pub role: String,
    pub pid: i32,
    /// The release its role runs (the supervisor's active release).
    pub release: u32,
    /// SHA-256 of the binary the process executes.
    pub sha256: String,
}

/// SHA-256 of the binary process `pid` executes, read through
/// `/proc/PID/exe` (the file it was started from, even if renamed).
pub fn exe_sha256(pid: i32) -> anyhow::Result<String> {
    file_sha256(Path::new(&format!("/proc/{pid}/exe")))
        .with_context(|| format!("cannot read the binary of process {pid}"))
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = handover_core::artifact::Hasher::new();
    let mut buf = vec![0u8; HASH_READ_BYTES];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(h.finish().0);
        }
        h.update(&buf[..n]);
    }
}

/// The pid of the worker serving a role's active release, from its
/// supervisor (bounded wait while it restarts).
async fn active_worker(
    client: &handover_supervisor::SupervisorClient,
    id: &str,
) -> anyhow::Result<Pid> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(HEALTHY_WAIT_MS);
    loop {
        if let Ok(status) = client.status().await {
            if let Some(pid) = status.active_pid.and_then(|p| i32::try_from(p).ok()) {
                return Ok(Pid::from_raw(pid));
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{id}'s supervisor named no active worker within {HEALTHY_WAIT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}
