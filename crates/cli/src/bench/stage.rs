//! Benchmark 8, stage: N nodes (real processes under their supervisors)
//! staging an upgrade's artifact, and the bytes the controller sent for it.

use super::*;

/// Staging of 100 nodes is over well within this.
const STAGE_WAIT: Duration = Duration::from_secs(300);

/// The event the staged nodes run meanwhile outlasts the benchmark.
const STAGE_EVENT_MS: u64 = 600_000;

/// What the kernel counts as written by `pid` (`wchar` of /proc/PID/io):
/// every byte it wrote, to sockets and files alike.
fn written_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no wchar in /proc/PID/io")
}

/// How the staging nodes of the benchmark keep their copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Copies {
    /// The nodes share this host's artifact cache (`--artifact-cache`), as
    /// nodes run on one host would: one copy written, the others linked.
    HostCache,
    /// Each node downloads and writes its own copy, as nodes on hosts of
    /// their own do; here all on this machine's one disk.
    OwnCopy,
}

impl Copies {
    /// The prefix of this variant's figures.
    fn prefix(self) -> &'static str {
        match self {
            Copies::HostCache => "stage.",
            Copies::OwnCopy => "stage.own_copy_",
        }
    }
}

/// `nodes` supervised nodes in `nodes / 2` groups on release 1; an upgrade
/// to release 2 that pauses before the fence. The figure runs from the
/// upgrade's start to the end of its stage phase (every node staged: the
/// controller's own phase records); the bytes are what the controller
/// process wrote meanwhile (the artifact to every node, and the little
/// else it says), per byte of the artifact's binary.
pub(super) async fn stage_fleet(
    exe: &Path,
    dir: &Path,
    nodes: usize,
    copies: Copies,
) -> anyhow::Result<Figures> {
    ensure!(
        nodes >= 2 && nodes % 2 == 0,
        "stage: an even number of nodes"
    );
    let name = match copies {
        Copies::HostCache => "stage",
        Copies::OwnCopy => "stage-own-copy",
    };
    let mut fleet = Fleet::new(exe, &dir.join(name), SUBNET_STAGE)?;
    if copies == Copies::HostCache {
        fleet.artifact_cache = Some(fleet.dir.join("host-cache"));
    }
    fleet.start_controller(1).await?;
    let artifact = fleet.upload_artifact(2).await?;
    let size = std::fs::metadata(
        fleet
            .dir
            .join("artifact-r2")
            .join(handover_core::artifact::BINARY_FILE),
    )
    .context("the artifact's binary")?
    .len();
    fleet
        .start_live_groups((nodes / 2) as u64, 1, 1_000, STAGE_EVENT_MS)
        .await?;
    let pid = fleet.controller_worker_pid().await?.as_raw().unsigned_abs();
    let before = written_bytes(pid)?;
    let request = UpgradeRequest {
        pause_at: vec![handover_core::upgrade::Phase::Fence],
        ..UpgradeRequest::new(&artifact, "wait")
    };
    crate::upgrade::start(&fleet.op, &request).await?;
    fleet
        .wait_paused_at(handover_core::upgrade::Phase::Fence, STAGE_WAIT)
        .await?;
    let written = written_bytes(pid)?.saturating_sub(before);
    let status = crate::upgrade::status(&fleet.op).await?;
    if copies == Copies::HostCache {
        one_file(&fleet, &artifact)?;
    }
    fleet.stop_all().await?;
    let up = status.upgrade.context("the controller lost the upgrade")?;
    let staged_at = up
        .phases
        .iter()
        .find(|p| p.phase == handover_core::upgrade::Phase::Stage)
        .and_then(|p| p.ended_ms)
        .context("the stage phase did not end")?;
    let mut f = Figures::new();
    let prefix = copies.prefix();
    // Named for the full size; `stage.nodes` says how many (4 with --quick).
    put(
        &mut f,
        &format!("{prefix}nodes_100_ms"),
        staged_at.saturating_sub(up.started_ms) as f64,
    );
    put(
        &mut f,
        &format!("{prefix}controller_bytes_per_artifact_bytes"),
        written as f64 / size.max(1) as f64,
    );
    if copies == Copies::HostCache {
        put(&mut f, "stage.artifact_mib", size as f64 / (1 << 20) as f64);
        put(&mut f, "stage.nodes", nodes as f64);
    }
    Ok(f)
}

/// That the host cache did its work: every node's staged binary is one
/// file on disk (one inode), or the figure would name what did not happen.
fn one_file(fleet: &Fleet, artifact: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let mut inodes = std::collections::BTreeSet::new();
    for node in &fleet.nodes {
        let binary = handover_node::stage::binary_path(&node.data_dir, artifact);
        let md = std::fs::metadata(&binary)
            .with_context(|| format!("{}: not staged", binary.display()))?;
        inodes.insert((md.dev(), md.ino()));
    }
    ensure!(
        inodes.len() == 1,
        "the nodes staged {} files, not one shared by the host cache",
        inodes.len()
    );
    Ok(())
}
