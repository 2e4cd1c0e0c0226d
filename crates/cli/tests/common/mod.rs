//! Helpers of the process tests, shared by every test binary here (each uses
//! a part of them): a fleet on a subnet claimed from `handover-testkit` in a
//! temp dir kept when the test fails, the two standard clusters (one group
//! with one channel; or live groups with an upgrade artifact), viewers, the
//! upgrade's controls, and the checks tests end with: viewers undisturbed,
//! every record stored exactly once, the fleet on the new release.
#![allow(dead_code)]

use handover::check::CheckReport;
use handover::fleet::Fleet;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::api::{ChannelSpec, EventSpec, UpgradeRequest};
use handover_core::params::Group;
use handover_core::upgrade::{Phase, Status, Upgrade};
use handover_core::wire::Role;
use handover_testkit::faultproxy::FaultProxy;
use handover_testkit::subnet::{self, Subnet};
use serde_json::Value;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SEGMENT_MS: u32 = 1000;
/// Bound on any one upgrade (and on waiting for one of its pauses).
pub const UPGRADE_WAIT: Duration = Duration::from_secs(150);
/// Host part of a fault proxy's address on the fleet's subnet.
const PROXY_HOST: u8 = 200;

/// The PostgreSQL server (a database on it) process tests keep controller
/// stores on: `HANDOVER_TEST_POSTGRES`, or the local one `.ci/run` starts.
pub fn postgres_url() -> String {
    std::env::var("HANDOVER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The controller's store in a test: SQLite in its data dir, or a
/// PostgreSQL schema of the fleet's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// PostgreSQL when `HANDOVER_TEST_BACKEND=postgres` asks every fleet of
    /// [`setup`] and [`cluster`] for it; SQLite otherwise.
    pub fn from_env() -> Backend {
        match std::env::var("HANDOVER_TEST_BACKEND").as_deref() {
            Ok("postgres") => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }

    /// Points `fleet`'s controller at this backend (before it starts).
    pub async fn apply(self, fleet: &mut Fleet) {
        if self == Backend::Postgres {
            fleet.use_postgres(&postgres_url()).await.unwrap();
        }
    }
}

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handover"))
}

pub fn now_ms() -> i64 {
    handover::client::now_ms()
}

pub async fn sleep_until(at_ms: i64) {
    let wait = u64::try_from(at_ms - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

/// Where a test's fleet lives: a subnet of its own (claimed until this is
/// dropped) and a temp dir, kept with its logs if the test panics. Hold it
/// after the fleet (declared after it), so the processes die first.
pub struct Site {
    pub subnet: Subnet,
    dir: Option<tempfile::TempDir>,
    pub name: String,
}

impl Site {
    pub fn new(name: &str) -> Site {
        Site {
            subnet: subnet::claim(),
            dir: Some(tempfile::tempdir().unwrap()),
            name: name.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap()
    }

    /// A fleet of `exe` in `dir` on this site's subnet.
    pub fn fleet_in(&self, exe: &Path, dir: &Path) -> Fleet {
        Fleet::new(exe, dir, self.subnet.get()).unwrap()
    }

    /// A fleet of this test's binary in the site's dir.
    pub fn fleet(&self) -> Fleet {
        self.fleet_in(&exe(), self.path())
    }

    /// An address of this site's subnet (`127.<subnet>.0.<host>`).
    pub fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, self.subnet.get(), 0, host), port))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // A failed test keeps its data dirs and logs to look at; so does
        // any test with HANDOVER_TEST_KEEP_LOGS set.
        if std::thread::panicking() || std::env::var_os("HANDOVER_TEST_KEEP_LOGS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("{}: logs kept in {}", self.name, dir.keep().display());
            }
        }
    }
}

// ------------------------------------------------ one group, one channel

/// What [`setup`] builds.
pub struct SetupSpec {
    pub controller_release: u32,
    pub node_release: u32,
    pub event_ms: u64,
    pub supervised: bool,
    /// The channel's DVR window (schema 3), if set.
    pub window_segments: Option<u32>,
}

pub struct Setup {
    pub fleet: Fleet,
    pub event_start_ms: i64,
    pub event_ms: u64,
    /// The controller's answer to creating `ch1`.
    pub channel: Value,
    pub name: String,
    _site: Site,
}

impl Setup {
    pub fn event_end_ms(&self) -> i64 {
        self.event_start_ms + i64::try_from(self.event_ms).unwrap()
    }
}

