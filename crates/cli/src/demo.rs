//! `handover demo`: a release-1 cluster of separate processes under viewer
//! load, upgraded to release 2 by handover; then an identical fresh cluster
//! under the same load, upgraded by the manual procedure operators use today.
//! Both are judged the same way: what the viewers saw, and what every node
//! produced compared with what the database holds.

use crate::check::CheckReport;
use crate::fleet::Fleet;
use crate::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use anyhow::{bail, Context};
use clap::Args;
use handover_core::api::UpgradeRequest;
use handover_core::upgrade::Status;
use handover_core::wire::Role;
use serde::Serialize;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upgrade a live local cluster from release 1 to release 2 (or to another
/// binary's newest release, `--to-binary`), twice.
///
/// First with handover: a controller (embedded SQLite) and three redundancy
/// groups of a primary and a backup node, each its own supervised process on
/// its own 127.x address and data dir; two channels per group with events of
/// 20 to 40 s; HLS viewers throughout; the upgrade (stage, fence, controller,
/// deliver, backups, primaries waiting for their events, finalize). Then the
/// same cluster again, upgraded by hand as operators do today: controller
/// first, then every node stopped and started on the new release, backups
/// before primaries, with no fence, queue, translation or socket handover.
/// Prints both reports; stops every process it started (also on Ctrl-C).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Viewers per channel.
    #[arg(long, default_value_t = 3)]
    pub viewers_per_channel: usize,
    /// Second octet of the 127.x.0.y addresses (the manual run uses x + 1).
    #[arg(long, default_value_t = 201)]
    pub subnet: u8,
    /// Policy for primaries: wait, failover or deadline=MS.
    #[arg(long, default_value = "wait")]
    pub policy: String,
    /// Skip the manual procedure (only the handover upgrade).
    #[arg(long)]
    pub skip_naive: bool,
    /// Keep the data dirs and logs (their path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
    /// Upgrade to another binary's newest release instead of this binary's
    /// release 2: the cluster starts on this binary's newest release and is
    /// upgraded to an artifact of PATH (e.g. a build with
    /// `--features next-release`), so every process ends on PATH.
    #[arg(long, value_name = "PATH")]
    pub to_binary: Option<std::path::PathBuf>,
}

/// The upgrade a demo shows: from a release of this binary to a release of
/// `to_exe` (this binary again, or `--to-binary`).
#[derive(Clone, Debug)]
struct Hop {
    from: u32,
    to: u32,
    to_exe: std::path::PathBuf,
}

const GROUPS: u64 = 3;
const CHANNELS_PER_GROUP: usize = 2;
const SEGMENT_MS: u32 = 1000;
/// Events start this long after they are created, so every node has them.
const EVENT_LEAD_MS: i64 = 3_000;
/// Group g's events last 10 + 10·g s: 20, 30 and 40 s, so primaries really wait.
fn event_ms(group: u64) -> u64 {
    10_000 + 10_000 * group
}
/// Viewers start this long after the first segment is complete, so the
/// first playlist they read lists it.
const VIEWERS_AFTER_FIRST_SEGMENT_MS: i64 = 200;
/// Steady viewing before the upgrade starts.
const STEADY_MS: u64 = 5_000;
/// Longest the upgrade may take before the demo gives up.
const UPGRADE_WAIT_MS: u64 = 150_000;

