//! `handover bench`: the figures the design is held against, each measured
//! next to the limit it is compared with, in the same run, on this machine.
//!
//! 1. drain — release-1 records queued by 8 nodes, pushed over the
//!    redundant channel to a release-2 controller (upcast, idempotent insert,
//!    commit, ack), against a raw batched insert of the same upcast rows.
//! 2. outbox — durable appends through the node's producer path
//!    (`Store::commit`) against a raw insert into the same kind of file.
//! 3. fence — N simulated nodes long-poll the watch; the time from the fence
//!    request until every one of them holds the fenced answer.
//! 4. storm — N registered nodes say hello at once after a controller restart.
//! 5. viewers — HLS playlists and segments served per second by one node,
//!    and viewer latency steady versus while that node switches release.
//! 6. memory — the controller with N connected nodes; an idle node.
//! 7. upgrade — the demo cluster's upgrade time minus its waiting for events.
//!
//! Every process is this binary, on 127.50-59.x.x, killed when dropped; every
//! data dir is in one temp dir removed at the end. Each figure is the median
//! of `--runs` runs; a ratio is the median of the per-run ratios.

use crate::fleet::Fleet;
use anyhow::{anyhow, bail, ensure, Context};
use clap::Args;
use handover_core::api::{ChannelSpec, EventSpec, RecordSummary, UpgradeRequest};
use handover_core::params::Group;
use handover_core::record::{self, v2::Kind, v3::Severity, AnyRecord, Observation};
use handover_core::wire::{Batch, BatchAck, GrantState, Hello, OutboxState, Role, Welcome};
use handover_core::{Grant, Release, ReleaseInfo, Schema};
use handover_store::Store as _;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Measure the design's limits on this machine and write docs/benchmarks.md.
///
/// Runs real processes of this binary on 127.50-59.x.x (a controller, nodes
/// under their supervisors, the demo cluster) and in-process simulated nodes
/// and viewers. Takes a few minutes in a release build; `--quick` runs tiny
/// sizes once (for the smoke test).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Runs per figure; each figure is the median [default: 3, 1 with --quick].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Tiny sizes (1,000 records per node, 100 nodes, one run): checks that
    /// every benchmark works, measures nothing worth keeping.
    #[arg(long)]
    pub quick: bool,
    /// Only these benchmarks: drain, outbox, fence, storm, viewers, memory, upgrade.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the markdown report goes (with the machine it ran on).
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const BENCHES: [&str; 7] = [
    "drain", "outbox", "fence", "storm", "viewers", "memory", "upgrade",
];

/// Keys `--json` always prints (null when the benchmark did not run).
pub const JSON_KEYS: [&str; 11] = [
    "drain.records_per_s",
    "drain.limit_records_per_s",
    "drain.ratio",
    "outbox.ratio",
    "fence.nodes_1000_ms",
    "fence.nodes_10000_ms",
    "storm.nodes_10000_ms",
    "viewers.segments_per_s",
    "memory.controller_10000_nodes_mib",
    "memory.node_idle_mib",
    "upgrade.overhead_ms",
];

// Addresses: 127.<subnet>.0.x for processes, 127.52.<wave>.x as the source
// addresses of simulated nodes (a fresh third octet per wave of connections,
// so no wave waits for the ports of the last one to leave TIME_WAIT).
const SUBNET_DRAIN: u8 = 50;
const SUBNET_FENCE: u8 = 51;
const SUBNET_SOURCES: u8 = 52;
const SUBNET_VIEWERS: u8 = 53;
const SUBNET_UPGRADE_SMALL: u8 = 57;
/// The demo also claims 59 for its manual run, which the bench skips.
const SUBNET_DEMO: u8 = 58;
/// Simulated nodes per source address (ephemeral ports are about 28,000).
const NODES_PER_SOURCE: usize = 2_000;

/// Connections set up at once while simulated nodes register.
const SETUP_CONCURRENCY: usize = 256;
/// Bounds on every wait in the bench, so nothing hangs.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const DEMO_TIMEOUT: Duration = Duration::from_secs(400);
/// The wait a node asks of a watch (`handover_node::session::WATCH_WAIT_MS`).
const WATCH_WAIT_MS: u64 = handover_node::session::WATCH_WAIT_MS;
/// Hello attempts per node in the storm; backoff as a node's (100 ms doubling to 2 s).
const STORM_ATTEMPTS_MAX: u32 = 12;
/// Bounds of the mini HTTP client's answers.
const HEADER_BYTES_MAX: usize = 16 << 10;
const BODY_BYTES_MAX: usize = 1 << 20;

/// Goals (from the issue "Benchmarks against the limits").
const GOAL_RATIO: f64 = 0.5;
const GOAL_FENCE_1000_MS: f64 = 250.0;
const GOAL_FENCE_10000_MS: f64 = 2_000.0;
const GOAL_STORM_MS: f64 = 2_000.0;
const GOAL_CONTROLLER_MIB: f64 = 256.0;
const GOAL_NODE_MIB: f64 = 20.0;
const GOAL_UPGRADE_OVERHEAD_MS: f64 = 10_000.0;

/// Figures measured before a fix, on the machine of docs/benchmarks.md, with
/// what changed; shown in the "before" column. (key, figure, note)
const BEFORE: &[(&str, &str, &str)] = &[
    (
        "drain.records_per_s",
        "66,055/s",
        "Before: `store_batch` sent SQLite one INSERT per record (sqlx runs each SQLite \
         connection on a thread of its own, so every statement is a round trip between \
         threads, which on this VM costs most when the cores are idle), copied each \
         record's JSON tree before reading it (`record::decode`), and committed every \
         request alone. Fixes: multi-row INSERTs of 100 records \
         (`sqlite::insert_rows`, shared by `store_batch` and the limit's \
         `insert_records`), records read in place (`v1::Record::deserialize(&Value)`), \
         batches group-committed like hellos (`SqliteStore::grouped`). Steps on this \
         machine: 66-69k/s, 156k/s with multi-row INSERTs, 163k/s reading in place, \
         169k/s with group commit. The limit as first measured (one INSERT per row) \
         swung between 22k/s and 117k/s with the machine's idleness, so it was no \
         limit; it uses the multi-row statement now.",
    ),
    (
        "storm.nodes_10000_ms",
        "8,696 ms",
        "Before: every hello committed its registration in a transaction of its own \
         (an fsync each, one at a time behind the writer lock), dropped the node's old \
         session by scanning every session (quadratic in the number of nodes), the \
         controller rebuilt its router for every new connection, and a controller \
         without its supervisor listened with a backlog of 1,024, so most of 10,000 \
         simultaneous connects waited in SYN retransmission (1 s, 3 s, 7 s). Fixes: \
         group commit of registrations (`SqliteStore::register_node`: whoever takes the \
         writer commits every hello waiting, one transaction), the old session removed \
         by key (`node_api::hello`), `into_make_service` (controller `serve_on`), backlog \
         4,096 as the supervisor's (`roles::listener`). Measured along the way: router \
         and session fixes alone 6,607 ms; all but group commit 7,163-7,864 ms; all \
         but the backlog 6,536 ms.",
    ),
    (
        "memory.controller_10000_nodes_mib",
        "351.4 MiB",
        "Before: `axum::serve(listener, router)` turns the `Router` into a service for \
         every accepted connection, which rebuilds its route table: about 9 KB per \
         connection on the controller's 30 routes (valgrind massif: 9.3 MB of 43 MB at \
         1,000 watching nodes). Fix: `router(state).into_make_service()` does it once. \
         What remains per watching node is mostly hyper's buffers (16 KiB read, 8 KiB \
         write, allocated but partly untouched).",
    ),
];

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sizes {
    pub drain_nodes: usize,
    pub drain_records_per_node: usize,
    /// Records per deliver request (the core's `ship::BATCH_RECORDS_MAX`).
    pub drain_batch_records: usize,
    pub raw_rows_per_transaction: usize,
    pub outbox_commits: usize,
    pub fence_small: usize,
    pub fence_large: usize,
    pub hls_phase_ms: u64,
    pub hls_loops: usize,
    pub paced_viewers: usize,
    pub steady_ms: u64,
}

