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

/// `nodes` supervised nodes in `nodes / 2` groups on release 1; an upgrade
/// to release 2 that pauses before the fence. The figure runs from the
/// upgrade's start to the end of its stage phase (every node staged: the
/// controller's own phase records); the bytes are what the controller
/// process wrote meanwhile (the artifact to every node, and the little
/// else it says), per byte of the artifact's binary.
pub(super) async fn stage_fleet(exe: &Path, dir: &Path, nodes: usize) -> anyhow::Result<Figures> {
    ensure!(
        nodes >= 2 && nodes % 2 == 0,
        "stage: an even number of nodes"
    );
    let mut fleet = Fleet::new(exe, &dir.join("stage"), SUBNET_STAGE)?;
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
    fleet.stop_all().await?;
    let up = status.upgrade.context("the controller lost the upgrade")?;
    let staged_at = up
        .phases
        .iter()
        .find(|p| p.phase == handover_core::upgrade::Phase::Stage)
        .and_then(|p| p.ended_ms)
        .context("the stage phase did not end")?;
    let mut f = Figures::new();
    // Named for the full size; `stage.nodes` says how many (4 with --quick).
    put(
        &mut f,
        "stage.nodes_100_ms",
        staged_at.saturating_sub(up.started_ms) as f64,
    );
    put(
        &mut f,
        "stage.controller_bytes_per_artifact_bytes",
        written as f64 / size.max(1) as f64,
    );
    put(&mut f, "stage.artifact_mib", size as f64 / (1 << 20) as f64);
    put(&mut f, "stage.nodes", nodes as f64);
    Ok(f)
}