/// A controller, one group `g1` of two nodes (`g1-a` primary, `g1-b`
/// backup; declared, not started), one channel `ch1` with an event from 2 s
/// from now.
pub async fn setup(name: &str, spec: SetupSpec) -> Setup {
    setup_on(name, spec, Backend::from_env()).await
}

/// [`setup`] with the controller's store on `backend`.
pub async fn setup_on(name: &str, spec: SetupSpec, backend: Backend) -> Setup {
    let site = Site::new(name);
    let mut fleet = site.fleet();
    backend.apply(&mut fleet).await;
    fleet.supervised = spec.supervised;
    fleet
        .start_controller(spec.controller_release)
        .await
        .unwrap();
    let group = Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let channel = ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: SEGMENT_MS,
        ladder: vec![],
        window_segments: spec.window_segments,
    };
    let channel: Value = fleet.op.post("/api/v1/channels", &channel).await.unwrap();
    let event_start_ms = now_ms() + 2_000;
    let ev = EventSpec {
        channel: "ch1".into(),
        group: "g1".into(),
        start_ms: event_start_ms,
        duration_ms: spec.event_ms,
    };
    let _: Value = fleet.op.post("/api/v1/events", &ev).await.unwrap();
    fleet.add_node("g1-a", Role::Primary, "g1", spec.node_release);
    fleet.add_node("g1-b", Role::Backup, "g1", spec.node_release);
    Setup {
        fleet,
        event_start_ms,
        event_ms: spec.event_ms,
        channel,
        name: name.to_owned(),
        _site: site,
    }
}

/// Starts every declared node and waits until they are registered.
pub async fn start_nodes(fleet: &mut Fleet) {
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await.unwrap();
    }
    fleet.wait_nodes_registered().await.unwrap();
}

// -------------------------------------------------- live groups, upgrades

/// The upgrade artifact [`cluster`] uploads.
#[derive(Default)]
pub enum Artifact {
    /// None: the test uploads its own.
    #[default]
    None,
    /// Release 2 of this binary.
    Plain,
    /// Release 2 through a wrapper script that adds this environment (a test
    /// fault of the new release only, see `Fleet::upload_artifact_with_env`).
    Wrapped(Vec<(&'static str, &'static str)>),
}

