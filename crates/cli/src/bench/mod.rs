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
//! 8. stage — 100 supervised nodes staging an upgrade's artifact: from the
//!    upgrade's start until every node staged, and the bytes the controller
//!    wrote meanwhile per byte of the artifact.
//! 9. drain_postgres — the drain of 1 with the controller's store on
//!    PostgreSQL (`--postgres`, a schema of the run's own, dropped after),
//!    against a raw `COPY` of the same upcast rows into the same table;
//!    skipped (its figures null) when the server does not answer.
//! 10. heartbeats — N simulated nodes each heartbeating once a second to one
//!     controller (SQLite): heartbeats answered per second over a window
//!     after a warm-up, and their latency (p50, p99) from when each was due.
//! 11. ha — three controller replicas on PostgreSQL (`--postgres`), an
//!     upgrade paused: the leader SIGKILLed until a survivor's orchestrator
//!     stepped the upgrade under a new term; skipped with drain_postgres.
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
use handover_core::wire::{Batch, BatchAck, GrantState, Hello, Role, Welcome};
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
    /// Only these benchmarks: drain, outbox, fence, storm, viewers, memory,
    /// upgrade, stage, drain_postgres, heartbeats, ha.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The PostgreSQL server of drain_postgres and ha
    /// (`postgres://USER@HOST[:PORT]/DB`, without `schema`): each run makes
    /// schemas of its own in that database and drops them after. Not
    /// reachable: those benchmarks are skipped.
    #[arg(
        long,
        env = "HANDOVER_BENCH_POSTGRES",
        hide_env_values = true,
        default_value = POSTGRES_URL_DEFAULT
    )]
    pub postgres: String,
    /// Where the markdown report goes (with the machine it ran on).
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const BENCHES: [&str; 11] = [
    "drain",
    "outbox",
    "fence",
    "storm",
    "viewers",
    "memory",
    "upgrade",
    "stage",
    "drain_postgres",
    "heartbeats",
    "ha",
];

