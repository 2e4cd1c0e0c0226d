//! The upgrade state machine driven through every phase and policy by a
//! tiny model cluster.

use super::*;
use crate::release::CONTRACTS;

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
                replicas_behind: vec![],
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

#[test]
fn the_controller_phase_waits_for_every_replica_to_switch() {
    let mut s = Sim::new(PrimaryPolicy::Wait);
    s.run_until(Phase::Controller);
    // The leader switched (the sim's effect), a replica has not yet.
    s.cluster.replicas_behind = vec!["c2".into()];
    for _ in 0..5 {
        s.tick();
    }
    assert_eq!(s.up.phase, Phase::Controller, "{:?}", s.up);
    assert!(s.up.waiting_for.contains("c2"), "{}", s.up.waiting_for);
    assert!(
        s.cluster.fenced,
        "the fence holds while a replica is behind"
    );
    s.cluster.replicas_behind.clear();
    s.tick();
    assert_eq!(s.up.phase, Phase::Deliver, "{:?}", s.up);
    s.run_until(Phase::Finalize);
    s.tick();
    assert_eq!(s.up.status, Status::Finalized, "{:?}", s.up);
}