/// What a test changes in the standard cluster.
#[derive(Default)]
pub struct Options {
    /// Groups (at least 1).
    pub groups: usize,
    pub event_ms: u64,
    /// Release of the controller and nodes at the start (at least 1).
    pub release: u32,
    pub artifact: Artifact,
    /// Extra environment of one node's supervisor (and so of its workers).
    pub node_env: Option<(&'static str, Vec<(&'static str, &'static str)>)>,
    /// This node talks to the controller through a fault proxy.
    pub proxied: Option<&'static str>,
    /// Extra environment of the controller's supervisor.
    pub controller_env: Vec<(&'static str, &'static str)>,
    /// How long viewers may watch after the event's planned end (0: 60 s).
    pub viewer_slack_ms: u64,
    /// The controller's store on PostgreSQL (else [`Backend::from_env`]).
    pub postgres: bool,
    /// More controller replicas on that store (PostgreSQL then), started
    /// before the artifact is uploaded (to every replica) and before the
    /// nodes, which take every replica's URL.
    pub replicas: usize,
    /// Every controller reaches PostgreSQL through a fault proxy of its own
    /// ([`Cluster::database_proxies`]), so a test can cut one off.
    pub database_proxies: bool,
}

pub struct Cluster {
    pub fleet: Fleet,
    pub targets: Vec<ChannelTarget>,
    pub event_start_ms: i64,
    pub event_ms: u64,
    viewer_slack_ms: u64,
    /// The uploaded artifact's id (empty with [`Artifact::None`]).
    pub artifact: String,
    pub proxy: Option<FaultProxy>,
    /// The proxy between each controller process (by name) and PostgreSQL.
    pub database_proxies: Vec<(String, FaultProxy)>,
    pub name: String,
    site: Site,
}

fn env_of(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A cluster of `groups` groups (g1 = g1-a primary + g1-b backup, …), one
/// channel each with one event starting 2 s from now, every node started
/// and registered, the artifact uploaded first (so the events are still
/// live when the upgrade runs).
pub async fn cluster(name: &str, opts: Options) -> Cluster {
    let site = Site::new(name);
    let mut fleet = site.fleet();
    let backend = if opts.postgres || opts.replicas > 0 {
        Backend::Postgres
    } else {
        Backend::from_env()
    };
    backend.apply(&mut fleet).await;
    if opts.proxied.is_some() {
        // The fault proxy reads the node protocol it forwards: plain HTTP
        // on loopback for these tests.
        fleet.plain_http().unwrap();
    }
    fleet.controller_env = env_of(&opts.controller_env);
    let mut database_proxies = Vec::new();
    if opts.database_proxies {
        let server = reqwest::Url::parse(&postgres_url()).unwrap();
        let target: SocketAddr = format!(
            "{}:{}",
            server.host_str().unwrap(),
            server.port().unwrap_or(5432)
        )
        .parse()
        .unwrap();
        let url = fleet.database.as_ref().unwrap().url().to_owned();
        let names = std::iter::once("controller".to_owned())
            .chain((1..=opts.replicas).map(|k| format!("controller-{k}")));
        for name in names {
            let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), target)
                .await
                .unwrap();
            let routed = url.replacen(&target.to_string(), &proxy.addr().to_string(), 1);
            assert_ne!(routed, url, "the database URL names {target}");
            fleet.database_routes.push((name.clone(), routed));
            database_proxies.push((name, proxy));
        }
    }
    let release = opts.release.max(1);
    fleet.start_controller(release).await.unwrap();
    for _ in 0..opts.replicas {
        fleet.start_replica(release).await.unwrap();
    }
    let artifact = match &opts.artifact {
        Artifact::None => String::new(),
        Artifact::Plain => fleet.upload_artifact(2).await.unwrap(),
        Artifact::Wrapped(env) => fleet.upload_artifact_with_env(2, env).await.unwrap(),
    };
    let proxy = match opts.proxied {
        Some(_) => Some(
            FaultProxy::start(
                site.addr(PROXY_HOST, fleet.controller_addr().port()),
                fleet.controller_addr(),
            )
            .await
            .unwrap(),
        ),
        None => None,
    };
    let event_start_ms = now_ms() + 2_000;
    let mut targets = Vec::new();
    for g in 1..=opts.groups.max(1) {
        let names = [format!("ch{g}")];
        targets.extend(
            fleet
                .add_live_group(
                    g as u64,
                    &names,
                    release,
                    SEGMENT_MS,
                    event_start_ms,
                    opts.event_ms,
                )
                .await
                .unwrap(),
        );
    }
    if let (Some(id), Some(p)) = (opts.proxied, &proxy) {
        fleet.node(id).unwrap().controller_url = Some(p.url());
    }
    if let Some((id, env)) = &opts.node_env {
        fleet.node(id).unwrap().env = env_of(env);
    }
    start_nodes(&mut fleet).await;
    Cluster {
        fleet,
        targets,
        event_start_ms,
        event_ms: opts.event_ms,
        viewer_slack_ms: match opts.viewer_slack_ms {
            0 => 60_000,
            ms => ms,
        },
        artifact,
        proxy,
        database_proxies,
        name: name.to_owned(),
        site,
    }
}

pub type Viewers = tokio::task::JoinHandle<anyhow::Result<ViewerReport>>;

/// Two viewers on every channel from the first segment until the ENDLIST.
pub fn spawn_viewers(c: &Cluster, request_timeout: Duration) -> Viewers {
    let config = ViewerConfig {
        targets: c.targets.clone(),
        viewers_per_channel: 2,
        duration: Duration::from_millis(c.event_ms + c.viewer_slack_ms),
        request_timeout,
        steady: None,
    };
    viewers::spawn_at(config, c.event_start_ms + i64::from(SEGMENT_MS) + 300)
}

pub async fn start_upgrade(fleet: &Fleet, artifact: &str, policy: &str, pause_at: &[&str]) {
    let mut req = UpgradeRequest::new(artifact, policy);
    req.pause_at = pause_at.iter().map(|p| Phase::parse(p).unwrap()).collect();
    let _ = handover::upgrade::start(&fleet.op, &req).await.unwrap();
}

/// POSTs `{}` to an operator route (fence, unfence, upgrade/resume, …).
pub async fn post_empty(fleet: &Fleet, path: &str) -> Value {
    fleet
        .op
        .post(path, &serde_json::json!({}))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e:#}"))
}

pub async fn resume(fleet: &Fleet) {
    post_empty(fleet, "/api/v1/upgrade/resume").await;
}