const FULL: Sizes = Sizes {
    drain_nodes: 8,
    drain_records_per_node: 100_000,
    drain_batch_records: handover_core::ship::BATCH_RECORDS_MAX,
    raw_rows_per_transaction: 1_000,
    outbox_commits: 2_000,
    fence_small: 1_000,
    fence_large: 10_000,
    hls_phase_ms: 3_000,
    hls_loops: 16,
    paced_viewers: 20,
    steady_ms: 3_000,
};

const QUICK: Sizes = Sizes {
    drain_nodes: 8,
    drain_records_per_node: 1_000,
    drain_batch_records: handover_core::ship::BATCH_RECORDS_MAX,
    raw_rows_per_transaction: 1_000,
    outbox_commits: 50,
    fence_small: 50,
    fence_large: 100,
    hls_phase_ms: 500,
    hls_loops: 4,
    paced_viewers: 4,
    steady_ms: 500,
};

/// One run's figures, flat: "drain.records_per_s" → value.
type Figures = BTreeMap<String, f64>;

fn put(f: &mut Figures, key: &str, v: f64) {
    f.insert(key.to_owned(), v);
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    for name in &args.only {
        ensure!(
            BENCHES.contains(&name.as_str()),
            "--only {name:?}: the benchmarks are {}",
            BENCHES.join(", ")
        );
    }
    let selected = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!((1..=20).contains(&runs), "--runs is 1 to 20");
    let sizes = if args.quick { QUICK } else { FULL };
    let fd_limit = raise_fd_limit();
    let exe = std::env::current_exe().context("cannot find this binary to start processes")?;
    let tmp = tempfile::Builder::new()
        .prefix("handover-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let machine = Machine::read();
    let mut sources = Sources::default();
    let mut per_run: Vec<Figures> = Vec::new();
    let work = async {
        for r in 0..runs {
            let dir = tmp.path().join(format!("run{r}"));
            std::fs::create_dir_all(&dir)?;
            let mut f = Figures::new();
            let tag = format!("run {}/{runs}", r + 1);
            if selected("drain") {
                progress(&format!("{tag}: drain"));
                f.extend(drain(&exe, &dir, &sizes).await.context("drain")?);
            }
            if selected("outbox") {
                progress(&format!("{tag}: outbox"));
                f.extend(outbox(&dir, &sizes).await.context("outbox")?);
            }
            if selected("fence") || selected("storm") || selected("memory") {
                progress(&format!("{tag}: fence, storm, controller memory"));
                let got = fence_and_storm(&exe, &dir, &sizes, &mut sources, selected("fence"))
                    .await
                    .context("fence and storm")?;
                f.extend(got.into_iter().filter(|(k, _)| {
                    let bench = k.split('.').next().unwrap_or("");
                    selected(bench)
                }));
            }
            if selected("viewers") || selected("memory") {
                progress(&format!("{tag}: viewers, node memory"));
                let got = viewers(&exe, &dir, &sizes, selected("viewers"))
                    .await
                    .context("viewers")?;
                f.extend(got.into_iter().filter(|(k, _)| {
                    let bench = k.split('.').next().unwrap_or("");
                    selected(bench)
                }));
            }
            if selected("upgrade") {
                progress(&format!("{tag}: upgrade overhead"));
                let got = if args.quick {
                    upgrade_small(&exe, &dir).await
                } else {
                    upgrade_demo(&exe, &dir).await
                };
                f.extend(got.context("upgrade")?);
            }
            per_run.push(f);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every process started is stopped"),
    }
    let summary = summarize(&per_run);
    let report = Report {
        machine,
        runs,
        quick: args.quick,
        sizes,
        fd_limit,
        elapsed_s: started.elapsed().as_secs_f64(),
        summary,
        per_run,
    };
    let md = render_markdown(&report);
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&args.out, &md)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    progress(&format!(
        "report written to {} ({:.0} s)",
        args.out.display(),
        report.elapsed_s
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}

// ---------------------------------------------------------------- machine

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub date: String,
    pub build: &'static str,
    /// /proc/loadavg when the bench started: other work on the machine
    /// shares its cores.
    pub load_average: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
            .max(1);
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| format!("Linux {}", k.trim()))
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cores,
            memory_mib,
            cpu_model,
            kernel,
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }
}

/// Raises this process's file-descriptor limit to its hard limit (children
/// inherit it); returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    use nix::libc;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain FFI calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// VmRSS of a process, in MiB.
fn vmrss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb / 1024.0)
}

// ---------------------------------------------------------------- sources

/// Source addresses for waves of simulated nodes.
#[derive(Default)]
struct Sources {
    wave: u8,
}

impl Sources {
    fn next_wave(&mut self, nodes: usize) -> anyhow::Result<Vec<Ipv4Addr>> {
        self.wave = self
            .wave
            .checked_add(1)
            .filter(|w| *w < 255)
            .context("out of source-address waves (lower --runs)")?;
        let n = nodes.div_ceil(NODES_PER_SOURCE).max(1);
        ensure!(n < 250, "too many simulated nodes for one wave");
        Ok((0..n)
            .map(|i| Ipv4Addr::new(127, SUBNET_SOURCES, self.wave, 1 + i as u8))
            .collect())
    }
}

fn source_of(sources: &[Ipv4Addr], k: usize) -> Ipv4Addr {
    sources[(k / NODES_PER_SOURCE).min(sources.len() - 1)]
}

// ---------------------------------------------------------------- mini HTTP/1.1

/// One keep-alive HTTP/1.1 connection, about 2 KiB: enough to hold 10,000
/// simulated nodes' long-polls in one process.
struct Http1 {
    io: BufReader<TcpStream>,
    host: String,
}

impl Http1 {
    async fn connect(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<Http1> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((from, 0)))?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(Http1 {
            io: BufReader::with_capacity(2048, stream),
            host: to.to_string(),
        })
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        if let Some(b) = bearer {
            let _ = write!(head, "authorization: Bearer {b}\r\n");
        }
        if method != "GET" {
            let _ = write!(
                head,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.io.get_mut().write_all(&out).await?;

        let mut budget = 0usize;
        let mut line = Vec::new();
        self.line(&mut line, &mut budget).await?;
        let status: u16 = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", String::from_utf8_lossy(&line)))?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        loop {
            self.line(&mut line, &mut budget).await?;
            if line.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some((name, value)) = text.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    length = Some(value.parse().context("bad content-length")?);
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                self.line(&mut line, &mut budget).await?;
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&line)
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .context("bad chunk size")?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        self.line(&mut line, &mut budget).await?;
                        if line.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                ensure!(body.len() + size <= BODY_BYTES_MAX, "answer too large");
                let at = body.len();
                body.resize(at + size, 0);
                self.io.read_exact(&mut body[at..]).await?;
                self.line(&mut line, &mut budget).await?;
            }
        } else {
            let n = length.unwrap_or(0);
            ensure!(n <= BODY_BYTES_MAX, "answer too large");
            body.resize(n, 0);
            self.io.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }

    /// One header line without its CRLF; the header budget bounds them all.
    async fn line(&mut self, buf: &mut Vec<u8>, budget: &mut usize) -> anyhow::Result<()> {
        buf.clear();
        let n = self.io.read_until(b'\n', buf).await?;
        ensure!(n > 0, "connection closed by the controller");
        *budget += n;
        ensure!(*budget <= HEADER_BYTES_MAX, "answer headers too large");
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        Ok(())
    }
}

