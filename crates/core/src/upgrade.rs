//! The upgrade as a persisted state machine (DESIGN.md "The upgrade").
//!
//! [`Upgrade::step`] takes an [`Input`] and `now_ms` and returns the
//! [`Effect`]s the controller must perform; it never performs anything
//! itself. The whole state is serializable: the controller stores it after
//! every step in a table that is the same in every release, so the new
//! controller resumes what the old one started, and a controller restart at
//! any moment resumes from the last stored state.

use crate::artifact::Manifest;
use crate::grant::Grant;
use crate::release::{Contracts, Release, ReleaseFacts, ReleaseInfo, Schema, CONTRACTS};
use crate::wire::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long the fence phase waits for acknowledgements; a silent node stays
/// fenced by the epoch anyway, so waiting longer buys nothing.
pub const FENCE_ACK_WAIT_MS: u64 = 5_000;
/// A node that has not come back on the new release within this long stops
/// the upgrade (it stays paused in a state the operator can read). The
/// default of [`Plan::node_switch_wait_ms`].
pub const NODE_SWITCH_WAIT_MS: u64 = 60_000;
/// A node told to switch that is still (or again) reachable on its old
/// release this long afterwards could not switch: a switching worker stops
/// heartbeating once it has drained (a few seconds at most) and the new one
/// says hello on the new release, while a worker whose supervisor refused the
/// new release exits and the old release says hello again.
pub const NODE_SWITCH_BACK_MS: u64 = 20_000;
/// An outbox at or below this many records counts as drained: a live node
/// keeps producing, so "exactly zero" may never be observed.
pub const DRAINED_RECORDS_MAX: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preflight,
    Stage,
    Fence,
    Controller,
    Deliver,
    Backups,
    Primaries,
    Finalize,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Preflight,
        Phase::Stage,
        Phase::Fence,
        Phase::Controller,
        Phase::Deliver,
        Phase::Backups,
        Phase::Primaries,
        Phase::Finalize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Stage => "stage",
            Phase::Fence => "fence",
            Phase::Controller => "controller",
            Phase::Deliver => "deliver",
            Phase::Backups => "backups",
            Phase::Primaries => "primaries",
            Phase::Finalize => "finalize",
        }
    }

    /// The phase named `text` (as [`Phase::as_str`] writes it).
    pub fn parse(text: &str) -> Result<Phase, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                format!("no phase {text:?}; the phases are {}", names.join(", "))
            })
    }
}

/// When a primary may switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum PrimaryPolicy {
    /// When its current events have ended (default).
    Wait,
    /// As soon as its backup runs the new release and passed its health gate.
    Failover,
    /// Wait, but fail over once this long has passed in the primaries phase.
    Deadline { ms: u64 },
}

impl PrimaryPolicy {
    /// `wait`, `failover` or `deadline=DURATION_MS`.
    pub fn parse(text: &str) -> Result<PrimaryPolicy, String> {
        match text {
            "wait" => Ok(PrimaryPolicy::Wait),
            "failover" => Ok(PrimaryPolicy::Failover),
            other => match other.strip_prefix("deadline=") {
                Some(ms) => ms
                    .parse()
                    .map(|ms| PrimaryPolicy::Deadline { ms })
                    .map_err(|_| {
                        format!("deadline takes milliseconds, e.g. deadline=30000, not {ms:?}")
                    }),
                None => Err(format!(
                    "policy is wait, failover or deadline=MS, not {other:?}"
                )),
            },
        }
    }
}

/// The artifact an upgrade moves to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub artifact_id: String,
    pub release: Release,
    pub schema: Schema,
    pub size: u64,
    /// The release as the artifact's manifest describes it (upgrade state 2;
    /// absent from states stored by upgrade state 1, whose targets were
    /// always releases the binary carried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<ReleaseFacts>,
    /// SHA-256 of the artifact's binary: with the release, what a process
    /// runs (a patch build has the release of the one it replaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Contract versions the artifact's binary speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contracts: Option<Contracts>,
}

impl Target {
    /// The target of an upgrade to the artifact `manifest` describes.
    pub fn of(manifest: &Manifest) -> Target {
        Target {
            artifact_id: manifest.id(),
            release: manifest.release,
            schema: manifest.schema,
            size: manifest.size,
            facts: Some(manifest.facts()),
            sha256: Some(manifest.sha256.clone()),
            contracts: Some(manifest.contracts),
        }
    }

    /// The target release's facts: from its manifest, or for a state stored
    /// before manifests carried them, from this binary's own table.
    pub fn facts(&self) -> Result<ReleaseFacts, String> {
        match &self.facts {
            Some(f) => Ok(f.clone()),
            None => ReleaseInfo::of(self.release)
                .map(ReleaseInfo::facts)
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether a process of `release` running a binary of digest `sha256`
    /// runs this target. A digest counts only when both sides know it.
    pub fn runs_on(&self, release: Release, sha256: Option<&str>) -> bool {
        release == self.release && self.same_binary(sha256)
    }

    /// Whether a binary of digest `sha256` is this target's (unknown on
    /// either side counts as yes: a process without a supervisor has none).
    pub fn same_binary(&self, sha256: Option<&str>) -> bool {
        match (self.sha256.as_deref(), sha256) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        }
    }
}

/// Which way an upgrade goes, decided by preflight and stored with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// The target's schema differs from the database's: fence, switch and
    /// migrate the controller, old nodes deliver, then the groups.
    #[default]
    Incompatible,
    /// Same schema (a patch build, or a release whose changes older nodes
    /// can live with): no fence and no deliver; the controller switches on
    /// its socket, then the groups as for any upgrade.
    Compatible,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGroup {
    pub name: String,
    pub primary: String,
    pub backup: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub target: Target,
    pub from_release: Release,
    pub policy: PrimaryPolicy,
    pub groups: Vec<PlanGroup>,
    /// Phases at whose start the upgrade pauses (after that step's effects),
    /// so an operator can look before going on.
    #[serde(default)]
    pub pause_at: Vec<Phase>,
    /// How long a node may take to come back healthy on the new release
    /// before the upgrade pauses ([`NODE_SWITCH_WAIT_MS`] unless the
    /// controller is configured otherwise).
    #[serde(default = "default_node_switch_wait_ms")]
    pub node_switch_wait_ms: u64,
}

fn default_node_switch_wait_ms() -> u64 {
    NODE_SWITCH_WAIT_MS
}

/// What the controller tells one node to do (carried in every grant answer).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    /// Artifact to have staged (downloaded and verified) ahead of time.
    pub stage: Option<String>,
    /// Take no new event (a primary waiting for its current ones to end).
    pub quiesce: bool,
    /// Switch to this release (of the staged artifact) now.
    pub switch_to: Option<Release>,
}