/// Resumes once the controller answers again (its worker may be restarting).
pub async fn resume_when_back(fleet: &Fleet) {
    for _ in 0..300 {
        let r: Result<Value, _> = fleet
            .op
            .post("/api/v1/upgrade/resume", &serde_json::json!({}))
            .await;
        if r.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resume(fleet).await;
}

/// Polls `probe` every 100 ms until it gives a value; panics after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn upgrade_now(fleet: &Fleet) -> Option<Upgrade> {
    handover::upgrade::status(&fleet.op).await.ok()?.upgrade
}

/// Waits for the upgrade to pause at `phase` (bounded); panics if it ends first.
pub async fn wait_paused_at(c: &Cluster, phase: Phase) -> Upgrade {
    let what = format!("{}: pause at {phase:?}", c.name);
    wait_for(&what, UPGRADE_WAIT, || async {
        let up = upgrade_now(&c.fleet).await?;
        assert!(!up.status.is_over(), "{what}: over first: {up:?}");
        (up.phase == phase && up.status == Status::Paused).then_some(up)
    })
    .await
}

/// Waits for the upgrade to pause (anywhere) and returns it.
pub async fn wait_paused(c: &Cluster) -> Upgrade {
    wait_for(&format!("{}: a pause", c.name), UPGRADE_WAIT, || async {
        let up = upgrade_now(&c.fleet).await?;
        assert!(!up.status.is_over(), "{}: over: {up:?}", c.name);
        (up.status == Status::Paused).then_some(up)
    })
    .await
}

/// Waits (bounded) for the upgrade to end and asserts it finalized.
pub async fn wait_finalized(c: &Cluster) -> Upgrade {
    let s = c.fleet.wait_upgrade_over(UPGRADE_WAIT).await.unwrap();
    let rendered = handover::upgrade::render_status(&s);
    eprintln!("{}:\n{rendered}", c.name);
    let up = s.upgrade.clone().unwrap();
    assert_eq!(up.status, Status::Finalized, "{}: {rendered}", c.name);
    up
}

/// SIGKILL the controller (supervisor and worker) and start it again; the
/// supervisor's state decides the release it runs.
pub async fn crash_controller(c: &mut Cluster) {
    c.fleet.kill_controller().await.unwrap();
    start_again(c, None).await;
}

/// Starts node `i` (or the controller) again after a kill. Its workers are
/// gone (`Fleet::kill_*` waits for them), but under load the kernel has
/// once been seen to refuse the address for a moment: one more try after a
/// pause, with the sockets on it printed.
pub async fn start_again(c: &mut Cluster, node: Option<usize>) {
    let (addr, first) = match node {
        Some(i) => (c.fleet.nodes[i].addr, c.fleet.start_node(i).await),
        None => (c.fleet.controller_addr(), c.fleet.start_controller(1).await),
    };
    let Err(e) = first else {
        return;
    };
    let ss = std::process::Command::new("ss").args(["-tanpe"]).output();
    let sockets: Vec<String> = ss
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&addr.to_string()))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "{}: could not start again on {addr} ({e:#}); sockets there: {sockets:#?}; retrying once",
        c.name
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    match node {
        Some(i) => c.fleet.start_node(i).await.unwrap(),
        None => c.fleet.start_controller(1).await.unwrap(),
    }
}

/// Starts node `id` again after a kill (its supervisor's state decides the release).
pub async fn restart_node(c: &mut Cluster, id: &str) {
    let i = c.fleet.nodes.iter().position(|n| n.id == id).unwrap();
    start_again(c, Some(i)).await;
}

/// Waits (bounded) until a supervisor is done switching and runs a worker.
pub async fn supervisor_settled(
    what: &str,
    supervisor: &handover_supervisor::SupervisorClient,
) -> handover_supervisor::SupervisorStatus {
    wait_for(what, Duration::from_secs(20), || async {
        let s = supervisor.status().await.ok()?;
        (s.switching.is_none() && s.active_pid.is_some()).then_some(s)
    })
    .await
}