fn hello_body(node_id: &str, token: &str, release: u32, group: &str) -> anyhow::Result<Vec<u8>> {
    let info = ReleaseInfo::of(Release(release))?;
    Ok(serde_json::to_vec(&Hello {
        v: handover_core::wire::MESSAGE_VERSION,
        node_id: node_id.to_owned(),
        token: token.to_owned(),
        release: info.release,
        schema: info.schema,
        protocol: info.protocol,
        role: Role::Primary,
        group: group.to_owned(),
        hls_url: "http://127.50.255.1:9".to_owned(),
        outbox: OutboxState::default(),
        current_events: vec![],
        param_revision: None,
        staged: vec![],
        binary_sha256: None,
        supervisor_sha256: None,
    })?)
}

fn parse<T: serde::de::DeserializeOwned>(
    status: u16,
    body: &[u8],
    what: &str,
) -> anyhow::Result<T> {
    ensure!(
        status == 200,
        "{what}: controller answered {status}: {}",
        String::from_utf8_lossy(body)
            .chars()
            .take(300)
            .collect::<String>()
    );
    serde_json::from_slice(body).with_context(|| format!("{what}: unexpected answer"))
}

// ---------------------------------------------------------------- statistics

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The q-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(runs: &[Figures]) -> BTreeMap<String, Stat> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for f in runs {
        for (k, v) in f {
            all.entry(k.clone()).or_default().push(*v);
        }
    }
    all.into_iter()
        .map(|(k, mut v)| {
            let n = v.len();
            let m = median(&mut v);
            let (min, max) = (v[0], v[n - 1]);
            (
                k,
                Stat {
                    median: m,
                    min,
                    max,
                    n,
                },
            )
        })
        .collect()
}

// ---------------------------------------------------------------- 1. drain

fn drain_observation(k: usize, base_ms: i64) -> Observation {
    let kind = match k % 50 {
        0 => Kind::ViewerStats,
        25 => Kind::Alert,
        _ => Kind::SegmentPublished,
    };
    let seg = kind == Kind::SegmentPublished;
    Observation {
        kind,
        channel: "ch1".into(),
        channel_id: Some(1),
        at_ms: base_ms + (k as i64) * 20,
        media_seq: seg.then_some(k as u64),
        duration_ms: seg.then_some(1000),
        viewers: (kind == Kind::ViewerStats).then_some((k % 997) as u32),
        event_id: None,
        // Brings a release-1 record to about 200 bytes of JSON.
        message: Some(format!(
            "segment {k:08} of ch1 ready at 1080p/6000 kbps, 720p/3000 kbps, 480p/1200 kbps; origin ok; cdn purge queued"
        )),
        severity: (kind == Kind::Alert).then_some(Severity::Warning),
    }
}

/// Serialised batches, each with its first sequence number.
type Batches = Vec<(u64, Vec<u8>)>;

/// Batches of release-1 records of one node, serialised as the shipper sends them.
fn drain_batches(
    node_id: &str,
    epoch: u64,
    records: usize,
    per_batch: usize,
    base_ms: i64,
) -> anyhow::Result<(Batches, usize)> {
    let mut out = Vec::new();
    let mut record_bytes = 0usize;
    let mut first = 0usize;
    while first < records {
        let n = per_batch.min(records - first);
        let mut values = Vec::with_capacity(n);
        for k in first..first + n {
            let v = record::encode(Schema(1), node_id, &drain_observation(k, base_ms))?;
            record_bytes += v.to_string().len();
            values.push(v);
        }
        let batch = Batch {
            v: handover_core::wire::MESSAGE_VERSION,
            node_id: node_id.to_owned(),
            epoch,
            schema: Schema(1),
            first_seq: first as u64 + 1,
            records: values,
        };
        out.push(((first + n) as u64, serde_json::to_vec(&batch)?));
        first += n;
    }
    Ok((out, record_bytes))
}

