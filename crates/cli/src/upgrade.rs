//! The operator's side of an upgrade: plan, start, status (with live
//! progress bars), pause, resume and abort, over `/api/v1/upgrade`.

use crate::client::Operator;
use anyhow::Context;
use handover_core::api::{PlanAnswer, UpgradeRequest, UpgradeStatus};
use handover_core::upgrade::{NodeStep, Phase, Status, Upgrade};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// How often `status --watch` asks the controller.
pub const WATCH_POLL_MS: u64 = 500;
/// Polls in a row the controller may miss before `--watch` gives up: 20 s
/// at [`WATCH_POLL_MS`], longer than the controller's own switch takes.
const CONTROLLER_MISSES_MAX: u32 = 40;
/// Redraws of the progress bars per second.
const BARS_REDRAW_HZ: u8 = 4;

/// `--to` names an artifact id on the controller, or an artifact directory
/// (made by `handover artifact create`), which is uploaded first.
pub async fn resolve_artifact(op: &Operator, to: &str) -> anyhow::Result<String> {
    let dir = Path::new(to);
    if dir.join(handover_core::artifact::MANIFEST_FILE).is_file() {
        let manifest = crate::artifact::upload(op, dir).await?;
        return Ok(manifest.id());
    }
    handover_core::artifact::check_id(to).map_err(|e| {
        anyhow::anyhow!("--to {to:?} is neither an artifact directory nor an artifact id: {e}")
    })?;
    Ok(to.to_owned())
}

pub async fn plan(op: &Operator, req: &UpgradeRequest) -> anyhow::Result<PlanAnswer> {
    op.post("/api/v1/upgrade/plan", req).await
}

pub async fn start(op: &Operator, req: &UpgradeRequest) -> anyhow::Result<Upgrade> {
    op.post("/api/v1/upgrade", req).await
}

pub async fn status(op: &Operator) -> anyhow::Result<UpgradeStatus> {
    op.get("/api/v1/upgrade").await
}

pub fn render_plan(p: &PlanAnswer) -> String {
    let mut out = String::new();
    let t = &p.plan.target;
    let _ = writeln!(
        out,
        "upgrade plan: release {} -> {} with artifact {} ({} bytes)",
        p.plan.from_release, t.release, t.artifact_id, t.size
    );
    for s in &p.steps {
        let _ = writeln!(out, "  {s}");
    }
    match &p.preflight_error {
        None => out.push_str("preflight passes now.\n"),
        Some(e) => {
            let _ = writeln!(out, "preflight would stop the upgrade: {e}");
        }
    }
    out
}

fn status_word(s: &Status) -> String {
    match s {
        Status::Running => "running".into(),
        Status::Paused => "PAUSED".into(),
        Status::Finalized => "finalized".into(),
        Status::Aborted { reason } => format!("aborted: {reason}"),
        Status::Failed { reason } => format!("FAILED: {reason}"),
    }
}

fn step_word(step: Option<&NodeStep>) -> &'static str {
    match step {
        None | Some(NodeStep::Pending) => "pending",
        Some(NodeStep::Waiting { .. }) => "waiting for its events",
        Some(NodeStep::Switching { .. }) => "switching",
        Some(NodeStep::Upgraded { .. }) => "upgraded",
    }
}

pub fn render_status(s: &UpgradeStatus) -> String {
    let mut out = String::new();
    let Some(up) = &s.upgrade else {
        return "no upgrade was ever started\n".into();
    };
    let t = &up.plan.target;
    let _ = writeln!(
        out,
        "upgrade to release {} ({}): {}, phase {}",
        t.release,
        t.artifact_id,
        status_word(&up.status),
        up.phase.as_str()
    );
    for p in &up.phases {
        let took = p
            .ended_ms
            .map(|e| format!("{} ms", e.saturating_sub(p.started_ms)))
            .unwrap_or_else(|| "under way".into());
        let _ = writeln!(out, "  {:<11} {took}", p.phase.as_str());
    }
    if !up.waiting_for.is_empty() && !up.status.is_over() {
        let _ = writeln!(out, "waiting for: {}", up.waiting_for);
    }
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:<8} {:>7}  {:<24} events",
        "node", "release", "grant", "outbox", "step"
    );
    for n in &s.nodes {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:<8} {:>7}  {:<24} {:?}{}",
            n.id,
            n.release.0,
            n.grant.as_str(),
            n.outbox_count,
            step_word(up.nodes.get(&n.id)),
            n.current_events,
            if n.reachable { "" } else { " (unreachable)" }
        );
    }
    if let Some(a) = &s.abort {
        let _ = writeln!(out, "abort now: {a}");
    }
    out
}

/// Live progress bars until the upgrade is over (or the controller goes
/// away for longer than a switch takes).
pub async fn watch(op: &Operator) -> anyhow::Result<UpgradeStatus> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(BARS_REDRAW_HZ));
    let phase_bar = multi.add(ProgressBar::new(Phase::ALL.len() as u64));
    phase_bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:24}] {pos}/{len} {msg}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    phase_bar.set_prefix("phases");
    let mut node_bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let node_style =
        ProgressStyle::with_template("{prefix:>10} {msg}").context("progress template")?;
    let mut failures = 0u32;
    loop {
        let s = match status(op).await {
            Ok(s) => {
                failures = 0;
                s
            }
            // The controller switches release during the upgrade: a few misses are expected.
            Err(e) if failures < CONTROLLER_MISSES_MAX => {
                failures += 1;
                phase_bar.set_message(format!("(controller not answering: {e:#})"));
                tokio::time::sleep(Duration::from_millis(WATCH_POLL_MS)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(up) = &s.upgrade else {
            anyhow::bail!("no upgrade was ever started");
        };
        let done = up.phases.iter().filter(|p| p.ended_ms.is_some()).count() as u64;
        phase_bar.set_position(done);
        phase_bar.set_message(format!(
            "{} ({}) {}",
            up.phase.as_str(),
            status_word(&up.status),
            up.waiting_for
        ));
        for n in &s.nodes {
            let bar = node_bars.entry(n.id.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(node_style.clone());
                b.set_prefix(n.id.clone());
                b
            });
            bar.set_message(format!(
                "release {} grant {:<7} outbox {:>5}  {} {:?}",
                n.release.0,
                n.grant.as_str(),
                n.outbox_count,
                step_word(up.nodes.get(&n.id)),
                n.current_events
            ));
        }
        if up.status.is_over() {
            phase_bar.finish();
            for b in node_bars.values() {
                b.finish();
            }
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(WATCH_POLL_MS)).await;
    }
}