/// One node as the controller sees it at a tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub role: Role,
    pub group: String,
    pub release: Release,
    pub schema: Schema,
    /// Heartbeats within the lease.
    pub reachable: bool,
    pub grant: Grant,
    /// The epoch the node last reported holding.
    pub epoch: u64,
    pub staged: Vec<String>,
    pub outbox_count: u64,
    pub current_events: Vec<i64>,
    /// SHA-256 of the binary the node's worker runs, when it reports one.
    #[serde(default)]
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary the node's supervisor runs, when it reports one.
    #[serde(default)]
    pub supervisor_sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub epoch: u64,
    pub fenced: bool,
    /// Release of the controller running this step.
    pub controller_release: Release,
    /// SHA-256 of the binary the controller's worker runs, when known.
    #[serde(default)]
    pub controller_sha256: Option<String>,
    /// SHA-256 of the binary the controller's supervisor runs, when known.
    #[serde(default)]
    pub controller_supervisor_sha256: Option<String>,
    /// Schema of the database.
    pub database_schema: Schema,
    /// Free bytes where artifacts are stored, for preflight.
    pub disk_free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    Tick {
        nodes: Vec<NodeView>,
        cluster: ClusterView,
    },
    Pause,
    Resume,
    Abort,
    /// The controller's switch to the target failed; it still runs the old release.
    ControllerSwitchFailed {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Epoch + 1 and fenced.
    Fence,
    /// Lift the fence, same epoch.
    Unfence,
    /// Replace what `node` is told to do.
    SetDesired { node: String, desired: Desired },
    /// Switch this controller to the target release (through its supervisor).
    SwitchController { target: Target },
    /// The cluster release moves: the point of no return.
    Finalize { release: Release },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    Running,
    Paused,
    Finalized,
    Aborted { reason: String },
    Failed { reason: String },
}

impl Status {
    pub fn is_over(&self) -> bool {
        matches!(
            self,
            Status::Finalized | Status::Aborted { .. } | Status::Failed { .. }
        )
    }
}

/// Where one node is in its own switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum NodeStep {
    Pending,
    /// A primary that takes no new event and waits for its policy.
    Waiting {
        since_ms: u64,
    },
    Switching {
        since_ms: u64,
    },
    /// On the new release with `full`, serving and shipping.
    Upgraded {
        at_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: Phase,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
}

