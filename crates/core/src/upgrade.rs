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
use crate::release::{Contracts, Release, ReleaseFacts, ReleaseInfo, Schema};
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod preflight;
pub use preflight::{contracts_fit, preflight};

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
    /// Other controller replicas on this database that run another binary
    /// than the one running this step: the controller phase ends only once
    /// every live replica switched.
    #[serde(default)]
    pub replicas_behind: Vec<String>,
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
                if switched && !cluster.replicas_behind.is_empty() {
                    // Each replica switches itself when it sees this phase.
                    self.waiting_for = format!(
                        "controller replicas {} to switch to release {}",
                        join(&cluster.replicas_behind),
                        target.release
                    );
                    vec![]
                } else if switched && self.path == Path::Compatible {
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
mod tests;