/// A node's own `/status` (bounded), if it answers.
pub async fn node_status(url: &str) -> Option<Value> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(format!("{url}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Polls until the node's own /status reports `grant`; bounded.
pub async fn wait_node_grant(url: &str, grant: &str) {
    for _ in 0..200 {
        if node_status(url).await.is_some_and(|s| s["grant"] == grant) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "node {url} never reported grant {grant}: {:?}",
        node_status(url).await
    );
}

/// Polls every node of `fleet` until its own /status reports `grant`.
pub async fn wait_fleet_grant(fleet: &Fleet, grant: &str) {
    for n in &fleet.nodes {
        wait_node_grant(&n.url(), grant).await;
    }
}

/// Fences (`fenced`) or unfences the cluster and waits until every node
/// reports the grant that follows: `fenced` or `full`.
pub async fn set_fence(fleet: &Fleet, fenced: bool) {
    let (path, grant) = if fenced {
        ("/api/v1/fence", "fenced")
    } else {
        ("/api/v1/unfence", "full")
    };
    post_empty(fleet, path).await;
    wait_fleet_grant(fleet, grant).await;
}

/// Replaces the controller by hand (no supervisor, no upgrade) with a bare
/// one of `release` on the same database, which it migrates, and waits
/// until every node reports `grant`.
pub async fn replace_controller(fleet: &mut Fleet, release: u32, grant: &str) {
    fleet.controller.take().unwrap().terminate().await.unwrap();
    fleet.start_controller(release).await.unwrap();
    wait_fleet_grant(fleet, grant).await;
}

// ----------------------------------------------------------------- checks

/// What one test saw, printed for the report.
pub struct Seen {
    pub viewers: ViewerReport,
    pub records: CheckReport,
    pub upgrade: Upgrade,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v, r) = (&self.viewers, &self.records);
        write!(
            f,
            "viewers: {} requests, {} failed, {} failovers, {} segments missed; records: {} produced, {} stored, {} translated, {}/{}/{} lost/duplicated/unexpected",
            v.requests, v.failed_requests, v.failovers, v.segments_missed,
            r.produced, r.stored, r.translated, r.lost, r.duplicated, r.unexpected
        )
    }
}

/// How a test judges viewers: `Clean` = no failed request; `NodeKilled` =
/// one node of their group was killed once, so a viewer using it saw a
/// request fail and failed over to the other node, where it stays: at most
/// one failed request per viewer, and no segment missed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Viewing {
    Clean,
    NodeKilled,
}

pub fn judge_viewers(name: &str, v: &ViewerReport, viewing: Viewing) {
    eprintln!("{name}: viewers {v:?}");
    assert!(v.segments_received > 0, "{name}: {v:?}");
    assert_eq!(v.segments_missed, 0, "{name}: {v:?}");
    assert_eq!(v.ended_streams, v.viewers, "{name}: {v:?}");
    match viewing {
        Viewing::Clean => assert_eq!(v.failed_requests, 0, "{name}: {v:?}"),
        Viewing::NodeKilled => assert!(v.failed_requests <= v.viewers, "{name}: {v:?}"),
    }
}

/// Every record produced is stored exactly once: none lost, duplicated or
/// unexpected, none still queued (nodes were stopped gracefully: each
/// drained its outbox first).
pub fn assert_exact(name: &str, r: &CheckReport) {
    assert!(r.produced > 0, "{name}: {r:?}");
    assert_eq!(
        (r.lost, r.duplicated, r.unexpected, r.queued),
        (0, 0, 0, 0),
        "{name}: {r:?}"
    );
    assert_eq!(r.stored, r.produced, "{name}: {r:?}");
}

/// Stops every node gracefully, then [`assert_exact`] over every record.
pub async fn stop_and_check(fleet: &mut Fleet, name: &str) -> CheckReport {
    fleet.stop_nodes().await.unwrap();
    let r = fleet.check().await.unwrap();
    eprintln!("{name}: records {r:?}");
    assert_exact(name, &r);
    r
}

/// Waits for the upgrade to finalize and asserts what the issue asks of
/// every upgrade: viewers as `viewing` allows, the controller, cluster,
/// schema and every node on `release` with a `full` grant, every record
/// stored exactly once and the old release's records translated. Stops the
/// fleet.
pub async fn finish(mut c: Cluster, viewers: Viewers, viewing: Viewing, release: u32) -> Seen {
    let upgrade = wait_finalized(&c).await;
    let v = viewers.await.unwrap().unwrap();
    judge_viewers(&c.name, &v, viewing);
    let status = c.fleet.op.status().await.unwrap();
    assert_eq!(
        (
            status.controller.release.0,
            status.cluster.release.0,
            status.cluster.schema.0
        ),
        (release, release, release),
        "{}",
        c.name
    );
    for n in &status.nodes {
        assert_eq!(
            (n.node.release.0, n.grant_now.as_str()),
            (release, "full"),
            "{}: {n:?}",
            c.name
        );
    }
    let records = stop_and_check(&mut c.fleet, &c.name).await;
    assert!(
        records.translated > 0,
        "{}: the old release's records land translated: {records:?}",
        c.name
    );
    c.fleet.stop_all().await.unwrap();
    Seen {
        viewers: v,
        records,
        upgrade,
    }
}