#[derive(Serialize, Debug, Clone)]
pub struct PhaseFigure {
    pub name: String,
    pub duration_ms: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct UpgradeFigures {
    pub outcome: String,
    pub phases: Vec<PhaseFigure>,
    pub total_ms: u64,
    pub waiting_for_operations_ms: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct NodeFigure {
    pub id: String,
    pub release: u32,
    pub grant: String,
}

#[derive(Serialize, Debug, Clone)]
pub struct ClusterFigures {
    pub controller_release: u32,
    pub schema: u32,
    pub nodes: Vec<NodeFigure>,
    /// Every process after the upgrade, supervisors and workers alike.
    pub processes: Vec<crate::fleet::ProcessInfo>,
}

#[derive(Serialize, Debug, Clone)]
pub struct NaiveFigures {
    pub total_ms: u64,
    pub viewers: ViewerReport,
    pub records: CheckReport,
}

#[derive(Serialize, Debug)]
pub struct DemoReport {
    /// The release the cluster ran before the upgrade.
    pub from_release: u32,
    pub upgrade: UpgradeFigures,
    pub viewers: ViewerReport,
    pub records: CheckReport,
    pub cluster: ClusterFigures,
    pub naive: Option<NaiveFigures>,
    pub processes: Vec<String>,
    pub data_dir: Option<String>,
    pub elapsed_ms: u64,
}

fn progress(args: &DemoArgs, msg: &str) {
    if !args.json {
        eprintln!("demo: {msg}");
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("handover-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let exe = std::env::current_exe().context("cannot find this binary to start the cluster")?;
    let hop = match &args.to_binary {
        None => Hop {
            from: 1,
            to: 2,
            to_exe: exe.clone(),
        },
        Some(path) => {
            let to_exe = std::fs::canonicalize(path)
                .with_context(|| format!("cannot find {}", path.display()))?;
            let facts = crate::artifact::binary_facts(&to_exe)?;
            let to = facts
                .releases
                .iter()
                .map(|r| r.release.0)
                .max()
                .with_context(|| format!("{} carries no release", to_exe.display()))?;
            Hop {
                from: handover_core::release::NEWEST.0,
                to,
                to_exe,
            }
        }
    };
    let mut fleet = Fleet::new(&exe, &dir.path().join("handover"), args.subnet)?;
    let mut naive_fleet = Fleet::new(
        &exe,
        &dir.path().join("manual"),
        args.subnet.wrapping_add(1),
    )?;
    naive_fleet.supervised = false;
    naive_fleet.legacy = true;
    let outcome = tokio::select! {
        r = drive(&mut fleet, &mut naive_fleet, &args, &hop) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopping every process")),
    };
    // Always stop what was started, whatever happened above.
    let stopped = (fleet.stop_all().await, naive_fleet.stop_all().await);
    let mut report = outcome?;
    stopped.0?;
    stopped.1?;
    report.elapsed_ms = ms(started.elapsed());
    if args.keep {
        report.data_dir = Some(dir.keep().display().to_string());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

async fn drive(
    fleet: &mut Fleet,
    naive: &mut Fleet,
    args: &DemoArgs,
    hop: &Hop,
) -> anyhow::Result<DemoReport> {
    progress(
        args,
        &format!(
            "handover: release-{} cluster at {}",
            hop.from,
            fleet.controller_url()
        ),
    );
    let live = build_cluster(fleet, args, hop.from).await?;
    let artifact = if args.to_binary.is_some() {
        let out = fleet.dir.join("artifact-to-binary");
        crate::artifact::create(&hop.to_exe, Some(hop.to), &out)?;
        crate::artifact::upload(&fleet.op, &out).await?.id()
    } else {
        fleet.upload_artifact(hop.to).await?
    };
    progress(
        args,
        &format!("handover: artifact {artifact} uploaded; viewers watching"),
    );
    let steady = Arc::new(AtomicBool::new(true));
    let viewers = spawn_viewers(&live, args, Some(steady.clone()));
    sleep_until(live.start_ms + i64::from(SEGMENT_MS) + i64::try_from(STEADY_MS).unwrap_or(0))
        .await;

    progress(
        args,
        &format!(
            "handover: upgrading to release {} (policy {})",
            hop.to, args.policy
        ),
    );
    steady.store(false, Ordering::Relaxed);
    crate::upgrade::start(&fleet.op, &UpgradeRequest::new(&artifact, &args.policy)).await?;
    let s = fleet
        .wait_upgrade_over(Duration::from_millis(UPGRADE_WAIT_MS))
        .await?;
    steady.store(true, Ordering::Relaxed);
    let up = s.upgrade.context("the controller lost the upgrade")?;
    progress(
        args,
        &format!(
            "handover: upgrade {:?}; waiting for the events to end",
            up.status
        ),
    );
    let viewers = viewers.await.context("viewers failed")??;
    let status = fleet.op.status().await?;
    let cluster = ClusterFigures {
        controller_release: status.controller.release.0,
        schema: status.cluster.schema.0,
        nodes: status
            .nodes
            .iter()
            .map(|n| NodeFigure {
                id: n.node.node_id.clone(),
                release: n.node.release.0,
                grant: n.grant_now.as_str().into(),
            })
            .collect(),
        processes: fleet.processes().await?,
    };
    fleet.stop_nodes().await?;
    let records = fleet.check().await?;
    let upgrade = UpgradeFigures {
        outcome: match &up.status {
            Status::Finalized => "finalized".into(),
            Status::Aborted { reason } => format!("aborted: {reason}"),
            Status::Failed { reason } => format!("failed: {reason}"),
            other => format!("{other:?}"),
        },
        phases: up
            .phases
            .iter()
            .map(|p| PhaseFigure {
                name: p.phase.as_str().into(),
                duration_ms: p
                    .ended_ms
                    .unwrap_or(p.started_ms)
                    .saturating_sub(p.started_ms),
            })
            .collect(),
        total_ms: up
            .ended_ms
            .unwrap_or(up.started_ms)
            .saturating_sub(up.started_ms),
        waiting_for_operations_ms: up.waiting_for_operations_ms,
    };
    let mut processes = vec![format!("controller {}", fleet.controller_url())];
    processes.extend(
        fleet
            .nodes
            .iter()
            .map(|n| format!("{} {} {} {}", n.id, n.role.as_str(), n.group, n.url())),
    );
    fleet.stop_all().await?;

    let naive = if args.skip_naive {
        None
    } else {
        Some(manual_upgrade(naive, args, hop).await?)
    };
    Ok(DemoReport {
        from_release: hop.from,
        upgrade,
        viewers,
        records,
        cluster,
        naive,
        processes,
        data_dir: None,
        elapsed_ms: 0,
    })
}

/// The cluster the demo runs: channels, groups and their nodes, and events.
struct Live {
    targets: Vec<ChannelTarget>,
    start_ms: i64,
    longest_ms: u64,
}

async fn build_cluster(fleet: &mut Fleet, args: &DemoArgs, release: u32) -> anyhow::Result<Live> {
    fleet.start_controller(release).await?;
    let start_ms = crate::client::now_ms() + EVENT_LEAD_MS;
    let mut targets = Vec::new();
    for g in 1..=GROUPS {
        let names: Vec<String> = (1..=CHANNELS_PER_GROUP)
            .map(|c| format!("ch{g}{c}"))
            .collect();
        targets.extend(
            fleet
                .add_live_group(g, &names, release, SEGMENT_MS, start_ms, event_ms(g))
                .await?,
        );
    }
    for i in 0..fleet.nodes.len() {
        progress(
            args,
            &format!("  node {} at {}", fleet.nodes[i].id, fleet.nodes[i].url()),
        );
        fleet.start_node(i).await?;
    }
    fleet.wait_nodes_registered().await?;
    Ok(Live {
        targets,
        start_ms,
        longest_ms: event_ms(GROUPS),
    })
}

fn spawn_viewers(
    live: &Live,
    args: &DemoArgs,
    steady: Option<Arc<AtomicBool>>,
) -> tokio::task::JoinHandle<anyhow::Result<ViewerReport>> {
    let config = ViewerConfig {
        targets: live.targets.clone(),
        viewers_per_channel: args.viewers_per_channel,
        duration: Duration::from_millis(live.longest_ms + UPGRADE_WAIT_MS),
        request_timeout: viewers::REQUEST_TIMEOUT,
        steady,
    };
    viewers::spawn_at(
        config,
        live.start_ms + i64::from(SEGMENT_MS) + VIEWERS_AFTER_FIRST_SEGMENT_MS,
    )
}

async fn sleep_until(at_ms: i64) {
    let wait = u64::try_from(at_ms - crate::client::now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

/// The procedure a careful operator follows today: the controller first
/// (stopped, started on the new release, which migrates the database), then
/// every node stopped and started on the new release, backups before
/// primaries, each back before the next. No fence, no queue, no translation,
/// no socket handover.
async fn manual_upgrade(
    fleet: &mut Fleet,
    args: &DemoArgs,
    hop: &Hop,
) -> anyhow::Result<NaiveFigures> {
    progress(
        args,
        &format!(
            "manual: the same release-{} cluster at {}",
            hop.from,
            fleet.controller_url()
        ),
    );
    let live = build_cluster(fleet, args, hop.from).await?;
    let viewers = spawn_viewers(&live, args, None);
    sleep_until(live.start_ms + i64::from(SEGMENT_MS) + i64::try_from(STEADY_MS).unwrap_or(0))
        .await;
    progress(
        args,
        &format!("manual: controller stopped, started on release {}", hop.to),
    );
    let began = Instant::now();
    let mut controller = fleet.controller.take().context("no controller")?;
    controller.terminate().await?;
    // From here on every process starts from the new binary.
    fleet.exe = hop.to_exe.clone();
    fleet.start_controller(hop.to).await?;
    let order: Vec<usize> = (0..fleet.nodes.len())
        .filter(|&i| fleet.nodes[i].role == Role::Backup)
        .chain((0..fleet.nodes.len()).filter(|&i| fleet.nodes[i].role == Role::Primary))
        .collect();
    for i in order {
        progress(
            args,
            &format!(
                "manual: node {} stopped, started on release {}",
                fleet.nodes[i].id, hop.to
            ),
        );
        if let Some(mut p) = fleet.nodes[i].proc.take() {
            p.terminate().await?;
        }
        fleet.nodes[i].release = hop.to;
        fleet.start_node(i).await?;
    }
    let total_ms = ms(began.elapsed());
    progress(
        args,
        &format!(
            "manual: every node on release {}; waiting for the events to end",
            hop.to
        ),
    );
    let viewers = viewers.await.context("viewers failed")??;
    fleet.stop_nodes().await?;
    let records = fleet.check().await?;
    if records.produced == 0 {
        bail!(
            "the manual run produced no record; see the logs in {}",
            fleet.dir.display()
        );
    }
    fleet.stop_all().await?;
    Ok(NaiveFigures {
        total_ms,
        viewers,
        records,
    })
}

pub fn render_viewers(v: &ViewerReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "viewers     {} viewers, {} requests, {} failed, {} failovers",
        v.viewers, v.requests, v.failed_requests, v.failovers
    );
    let _ = writeln!(
        out,
        "segments    {} received ({} bytes), {} missed; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        v.segments_received, v.bytes_received, v.segments_missed, v.p50_ms, v.p99_ms, v.max_ms
    );
    out
}

fn render(r: &DemoReport) -> String {
    let mut out = String::new();
    let u = &r.upgrade;
    let _ = writeln!(
        out,
        "handover demo ({:.0} s): release {} -> {} on {} roles ({} processes with their supervisors)",
        r.elapsed_ms as f64 / 1000.0,
        r.from_release,
        r.cluster.controller_release,
        r.processes.len(),
        r.cluster.processes.len()
    );
    let _ = writeln!(
        out,
        "\nhandover upgrade: {}, {:.1} s in all, {:.1} s of it waiting for events to end",
        u.outcome,
        u.total_ms as f64 / 1000.0,
        u.waiting_for_operations_ms as f64 / 1000.0
    );
    for p in &u.phases {
        let _ = writeln!(out, "  {:<11} {:>7} ms", p.name, p.duration_ms);
    }
    let mut binaries = std::collections::BTreeMap::<(u32, String), usize>::new();
    for p in &r.cluster.processes {
        let sha = p.sha256.get(..12).unwrap_or(&p.sha256).to_owned();
        *binaries.entry((p.release, sha)).or_default() += 1;
    }
    let said: Vec<String> = binaries
        .iter()
        .map(|((release, sha), n)| format!("{n} on release {release} from binary {sha}"))
        .collect();
    let _ = writeln!(
        out,
        "  processes after the upgrade (supervisors and workers): {}",
        said.join(", ")
    );
    let _ = writeln!(
        out,
        "cluster: controller release {}, schema {}",
        r.cluster.controller_release, r.cluster.schema
    );
    for n in &r.cluster.nodes {
        let _ = writeln!(out, "  {:<8} release {} {}", n.id, n.release, n.grant);
    }
    let _ = writeln!(out, "\n{:<28} {:>12} {:>12}", "", "handover", "manual");
    let naive_v = r.naive.as_ref().map(|n| &n.viewers);
    let naive_r = r.naive.as_ref().map(|n| &n.records);
    let row = |out: &mut String, name: &str, a: String, b: Option<String>| {
        let _ = writeln!(
            out,
            "{name:<28} {a:>12} {:>12}",
            b.unwrap_or_else(|| "-".into())
        );
    };
    row(
        &mut out,
        "viewer requests",
        r.viewers.requests.to_string(),
        naive_v.map(|v| v.requests.to_string()),
    );
    row(
        &mut out,
        "failed viewer requests",
        r.viewers.failed_requests.to_string(),
        naive_v.map(|v| v.failed_requests.to_string()),
    );
    row(
        &mut out,
        "segments missed",
        r.viewers.segments_missed.to_string(),
        naive_v.map(|v| v.segments_missed.to_string()),
    );
    row(
        &mut out,
        "viewer p99 (ms)",
        format!("{:.1}", r.viewers.p99_ms),
        naive_v.map(|v| format!("{:.1}", v.p99_ms)),
    );
    row(
        &mut out,
        "viewer p99, steady (ms)",
        format!("{:.1}", r.viewers.steady_p99_ms),
        None,
    );
    row(
        &mut out,
        "records produced",
        r.records.produced.to_string(),
        naive_r.map(|c| c.produced.to_string()),
    );
    row(
        &mut out,
        "records stored",
        r.records.stored.to_string(),
        naive_r.map(|c| c.stored.to_string()),
    );
    row(
        &mut out,
        "records lost",
        r.records.lost.to_string(),
        naive_r.map(|c| c.lost.to_string()),
    );
    row(
        &mut out,
        "records duplicated",
        r.records.duplicated.to_string(),
        naive_r.map(|c| c.duplicated.to_string()),
    );
    row(
        &mut out,
        "records translated",
        r.records.translated.to_string(),
        naive_r.map(|c| c.translated.to_string()),
    );
    if let Some(d) = &r.data_dir {
        let _ = writeln!(out, "\ndata and logs: {d}");
    }
    out
}
