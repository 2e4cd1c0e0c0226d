//! Preflight: whether a plan may start, judged before anything changes,
//! and which path it takes.

use super::{ClusterView, NodeView, Path, Plan};
use crate::release::{Contracts, ReleaseInfo, CONTRACTS};

/// Why a plan cannot start; preflight's answer before anything changes.
/// It judges the target from its manifest's facts against the live cluster
/// and this binary's contracts; this binary's own release table is consulted
/// only for the releases the nodes run now (all carried by the controller,
/// or they would be fenced as newer). On success, the path it takes.
pub fn preflight(plan: &Plan, nodes: &[NodeView], cluster: &ClusterView) -> Result<Path, String> {
    let target = plan.target.facts()?;
    let t = &plan.target;
    if target.release != t.release || target.schema != t.schema {
        return Err(format!(
            "the plan names release {} schema {}, its manifest release {} schema {}",
            t.release, t.schema, target.release, target.schema
        ));
    }
    if t.release < cluster.controller_release {
        return Err(format!(
            "release {} is older than the controller's release {}; handover does not downgrade",
            t.release, cluster.controller_release
        ));
    }
    if t.release == cluster.controller_release {
        match (t.sha256.as_deref(), cluster.controller_sha256.as_deref()) {
            (Some(want), Some(have)) if want != have => {}
            (Some(_), Some(_)) => {
                return Err(format!(
                "the controller already runs release {} from this very binary; nothing to upgrade",
                t.release
            ))
            }
            _ => {
                return Err(format!(
                    "the controller already runs release {}, and without both binaries' digests \
                     a build of the same release cannot be told apart from it",
                    t.release
                ))
            }
        }
    }
    if let Some(c) = t.contracts {
        contracts_fit(&c)?;
    }
    let compatible = target.schema == cluster.database_schema;
    // What lies outside the target's window, all named at once.
    let mut outside = Vec::new();
    if !target.opens_database(cluster.database_schema) {
        let from: Vec<String> = target.migrates_from.iter().map(|s| s.to_string()).collect();
        outside.push(format!(
            "the database (schema {}; release {} migrates only from schemas [{}])",
            cluster.database_schema,
            t.release,
            from.join(", ")
        ));
    }
    if cluster.disk_free_bytes < t.size.saturating_mul(2) {
        return Err(format!(
            "not enough disk room: {} bytes free, the artifact needs {} (twice its size)",
            cluster.disk_free_bytes, t.size
        ));
    }
    for g in &plan.groups {
        for id in [&g.primary, &g.backup] {
            let n = nodes
                .iter()
                .find(|n| &n.id == id)
                .ok_or_else(|| format!("node {id} of group {} never said hello", g.name))?;
            if !n.reachable {
                return Err(format!(
                    "node {id} is unreachable (no heartbeat within its lease)"
                ));
            }
            let protocol = ReleaseInfo::of(n.release)
                .map_err(|_| {
                    format!(
                        "node {id} runs release {}, which the controller does not know",
                        n.release
                    )
                })?
                .protocol;
            if !target.in_window(n.schema) {
                outside.push(format!("{id} (schema {})", n.schema));
            } else if target.protocol.negotiate(protocol).is_none() {
                outside.push(format!(
                    "{id} (protocol {}..={}, release {} speaks {}..={})",
                    protocol.min, protocol.max, t.release, target.protocol.min, target.protocol.max
                ));
            } else if t.release == n.release && n.binary_sha256.is_none() && t.sha256.is_some() {
                return Err(format!(
                    "node {id} does not report the digest of its binary (it runs without a \
                     supervisor?), so a build of its own release cannot be rolled onto it"
                ));
            }
        }
    }
    if !outside.is_empty() {
        return Err(format!(
            "release {} serves nodes of schemas {} to {}; outside its window: {}. \
             Upgrade to a release in between first",
            t.release,
            target.window_min_schema,
            target.schema,
            outside.join(", ")
        ));
    }
    Ok(if compatible {
        Path::Compatible
    } else {
        Path::Incompatible
    })
}

/// Whether this binary (the old side) can hand over to a binary speaking
/// `theirs`: same worker command line and supervisor control protocol (the
/// old supervisor starts the new worker and hears from it), a hand-off this
/// supervisor can make, and an upgrade state no older than ours (the new
/// controller resumes what we stored).
pub fn contracts_fit(theirs: &Contracts) -> Result<(), String> {
    let ours = CONTRACTS;
    let mut misfits = Vec::new();
    for (name, o, t) in [
        ("worker_cli", ours.worker_cli, theirs.worker_cli),
        (
            "supervisor_control",
            ours.supervisor_control,
            theirs.supervisor_control,
        ),
        (
            "supervisor_handoff",
            ours.supervisor_handoff,
            theirs.supervisor_handoff,
        ),
    ] {
        if o != t {
            misfits.push(format!("{name} {t} (this binary speaks {o})"));
        }
    }
    if theirs.upgrade_state < ours.upgrade_state {
        misfits.push(format!(
            "upgrade_state {} (older than this binary's {})",
            theirs.upgrade_state, ours.upgrade_state
        ));
    }
    if misfits.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the artifact's binary speaks contracts this fleet cannot hand over to: {}; \
             upgrade through a release that speaks both",
            misfits.join(", ")
        ))
    }
}