async fn drain(exe: &Path, dir: &Path, s: &Sizes) -> anyhow::Result<Figures> {
    let mut fleet = Fleet::new(exe, &dir.join("drain"), SUBNET_DRAIN)?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let spec = ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: 1000,
        ladder: vec![],
        window_segments: None,
    };
    let _: Value = fleet.op.post("/api/v1/channels", &spec).await?;
    let base_ms = crate::client::now_ms();
    let url = fleet.controller_url();
    let total = s.drain_nodes * s.drain_records_per_node;

    // Every node says hello as release 1 and gets `deliver`; its batches are
    // built before the clock starts (a node reads them from its outbox).
    let mut clients = Vec::new();
    let mut record_bytes = 0usize;
    for i in 0..s.drain_nodes {
        let node_id = format!("drain-{i}");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(ANSWER_TIMEOUT)
            .build()?;
        let hello = hello_body(&node_id, &fleet.join_token, 1, "drain")?;
        let r = http
            .post(format!("{url}/node/v1/hello"))
            .header("content-type", "application/json")
            .body(hello)
            .send()
            .await?;
        let status = r.status().as_u16();
        let w: Welcome = parse(status, &r.bytes().await?, "hello")?;
        ensure!(
            w.grant == Grant::Deliver,
            "a release-1 node got grant {} from a release-2 controller, not deliver",
            w.grant
        );
        let (batches, bytes) = drain_batches(
            &node_id,
            w.epoch,
            s.drain_records_per_node,
            s.drain_batch_records,
            base_ms,
        )?;
        record_bytes += bytes;
        clients.push((http, w.credential, batches));
    }

    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (http, credential, batches) in clients {
        let mut go = go_rx.clone();
        let endpoint = format!("{url}/node/v1/deliver");
        tasks.spawn(async move {
            go.wait_for(|g| *g).await?;
            // One batch at a time, like the shipper: the next goes after the ack.
            for (last, body) in batches {
                let r = http
                    .post(&endpoint)
                    .bearer_auth(&credential)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let ack: BatchAck = parse(status, &r.bytes().await?, "deliver")?;
                ensure!(
                    ack.acked_through == last,
                    "acked through {} instead of {last}",
                    ack.acked_through
                );
            }
            anyhow::Ok(Instant::now())
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    go_tx.send_replace(true);
    let mut last_ack = t0;
    while let Some(r) = tasks.join_next().await {
        last_ack = last_ack.max(r??);
    }
    let elapsed = last_ack - t0;
    let summary: Vec<RecordSummary> = fleet.op.get("/api/v1/records/summary").await?;
    let stored: u64 = summary.iter().map(|r| r.records).sum();
    let translated: u64 = summary.iter().map(|r| r.translated).sum();
    ensure!(
        stored == total as u64 && translated == total as u64,
        "the database holds {stored} records ({translated} translated), expected {total}"
    );
    fleet.stop_all().await?;

    let limit = drain_limit(dir, s, base_ms).await?;
    let rate = total as f64 / elapsed.as_secs_f64();
    let mut f = Figures::new();
    put(&mut f, "drain.records_per_s", rate);
    put(&mut f, "drain.limit_records_per_s", limit);
    put(&mut f, "drain.ratio", rate / limit);
    put(&mut f, "drain.records", total as f64);
    put(
        &mut f,
        "drain.record_bytes",
        record_bytes as f64 / total as f64,
    );
    put(&mut f, "drain.elapsed_ms", ms(elapsed));
    Ok(f)
}

/// The same rows, upcast beforehand, inserted by one in-process writer into a
/// fresh release-2 database, one transaction per `raw_rows_per_transaction`.
async fn drain_limit(dir: &Path, s: &Sizes, base_ms: i64) -> anyhow::Result<f64> {
    let d = dir.join("drain-limit");
    std::fs::create_dir_all(&d)?;
    let store = handover_store::sqlite::SqliteStore::open(
        &d.join("controller.db"),
        Release(2),
        &d.join("snapshots"),
    )
    .await?;
    store
        .create_channel(&ChannelSpec {
            name: "ch1".into(),
            title: None,
            segment_ms: 1000,
            ladder: vec![],
            window_segments: None,
        })
        .await?;
    let (directory, _) = store.channel_directory().await?;
    let mut spent = Duration::ZERO;
    let mut rows = 0usize;
    for i in 0..s.drain_nodes {
        let node_id = format!("drain-{i}");
        let upcast: Vec<AnyRecord> = (0..s.drain_records_per_node)
            .map(|k| {
                let raw = record::encode(Schema(1), &node_id, &drain_observation(k, base_ms))?;
                record::upcast(Schema(1), Schema(2), &raw, &node_id, &directory)
            })
            .collect::<Result<_, _>>()?;
        for (c, chunk) in upcast.chunks(s.raw_rows_per_transaction).enumerate() {
            let first_seq = (c * s.raw_rows_per_transaction) as u64 + 1;
            let t = Instant::now();
            let n = store
                .insert_records(&node_id, first_seq, chunk, Some(1))
                .await?;
            spent += t.elapsed();
            rows += usize::try_from(n).unwrap_or(0);
        }
    }
    ensure!(
        rows == s.drain_nodes * s.drain_records_per_node,
        "raw insert stored {rows}"
    );
    Ok(rows as f64 / spent.as_secs_f64())
}

// ---------------------------------------------------------------- 2. outbox

/// What the producer commits in one tick of a node running two channels, at
/// a second boundary: a segment and viewer stats per channel, and the
/// progress rows (`producer::tick_commit`).
fn tick_commit(node_id: &str, tick: usize) -> anyhow::Result<handover_node::store::Commit> {
    use handover_node::store::{keys, Commit, NewRecord};
    let mut c = Commit::default();
    let at_ms = 1_800_000_000_000 + (tick as i64) * 1000;
    for (ch, id) in [("ch1", 1i64), ("ch2", 2)] {
        let seg = Observation {
            kind: Kind::SegmentPublished,
            channel: ch.into(),
            channel_id: Some(id),
            at_ms,
            media_seq: Some(tick as u64),
            duration_ms: Some(1000),
            viewers: None,
            event_id: Some(id),
            message: None,
            severity: None,
        };
        let stats = Observation {
            kind: Kind::ViewerStats,
            media_seq: None,
            duration_ms: None,
            viewers: Some(40),
            event_id: None,
            ..seg.clone()
        };
        c.records.push(NewRecord::encode(Schema(2), node_id, &seg)?);
        c.records
            .push(NewRecord::encode(Schema(2), node_id, &stats)?);
        c.put.push((
            keys::progress(id),
            format!(
                r#"{{"started":true,"finished":false,"last_seq":{tick},"end_ms":1800003600000}}"#
            ),
        ));
    }
    c.put.push((
        keys::LAST_STATS_SECOND.to_owned(),
        (at_ms / 1000 - 1).to_string(),
    ));
    Ok(c)
}

fn single_commit(node_id: &str, k: usize) -> anyhow::Result<handover_node::store::Commit> {
    use handover_node::store::{Commit, NewRecord};
    let o = Observation {
        kind: Kind::Alert,
        channel: "ch1".into(),
        channel_id: Some(1),
        at_ms: 1_800_000_000_000 + k as i64,
        media_seq: None,
        duration_ms: None,
        viewers: None,
        event_id: None,
        message: Some(format!("alert {k}")),
        severity: Some(Severity::Warning),
    };
    Ok(Commit {
        records: vec![NewRecord::encode(Schema(2), node_id, &o)?],
        ..Commit::default()
    })
}

async fn outbox(dir: &Path, s: &Sizes) -> anyhow::Result<Figures> {
    use handover_node::store::{RawOutbox, Store};
    let mut f = Figures::new();
    let mut ratios = Vec::new();
    for name in ["tick", "single"] {
        let commits = (0..s.outbox_commits)
            .map(|k| {
                if name == "tick" {
                    tick_commit("bench-node", k)
                } else {
                    single_commit("bench-node", k)
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let records: usize = commits.iter().map(|c| c.records.len()).sum();

        let store = Store::open(&dir.join(format!("outbox-{name}"))).await?;
        let t = Instant::now();
        for c in &commits {
            store.commit(c).await?;
        }
        let spent = t.elapsed();
        store.close().await;

        let mut raw = RawOutbox::open(&dir.join(format!("outbox-{name}-raw"))).await?;
        let t = Instant::now();
        for c in &commits {
            raw.append(&c.records).await?;
        }
        let raw_spent = t.elapsed();
        raw.close().await;

        let rate = records as f64 / spent.as_secs_f64();
        let limit = records as f64 / raw_spent.as_secs_f64();
        ratios.push(rate / limit);
        put(&mut f, &format!("outbox.{name}_per_s"), rate);
        put(&mut f, &format!("outbox.{name}_limit_per_s"), limit);
        put(&mut f, &format!("outbox.{name}_ratio"), rate / limit);
        put(
            &mut f,
            &format!("outbox.{name}_records_per_commit"),
            records as f64 / commits.len() as f64,
        );
    }
    put(
        &mut f,
        "outbox.ratio",
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
    );
    Ok(f)
}

// ---------------------------------------------------------------- 3, 4, 6. fence, storm, memory

struct Registered {
    node_id: String,
    credential: String,
}

struct FenceWave {
    latencies_ms: Vec<f64>,
    total_ms: f64,
    answer_ms: f64,
    controller_mib: f64,
    setup_ms: f64,
    registered: Vec<Registered>,
}

/// `n` simulated nodes say hello (distinct ids, release 2, grant `full`),
/// then all long-poll the watch as a node does; once they wait, the operator
/// fences. Latency per node: from the fence request to its fenced answer.
async fn fence_wave(
    fleet: &Fleet,
    n: usize,
    sources: &[Ipv4Addr],
    settle: Duration,
) -> anyhow::Result<FenceWave> {
    let addr = fleet.controller_addr();
    let setup_started = Instant::now();
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let ready = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for k in 0..n {
        let node_id = format!("n{k:05}");
        let hello = hello_body(&node_id, &fleet.join_token, 2, "fence")?;
        let (sem, ready, mut go) = (sem.clone(), ready.clone(), go_rx.clone());
        let from = source_of(sources, k);
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await?;
            let mut c = Http1::connect(from, addr)
                .await
                .with_context(|| format!("connect from {from}"))?;
            let (st, body) = c.call("POST", "/node/v1/hello", None, &hello).await?;
            let w: Welcome = parse(st, &body, "hello")?;
            drop(permit);
            ready.fetch_add(1, Ordering::SeqCst);
            go.wait_for(|g| *g).await?;
            let path = format!(
                "/node/v1/watch?node={node_id}&epoch={}&grant={}&wait_ms={WATCH_WAIT_MS}&desired_rev={}",
                w.epoch,
                w.grant.as_str(),
                w.desired_rev
            );
            let (st, body) = c.call("GET", &path, Some(&w.credential), &[]).await?;
            let at = Instant::now();
            let gs: GrantState = parse(st, &body, "watch")?;
            anyhow::Ok((at, gs.grant, Registered { node_id, credential: w.credential }))
        });
    }
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while ready.load(Ordering::SeqCst) < n {
        if let Some(r) = tasks.try_join_next() {
            r??;
            bail!("a simulated node answered before the fence");
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} simulated nodes said hello within {SETUP_TIMEOUT:?}",
            ready.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    go_tx.send_replace(true);
    tokio::time::sleep(settle).await;
    if let Some(r) = tasks.try_join_next() {
        r??;
        bail!("a watch answered before the fence (raise the settle time?)");
    }
    let setup_ms = ms(setup_started.elapsed());
    let pid = fleet
        .controller
        .as_ref()
        .and_then(|p| p.pid())
        .context("no controller")?;
    let controller_mib = vmrss_mib(pid.as_raw().unsigned_abs())?;

    let t0 = Instant::now();
    let _: Value = fleet.op.post("/api/v1/fence", &json!({})).await?;
    let answer_ms = ms(t0.elapsed());
    let mut latencies_ms = Vec::with_capacity(n);
    let mut registered = Vec::with_capacity(n);
    let joined = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            let (at, grant, reg) = r??;
            ensure!(grant == Grant::Fenced, "a watcher got {grant}, not fenced");
            latencies_ms.push(ms(at.saturating_duration_since(t0)));
            registered.push(reg);
        }
        anyhow::Ok(())
    })
    .await;
    joined.map_err(|_| anyhow!("not every watcher was fenced within {ANSWER_TIMEOUT:?}"))??;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(FenceWave {
        total_ms: latencies_ms.last().copied().unwrap_or(0.0),
        latencies_ms,
        answer_ms,
        controller_mib,
        setup_ms,
        registered,
    })
}

/// Every registered node says hello at once with its own credential, as
/// nodes do after a controller restart; done when every one holds a grant.
async fn storm_wave(
    fleet: &Fleet,
    nodes: &[Registered],
    sources: &[Ipv4Addr],
) -> anyhow::Result<(f64, u64)> {
    let addr = fleet.controller_addr();
    let (go_tx, go_rx) = watch::channel(false);
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for (k, node) in nodes.iter().enumerate() {
        let hello = hello_body(&node.node_id, &node.credential, 2, "fence")?;
        let mut go = go_rx.clone();
        let from = source_of(sources, k);
        let retries = retries.clone();
        tasks.spawn(async move {
            go.wait_for(|g| *g).await?;
            let mut backoff = Duration::from_millis(100);
            let mut last_error = None;
            for _ in 0..STORM_ATTEMPTS_MAX {
                let attempt = async {
                    let mut c = Http1::connect(from, addr).await?;
                    let (st, body) = c.call("POST", "/node/v1/hello", None, &hello).await?;
                    parse::<Welcome>(st, &body, "hello")
                };
                match attempt.await {
                    Ok(w) => return anyhow::Ok((Instant::now(), w.grant)),
                    Err(e) => last_error = Some(e),
                }
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(last_error.unwrap_or_else(|| anyhow!("no attempt")))
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    go_tx.send_replace(true);
    let mut last = t0;
    let joined = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            let (at, grant) = r??;
            ensure!(grant == Grant::Full, "a node got {grant} after the restart");
            last = last.max(at);
        }
        anyhow::Ok(())
    })
    .await;
    joined.map_err(|_| anyhow!("not every node was welcomed within {ANSWER_TIMEOUT:?}"))??;
    Ok((ms(last - t0), retries.load(Ordering::Relaxed)))
}

async fn fence_and_storm(
    exe: &Path,
    dir: &Path,
    s: &Sizes,
    sources: &mut Sources,
    fence_small: bool,
) -> anyhow::Result<Figures> {
    let mut f = Figures::new();
    let settle = |n: usize| Duration::from_millis(300 + (n as u64) / 10);
    let record = |f: &mut Figures, label: &str, w: &FenceWave| {
        put(f, &format!("fence.{label}_ms"), w.total_ms);
        put(
            f,
            &format!("fence.{label}_p50_ms"),
            quantile(&w.latencies_ms, 0.5),
        );
        put(
            f,
            &format!("fence.{label}_p99_ms"),
            quantile(&w.latencies_ms, 0.99),
        );
        put(f, &format!("fence.{label}_max_ms"), w.total_ms);
        put(f, &format!("fence.{label}_fence_answer_ms"), w.answer_ms);
        put(f, &format!("fence.{label}_setup_ms"), w.setup_ms);
        put(
            f,
            &format!("fence.{label}_count"),
            w.latencies_ms.len() as f64,
        );
    };
    if fence_small {
        let mut fleet = Fleet::new(exe, &dir.join("fence-small"), SUBNET_FENCE)?;
        fleet.supervised = false;
        fleet.start_controller(2).await?;
        let src = sources.next_wave(s.fence_small)?;
        let w = fence_wave(&fleet, s.fence_small, &src, settle(s.fence_small)).await?;
        record(&mut f, "nodes_1000", &w);
        fleet.stop_all().await?;
    }

    let mut fleet = Fleet::new(exe, &dir.join("fence-large"), SUBNET_FENCE)?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let src = sources.next_wave(s.fence_large)?;
    let w = fence_wave(&fleet, s.fence_large, &src, settle(s.fence_large)).await?;
    record(&mut f, "nodes_10000", &w);
    put(
        &mut f,
        "memory.controller_10000_nodes_mib",
        w.controller_mib,
    );
    put(&mut f, "memory.controller_nodes", s.fence_large as f64);

    // Storm: lift the fence, restart the controller, every node at once.
    let _: Value = fleet.op.post("/api/v1/unfence", &json!({})).await?;
    let mut controller = fleet.controller.take().context("no controller")?;
    controller.terminate().await?;
    fleet.start_controller(2).await?;
    let src = sources.next_wave(s.fence_large)?;
    let (storm_ms, retries) = storm_wave(&fleet, &w.registered, &src).await?;
    put(&mut f, "storm.nodes_10000_ms", storm_ms);
    put(&mut f, "storm.nodes", w.registered.len() as f64);
    put(&mut f, "storm.retries", retries as f64);
    fleet.stop_all().await?;
    Ok(f)
}

// ---------------------------------------------------------------- 5, 6. viewers, node memory

/// The URI of the newest segment in a media playlist.
fn newest_segment(playlist: &str) -> Option<&str> {
    playlist
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
}

async fn get_text(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.get(url).send().await?;
    ensure!(r.status().is_success(), "GET {url}: {}", r.status());
    Ok(r.text().await?)
}

/// Requests per second of `loops` tight loops GETting `url` for `phase`.
async fn hls_rate(
    http: &reqwest::Client,
    url: &str,
    loops: usize,
    phase: Duration,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..loops {
        let (http, url, count) = (http.clone(), url.to_owned(), count.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let r = http.get(&url).send().await?;
                ensure!(r.status().is_success(), "GET {url}: {}", r.status());
                r.bytes().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    ms: f64,
    ok: bool,
}

/// Viewers that fetch the playlist and its newest segment every 100 ms
/// until `stop`, recording every request.
fn paced_viewers(
    http: &reqwest::Client,
    base: &str,
    viewers: usize,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for i in 0..viewers {
        let (http, stop, samples) = (http.clone(), stop.clone(), samples.clone());
        let playlist = format!("{base}/hls/ch1/index.m3u8");
        let base = base.to_owned();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100 * i as u64 / viewers as u64)).await;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let text = get_text(&http, &playlist).await;
                let mut got = vec![Sample {
                    at: t,
                    ms: ms(t.elapsed()),
                    ok: text.is_ok(),
                }];
                if let Some(seg) = text.as_deref().ok().and_then(newest_segment) {
                    let t = Instant::now();
                    let ok = match http.get(format!("{base}/hls/ch1/{seg}")).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    got.push(Sample {
                        at: t,
                        ms: ms(t.elapsed()),
                        ok,
                    });
                }
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(got);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    tasks
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        ensure!(Instant::now() < deadline, "{what} not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A release-1 node under its supervisor, serving one live channel, whose
/// controller was then restarted as release 2 (so the node runs on `deliver`
/// from its cache, as in an upgrade's deliver phase). Figures: the node's
/// idle memory, HLS throughput, viewer p99 steady and during its switch to
/// release 2 (through the supervisor's control socket).
async fn viewers(exe: &Path, dir: &Path, s: &Sizes, load: bool) -> anyhow::Result<Figures> {
    let mut f = Figures::new();
    let mut fleet = Fleet::new(exe, &dir.join("viewers"), SUBNET_VIEWERS)?;
    fleet.supervised = false;
    fleet.start_controller(1).await?;
    let group = Group {
        name: "g1".into(),
        primary: "v-a".into(),
        backup: "v-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await?;
    let spec = ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: 1000,
        ladder: vec![],
        window_segments: None,
    };
    let _: Value = fleet.op.post("/api/v1/channels", &spec).await?;
    let ev = EventSpec {
        channel: "ch1".into(),
        group: "g1".into(),
        start_ms: crate::client::now_ms() + 500,
        duration_ms: 3_600_000,
    };
    let _: Value = fleet.op.post("/api/v1/events", &ev).await?;
    fleet.supervised = true;
    let i = fleet.add_node("v-a", Role::Primary, "g1", 1);
    fleet.start_node(i).await?;
    let base = fleet.nodes[i].url();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let playlist = format!("{base}/hls/ch1/index.m3u8");
    wait_until("the node's first playlist", Duration::from_secs(15), || {
        let (http, playlist) = (&http, &playlist);
        async move { get_text(http, playlist).await.is_ok() }
    })
    .await?;

    // The controller becomes release 2; the node keeps serving on `deliver`.
    let mut controller = fleet.controller.take().context("no controller")?;
    controller.terminate().await?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let status_url = format!("{base}/status");
    wait_until(
        "grant deliver for the release-1 node",
        Duration::from_secs(15),
        || {
            let (http, status_url) = (&http, &status_url);
            async move {
                match get_text(http, status_url).await {
                    Ok(t) => {
                        serde_json::from_str::<Value>(&t).is_ok_and(|v| v["grant"] == "deliver")
                    }
                    Err(_) => false,
                }
            }
        },
    )
    .await?;
    let sock = fleet.nodes[i]
        .data_dir
        .join("supervisor")
        .join("control.sock");
    let supervisor = handover_supervisor::SupervisorClient::new(
        &sock,
        handover_supervisor::DEFAULT_READY_TIMEOUT_MS,
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let worker = supervisor
        .status()
        .await?
        .active_pid
        .context("the node's supervisor runs no worker")?;
    put(&mut f, "memory.node_idle_mib", vmrss_mib(worker)?);

    if load {
        let phase = Duration::from_millis(s.hls_phase_ms);
        let playlists = hls_rate(&http, &playlist, s.hls_loops, phase).await?;
        let text = get_text(&http, &playlist).await?;
        let seg = newest_segment(&text).context("empty playlist")?;
        let seg_url = format!("{base}/hls/ch1/{seg}");
        let segments = hls_rate(&http, &seg_url, s.hls_loops, phase).await?;
        put(&mut f, "viewers.playlists_per_s", playlists);
        put(&mut f, "viewers.segments_per_s", segments);
        let seg_bytes = http.get(&seg_url).send().await?.bytes().await?.len();
        put(&mut f, "viewers.segment_bytes", seg_bytes as f64);

        // Steady, then the switch to release 2 under the same viewers.
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let steady_from = Instant::now();
        let mut tasks = paced_viewers(&http, &base, s.paced_viewers, stop.clone(), samples.clone());
        tokio::time::sleep(Duration::from_millis(s.steady_ms)).await;
        let switch_from = Instant::now();
        let outcome = supervisor
            .switch(&handover_supervisor::Release::new(2, exe))
            .await?;
        let switch_ms = ms(switch_from.elapsed());
        ensure!(
            matches!(outcome, handover_supervisor::SwitchOutcome::Switched { .. }),
            "the switch to release 2 did not happen: {outcome:?}"
        );
        // The old worker finishes its requests and exits after the switch.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let switch_until = Instant::now();
        stop.store(true, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        let all = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let window = |from: Instant, to: Instant| {
            let mut v: Vec<f64> = all
                .iter()
                .filter(|x| x.at >= from && x.at < to && x.ok)
                .map(|x| x.ms)
                .collect();
            v.sort_by(f64::total_cmp);
            let failed = all
                .iter()
                .filter(|x| x.at >= from && x.at < to && !x.ok)
                .count();
            (v, failed)
        };
        let (steady, steady_failed) = window(steady_from, switch_from);
        let (during, during_failed) = window(switch_from, switch_until);
        put(&mut f, "viewers.steady_p99_ms", quantile(&steady, 0.99));
        put(&mut f, "viewers.switch_p99_ms", quantile(&during, 0.99));
        put(
            &mut f,
            "viewers.switch_max_ms",
            during.last().copied().unwrap_or(0.0),
        );
        put(&mut f, "viewers.switch_ms", switch_ms);
        put(
            &mut f,
            "viewers.switch_requests",
            (during.len() + during_failed) as f64,
        );
        put(
            &mut f,
            "viewers.failed_requests",
            (steady_failed + during_failed) as f64,
        );
        let active = supervisor.status().await?.active.release;
        ensure!(
            active == 2,
            "after the switch the node runs release {active}"
        );
    }
    fleet.stop_all().await?;
    Ok(f)
}

// ---------------------------------------------------------------- 7. upgrade

/// `handover demo --json --skip-naive` as a child: the demo cluster's
/// upgrade, total minus waiting for events to end.
async fn upgrade_demo(exe: &Path, dir: &Path) -> anyhow::Result<Figures> {
    let log = std::fs::File::create(dir.join("demo.log"))?;
    let child = tokio::process::Command::new(exe)
        .args(["demo", "--json", "--skip-naive", "--subnet"])
        .arg(SUBNET_DEMO.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the demo")?;
    let out = tokio::time::timeout(DEMO_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("the demo did not finish within {DEMO_TIMEOUT:?}"))??;
    ensure!(
        out.status.success(),
        "the demo failed ({}); see {}",
        out.status,
        dir.join("demo.log").display()
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("the demo's JSON")?;
    let u = &v["upgrade"];
    ensure!(
        u["outcome"] == "finalized",
        "the demo's upgrade ended {}",
        u["outcome"]
    );
    let total = u["total_ms"].as_f64().context("upgrade.total_ms")?;
    let waiting = u["waiting_for_operations_ms"]
        .as_f64()
        .context("upgrade.waiting_for_operations_ms")?;
    let mut f = Figures::new();
    put(&mut f, "upgrade.overhead_ms", total - waiting);
    put(&mut f, "upgrade.total_ms", total);
    put(&mut f, "upgrade.waiting_ms", waiting);
    Ok(f)
}

/// `--quick`: one group of two supervised nodes with a 3 s event, upgraded
/// to release 2 with the default policy (the demo takes about a minute).
async fn upgrade_small(exe: &Path, dir: &Path) -> anyhow::Result<Figures> {
    let mut fleet = Fleet::new(exe, &dir.join("upgrade"), SUBNET_UPGRADE_SMALL)?;
    fleet.start_controller(1).await?;
    let artifact = fleet.upload_artifact(2).await?;
    let group = Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await?;
    let spec = ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: 1000,
        ladder: vec![],
        window_segments: None,
    };
    let _: Value = fleet.op.post("/api/v1/channels", &spec).await?;
    let ev = EventSpec {
        channel: "ch1".into(),
        group: "g1".into(),
        start_ms: crate::client::now_ms() + 1_000,
        duration_ms: 3_000,
    };
    let _: Value = fleet.op.post("/api/v1/events", &ev).await?;
    fleet.add_node("g1-a", Role::Primary, "g1", 1);
    fleet.add_node("g1-b", Role::Backup, "g1", 1);
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await?;
    }
    fleet.wait_nodes_registered().await?;
    crate::upgrade::start(&fleet.op, &UpgradeRequest::new(&artifact, "wait")).await?;
    let s = fleet.wait_upgrade_over(Duration::from_secs(120)).await?;
    fleet.stop_all().await?;
    let up = s.upgrade.context("the controller lost the upgrade")?;
    ensure!(
        up.status == handover_core::upgrade::Status::Finalized,
        "the upgrade ended {:?}",
        up.status
    );
    let total = up
        .ended_ms
        .unwrap_or(up.started_ms)
        .saturating_sub(up.started_ms) as f64;
    let waiting = up.waiting_for_operations_ms as f64;
    let mut f = Figures::new();
    put(&mut f, "upgrade.overhead_ms", total - waiting);
    put(&mut f, "upgrade.total_ms", total);
    put(&mut f, "upgrade.waiting_ms", waiting);
    Ok(f)
}

// ---------------------------------------------------------------- report

pub struct Report {
    pub machine: Machine,
    pub runs: usize,
    pub quick: bool,
    pub sizes: Sizes,
    pub fd_limit: u64,
    pub elapsed_s: f64,
    pub summary: BTreeMap<String, Stat>,
    pub per_run: Vec<Figures>,
}

fn round3(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn report_json(r: &Report) -> Value {
    let mut root = serde_json::Map::new();
    let set = |root: &mut serde_json::Map<String, Value>, key: &str, v: Value| {
        let (group, name) = key.split_once('.').unwrap_or(("other", key));
        let obj = root.entry(group.to_owned()).or_insert_with(|| json!({}));
        if let Some(o) = obj.as_object_mut() {
            o.insert(name.to_owned(), v);
        }
    };
    for key in JSON_KEYS {
        set(&mut root, key, Value::Null);
    }
    for (key, stat) in &r.summary {
        set(&mut root, key, round3(stat.median));
    }
    root.insert("machine".into(), json!(r.machine));
    root.insert("runs".into(), json!(r.runs));
    root.insert("quick".into(), json!(r.quick));
    root.insert("sizes".into(), json!(r.sizes));
    root.insert("elapsed_s".into(), round3(r.elapsed_s));
    root.insert(
        "per_run".into(),
        Value::Array(
            r.per_run
                .iter()
                .map(|f| Value::Object(f.iter().map(|(k, v)| (k.clone(), round3(*v))).collect()))
                .collect(),
        ),
    );
    Value::Object(root)
}

/// 12345.6 → "12,346".
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

struct Row {
    key: &'static str,
    bench: String,
    result: String,
    limit: String,
    ratio: String,
    goal: String,
    met: Option<bool>,
}

fn rows(r: &Report) -> Vec<Row> {
    let s = &r.sizes;
    let get = |k: &str| r.summary.get(k).copied();
    let med = |k: &str| get(k).map(|x| x.median);
    let spread = |k: &str, f: &dyn Fn(f64) -> String| match get(k) {
        Some(x) if x.n > 1 => format!("{} ({}–{})", f(x.median), f(x.min), f(x.max)),
        Some(x) => f(x.median),
        None => "not run".into(),
    };
    let per_s = |v: f64| format!("{}/s", thousands(v));
    let msf = |v: f64| format!("{v:.0} ms");
    let msf1 = |v: f64| format!("{v:.1} ms");
    let mib = |v: f64| format!("{v:.1} MiB");
    let ratio = |k: &str| med(k).map_or("—".into(), |v| format!("{v:.2}"));
    let at_least = |k: &str, goal: f64| med(k).map(|v| v >= goal);
    let at_most = |k: &str, goal: f64| med(k).map(|v| v <= goal);
    let mut out = vec![
        Row {
            key: "drain.records_per_s",
            bench: format!(
                "1. redundant-channel drain: {} nodes × {} release-1 records (~{:.0} B) → release-2 controller, {} per request",
                s.drain_nodes,
                thousands(s.drain_records_per_node as f64),
                med("drain.record_bytes").unwrap_or(0.0),
                s.drain_batch_records
            ),
            result: spread("drain.records_per_s", &per_s),
            limit: format!(
                "raw insert of the upcast rows, {} per transaction: {}",
                thousands(s.raw_rows_per_transaction as f64),
                spread("drain.limit_records_per_s", &per_s)
            ),
            ratio: ratio("drain.ratio"),
            goal: "≥ 0.5 × raw".into(),
            met: at_least("drain.ratio", GOAL_RATIO),
        },
        Row {
            key: "outbox.tick_per_s",
            bench: format!(
                "2a. node outbox, producer tick ({:.0} records + 3 kv rows per commit)",
                med("outbox.tick_records_per_commit").unwrap_or(0.0)
            ),
            result: spread("outbox.tick_per_s", &per_s),
            limit: format!(
                "raw insert, same file settings and records per transaction: {}",
                spread("outbox.tick_limit_per_s", &per_s)
            ),
            ratio: ratio("outbox.tick_ratio"),
            goal: "≥ 0.5 × raw".into(),
            met: at_least("outbox.tick_ratio", GOAL_RATIO),
        },
        Row {
            key: "outbox.single_per_s",
            bench: "2b. node outbox, 1 record per commit".into(),
            result: spread("outbox.single_per_s", &per_s),
            limit: format!(
                "raw insert, 1 per transaction: {}",
                spread("outbox.single_limit_per_s", &per_s)
            ),
            ratio: ratio("outbox.single_ratio"),
            goal: "≥ 0.5 × raw".into(),
            met: at_least("outbox.single_ratio", GOAL_RATIO),
        },
    ];
    for (label, n, goal) in [
        ("nodes_1000", s.fence_small, GOAL_FENCE_1000_MS),
        ("nodes_10000", s.fence_large, GOAL_FENCE_10000_MS),
    ] {
        let p = |q: &str| {
            med(&format!("fence.{label}_{q}_ms")).map_or("—".into(), |v| format!("{v:.0}"))
        };
        out.push(Row {
            key: if label == "nodes_1000" {
                "fence.nodes_1000_ms"
            } else {
                "fence.nodes_10000_ms"
            },
            bench: format!(
                "3. fence: {} watching nodes, fence request → every watcher fenced",
                thousands(n as f64)
            ),
            result: format!(
                "{} (per node p50 {} / p99 {} ms)",
                spread(&format!("fence.{label}_ms"), &msf),
                p("p50"),
                p("p99")
            ),
            limit: "goal".into(),
            ratio: "—".into(),
            goal: format!("≤ {goal:.0} ms"),
            met: at_most(&format!("fence.{label}_ms"), goal),
        });
    }
    out.push(Row {
        key: "storm.nodes_10000_ms",
        bench: format!(
            "4. reconnect storm: {} registered nodes say hello at once after a controller restart",
            thousands(s.fence_large as f64)
        ),
        result: format!(
            "{} ({} retries)",
            spread("storm.nodes_10000_ms", &msf),
            med("storm.retries").map_or("—".into(), thousands)
        ),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_STORM_MS:.0} ms"),
        met: at_most("storm.nodes_10000_ms", GOAL_STORM_MS),
    });
    out.push(Row {
        key: "viewers.segments_per_s",
        bench: format!(
            "5a. HLS served by one node process, {} concurrent client loops",
            s.hls_loops
        ),
        result: format!(
            "segments {}; playlists {}",
            spread("viewers.segments_per_s", &per_s),
            spread("viewers.playlists_per_s", &per_s)
        ),
        limit: "—".into(),
        ratio: "—".into(),
        goal: "—".into(),
        met: None,
    });
    out.push(Row {
        key: "viewers.switch_p99_ms",
        bench: format!(
            "5b. viewer latency p99 ({} viewers), during a release 1 → 2 switch of that node",
            s.paced_viewers
        ),
        result: format!(
            "{} ({} failed requests; switch {})",
            spread("viewers.switch_p99_ms", &msf1),
            med("viewers.failed_requests").map_or("—".into(), thousands),
            med("viewers.switch_ms").map_or("—".into(), msf)
        ),
        limit: format!("steady p99: {}", spread("viewers.steady_p99_ms", &msf1)),
        ratio: match (med("viewers.switch_p99_ms"), med("viewers.steady_p99_ms")) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}", a / b),
            _ => "—".into(),
        },
        goal: "no failed request".into(),
        met: med("viewers.failed_requests").map(|v| v == 0.0),
    });
    out.push(Row {
        key: "memory.controller_10000_nodes_mib",
        bench: format!(
            "6a. controller resident memory with {} connected nodes",
            thousands(s.fence_large as f64)
        ),
        result: spread("memory.controller_10000_nodes_mib", &mib),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_CONTROLLER_MIB:.0} MiB"),
        met: at_most("memory.controller_10000_nodes_mib", GOAL_CONTROLLER_MIB),
    });
    out.push(Row {
        key: "memory.node_idle_mib",
        bench: "6b. idle node (worker) resident memory, one live event, no viewers".into(),
        result: spread("memory.node_idle_mib", &mib),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_NODE_MIB:.0} MiB"),
        met: at_most("memory.node_idle_mib", GOAL_NODE_MIB),
    });
    out.push(Row {
        key: "upgrade.overhead_ms",
        bench: if r.quick {
            "7. upgrade overhead (quick: one group, 3 s event)".into()
        } else {
            "7. upgrade overhead of the demo cluster (`demo --skip-naive`)".into()
        },
        result: format!(
            "{} (total {}, waiting {})",
            spread("upgrade.overhead_ms", &msf),
            med("upgrade.total_ms").map_or("—".into(), msf),
            med("upgrade.waiting_ms").map_or("—".into(), msf)
        ),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_UPGRADE_OVERHEAD_MS:.0} ms"),
        met: at_most("upgrade.overhead_ms", GOAL_UPGRADE_OVERHEAD_MS),
    });
    out.retain(|row| {
        let bench = row.key.split('.').next().unwrap_or("");
        r.summary
            .keys()
            .any(|k| k.starts_with(&format!("{bench}.")))
    });
    out
}

fn before_of(key: &str) -> String {
    BEFORE
        .iter()
        .find(|(k, _, _)| *k == key)
        .map_or("—".into(), |(_, figure, _)| (*figure).to_owned())
}

fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| benchmark | result (median{}) | limit measured in the same run | ratio | goal | met | before fix |",
        if r.runs > 1 { " (min–max)" } else { "" }
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in rows(r) {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.bench,
            row.result,
            row.limit,
            row.ratio,
            row.goal,
            met,
            before_of(row.key)
        );
    }
    out
}

