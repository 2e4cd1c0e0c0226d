//! `handover demo`: a whole local cluster as separate processes, viewers
//! against it, and a report of what the viewers saw and what the database
//! holds compared with what every node produced.

use crate::check::CheckReport;
use crate::fleet::Fleet;
use crate::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use anyhow::Context;
use clap::Args;
use handover_core::params::Group;
use handover_core::release::NEWEST;
use handover_core::wire::Role;
use handover_store::{ChannelSpec, EventSpec};
use serde::Serialize;
use std::fmt::Write;
use std::time::{Duration, Instant};

/// Run a local cluster and report.
///
/// Starts a controller (embedded SQLite) and three redundancy groups of a
/// primary and a backup node, each its own process on its own 127.x address
/// and data dir; creates two channels per group with live events; runs HLS
/// viewers; then stops every node, compares what each produced with what the
/// database holds, and stops everything it started (also on Ctrl-C).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long the viewers watch.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Viewers per channel.
    #[arg(long, default_value_t = 3)]
    pub viewers_per_channel: usize,
    /// Release of the controller and the nodes.
    #[arg(long, default_value_t = NEWEST.0)]
    pub release: u32,
    /// Second octet of the 127.x.0.y addresses the processes listen on.
    #[arg(long, default_value_t = 201)]
    pub subnet: u8,
    /// Keep the data dirs and logs (their path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

const GROUPS: usize = 3;
const CHANNELS_PER_GROUP: usize = 2;
const SEGMENT_MS: u32 = 1000;
/// Events start this long after they are created, so every node has them.
const EVENT_LEAD_MS: i64 = 3_000;

#[derive(Serialize, Debug)]
pub struct DemoReport {
    pub release: u32,
    pub processes: Vec<String>,
    pub viewers: ViewerReport,
    pub records: CheckReport,
    pub data_dir: Option<String>,
    pub elapsed_ms: u64,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("handover-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let exe = std::env::current_exe().context("cannot find this binary to start the cluster")?;
    let mut fleet = Fleet::new(&exe, dir.path(), args.subnet)?;
    let outcome = tokio::select! {
        r = drive(&mut fleet, &args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopping every process")),
    };
    // Always stop what was started, whatever happened above.
    let stopped = fleet.stop_all().await;
    let mut report = outcome?;
    stopped?;
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

fn progress(args: &DemoArgs, msg: &str) {
    if !args.json {
        eprintln!("demo: {msg}");
    }
}

async fn drive(fleet: &mut Fleet, args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    progress(
        args,
        &format!(
            "starting controller (release {}) at {}",
            args.release,
            fleet.controller_url()
        ),
    );
    fleet.start_controller(args.release).await?;
    let mut channels = Vec::new();
    for g in 1..=GROUPS {
        let group = Group {
            name: format!("g{g}"),
            primary: format!("g{g}-a"),
            backup: format!("g{g}-b"),
        };
        let _: serde_json::Value = fleet.op.post("/api/v1/groups", &group).await?;
        fleet.add_node(&group.primary, Role::Primary, &group.name, args.release);
        fleet.add_node(&group.backup, Role::Backup, &group.name, args.release);
        for c in 1..=CHANNELS_PER_GROUP {
            let name = format!("ch{g}{c}");
            let spec = ChannelSpec {
                name: name.clone(),
                title: None,
                segment_ms: SEGMENT_MS,
                ladder: vec![],
            };
            let _: serde_json::Value = fleet.op.post("/api/v1/channels", &spec).await?;
            channels.push((name, group.name.clone()));
        }
    }
    let start_ms = crate::client::now_ms() + EVENT_LEAD_MS;
    let duration_ms = u64::try_from(args.duration.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(10_000);
    for (channel, group) in &channels {
        let spec = EventSpec {
            channel: channel.clone(),
            group: group.clone(),
            start_ms,
            duration_ms,
        };
        let _: serde_json::Value = fleet.op.post("/api/v1/events", &spec).await?;
    }
    for i in 0..fleet.nodes.len() {
        progress(
            args,
            &format!(
                "starting node {} at {}",
                fleet.nodes[i].id,
                fleet.nodes[i].url()
            ),
        );
        fleet.start_node(i).await?;
    }
    fleet.wait_nodes_registered().await?;
    let first_segment_at = start_ms + i64::from(SEGMENT_MS) + 200;
    let wait = u64::try_from(first_segment_at - crate::client::now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;

    let targets: Vec<ChannelTarget> = channels
        .iter()
        .map(|(channel, group)| ChannelTarget {
            channel: channel.clone(),
            node_urls: fleet
                .nodes
                .iter()
                .filter(|n| &n.group == group)
                .map(|n| n.url())
                .collect(),
        })
        .collect();
    progress(
        args,
        &format!(
            "{} viewers on {} channels for {:?}",
            targets.len() * args.viewers_per_channel,
            targets.len(),
            args.duration
        ),
    );
    let config = ViewerConfig {
        targets,
        viewers_per_channel: args.viewers_per_channel,
        duration: args.duration,
        request_timeout: Duration::from_secs(5),
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let viewers = viewers::run(&config, stop_rx).await?;

    progress(
        args,
        "stopping nodes (each ships its outbox first) and checking records",
    );
    fleet.stop_nodes().await?;
    let records = fleet.check().await?;
    let mut processes = vec![format!(
        "controller r{} {}",
        args.release,
        fleet.controller_url()
    )];
    processes.extend(fleet.nodes.iter().map(|n| {
        format!(
            "{} r{} {} {} {}",
            n.id,
            n.release,
            n.role.as_str(),
            n.group,
            n.url()
        )
    }));
    Ok(DemoReport {
        release: args.release,
        processes,
        viewers,
        records,
        data_dir: None,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
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
    let _ = writeln!(
        out,
        "handover demo: release {} cluster, {} processes, {:.1} s",
        r.release,
        r.processes.len(),
        r.elapsed_ms as f64 / 1000.0
    );
    for p in &r.processes {
        let _ = writeln!(out, "  {p}");
    }
    out.push_str(&render_viewers(&r.viewers));
    let c = &r.records;
    let _ = writeln!(
        out,
        "records     {} produced, {} stored, {} queued, {} lost, {} duplicated, {} unexpected",
        c.produced, c.stored, c.queued, c.lost, c.duplicated, c.unexpected
    );
    if let Some(d) = &r.data_dir {
        let _ = writeln!(out, "data        {d}");
    }
    out
}