/// The whole persisted state of one upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    pub plan: Plan,
    pub phase: Phase,
    pub status: Status,
    pub phases: Vec<PhaseRecord>,
    pub nodes: BTreeMap<String, NodeStep>,
    /// Time primaries spent waiting for their operations to end.
    pub waiting_for_operations_ms: u64,
    /// What the current phase waits for, in words.
    pub waiting_for: String,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// Decided by preflight (states stored before it existed were all
    /// incompatible upgrades).
    #[serde(default)]
    pub path: Path,
}

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
    if !compatible && !target.migrates_from.contains(&cluster.database_schema) {
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

impl Upgrade {
    pub fn new(plan: Plan, now_ms: u64) -> Upgrade {
        let mut nodes = BTreeMap::new();
        for g in &plan.groups {
            nodes.insert(g.backup.clone(), NodeStep::Pending);
            nodes.insert(g.primary.clone(), NodeStep::Pending);
        }
        Upgrade {
            plan,
            phase: Phase::Preflight,
            status: Status::Running,
            phases: vec![PhaseRecord {
                phase: Phase::Preflight,
                started_ms: now_ms,
                ended_ms: None,
            }],
            nodes,
            waiting_for_operations_ms: 0,
            waiting_for: String::new(),
            started_ms: now_ms,
            ended_ms: None,
            path: Path::Incompatible,
        }
    }

    fn phase_started_ms(&self) -> u64 {
        self.phases
            .last()
            .map(|p| p.started_ms)
            .unwrap_or(self.started_ms)
    }

    fn enter(&mut self, phase: Phase, now_ms: u64) {
        if let Some(last) = self.phases.last_mut() {
            last.ended_ms = Some(now_ms);
        }
        self.phase = phase;
        self.phases.push(PhaseRecord {
            phase,
            started_ms: now_ms,
            ended_ms: None,
        });
    }

    fn end(&mut self, status: Status, now_ms: u64) {
        if let Some(last) = self.phases.last_mut() {
            last.ended_ms.get_or_insert(now_ms);
        }
        self.status = status;
        self.ended_ms = Some(now_ms);
    }

    fn desired_all(&self, desired: Desired) -> Vec<Effect> {
        self.nodes
            .keys()
            .map(|n| Effect::SetDesired {
                node: n.clone(),
                desired: desired.clone(),
            })
            .collect()
    }

    fn staged(&self) -> Desired {
        Desired {
            stage: Some(self.plan.target.artifact_id.clone()),
            ..Desired::default()
        }
    }

    /// What the operator may still undo, in words (shown with abort).
    pub fn abort_answer(&self) -> Result<&'static str, &'static str> {
        match self.phase {
            _ if self.status.is_over() => Err("the upgrade is over; nothing to abort"),
            Phase::Preflight | Phase::Stage => Ok("nothing had changed: staged artifacts stay on disk, unused"),
            Phase::Fence => Ok("the fence is lifted; nodes get their old grants back at the new epoch"),
            Phase::Controller => Err("the controller is switching release; wait until it finishes or fails, then abort"),
            Phase::Deliver | Phase::Backups | Phase::Primaries => Ok(
                "the upgrade stops here: the controller stays on the new release (its database is migrated); \
                 upgraded nodes stay upgraded, the others keep running the old release with grant deliver; \
                 start a new upgrade to finish",
            ),
            Phase::Finalize => Err("finalize is the point of no return"),
        }
    }

    pub fn step(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        match input {
            Input::Pause if self.status == Status::Running => {
                self.status = Status::Paused;
                vec![]
            }
            Input::Resume if self.status == Status::Paused => {
                self.status = Status::Running;
                vec![]
            }
            Input::Abort => self.abort(now_ms),
            Input::ControllerSwitchFailed { reason }
                if self.phase == Phase::Controller && !self.status.is_over() =>
            {
                let reason = format!("the new controller did not come up ({reason}); the old release runs on its database and the fence is lifted");
                self.end(Status::Failed { reason }, now_ms);
                let mut effects = vec![Effect::Unfence];
                effects.extend(self.desired_all(Desired::default()));
                effects
            }
            Input::Tick { nodes, cluster } if self.status == Status::Running => {
                let before = self.phase;
                let effects = self.tick(&nodes, &cluster, now_ms);
                if self.phase != before
                    && self.status == Status::Running
                    && self.plan.pause_at.contains(&self.phase)
                {
                    self.status = Status::Paused;
                    self.waiting_for = format!(
                        "paused at {} as the plan asked; resume to go on",
                        self.phase.as_str()
                    );
                }
                effects
            }
            _ => vec![],
        }
    }

    fn abort(&mut self, now_ms: u64) -> Vec<Effect> {
        let Ok(answer) = self.abort_answer() else {
            return vec![];
        };
        let mut effects = match self.phase {
            Phase::Fence => vec![Effect::Unfence],
            _ => vec![],
        };
        // Nodes not yet switched go back to holding; a switch under way finishes.
        for (id, step) in &self.nodes {
            if !matches!(step, NodeStep::Switching { .. }) {
                effects.push(Effect::SetDesired {
                    node: id.clone(),
                    desired: Desired::default(),
                });
            }
        }
        self.end(
            Status::Aborted {
                reason: answer.to_owned(),
            },
            now_ms,
        );
        effects
    }

    /// Nodes whose switch failed: told to switch (or already switched) and
    /// reachable on the old release again, because their supervisor refused
    /// the new release and restarted the old one. The upgrade pauses naming
    /// them, and they are told to stop trying (the node remembers a refused
    /// switch and tries it again only when asked anew); resume asks anew.
    fn failed_switches(&mut self, nodes: &[NodeView], now_ms: u64) -> Vec<Effect> {
        let target = &self.plan.target;
        let mut failed = Vec::new();
        for (id, step) in &self.nodes {
            let Some(n) = nodes.iter().find(|n| &n.id == id) else {
                continue;
            };
            if !n.reachable || target.runs_on(n.release, n.binary_sha256.as_deref()) {
                continue;
            }
            let back = match step {
                NodeStep::Upgraded { .. } => true,
                NodeStep::Switching { since_ms } => {
                    n.staged.contains(&target.artifact_id)
                        && now_ms.saturating_sub(*since_ms) >= NODE_SWITCH_BACK_MS
                }
                NodeStep::Pending | NodeStep::Waiting { .. } => false,
            };
            if back {
                failed.push((id.clone(), n.release));
            }
        }
        if failed.is_empty() {
            return vec![];
        }
        let said: Vec<String> = failed
            .iter()
            .map(|(id, release)| {
                format!(
                    "node {id} could not switch to release {}: it came back on release {release}",
                    target.release
                )
            })
            .collect();
        self.status = Status::Paused;
        self.waiting_for = format!(
            "{} (its supervisor refused the new release; the node's /status shows why in switch_error); \
             the upgrade is paused: fix the release, then resume to try again (or abort)",
            said.join("; ")
        );
        let staged = self.staged();
        failed
            .into_iter()
            .map(|(node, _)| {
                self.nodes.insert(node.clone(), NodeStep::Pending);
                Effect::SetDesired {
                    node,
                    desired: staged.clone(),
                }
            })
            .collect()
    }

    fn tick(&mut self, nodes: &[NodeView], cluster: &ClusterView, now_ms: u64) -> Vec<Effect> {
        let node = |id: &str| nodes.iter().find(|n| n.id == id);
        let target = self.plan.target.clone();
        if matches!(
            self.phase,
            Phase::Backups | Phase::Primaries | Phase::Finalize
        ) {
            let effects = self.failed_switches(nodes, now_ms);
            if self.status != Status::Running {
                return effects;
            }
        }
        match self.phase {
            Phase::Preflight => match preflight(&self.plan, nodes, cluster) {
                Ok(path) => {
                    self.path = path;
                    self.enter(Phase::Stage, now_ms);
                    self.desired_all(self.staged())
                }
                Err(reason) => {
                    self.end(
                        Status::Failed {
                            reason: format!("preflight: {reason}; nothing was changed"),
                        },
                        now_ms,
                    );
                    vec![]
                }
            },
            Phase::Stage => {
                let missing: Vec<&String> = self
                    .nodes
                    .keys()
                    .filter(|id| !node(id).is_some_and(|n| n.staged.contains(&target.artifact_id)))
                    .collect();
                if missing.is_empty() && self.path == Path::Compatible {
                    // Same schema: nodes keep `full` across the controller's switch.
                    self.enter(Phase::Controller, now_ms);
                    self.waiting_for =
                        format!("the controller to switch to release {}", target.release);
                    vec![Effect::SwitchController { target }]
                } else if missing.is_empty() {
                    self.enter(Phase::Fence, now_ms);
                    self.waiting_for = "fence acknowledgements".into();
                    vec![Effect::Fence]
                } else {
                    self.waiting_for = format!(
                        "artifact {} staged on {}",
                        target.artifact_id,
                        join(&missing)
                    );
                    vec![]
                }
            }
            Phase::Fence => {
                if !cluster.fenced {
                    // The fence effect has not landed yet (or was lost in a restart): ask again.
                    return vec![Effect::Fence];
                }
                let unacked: Vec<&String> = self
                    .nodes
                    .keys()
                    .filter(|id| {
                        !node(id).is_some_and(|n| {
                            !n.reachable || (n.grant == Grant::Fenced && n.epoch == cluster.epoch)
                        })
                    })
                    .collect();
                let waited = now_ms.saturating_sub(self.phase_started_ms());
                if unacked.is_empty() || waited >= FENCE_ACK_WAIT_MS {
                    self.enter(Phase::Controller, now_ms);
                    self.waiting_for =
                        format!("the controller to switch to release {}", target.release);
                    vec![Effect::SwitchController { target }]
                } else {
                    self.waiting_for = format!(
                        "fence acknowledgement at epoch {} from {}",
                        cluster.epoch,
                        join(&unacked)
                    );
                    vec![]
                }
            }
            Phase::Controller => {
                let switched = target.runs_on(
                    cluster.controller_release,
                    cluster.controller_sha256.as_deref(),
                );
                if switched && self.path == Path::Compatible {
                    self.enter(Phase::Backups, now_ms);
                    self.tick(nodes, cluster, now_ms)
                } else if switched {
                    self.enter(Phase::Deliver, now_ms);
                    self.waiting_for = "old nodes to drain their outboxes".into();
                    vec![Effect::Unfence]
                } else {
                    // Still the old controller: the switch must be (or is being) done. The
                    // shell starts it once and answers with ControllerSwitchFailed if it fails.
                    vec![Effect::SwitchController { target }]
                }
            }
            Phase::Deliver => {
                if cluster.fenced {
                    return vec![Effect::Unfence];
                }
                let busy: Vec<&String> = self
                    .nodes
                    .keys()
                    .filter(|id| {
                        !node(id).is_some_and(|n| {
                            target.runs_on(n.release, n.binary_sha256.as_deref())
                                || !n.reachable
                                || (n.grant == Grant::Deliver
                                    && n.outbox_count <= DRAINED_RECORDS_MAX)
                        })
                    })
                    .collect();
                if busy.is_empty() {
                    self.enter(Phase::Backups, now_ms);
                    self.tick(nodes, cluster, now_ms)
                } else {
                    self.waiting_for = format!(
                        "outboxes of {} to drain over the redundant channel",
                        join(&busy)
                    );
                    vec![]
                }
            }
            Phase::Backups => {
                let backups: Vec<String> =
                    self.plan.groups.iter().map(|g| g.backup.clone()).collect();
                let mut effects = Vec::new();
                for id in &backups {
                    effects.extend(self.advance_node(id, node(id), true, now_ms));
                }
                if self.status != Status::Running {
                    return effects;
                }
                let pending: Vec<&String> = backups
                    .iter()
                    .filter(|id| !matches!(self.nodes.get(*id), Some(NodeStep::Upgraded { .. })))
                    .collect();
                if pending.is_empty() {
                    self.enter(Phase::Primaries, now_ms);
                    effects.extend(self.tick(nodes, cluster, now_ms));
                } else {
                    self.waiting_for = format!(
                        "backups {} to switch and pass their health gate",
                        join(&pending)
                    );
                }
                effects
            }
            Phase::Primaries => self.primaries(nodes, now_ms),
            Phase::Finalize => {
                // Never past the point of no return with a node not upgraded: one
                // found back on its old release while this step waited (reset to
                // pending by `failed_switches`, then resumed) switches again first.
                if self
                    .nodes
                    .values()
                    .any(|s| !matches!(s, NodeStep::Upgraded { .. }))
                {
                    self.enter(Phase::Primaries, now_ms);
                    return self.primaries(nodes, now_ms);
                }
                if !target.same_binary(cluster.controller_supervisor_sha256.as_deref()) {
                    self.waiting_for =
                        "the controller's supervisor to re-execute into the new binary".into();
                    return vec![];
                }
                // Its own step, so `pause_at: finalize` stops before the point of no return.
                self.end(Status::Finalized, now_ms);
                self.waiting_for.clear();
                let mut effects = vec![Effect::Finalize {
                    release: target.release,
                }];
                effects.extend(self.desired_all(Desired::default()));
                effects
            }
        }
    }

    fn primaries(&mut self, nodes: &[NodeView], now_ms: u64) -> Vec<Effect> {
        let node = |id: &str| nodes.iter().find(|n| n.id == id);
        let phase_ms = now_ms.saturating_sub(self.phase_started_ms());
        let mut effects = Vec::new();
        let mut waiting = Vec::new();
        let groups = self.plan.groups.clone();
        // A backup whose switch failed and was resumed switches again here.
        for g in &groups {
            if !matches!(self.nodes.get(&g.backup), Some(NodeStep::Upgraded { .. })) {
                effects.extend(self.advance_node(&g.backup, node(&g.backup), true, now_ms));
            }
        }
        for g in &groups {
            let view = node(&g.primary);
            let backup_ready = matches!(self.nodes.get(&g.backup), Some(NodeStep::Upgraded { .. }));
            match self.nodes.get(&g.primary).cloned() {
                Some(NodeStep::Pending) => {
                    self.nodes
                        .insert(g.primary.clone(), NodeStep::Waiting { since_ms: now_ms });
                    effects.push(Effect::SetDesired {
                        node: g.primary.clone(),
                        desired: Desired {
                            quiesce: true,
                            ..self.staged()
                        },
                    });
                    waiting.push(g.primary.clone());
                }
                Some(NodeStep::Waiting { .. }) => {
                    let idle = view.is_some_and(|n| n.current_events.is_empty());
                    let go = match self.plan.policy {
                        PrimaryPolicy::Wait => idle,
                        PrimaryPolicy::Failover => backup_ready,
                        PrimaryPolicy::Deadline { ms } => idle || (backup_ready && phase_ms >= ms),
                    };
                    if go {
                        effects.extend(self.advance_node(&g.primary, view, false, now_ms));
                    } else {
                        let events = view
                            .map(|n| format!("{:?}", n.current_events))
                            .unwrap_or_default();
                        waiting.push(format!("{} (events {events})", g.primary));
                    }
                }
                _ => effects.extend(self.advance_node(&g.primary, view, false, now_ms)),
            }
        }
        if self.status != Status::Running {
            return effects;
        }
        if !waiting.is_empty() {
            self.waiting_for_operations_ms = phase_ms;
        }
        let pending: Vec<&String> = groups
            .iter()
            .flat_map(|g| [&g.primary, &g.backup])
            .filter(|id| !matches!(self.nodes.get(*id), Some(NodeStep::Upgraded { .. })))
            .collect();
        if pending.is_empty() {
            self.enter(Phase::Finalize, now_ms);
            self.waiting_for = format!(
                "finalize: the cluster release moves to {}",
                self.plan.target.release
            );
        } else if waiting.is_empty() {
            self.waiting_for = format!("{} to switch and pass their health gate", join(&pending));
        } else {
            self.waiting_for = format!(
                "primaries waiting for their operations to end: {}",
                waiting.join(", ")
            );
        }
        effects
    }

    /// Moves one node through Pending/Waiting → Switching → Upgraded.
    fn advance_node(
        &mut self,
        id: &str,
        view: Option<&NodeView>,
        _backup: bool,
        now_ms: u64,
    ) -> Vec<Effect> {
        let target = self.plan.target.clone();
        // Upgraded means every process of the node runs the new binary: its
        // supervisor re-executes itself once the old worker is gone.
        let on_target = view.is_some_and(|n| {
            target.runs_on(n.release, n.binary_sha256.as_deref())
                && target.same_binary(n.supervisor_sha256.as_deref())
        });
        let healthy = view.is_some_and(|n| {
            n.reachable && n.grant == Grant::Full && n.outbox_count <= DRAINED_RECORDS_MAX
        });
        match self.nodes.get(id).cloned() {
            Some(NodeStep::Pending) | Some(NodeStep::Waiting { .. }) => {
                self.nodes
                    .insert(id.to_owned(), NodeStep::Switching { since_ms: now_ms });
                let desired = Desired {
                    switch_to: Some(target.release),
                    ..self.staged()
                };
                vec![Effect::SetDesired {
                    node: id.to_owned(),
                    desired,
                }]
            }
            Some(NodeStep::Switching { since_ms }) => {
                if on_target && healthy {
                    self.nodes
                        .insert(id.to_owned(), NodeStep::Upgraded { at_ms: now_ms });
                    vec![Effect::SetDesired {
                        node: id.to_owned(),
                        desired: Desired::default(),
                    }]
                } else if now_ms.saturating_sub(since_ms) > self.plan.node_switch_wait_ms {
                    self.status = Status::Paused;
                    self.waiting_for = format!(
                        "node {id} did not come back healthy on release {} within {} ms; \
                         the upgrade is paused: fix the node, then resume (or abort)",
                        target.release, self.plan.node_switch_wait_ms
                    );
                    self.nodes
                        .insert(id.to_owned(), NodeStep::Switching { since_ms: now_ms });
                    vec![]
                } else {
                    vec![]
                }
            }
            _ => vec![],
        }
    }
}

fn join(ids: &[impl AsRef<str>]) -> String {
    ids.iter()
        .map(|s| s.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "r2-0123456789ab";

    #[test]
    fn a_phase_parses_from_its_wire_name() {
        for p in Phase::ALL {
            assert_eq!(
                serde_json::to_value(p).ok(),
                Some(serde_json::Value::from(p.as_str()))
            );
            assert_eq!(Phase::parse(p.as_str()), Ok(p));
        }
        assert!(Phase::parse("Primaries").is_err());
        assert!(Phase::parse("").is_err());
    }

    fn plan(policy: PrimaryPolicy) -> Plan {
        Plan {
            target: Target {
                artifact_id: A.into(),
                release: Release(2),
                schema: Schema(2),
                size: 1000,
                facts: None,
                sha256: None,
                contracts: None,
            },
            from_release: Release(1),
            policy,
            groups: vec![PlanGroup {
                name: "g1".into(),
                primary: "p".into(),
                backup: "b".into(),
            }],
            pause_at: vec![],
            node_switch_wait_ms: NODE_SWITCH_WAIT_MS,
        }
    }

    /// A tiny model cluster that applies effects the way the controller and nodes would.
    struct Sim {
        up: Upgrade,
        nodes: Vec<NodeView>,
        cluster: ClusterView,
        desired: BTreeMap<String, Desired>,
        now: u64,
        finalized: Option<Release>,
    }

    fn node(id: &str, role: Role) -> NodeView {
        NodeView {
            id: id.into(),
            role,
            group: "g1".into(),
            release: Release(1),
            schema: Schema(1),
            reachable: true,
            grant: Grant::Full,
            epoch: 1,
            staged: vec![],
            outbox_count: 3,
            current_events: vec![7],
            binary_sha256: None,
            supervisor_sha256: None,
        }
    }

    impl Sim {
        fn new(policy: PrimaryPolicy) -> Sim {
            Sim {
                up: Upgrade::new(plan(policy), 0),
                nodes: vec![node("p", Role::Primary), node("b", Role::Backup)],
                cluster: ClusterView {
                    epoch: 1,
                    fenced: false,
                    controller_release: Release(1),
                    controller_sha256: None,
                    controller_supervisor_sha256: None,
                    database_schema: Schema(1),
                    disk_free_bytes: 1 << 30,
                },
                desired: BTreeMap::new(),
                now: 0,
                finalized: None,
            }
        }

        fn input(&mut self, input: Input) {
            self.now += 100;
            for e in self.up.step(input, self.now) {
                match e {
                    Effect::Fence => {
                        self.cluster.epoch += 1;
                        self.cluster.fenced = true;
                    }
                    Effect::Unfence => self.cluster.fenced = false,
                    Effect::SetDesired { node, desired } => {
                        self.desired.insert(node, desired);
                    }
                    Effect::SwitchController { target } => {
                        self.cluster.controller_release = target.release;
                        self.cluster.controller_sha256 = target.sha256.clone();
                        self.cluster.database_schema = target.schema;
                    }
                    Effect::Finalize { release } => self.finalized = Some(release),
                }
            }
            // Nodes react: stage, take the grant, switch, go idle when quiesced.
            let ctl = ReleaseInfo::of(self.cluster.controller_release).unwrap();
            for n in &mut self.nodes {
                let d = self.desired.get(&n.id).cloned().unwrap_or_default();
                if let Some(a) = d.stage {
                    if !n.staged.contains(&a) {
                        n.staged.push(a);
                    }
                }
                if let Some(r) = d.switch_to {
                    n.release = r;
                    n.schema = self.up.plan.target.schema;
                    n.binary_sha256 = self.up.plan.target.sha256.clone();
                }
                if d.quiesce {
                    n.current_events.clear();
                }
                n.grant = crate::grant::decide_grant(ctl, n.schema, self.cluster.fenced).grant;
                n.epoch = self.cluster.epoch;
                n.outbox_count = 0;
            }
        }

        fn tick(&mut self) {
            let input = Input::Tick {
                nodes: self.nodes.clone(),
                cluster: self.cluster.clone(),
            };
            self.input(input);
        }

        fn run_until(&mut self, phase: Phase) {
            for _ in 0..50 {
                if self.up.phase == phase || self.up.status.is_over() {
                    return;
                }
                self.tick();
            }
            panic!("never reached {phase:?}: {:?}", self.up);
        }
    }

    const PATCH_SHA: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const OLD_SHA: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    /// A fleet on release 2 (binary OLD_SHA) and a target of release `to`
    /// described only by its manifest facts.
    fn on_release_2(target: Target) -> Sim {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.up = Upgrade::new(
            Plan {
                target,
                from_release: Release(2),
                ..s.up.plan.clone()
            },
            0,
        );
        s.cluster.controller_release = Release(2);
        s.cluster.controller_sha256 = Some(OLD_SHA.into());
        s.cluster.database_schema = Schema(2);
        for n in &mut s.nodes {
            n.release = Release(2);
            n.schema = Schema(2);
            n.binary_sha256 = Some(OLD_SHA.into());
        }
        s
    }

    fn patch_target() -> Target {
        Target {
            artifact_id: "r2-222222222222".into(),
            release: Release(2),
            schema: Schema(2),
            size: 1000,
            facts: Some(ReleaseInfo::of(Release(2)).unwrap().facts()),
            sha256: Some(PATCH_SHA.into()),
            contracts: Some(CONTRACTS),
        }
    }

    fn release_3_target() -> Target {
        Target {
            artifact_id: "r3-333333333333".into(),
            release: Release(3),
            schema: Schema(3),
            size: 1000,
            facts: Some(ReleaseFacts {
                release: Release(3),
                semver: "3.0.0".into(),
                schema: Schema(3),
                protocol: crate::ProtocolRange { min: 2, max: 3 },
                window_min_schema: Schema(2),
                migrates_from: vec![Schema(2)],
            }),
            sha256: Some("3".repeat(64)),
            contracts: Some(CONTRACTS),
        }
    }

    #[test]
    fn a_patch_build_rolls_through_without_fence_or_deliver() {
        let mut s = on_release_2(patch_target());
        for _ in 0..30 {
            s.tick();
        }
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
        assert_eq!(s.up.path, Path::Compatible);
        let order: Vec<Phase> = s.up.phases.iter().map(|p| p.phase).collect();
        assert_eq!(
            order,
            vec![
                Phase::Preflight,
                Phase::Stage,
                Phase::Controller,
                Phase::Backups,
                Phase::Primaries,
                Phase::Finalize
            ]
        );
        assert_eq!(s.cluster.epoch, 1, "no fence");
        assert_eq!(s.cluster.controller_sha256.as_deref(), Some(PATCH_SHA));
        assert!(s
            .nodes
            .iter()
            .all(|n| n.binary_sha256.as_deref() == Some(PATCH_SHA) && n.grant == Grant::Full));
    }

    #[test]
    fn upgraded_and_finalized_wait_for_supervisors_on_the_new_binary() {
        let mut s = on_release_2(patch_target());
        s.cluster.controller_supervisor_sha256 = Some(OLD_SHA.into());
        for n in &mut s.nodes {
            n.supervisor_sha256 = Some(OLD_SHA.into());
        }
        for _ in 0..30 {
            s.tick();
        }
        // Workers switched, but supervisors still run the old binary.
        assert_eq!(s.up.phase, Phase::Backups, "{:?}", s.up);
        assert!(
            s.up.waiting_for.contains("b to switch"),
            "{}",
            s.up.waiting_for
        );
        for n in &mut s.nodes {
            n.supervisor_sha256 = Some(PATCH_SHA.into());
        }
        for _ in 0..30 {
            s.tick();
        }
        assert_eq!(s.up.phase, Phase::Finalize, "{:?}", s.up);
        assert!(s.up.status == Status::Running, "{:?}", s.up);
        assert!(
            s.up.waiting_for.contains("controller's supervisor"),
            "{}",
            s.up.waiting_for
        );
        s.cluster.controller_supervisor_sha256 = Some(PATCH_SHA.into());
        s.tick();
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
    }

    #[test]
    fn a_release_the_binary_does_not_carry_upgrades_from_its_manifest() {
        let mut s = on_release_2(release_3_target());
        // The simulated controller of release 3 grants by release 3's facts.
        for _ in 0..40 {
            if s.up.status.is_over() {
                break;
            }
            s.now += 100;
            let input = Input::Tick {
                nodes: s.nodes.clone(),
                cluster: s.cluster.clone(),
            };
            for e in s.up.step(input, s.now) {
                match e {
                    Effect::Fence => {
                        s.cluster.epoch += 1;
                        s.cluster.fenced = true;
                    }
                    Effect::Unfence => s.cluster.fenced = false,
                    Effect::SetDesired { node, desired } => {
                        s.desired.insert(node, desired);
                    }
                    Effect::SwitchController { target } => {
                        s.cluster.controller_release = target.release;
                        s.cluster.database_schema = target.schema;
                        s.cluster.controller_sha256 = target.sha256;
                    }
                    Effect::Finalize { release } => s.finalized = Some(release),
                }
            }
            let db = s.cluster.database_schema;
            for n in &mut s.nodes {
                let d = s.desired.get(&n.id).cloned().unwrap_or_default();
                if let Some(a) = d.stage {
                    if !n.staged.contains(&a) {
                        n.staged.push(a);
                    }
                }
                if d.switch_to.is_some() {
                    n.release = Release(3);
                    n.schema = Schema(3);
                    n.binary_sha256 = s.up.plan.target.sha256.clone();
                }
                if d.quiesce {
                    n.current_events.clear();
                }
                n.grant = if s.cluster.fenced {
                    Grant::Fenced
                } else if n.schema == db {
                    Grant::Full
                } else {
                    Grant::Deliver
                };
                n.epoch = s.cluster.epoch;
                n.outbox_count = 0;
            }
        }
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
        assert_eq!(s.up.path, Path::Incompatible);
        assert_eq!(s.finalized, Some(Release(3)));
        let order: Vec<Phase> = s.up.phases.iter().map(|p| p.phase).collect();
        assert_eq!(order, Phase::ALL.to_vec());
    }

    #[test]
    fn preflight_judges_the_target_by_its_manifest_and_names_what_does_not_fit() {
        let refused = |s: &Sim, needle: &str| {
            let e = preflight(&s.up.plan, &s.nodes, &s.cluster).unwrap_err();
            assert!(e.contains(needle), "{e:?} should say {needle:?}");
        };
        // 1 → 3 directly: the database and both nodes are outside its window.
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.up.plan.target = release_3_target();
        refused(
            &s,
            "outside its window: the database (schema 1; release 3 migrates only from \
             schemas [2]), p (schema 1), b (schema 1)",
        );
        s.cluster.database_schema = Schema(2);
        refused(&s, "outside its window: p (schema 1), b (schema 1)");
        // The same binary again: nothing to do.
        let mut s = on_release_2(patch_target());
        s.cluster.controller_sha256 = Some(PATCH_SHA.into());
        refused(&s, "from this very binary");
        // A patch without the controller's digest cannot be told apart.
        s.cluster.controller_sha256 = None;
        refused(&s, "cannot be told apart");
        // A node without a digest cannot be told it switched.
        let mut s = on_release_2(patch_target());
        s.nodes[0].binary_sha256 = None;
        refused(&s, "does not report the digest");
        // Downgrades are refused.
        let mut s = on_release_2(patch_target());
        s.cluster.controller_release = Release(3);
        refused(&s, "does not downgrade");
        // A binary that speaks another worker command line cannot be started by our supervisors.
        let mut s = on_release_2(release_3_target());
        if let Some(c) = s.up.plan.target.contracts.as_mut() {
            c.worker_cli += 1;
        }
        refused(&s, "worker_cli 2 (this binary speaks 1)");
        // A node of a release this controller does not know.
        let mut s = on_release_2(release_3_target());
        s.nodes[1].release = Release(7);
        refused(
            &s,
            "node b runs release 7, which the controller does not know",
        );
        // And what fits is accepted, with its path.
        let s = on_release_2(release_3_target());
        assert_eq!(
            preflight(&s.up.plan, &s.nodes, &s.cluster),
            Ok(Path::Incompatible)
        );
        let s = on_release_2(patch_target());
        assert_eq!(
            preflight(&s.up.plan, &s.nodes, &s.cluster),
            Ok(Path::Compatible)
        );
    }

    #[test]
    fn every_phase_in_order_to_finalized() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        for _ in 0..30 {
            s.tick();
        }
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
        let order: Vec<Phase> = s.up.phases.iter().map(|p| p.phase).collect();
        assert_eq!(order, Phase::ALL.to_vec());
        assert!(s.up.phases.iter().all(|p| p.ended_ms.is_some()));
        assert_eq!(s.finalized, Some(Release(2)));
        assert!(s
            .nodes
            .iter()
            .all(|n| n.release == Release(2) && n.grant == Grant::Full));
        assert!(!s.cluster.fenced);
    }

    #[test]
    fn preflight_refuses_without_changing_anything() {
        type Break = Box<dyn Fn(&mut Sim)>;
        let cases: Vec<(&str, Break)> = vec![
            ("unreachable", Box::new(|s| s.nodes[0].reachable = false)),
            (
                "never said hello",
                Box::new(|s| {
                    s.nodes.pop();
                }),
            ),
            (
                "support window",
                Box::new(|s| s.nodes[1].schema = Schema(0)),
            ),
            ("disk room", Box::new(|s| s.cluster.disk_free_bytes = 10)),
            (
                "already runs",
                Box::new(|s| s.cluster.controller_release = Release(2)),
            ),
        ];
        for (what, breaks) in cases {
            let mut s = Sim::new(PrimaryPolicy::Wait);
            breaks(&mut s);
            s.tick();
            assert!(
                matches!(&s.up.status, Status::Failed { reason } if reason.contains("preflight")),
                "{what}: {:?}",
                s.up.status
            );
            assert!(s.desired.is_empty() && !s.cluster.fenced, "{what}");
        }
    }

    #[test]
    fn stage_waits_for_every_node() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.tick();
        assert_eq!(s.up.phase, Phase::Stage);
        s.nodes[1].reachable = false;
        s.up.step(
            Input::Tick {
                nodes: vec![s.nodes[0].clone()],
                cluster: s.cluster.clone(),
            },
            500,
        );
        assert_eq!(s.up.phase, Phase::Stage);
        assert!(s.up.waiting_for.contains("b"), "{}", s.up.waiting_for);
    }

    #[test]
    fn fence_waits_for_acks_but_not_forever() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Fence);
        assert!(s.cluster.fenced);
        let mut silent = s.nodes.clone();
        silent[0].epoch = 1;
        silent[0].grant = Grant::Full;
        s.up.step(
            Input::Tick {
                nodes: silent.clone(),
                cluster: s.cluster.clone(),
            },
            s.now + 100,
        );
        assert_eq!(s.up.phase, Phase::Fence);
        let late = s.up.phase_started_ms() + FENCE_ACK_WAIT_MS;
        let effects = s.up.step(
            Input::Tick {
                nodes: silent,
                cluster: s.cluster.clone(),
            },
            late,
        );
        assert_eq!(s.up.phase, Phase::Controller);
        assert!(matches!(effects[..], [Effect::SwitchController { .. }]));
    }

    #[test]
    fn a_failed_controller_switch_unfences_and_fails() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Controller);
        let effects = s.up.step(
            Input::ControllerSwitchFailed {
                reason: "migration failed".into(),
            },
            9_000,
        );
        assert!(effects.contains(&Effect::Unfence));
        assert!(
            matches!(&s.up.status, Status::Failed { reason } if reason.contains("migration failed"))
        );
    }

    #[test]
    fn deliver_waits_for_outboxes_to_drain() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Deliver);
        let mut busy = s.nodes.clone();
        for n in &mut busy {
            n.grant = Grant::Deliver;
            n.outbox_count = DRAINED_RECORDS_MAX + 1;
        }
        s.up.step(
            Input::Tick {
                nodes: busy,
                cluster: s.cluster.clone(),
            },
            s.now + 1,
        );
        assert_eq!(s.up.phase, Phase::Deliver);
        assert!(s.up.waiting_for.contains("drain"));
    }

    #[test]
    fn backups_switch_before_primaries() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Backups);
        assert_eq!(s.desired["b"].switch_to, Some(Release(2)));
        assert_eq!(s.desired.get("p").and_then(|d| d.switch_to), None);
    }

    fn primary_release_after(policy: PrimaryPolicy, primary_busy_forever: bool) -> Sim {
        let mut s = Sim::new(policy);
        s.run_until(Phase::Primaries);
        for _ in 0..10 {
            if primary_busy_forever {
                s.nodes[0].current_events = vec![7];
            }
            let input = Input::Tick {
                nodes: s.nodes.clone(),
                cluster: s.cluster.clone(),
            };
            s.now += 1_000;
            let effects = s.up.step(input, s.now);
            for e in effects {
                if let Effect::SetDesired { node, desired } = e {
                    if node == "p" {
                        if let Some(r) = desired.switch_to {
                            s.nodes[0].release = r;
                            s.nodes[0].schema = Schema(r.0);
                        }
                    }
                    s.desired.insert(node, desired);
                }
            }
        }
        s
    }

    #[test]
    fn primary_policies() {
        // wait: a primary with an event that never ends is never switched.
        let s = primary_release_after(PrimaryPolicy::Wait, true);
        assert_eq!(s.nodes[0].release, Release(1));
        assert!(
            s.up.waiting_for.contains("operations"),
            "{}",
            s.up.waiting_for
        );
        assert!(s.up.waiting_for_operations_ms > 0);
        assert!(s.desired["p"].quiesce);
        // failover: switched as soon as the backup is upgraded, events or not.
        let s = primary_release_after(PrimaryPolicy::Failover, true);
        assert_eq!(s.nodes[0].release, Release(2));
        // deadline: waits, then fails over.
        let s = primary_release_after(PrimaryPolicy::Deadline { ms: 4_000 }, true);
        assert_eq!(s.nodes[0].release, Release(2));
        let s = primary_release_after(PrimaryPolicy::Deadline { ms: 60_000 }, true);
        assert_eq!(s.nodes[0].release, Release(1));
    }

    #[test]
    fn a_node_that_does_not_come_back_pauses_the_upgrade() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Backups);
        let mut stuck = s.nodes.clone();
        stuck[1].release = Release(1);
        stuck[1].reachable = false;
        s.up.step(
            Input::Tick {
                nodes: stuck,
                cluster: s.cluster.clone(),
            },
            s.now + NODE_SWITCH_WAIT_MS + 1_000,
        );
        assert_eq!(s.up.status, Status::Paused, "{:?}", s.up);
        assert!(s.up.waiting_for.contains("resume"), "{}", s.up.waiting_for);
    }

    /// The backup `b` told to switch, but back on release 1 and reachable
    /// (its supervisor refused the new release), `ms` after the switch began.
    fn backup_back_on_release_1(s: &mut Sim, ms: u64) -> Vec<Effect> {
        let since = match s.up.nodes["b"] {
            NodeStep::Switching { since_ms } => since_ms,
            ref other => panic!("b is {other:?}"),
        };
        let mut back = s.nodes.clone();
        back[1].release = Release(1);
        back[1].schema = Schema(1);
        back[1].grant = Grant::Deliver;
        s.up.step(
            Input::Tick {
                nodes: back,
                cluster: s.cluster.clone(),
            },
            since + ms,
        )
    }

    #[test]
    fn a_node_back_on_its_old_release_pauses_naming_it_and_is_asked_anew_on_resume() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Backups);
        // Still draining or starting the new release: not a failure yet.
        assert!(backup_back_on_release_1(&mut s, NODE_SWITCH_BACK_MS - 1).is_empty());
        assert_eq!(s.up.status, Status::Running);
        let effects = backup_back_on_release_1(&mut s, NODE_SWITCH_BACK_MS);
        assert_eq!(s.up.status, Status::Paused, "{:?}", s.up);
        assert!(
            s.up.waiting_for
                .contains("node b could not switch to release 2: it came back on release 1"),
            "{}",
            s.up.waiting_for
        );
        // It is told to stop trying, and keeps its staged artifact.
        assert_eq!(
            effects,
            vec![Effect::SetDesired {
                node: "b".into(),
                desired: Desired {
                    stage: Some(A.into()),
                    ..Desired::default()
                }
            }]
        );
        assert_eq!(s.up.nodes["b"], NodeStep::Pending);
        // Resume asks anew.
        s.up.step(Input::Resume, s.now + NODE_SWITCH_BACK_MS + 1);
        let mut back = s.nodes.clone();
        back[1].release = Release(1);
        let effects = s.up.step(
            Input::Tick {
                nodes: back,
                cluster: s.cluster.clone(),
            },
            s.now + NODE_SWITCH_BACK_MS + 2,
        );
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SetDesired { node, desired }
                if node == "b" && desired.switch_to == Some(Release(2)))),
            "{effects:?}"
        );
        assert!(matches!(s.up.nodes["b"], NodeStep::Switching { .. }));
    }

    #[test]
    fn a_node_restaging_after_a_restart_is_not_taken_for_a_failed_switch() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Backups);
        s.nodes[1].staged.clear();
        assert!(backup_back_on_release_1(&mut s, NODE_SWITCH_BACK_MS + 1).is_empty());
        assert_eq!(s.up.status, Status::Running);
    }

    #[test]
    fn an_upgraded_node_that_falls_back_is_caught_before_finalize() {
        // Failover: the primary switches as soon as the backup looks upgraded.
        let mut s = Sim::new(PrimaryPolicy::Failover);
        s.run_until(Phase::Finalize);
        assert_eq!(
            s.up.status,
            Status::Running,
            "finalize is a step of its own"
        );
        assert_eq!(s.finalized, None);
        // The backup's new worker was never committed: its supervisor restarted release 1.
        s.nodes[1].release = Release(1);
        s.nodes[1].schema = Schema(1);
        s.tick();
        assert_eq!(s.up.status, Status::Paused, "{:?}", s.up);
        assert_eq!(s.finalized, None, "never past the point of no return");
        assert!(s.up.waiting_for.contains("node b could not switch"));
        assert_eq!(s.desired["b"].switch_to, None, "b stops trying");
        // Fixed and resumed: b switches again (the sim switches it), then finalize.
        s.input(Input::Resume);
        for _ in 0..5 {
            s.tick();
        }
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
        assert_eq!(s.finalized, Some(Release(2)));
        assert_eq!(
            s.nodes[1].release,
            Release(2),
            "b was asked anew and switched"
        );
    }

    /// Found by the simulation (crates/sim): a node reset to pending while the
    /// upgrade waited at finalize was left on its old release, and resume
    /// finalized anyway.
    #[test]
    fn resume_at_finalize_switches_a_node_that_fell_back_before_finalizing() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.run_until(Phase::Finalize);
        let back_on_1 = |s: &mut Sim| {
            s.nodes[1].release = Release(1);
            s.nodes[1].schema = Schema(1);
        };
        back_on_1(&mut s);
        s.tick();
        assert_eq!(s.up.status, Status::Paused, "{:?}", s.up);
        s.input(Input::Resume);
        // b has not switched again yet: resume must not finalize without it.
        back_on_1(&mut s);
        let input = Input::Tick {
            nodes: s.nodes.clone(),
            cluster: s.cluster.clone(),
        };
        s.now += 100;
        let effects = s.up.step(input, s.now);
        assert_eq!(s.up.status, Status::Running, "{:?}", s.up);
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Finalize { .. })),
            "{effects:?}"
        );
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::SetDesired { node, desired }
                if node == "b" && desired.switch_to == Some(Release(2)))),
            "b is asked to switch again: {effects:?}"
        );
        for e in effects {
            if let Effect::SetDesired { node, desired } = e {
                s.desired.insert(node, desired);
            }
        }
        // Once b is back on release 2 and healthy, the upgrade finalizes.
        for _ in 0..5 {
            s.tick();
        }
        assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
        assert_eq!(s.finalized, Some(Release(2)));
        assert!(s.nodes.iter().all(|n| n.release == Release(2)));
    }

    #[test]
    fn pause_at_finalize_stops_before_the_point_of_no_return() {
        let mut s = Sim::new(PrimaryPolicy::Failover);
        s.up.plan.pause_at = vec![Phase::Finalize];
        s.run_until(Phase::Finalize);
        assert_eq!(s.up.status, Status::Paused);
        s.tick();
        assert_eq!(s.finalized, None);
        s.input(Input::Resume);
        s.tick();
        assert_eq!(s.up.status, Status::Finalized);
        assert_eq!(s.finalized, Some(Release(2)));
    }

    #[test]
    fn the_node_switch_wait_comes_from_the_plan() {
        let mut json = serde_json::to_value(plan(PrimaryPolicy::Wait)).unwrap();
        json.as_object_mut().unwrap().remove("node_switch_wait_ms");
        let old: Plan = serde_json::from_value(json).unwrap();
        assert_eq!(
            old.node_switch_wait_ms, NODE_SWITCH_WAIT_MS,
            "a stored plan without it"
        );
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.up.plan.node_switch_wait_ms = 5_000;
        s.run_until(Phase::Backups);
        let mut gone = s.nodes.clone();
        gone[1].release = Release(1);
        gone[1].reachable = false;
        s.up.step(
            Input::Tick {
                nodes: gone,
                cluster: s.cluster.clone(),
            },
            s.now + 5_001,
        );
        assert_eq!(s.up.status, Status::Paused);
        assert!(
            s.up.waiting_for.contains("within 5000 ms"),
            "{}",
            s.up.waiting_for
        );
    }

    #[test]
    fn pause_and_resume() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.tick();
        s.input(Input::Pause);
        let phase = s.up.phase;
        for _ in 0..5 {
            s.tick();
        }
        assert_eq!((s.up.phase, &s.up.status), (phase, &Status::Paused));
        s.input(Input::Resume);
        s.run_until(Phase::Finalize);
        s.tick();
        assert_eq!(s.up.status, Status::Finalized);
    }

    #[test]
    fn abort_from_each_phase() {
        for phase in Phase::ALL {
            let mut s = Sim::new(PrimaryPolicy::Wait);
            s.run_until(phase);
            if s.up.status.is_over() {
                continue;
            }
            let answer = s.up.abort_answer();
            let before = s.up.clone();
            s.input(Input::Abort);
            match (phase, answer) {
                (Phase::Controller | Phase::Finalize, Err(_)) => {
                    assert_eq!(s.up, before, "{phase:?}: refused abort changes nothing")
                }
                (Phase::Fence, Ok(_)) => {
                    assert!(matches!(s.up.status, Status::Aborted { .. }));
                    assert!(!s.cluster.fenced, "abort from fence unfences");
                }
                (_, Ok(_)) => assert!(matches!(s.up.status, Status::Aborted { .. }), "{phase:?}"),
                (p, a) => panic!("{p:?}: unexpected {a:?}"),
            }
        }
    }

    #[test]
    fn resume_from_every_persisted_state() {
        // Persist after every step, restore into a new value (a new controller), go on.
        let mut s = Sim::new(PrimaryPolicy::Wait);
        let mut seen = Vec::new();
        for _ in 0..40 {
            let stored = serde_json::to_string(&s.up).unwrap();
            s.up = serde_json::from_str(&stored).unwrap();
            seen.push(s.up.phase);
            s.tick();
            if s.up.status.is_over() {
                break;
            }
        }
        assert_eq!(s.up.status, Status::Finalized);
        for p in Phase::ALL {
            assert!(
                seen.contains(&p) || p == Phase::Finalize,
                "{p:?} never persisted"
            );
        }
    }

    #[test]
    fn pause_at_stops_at_the_start_of_a_phase() {
        let mut s = Sim::new(PrimaryPolicy::Wait);
        s.up.plan.pause_at = vec![Phase::Deliver, Phase::Backups];
        s.run_until(Phase::Deliver);
        assert_eq!(s.up.status, Status::Paused);
        assert!(
            !s.cluster.fenced,
            "the phase's own effects ran before the pause"
        );
        s.tick();
        assert_eq!(s.up.phase, Phase::Deliver, "paused: ticks change nothing");
        s.input(Input::Resume);
        s.run_until(Phase::Backups);
        assert_eq!(s.up.status, Status::Paused);
        assert_eq!(
            s.desired["b"].switch_to,
            Some(Release(2)),
            "backups were told to switch before the pause"
        );
        s.input(Input::Resume);
        for _ in 0..20 {
            s.tick();
        }
        assert_eq!(s.up.status, Status::Finalized);
    }

    #[test]
    fn policies_parse() {
        assert_eq!(PrimaryPolicy::parse("wait"), Ok(PrimaryPolicy::Wait));
        assert_eq!(
            PrimaryPolicy::parse("failover"),
            Ok(PrimaryPolicy::Failover)
        );
        assert_eq!(
            PrimaryPolicy::parse("deadline=1500"),
            Ok(PrimaryPolicy::Deadline { ms: 1500 })
        );
        assert!(PrimaryPolicy::parse("deadline=soon").is_err());
        assert!(PrimaryPolicy::parse("yolo").is_err());
    }
}
