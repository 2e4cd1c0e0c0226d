//! 7. upgrade: the demo cluster's upgrade time minus its waiting for events.

use super::*;

/// `handover demo --json --skip-naive` as a child: the demo cluster's
/// upgrade, total minus waiting for events to end.
pub(super) async fn upgrade_demo(exe: &Path, dir: &Path) -> anyhow::Result<Figures> {
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
    Ok(upgrade_figures(total, waiting))
}

/// An upgrade's figures: its total, its waiting for events, and the
/// difference (the overhead the tool adds).
fn upgrade_figures(total: f64, waiting: f64) -> Figures {
    let mut f = Figures::new();
    put(&mut f, "upgrade.overhead_ms", total - waiting);
    put(&mut f, "upgrade.total_ms", total);
    put(&mut f, "upgrade.waiting_ms", waiting);
    f
}

/// The small upgrade (one group, a 3 s event) is over well within this.
const UPGRADE_WAIT: Duration = Duration::from_secs(120);

/// `--quick`: one group of two supervised nodes with a 3 s event, upgraded
/// to release 2 with the default policy (the demo takes about a minute).
pub(super) async fn upgrade_small(exe: &Path, dir: &Path) -> anyhow::Result<Figures> {
    let mut fleet = Fleet::new(exe, &dir.join("upgrade"), SUBNET_UPGRADE_SMALL)?;
    fleet.start_controller(1).await?;
    let artifact = fleet.upload_artifact(2).await?;
    create_live_event(&fleet, ("g1-a", "g1-b"), 1_000, 3_000).await?;
    fleet.add_node("g1-a", Role::Primary, "g1", 1);
    fleet.add_node("g1-b", Role::Backup, "g1", 1);
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await?;
    }
    fleet.wait_nodes_registered().await?;
    crate::upgrade::start(&fleet.op, &UpgradeRequest::new(&artifact, "wait")).await?;
    let s = fleet.wait_upgrade_over(UPGRADE_WAIT).await?;
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
    Ok(upgrade_figures(total, waiting))
}