fn render_markdown(r: &Report) -> String {
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `handover bench{}` ({} build) on {}: {} cores ({}), {} MiB of memory, {}; \
         load average {} at the start; {} run{} per figure, {:.0} s in all. Open-file limit {}.\n",
        if r.quick { " --quick" } else { "" },
        m.build,
        m.date,
        m.cores,
        m.cpu_model,
        thousands(m.memory_mib as f64),
        m.kernel,
        m.load_average,
        r.runs,
        if r.runs == 1 { "" } else { "s" },
        r.elapsed_s,
        r.fd_limit
    );
    if r.quick {
        let _ = writeln!(
            out,
            "**`--quick`: tiny sizes, one run. These figures check that every benchmark runs; they measure nothing worth keeping.**\n"
        );
    }
    out.push_str(&render_table(r));
    out.push_str(METHOD);
    if !BEFORE.is_empty() {
        let _ = writeln!(out, "\n## Before and after\n");
        for (key, figure, note) in BEFORE {
            let _ = writeln!(out, "- `{key}`: before {figure}. {note}");
        }
    }
    out
}

const METHOD: &str = r#"
Each figure is the median of the runs (min–max in brackets); a ratio is the
median of the per-run ratios, each taken against the limit measured in the
same run. `handover bench --json` prints the same figures (and every run's).

## What each benchmark measures

1. **Redundant-channel drain.** A release-2 controller process
   (`controller --no-supervisor --release 2`, embedded SQLite, WAL,
   `synchronous=FULL`) with one channel. Eight in-process clients speak the
   node protocol: `hello` with the join token as release 1 (grant `deliver`),
   then `POST /node/v1/deliver` batches of 500 release-1 records
   (`record::encode(Schema(1), …)`, about 200 bytes each), one batch at a time
   per client, each sent after the previous one was acknowledged, as the
   shipper does. The clock runs from the first batch sent to the last
   acknowledgement; each acknowledgement comes after the upcast, the
   idempotent insert and the commit. The database must then hold every record,
   translated. **Limit:** the same rows, upcast beforehand, inserted into a
   fresh release-2 database by one in-process writer with the statement
   `store_batch` uses (`SqliteStore::insert_records`: multi-row INSERTs of
   100 records), one transaction per 1,000 rows.
2. **Node outbox.** `handover_node::store::Store::commit` on a fresh node.db:
   (a) the commit a producer tick makes on a node running two channels at a
   second boundary (a segment and viewer stats per channel, two progress rows
   and the stats second), (b) one record per commit. Every commit is durable
   (`synchronous=FULL`) before the next. **Limit:** `RawOutbox`, a file opened
   the same way with one outbox-shaped table and one INSERT per record, the
   same records per transaction.
3. **Fence.** A fresh release-2 controller; N simulated nodes in this process,
   each on its own TCP connection (source addresses 127.52.x.y), say `hello`
   as distinct node ids and then long-poll
   `GET /node/v1/watch?node=…&epoch=…&grant=full&wait_ms=25000&desired_rev=…`
   as `handover_node::session` does. Once all wait, `POST /api/v1/fence`.
   Latency per node: from sending the fence request until that node has read
   its `fenced` answer; the figure is the last one (every watcher fenced).
4. **Reconnect storm.** After the 10,000-node fence: unfence, stop the
   controller (SIGTERM), start it again on the same database, then every node
   says `hello` with its own credential at the same instant, each on a new
   connection, retrying as a node does (100 ms doubling) on any error. The
   figure runs from the go signal to the last `welcome` (grant `full`).
5. **Viewers.** A release-1 node under its supervisor serves one live channel
   (1 s segments); its controller is then restarted as release 2, so the node
   serves from its cache on `deliver`, as in an upgrade's deliver phase.
   (a) Playlists, then the newest segment, requested in tight loops by
   concurrent in-process clients (keep-alive), per second. (b) Viewers
   fetching the playlist and its newest segment every 100 ms: p99 over a
   steady period, then over the node's switch to release 2 (the supervisor's
   control socket: new worker on the same socket, ready after its
   parameters, old worker retired) plus 1.5 s after it. The bench triggers
   the switch directly, so the old worker is not quiesced first as the
   upgrade agent would do.
6. **Memory.** VmRSS from `/proc/PID/status`: the controller while the
   10,000 simulated nodes of benchmark 3 wait on the watch; the node worker
   of benchmark 5 (release 1, one live event, no viewers) one second after
   it got `deliver`.
7. **Upgrade overhead.** `handover demo --json --skip-naive` as a child
   process (3 groups of supervised primary and backup nodes, 6 channels,
   events of 20–40 s, viewers): `upgrade.total_ms −
   upgrade.waiting_for_operations_ms`.
"#;