/// The PostgreSQL server drain_postgres uses without `--postgres`: the
/// database the store's tests use.
pub const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Keys `--json` always prints (null when the benchmark did not run, or was
/// skipped: then `skipped` names it and why).
pub const JSON_KEYS: [&str; 22] = [
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
    "stage.nodes_100_ms",
    "stage.controller_bytes_per_artifact_bytes",
    "stage.own_copy_nodes_100_ms",
    "stage.own_copy_controller_bytes_per_artifact_bytes",
    "drain_postgres.records_per_s",
    "drain_postgres.limit_records_per_s",
    "drain_postgres.ratio",
    "heartbeats.nodes_10000_per_s",
    "heartbeats.p50_ms",
    "heartbeats.p99_ms",
    "ha.takeover_ms",
];

// Addresses: 127.<subnet>.0.x for processes, 127.52.<wave>.x as the source
// addresses of simulated nodes (a fresh third octet per wave of connections,
// so no wave waits for the ports of the last one to leave TIME_WAIT).
const SUBNET_DRAIN: u8 = 50;
const SUBNET_FENCE: u8 = 51;
const SUBNET_SOURCES: u8 = 52;
const SUBNET_VIEWERS: u8 = 53;
const SUBNET_HEARTBEATS: u8 = 54;
const SUBNET_UPGRADE_SMALL: u8 = 57;
const SUBNET_STAGE: u8 = 56;
/// The demo also claims 59 for its manual run, which the bench skips.
const SUBNET_DEMO: u8 = 58;
/// Simulated nodes per source address (ephemeral ports are about 28,000).
const NODES_PER_SOURCE: usize = 2_000;
/// Runs of each figure without `--runs` (one with `--quick`): a median of
/// three.
const RUNS_DEFAULT: usize = 3;
/// Runs at most: every run uses its own source addresses (`sources`).
const RUNS_MAX: usize = 20;

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

/// Goals (from the issue "Benchmarks against the limits", the controller's
/// raised by issue 11, "Past one controller").
const GOAL_RATIO: f64 = 0.5;
/// The drain's goal, raised by issue 11 (the outbox keeps [`GOAL_RATIO`]).
const GOAL_DRAIN_RATIO: f64 = 0.8;
const GOAL_FENCE_1000_MS: f64 = 250.0;
const GOAL_FENCE_10000_MS: f64 = 250.0;
const GOAL_STORM_MS: f64 = 1_000.0;
const GOAL_CONTROLLER_MIB: f64 = 128.0;
const GOAL_NODE_MIB: f64 = 20.0;
const GOAL_UPGRADE_OVERHEAD_MS: f64 = 10_000.0;
/// Issue 11: 100 nodes staged within 5 s, and the controller sending no
/// more than a few copies of the artifact whatever the fleet's size.
const GOAL_STAGE_100_MS: f64 = 5_000.0;
/// Issue 11: the leader killed to the orchestrator resumed on another replica.
const GOAL_HA_TAKEOVER_MS: f64 = 5_000.0;
const GOAL_STAGE_COPIES: f64 = 3.0;
/// Issue 11: the drain with the store on PostgreSQL, against a raw `COPY`.
const GOAL_DRAIN_POSTGRES_RATIO: f64 = 0.5;
/// Issue 11: 10,000 nodes heartbeating once a second on one controller:
/// every heartbeat offered is answered (99%: a window's edges cut a few
/// answers off)...
const GOAL_HEARTBEATS_ANSWERED_SHARE: f64 = 0.99;
/// ...and answered within the heartbeat period, at p99.
const GOAL_HEARTBEATS_P99_MS: f64 = 1_000.0;

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
    (
        "heartbeats.nodes_10000_per_s",
        "4,621/s with p99 17,094 ms (a loaded machine)",
        "`perf stat` on the controller: 380 fsyncs/s, so about 12 heartbeats per commit \
         where 2,000 may share one, and 21,000 futex calls/s; `perf record`: the \
         controller's time in switching threads, `node_api` and JSON under 1% each. \
         Cause: in `store::group_commit::grouped` every caller waited its turn for the \
         writer lock before reading its answer, even when an earlier holder had already \
         committed its write, so 10,000 callers passed the lock one by one. Fix: a caller \
         waits for its answer or the writer, whichever comes first.",
    ),
    (
        "stage.nodes_100_ms",
        "8,694 ms (each node writing its own copy; 8,339 ms before that)",
        "The nodes' logs: the disk was the floor, 100 copies of 28.4 MiB (2.98 GB) on \
         this machine's one disk, which `dd` fills in 4.2 to 8.0 s. Fix: nodes of one \
         host share a cache of checked binaries (`--artifact-cache`), so the host writes \
         one copy and the others hard-link it (and still check its digest). Before that: \
         the last nodes were told to stage 6 to 10 s after the start, each desired state \
         its own fsync'd commit; fixed by one transaction per step.",
    ),
    (
        "stage.controller_bytes_per_artifact_bytes",
        "6.0-6.3 copies (17-18 controller downloads)",
        "The nodes' logs: every download from the controller came before the first \
         sources were named (1 to 1.5 s after the first node staged: its report is \
         committed behind 100 nodes' disk writes), and a slot went back as soon as its \
         body was sent: the one-second hold after a download never ran, because a body \
         of known length is dropped without being asked for its end. Fix: the bytes \
         sent decide (`artifacts::holding`), and a whole copy's slot goes back once the \
         fleet names as many sources as the controller served copies, while nodes ask \
         for sources, at most 10 s (`Serving::served_whole`): 4 downloads, 1.67 copies, \
         in a run of `--only stage`.",
    ),
    (
        "drain_postgres.ratio",
        "0.47 (91,303/s), and 0.38-0.42 (80,852/s) before that",
        "Last: each batch of a group commit paid its own epoch check, node row lock, \
         highest-seq read and `COPY` of 500 rows (1,600 `COPY`s for 800,000 records), and \
         read the channel directory before decoding. Fix: `Rows::write_all` stores a \
         group's batches (3.8 on average) with one check of each epoch, one lock of \
         every node's row (in name order), one highest-seq read and one `COPY` \
         (`postgres::writer::insert_records`), and the store keeps the channel \
         directory between batches (`ChannelCache`: channels are only ever added, a \
         batch naming one it lacks reads them again): 0.51-0.61 (120,000-130,000/s) in \
         four runs of `--only drain_postgres`. Earlier: each batch was one multi-row `INSERT … ON CONFLICT DO NOTHING` of 500 \
         rows (6,000 parameters), whose execution alone took the server 7.3 s of the \
         run. Fix: the node's registry row is locked, and the rows above its highest \
         stored seq (every row of a drain) go in by `COPY`; the rest by one `INSERT … \
         SELECT FROM UNNEST … ON CONFLICT DO NOTHING` of an array per column. Steps: \
         `UNNEST` for every row 0.38, plain `INSERT` for the rows above 0.45-0.49, \
         `COPY` for them 0.43-0.48 while the limit itself rose from 190,000/s to \
         240,000-330,000/s on a quieter machine (records from 98,000/s to 116,000-140,000/s).",
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
    /// Nodes of the stage benchmark.
    pub stage_nodes: usize,
    /// Simulated nodes of the heartbeats benchmark...
    pub heartbeat_nodes: usize,
    /// ...heartbeating this long before the window (connections warm, the
    /// controller's caches filled)...
    pub heartbeat_warmup_ms: u64,
    /// ...then this long measured.
    pub heartbeat_window_ms: u64,
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
    stage_nodes: 100,
    heartbeat_nodes: 10_000,
    heartbeat_warmup_ms: 3_000,
    heartbeat_window_ms: 10_000,
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
    stage_nodes: 4,
    heartbeat_nodes: 200,
    heartbeat_warmup_ms: 500,
    heartbeat_window_ms: 2_000,
};

/// One run's figures, flat: "drain.records_per_s" → value.
type Figures = BTreeMap<String, f64>;

fn put(f: &mut Figures, key: &str, v: f64) {
    f.insert(key.to_owned(), v);
}

/// The channel every bench serves: `ch1`, 1 s segments, no ladder.
fn bench_channel() -> ChannelSpec {
    ChannelSpec {
        name: "ch1".into(),
        title: None,
        segment_ms: 1000,
        ladder: vec![],
        window_segments: None,
    }
}

/// [`bench_channel`] on the fleet's controller.
async fn create_channel(fleet: &Fleet) -> anyhow::Result<()> {
    let _: Value = fleet.op.post("/api/v1/channels", &bench_channel()).await?;
    Ok(())
}

/// Group `g1` of `primary` and `backup`, channel `ch1` ([`create_channel`])
/// and an event on it for `g1`, starting `start_in_ms` from then and lasting
/// `duration_ms`.
async fn create_live_event(
    fleet: &Fleet,
    (primary, backup): (&str, &str),
    start_in_ms: i64,
    duration_ms: u64,
) -> anyhow::Result<()> {
    let group = Group {
        name: "g1".into(),
        primary: primary.into(),
        backup: backup.into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await?;
    create_channel(fleet).await?;
    let ev = EventSpec {
        channel: "ch1".into(),
        group: "g1".into(),
        start_ms: crate::client::now_ms() + start_in_ms,
        duration_ms,
    };
    let _: Value = fleet.op.post("/api/v1/events", &ev).await?;
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `--postgres` as the server drain_postgres makes its schemas on: a
/// `postgres://` URL that names no schema of its own.
fn postgres_server(url: &str) -> anyhow::Result<handover_store::postgres::Target> {
    let parsed = reqwest::Url::parse(url).context("--postgres: not a URL")?;
    ensure!(
        !parsed.query_pairs().any(|(k, _)| k == "schema"),
        "--postgres: give the server's URL without `schema`; each run makes schemas of its own"
    );
    handover_store::postgres::Target::parse(url).context("--postgres")
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
    let runs = args
        .runs
        .unwrap_or(if args.quick { 1 } else { RUNS_DEFAULT });
    ensure!((1..=RUNS_MAX).contains(&runs), "--runs is 1 to {RUNS_MAX}");
    let sizes = if args.quick { QUICK } else { FULL };
    let postgres = (selected("drain_postgres") || selected("ha"))
        .then(|| postgres_server(&args.postgres))
        .transpose()?;
    let fd_limit = raise_fd_limit();
    let exe = std::env::current_exe().context("cannot find this binary to start processes")?;
    let tmp = tempfile::Builder::new()
        .prefix("handover-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let machine = Machine::read();
    let mut sources = Sources::default();
    let mut per_run: Vec<Figures> = Vec::new();
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    let work = async {
        for r in 0..runs {
            let dir = tmp.path().join(format!("run{r}"));
            std::fs::create_dir_all(&dir)?;
            let mut f = Figures::new();
            let tag = format!("run {}/{runs}", r + 1);
            if selected("drain") {
                progress(&format!("{tag}: drain"));
                let got = drain(&exe, &dir, &sizes, DrainStore::Sqlite).await;
                f.extend(got.context("drain")?);
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
            if selected("stage") {
                for copies in [stage::Copies::HostCache, stage::Copies::OwnCopy] {
                    progress(&format!(
                        "{tag}: stage, {} nodes ({copies:?})",
                        sizes.stage_nodes
                    ));
                    f.extend(
                        stage_fleet(&exe, &dir, sizes.stage_nodes, copies)
                            .await
                            .with_context(|| format!("stage ({copies:?})"))?,
                    );
                }
            }
            if let Some(postgres) = &postgres {
                let store = DrainStore::Postgres {
                    server_url: &args.postgres,
                };
                match postgres.check().await {
                    Ok(()) => {
                        if selected("drain_postgres") {
                            progress(&format!("{tag}: drain_postgres"));
                            let got = drain(&exe, &dir, &sizes, store).await;
                            f.extend(got.context("drain_postgres")?);
                        }
                        if selected("ha") {
                            progress(&format!("{tag}: ha, leader takeover"));
                            let got = ha(&exe, &dir, &args.postgres).await;
                            f.extend(got.context("ha")?);
                        }
                    }
                    Err(e) => {
                        let why = format!(
                            "PostgreSQL is not reachable: {e}; start it \
                             (`pg_ctlcluster 15 main start`) or give --postgres"
                        );
                        for bench in ["drain_postgres", "ha"].into_iter().filter(|b| selected(b)) {
                            progress(&format!("{tag}: {bench} skipped: {why}"));
                            skipped.insert(bench.into(), why.clone());
                        }
                    }
                }
            }
            if selected("heartbeats") {
                progress(&format!(
                    "{tag}: heartbeats, {} nodes",
                    sizes.heartbeat_nodes
                ));
                let got = heartbeats(&exe, &dir, &sizes, &mut sources).await;
                f.extend(got.context("heartbeats")?);
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
        skipped,
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

mod drain;
mod ha;
mod heartbeats;
mod http1;
mod machine;
mod outbox;
mod report;
mod sources;
mod stage;
mod stats;
mod upgrade;
mod viewers;
mod waves;
use drain::*;
use ha::*;
use heartbeats::*;
use http1::*;
use machine::*;
use outbox::*;
use report::*;
use sources::*;
use stage::*;
use stats::*;
use upgrade::*;
use viewers::*;
use waves::*;
