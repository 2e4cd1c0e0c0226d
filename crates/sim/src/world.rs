//! The world: one seed, one RNG, one queue; the network, the faults, the
//! operator and the end of a run.

use crate::check;
use crate::controller::{Controller, CtlIo, Reply};
use crate::net::{Answer, Event, NodeIx, Payload, Queue};
use crate::node::{Io, Node, Out, Spec, CHANNELS};
use crate::trace::Trace;
use crate::{SimConfig, SimFailure, SimReport, Stats};
use handover_core::release::{Release, Schema};
use handover_core::upgrade::{
    Input, Phase, Plan, PlanGroup, PrimaryPolicy, Status, Target, Upgrade, NODE_SWITCH_WAIT_MS,
};
use handover_core::wire::Role;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Node timers run every this long.
pub const NODE_TICK_MS: u64 = 100;
/// The controller's timers (watch deadlines, orchestrator, operator) run every this long.
pub const CONTROLLER_TICK_MS: u64 = 100;
/// The operator resumes a paused upgrade after looking at it this long.
pub const OPERATOR_RESUME_MS: u64 = 2_000;
/// The operator retries an upgrade whose preflight failed after this long.
pub const PREFLIGHT_RETRY_MS: u64 = 2_000;
/// A settled cluster must stay settled this long (late and duplicated
/// messages from the fault period still arrive) before the run ends.
pub const LINGER_MS: u64 = 10_000;
pub const ARTIFACT_ID: &str = "r2-5eed5eed5eed";

/// What a seed decides about its run.
#[derive(Clone, Debug)]
struct SeedParams {
    groups: usize,
    loss: f64,
    duplication: f64,
    slow: f64,
    latency_ms_max: u64,
    fault_every_ms: u64,
    upgrade_at_ms: u64,
    policy: PrimaryPolicy,
    pause_at: Vec<Phase>,
    failing_switch: bool,
    step_crash: f64,
    switch_crash: f64,
    stage_failure: f64,
}

pub struct World {
    seed: u64,
    config: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    queue: Queue,
    trace: Trace,
    ctl: Controller,
    nodes: Vec<Node>,
    partition_until: Vec<u64>,
    /// A node's switch crashed and reverted since the last "could not switch" pause named it.
    reverted: Vec<bool>,
    p: SeedParams,
    stats: Stats,
    events: u64,
    faults_on: bool,
    producing: bool,
    /// Requests waiting in the supervisor's listen backlog while the controller is down.
    backlog: Vec<Payload>,
    switch_target: Option<Target>,
    paused_since: Option<u64>,
    preflight_failed_at: Option<u64>,
    epoch_high: u64,
    cluster_release_seen: Release,
    settled_since: Option<u64>,
    failure: Option<(String, u64)>,
    done: bool,
}

impl World {
    pub fn new(seed: u64, config: &SimConfig) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let f = &config.faults;
        let pct = |rng: &mut ChaCha8Rng, on: bool, max: u32| {
            if on {
                f64::from(rng.random_range(0..=max)) / 100.0
            } else {
                0.0
            }
        };
        let groups = rng.random_range(1..=config.groups_max.max(1));
        let loss = pct(&mut rng, f.loss, 8);
        let duplication = pct(&mut rng, f.duplication, 5);
        let slow = pct(&mut rng, f.reordering, 15);
        let latency_ms_max = if f.reordering {
            rng.random_range(5..=60)
        } else {
            5
        };
        let fault_every_ms = rng.random_range(2_000..=8_000);
        let upgrade_at_ms = rng.random_range(3_000..=40_000);
        let policy = match rng.random_range(0..3) {
            0 => PrimaryPolicy::Wait,
            1 => PrimaryPolicy::Failover,
            _ => PrimaryPolicy::Deadline {
                ms: rng.random_range(2_000..=20_000),
            },
        };
        let pause_at = if rng.random_bool(0.2) {
            vec![Phase::ALL[rng.random_range(1..Phase::ALL.len() - 1)]]
        } else {
            vec![]
        };
        let failing_switch = rng.random_range(0..100) < config.failing_switch_percent;
        let step_crash = pct(&mut rng, f.step_crashes, 10);
        let switch_crash = pct(&mut rng, f.switch_crashes, 30);
        let stage_failure = pct(&mut rng, true, 20);
        let p = SeedParams {
            groups,
            loss,
            duplication,
            slow,
            latency_ms_max,
            fault_every_ms,
            upgrade_at_ms,
            policy,
            pause_at,
            failing_switch,
            step_crash,
            switch_crash,
            stage_failure,
        };
        let mut nodes = Vec::new();
        for g in 0..groups {
            for role in [Role::Primary, Role::Backup] {
                let period = rng.random_range(8_000..=30_000);
                let spec = Spec {
                    ix: nodes.len(),
                    id: format!("{}{}", if role == Role::Primary { "p" } else { "b" }, g + 1),
                    role,
                    group: format!("g{}", g + 1),
                    channel: CHANNELS[g % CHANNELS.len()],
                    produce_every_ms: rng.random_range(200..=900),
                    event_offset_ms: rng.random_range(0..period),
                    event_period_ms: period,
                    event_len_ms: period * rng.random_range(50..=90) / 100,
                };
                nodes.push(Node::new(spec, Release(1), config.heal_stale_registration));
            }
        }
        let n = nodes.len();
        let mut w = World {
            seed,
            config: config.clone(),
            rng,
            now: 0,
            queue: Queue::default(),
            trace: Trace::new(),
            ctl: Controller::new(),
            nodes,
            partition_until: vec![0; n],
            reverted: vec![false; n],
            p,
            stats: Stats::default(),
            events: 0,
            faults_on: true,
            producing: true,
            backlog: Vec::new(),
            switch_target: None,
            paused_since: None,
            preflight_failed_at: None,
            epoch_high: 0,
            cluster_release_seen: Release(1),
            settled_since: None,
            failure: None,
            done: false,
        };
        w.log(format!("seed {seed}: {:?}", w.p));
        for node in &w.nodes {
            let spec = &node.spec;
            let member = handover_core::identity::Membership {
                group: spec.group.clone(),
                role: spec.role,
            };
            w.ctl
                .add_node(&spec.id, member, &crate::node::bootstrap_token(&spec.id));
        }
        w.with_ctl(|c, io| {
            c.start(io);
        });
        w.queue.push(0, Event::ControllerTick);
        for ix in 0..n {
            let start = w.rng.random_range(0..=2_000);
            let inc = w.nodes[ix].incarnation;
            w.queue.push(
                start,
                Event::NodeRestart {
                    node: ix,
                    incarnation: inc,
                },
            );
            let tick = w.rng.random_range(0..NODE_TICK_MS);
            w.queue.push(tick, Event::NodeTick(ix));
        }
        let first_fault = w.fault_gap();
        w.queue.push(first_fault, Event::Fault);
        w.queue.push(config.fault_ms, Event::FaultsEnd);
        w
    }

    pub fn keep_full_trace(&mut self) {
        self.trace.keep_full();
    }

    pub fn full_trace(&self) -> Vec<String> {
        self.trace.full()
    }

    pub fn run(mut self) -> Result<SimReport, SimFailure> {
        self.run_mut()
    }

    pub fn run_mut(&mut self) -> Result<SimReport, SimFailure> {
        while !self.done {
            if let Some((why, at)) = self.failure.take() {
                return Err(self.fail(why, at));
            }
            let Some((at, event)) = self.queue.pop() else {
                return Err(self.fail("the event queue ran dry".into(), self.now));
            };
            self.now = at;
            self.events += 1;
            if self.events > self.config.events_max {
                let why = format!(
                    "did not converge within {} events: {}",
                    self.config.events_max,
                    self.progress()
                );
                return Err(self.fail(why, self.now));
            }
            if self.now > self.config.sim_ms_max {
                let why = format!(
                    "did not converge within {} ms: {}",
                    self.config.sim_ms_max,
                    self.progress()
                );
                return Err(self.fail(why, self.now));
            }
            self.handle(event);
            if self.ctl.durable.epoch < self.epoch_high {
                self.violate(format!(
                    "the epoch went down from {} to {}",
                    self.epoch_high, self.ctl.durable.epoch
                ));
            }
            self.epoch_high = self.epoch_high.max(self.ctl.durable.epoch);
            let cluster_release = self.ctl.durable.cluster_release;
            if cluster_release != self.cluster_release_seen {
                self.cluster_release_seen = cluster_release;
                let behind: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.durable.release != cluster_release)
                    .map(|n| format!("{} on release {}", n.spec.id, n.durable.release))
                    .collect();
                if !behind.is_empty() {
                    self.violate(format!(
                        "the cluster release moved to {cluster_release} with {}",
                        behind.join(", ")
                    ));
                }
            }
        }
        if let Some((why, at)) = self.failure.take() {
            return Err(self.fail(why, at));
        }
        let expect = self.expected_outcome();
        if let Err(why) = check::final_state(&self.ctl, &self.nodes, &expect) {
            return Err(self.fail(why, self.now));
        }
        Ok(self.report())
    }

    fn fail(&self, invariant: String, at_ms: u64) -> SimFailure {
        SimFailure {
            seed: self.seed,
            at_ms,
            invariant,
            trace_tail: self.trace.tail(),
            notable_tail: self.trace.notable_tail(),
        }
    }

    fn violate(&mut self, why: String) {
        if self.failure.is_none() {
            self.log(format!("INVARIANT VIOLATED: {why}"));
            self.failure = Some((why, self.now));
        }
    }

    fn log(&mut self, line: String) {
        self.trace.log(self.now, line, true);
    }

    /// A message delivery: in the trace, but not among the notable events.
    fn log_message(&mut self, line: String) {
        self.trace.log(self.now, line, false);
    }

    fn report(&self) -> SimReport {
        let up = self.ctl.upgrade();
        SimReport {
            seed: self.seed,
            trace_hash: self.trace.hash(),
            events: self.events,
            sim_ms: self.now,
            nodes: self.nodes.len(),
            outcome: match up.map(|u| &u.status) {
                Some(Status::Finalized) => "finalized".into(),
                Some(Status::Failed { reason }) => format!("failed: {reason}"),
                other => format!("{other:?}"),
            },
            phases: up
                .map(|u| {
                    u.phases
                        .iter()
                        .map(|p| p.phase.as_str().to_owned())
                        .collect()
                })
                .unwrap_or_default(),
            records_produced: self
                .nodes
                .iter()
                .map(|n| n.durable.journal.len() as u64)
                .sum(),
            records_stored: self.ctl.durable.records.len() as u64,
            stats: self.stats.clone(),
        }
    }

    // ---- randomness ----

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.random_range(lo..=hi)
    }

    fn fault_gap(&mut self) -> u64 {
        let every = self.p.fault_every_ms;
        self.between(every / 2, every * 3 / 2)
    }

    fn latency(&mut self) -> u64 {
        if self.faults_on && self.chance(self.p.slow) {
            self.between(100, 6_000)
        } else {
            self.between(1, self.p.latency_ms_max)
        }
    }

    // ---- the network ----

    fn partitioned(&self, node: NodeIx) -> bool {
        self.now < self.partition_until[node]
    }

    fn transmit(&mut self, payload: Payload) {
        self.stats.messages += 1;
        let node = payload.node();
        if self.partitioned(node) {
            self.stats.cut_by_partition += 1;
            return;
        }
        if self.faults_on && self.chance(self.p.loss) {
            self.stats.lost += 1;
            self.log_message(format!("lost: {}", describe(&payload, &self.nodes)));
            return;
        }
        let d = self.latency();
        if self.faults_on && self.chance(self.p.duplication) {
            self.stats.duplicated += 1;
            let d2 = self.latency();
            self.queue
                .push(self.now + d2, Event::Deliver(payload.clone()));
        }
        self.queue.push(self.now + d, Event::Deliver(payload));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver(payload) => self.deliver(payload),
            Event::NodeTick(ix) => {
                self.queue
                    .push(self.now + NODE_TICK_MS, Event::NodeTick(ix));
                if self.nodes[ix].is_up() {
                    self.with_node(ix, |n, io| n.poll(io));
                }
            }
            Event::ControllerTick => {
                self.queue
                    .push(self.now + CONTROLLER_TICK_MS, Event::ControllerTick);
                self.controller_tick();
            }
            Event::ControllerRestart { incarnation } => {
                if self.ctl.incarnation == incarnation && !self.ctl.is_up() {
                    self.with_ctl(|c, io| {
                        c.start(io);
                    });
                    for payload in std::mem::take(&mut self.backlog) {
                        self.deliver(payload);
                    }
                }
            }
            Event::ControllerSwitchDone { incarnation } => self.controller_switch_done(incarnation),
            Event::NodeRestart { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation == incarnation && !n.is_up() {
                    let release = n.durable.release;
                    n.start(release, self.now);
                    let id = n.spec.id.clone();
                    self.log(format!("{id} starts as release {release}"));
                    self.with_node(node, |n, io| n.poll(io));
                }
            }
            Event::StageDone {
                node,
                incarnation,
                artifact,
                ok,
            } => {
                let n = &self.nodes[node];
                if n.incarnation == incarnation && n.is_up() {
                    let id = n.spec.id.clone();
                    self.log(format!("{id} staging {artifact}: ok {ok}"));
                    let release = ok.then_some(self.plan().target.release);
                    self.with_node(node, |n, io| n.stage_done(&artifact, release, io));
                }
            }
            Event::Fault => self.fault(),
            Event::FaultsEnd => {
                self.faults_on = false;
                self.log("faults end; quiet period".into());
            }
        }
    }

    fn deliver(&mut self, payload: Payload) {
        let node = payload.node();
        if self.partitioned(node) {
            self.stats.cut_by_partition += 1;
            return;
        }
        match payload {
            Payload::ToController {
                node,
                incarnation,
                lane,
                id,
                req,
            } => {
                if !self.ctl.is_up() {
                    self.backlog.push(Payload::ToController {
                        node,
                        incarnation,
                        lane,
                        id,
                        req,
                    });
                    return;
                }
                self.log_message(format!(
                    "{} → ctl {} #{id}",
                    self.nodes[node].spec.id,
                    req.name()
                ));
                self.with_ctl(|c, io| {
                    c.handle(node, incarnation, lane, id, req, io);
                });
            }
            Payload::ToNode {
                node,
                incarnation,
                lane,
                id,
                answer,
            } => {
                let n = &self.nodes[node];
                if n.incarnation != incarnation || !n.is_up() {
                    return; // the process that asked is gone
                }
                let what = match &answer {
                    Answer::Ok(_) => "ok".to_owned(),
                    Answer::Error { status, code, .. } => format!("{status} {code}"),
                    Answer::Reset => "reset".into(),
                };
                self.log_message(format!("ctl → {} {lane:?} #{id}: {what}", n.spec.id));
                self.with_node(node, |n, io| n.on_answer(id, answer, io));
            }
        }
    }

    // ---- calls into nodes and the controller ----

    fn with_node(&mut self, ix: NodeIx, f: impl FnOnce(&mut Node, &mut Io)) {
        let mut io = Io {
            now_ms: self.now,
            produce: self.producing,
            canary: self.config.canary,
            out: Vec::new(),
            log: Vec::new(),
            violation: None,
            stats: &mut self.stats,
        };
        f(&mut self.nodes[ix], &mut io);
        let Io {
            out,
            log,
            violation,
            ..
        } = io;
        for line in log {
            self.log(line);
        }
        if let Some(v) = violation {
            self.violate(v);
        }
        let incarnation = self.nodes[ix].incarnation;
        for o in out {
            match o {
                Out::Send { lane, id, req } => self.transmit(Payload::ToController {
                    node: ix,
                    incarnation,
                    lane,
                    id,
                    req,
                }),
                Out::Stage { artifact } => {
                    let at = self.now + self.between(200, 3_000);
                    let ok = !(self.faults_on && self.chance(self.p.stage_failure));
                    self.queue.push(
                        at,
                        Event::StageDone {
                            node: ix,
                            incarnation,
                            artifact,
                            ok,
                        },
                    );
                }
                Out::Switch { to } => self.node_switch(ix, to),
                Out::Exit => self.node_exit(ix),
            }
        }
    }

    /// A drained node asks its supervisor to switch: the supervisor starts
    /// `to`, or the new release does not come up and the supervisor refuses
    /// the switch, which the old worker remembers before it exits.
    fn node_switch(&mut self, ix: NodeIx, to: Release) {
        let refused = self.faults_on && self.chance(self.p.switch_crash);
        let n = &self.nodes[ix];
        let (id, from) = (n.spec.id.clone(), n.durable.release);
        if refused {
            self.stats.node_switch_crashes += 1;
            self.reverted[ix] = true;
            self.log(format!(
                "{id} switch {from} → {to} fails; the supervisor keeps {from}"
            ));
            self.with_node(ix, |n, io| {
                n.switch_refused("the new release did not become ready", io)
            });
            return;
        }
        let down_ms = self.between(300, 2_500);
        let n = &mut self.nodes[ix];
        n.crash();
        n.durable.release = to;
        let inc = n.incarnation;
        self.log(format!(
            "{id} stops release {from}; the supervisor starts {to}"
        ));
        self.queue.push(
            self.now + down_ms,
            Event::NodeRestart {
                node: ix,
                incarnation: inc,
            },
        );
    }

    /// A worker gave up: it exits, and its supervisor starts the release it runs again.
    fn node_exit(&mut self, ix: NodeIx) {
        let down_ms = self.between(300, 2_500);
        let n = &mut self.nodes[ix];
        n.crash();
        let (id, inc, release) = (n.spec.id.clone(), n.incarnation, n.durable.release);
        self.log(format!(
            "{id} exits; the supervisor starts release {release} again"
        ));
        self.queue.push(
            self.now + down_ms,
            Event::NodeRestart {
                node: ix,
                incarnation: inc,
            },
        );
    }

    /// Calls into the controller, then sends its answers and logs its lines.
    fn with_ctl<R>(&mut self, f: impl FnOnce(&mut Controller, &mut CtlIo) -> R) -> R {
        let mut io = CtlIo {
            now_ms: self.now,
            canary: self.config.canary,
            replies: Vec::new(),
            log: Vec::new(),
            violation: None,
            switch_requested: None,
            stats: &mut self.stats,
        };
        let r = f(&mut self.ctl, &mut io);
        let CtlIo {
            replies,
            log,
            violation,
            switch_requested,
            ..
        } = io;
        self.finish_ctl(replies, log, violation, switch_requested);
        r
    }

    fn finish_ctl(
        &mut self,
        replies: Vec<Reply>,
        log: Vec<String>,
        violation: Option<String>,
        switch_requested: Option<Target>,
    ) {
        for line in log {
            if line.starts_with("ctl stores") {
                self.log_message(line);
            } else {
                self.log(line);
            }
        }
        if let Some(v) = violation {
            self.violate(v);
        }
        for Reply {
            node,
            incarnation,
            lane,
            id,
            answer,
        } in replies
        {
            self.transmit(Payload::ToNode {
                node,
                incarnation,
                lane,
                id,
                answer,
            });
        }
        if let Some(target) = switch_requested {
            self.switch_target = Some(target);
            let at = self.now + self.between(500, 3_000);
            let incarnation = self.ctl.incarnation;
            self.queue
                .push(at, Event::ControllerSwitchDone { incarnation });
        }
    }

    fn crash_controller(&mut self, why: &str) {
        if !self.ctl.is_up() {
            return;
        }
        let down = self.between(200, 4_000);
        self.log(format!("controller crashes ({why}); down {down} ms"));
        self.with_ctl(|c, io| {
            c.crash(io);
        });
        let incarnation = self.ctl.incarnation;
        self.queue
            .push(self.now + down, Event::ControllerRestart { incarnation });
    }

    fn controller_switch_done(&mut self, incarnation: u64) {
        if self.ctl.incarnation != incarnation || !self.ctl.is_up() {
            return; // the process that started it is gone
        }
        let Some(target) = self.switch_target.take() else {
            return;
        };
        if self.p.failing_switch {
            self.log("the new controller fails its health check".into());
            self.with_ctl(|c, io| {
                let input = Input::ControllerSwitchFailed {
                    reason: "simulated: the new release failed its self-check".into(),
                };
                c.step(input, None, io);
            });
            return;
        }
        if self.faults_on && self.chance(self.p.switch_crash) {
            self.stats.controller_switch_crashes += 1;
            let committed = self.chance(0.5);
            self.crash_controller("during its switch");
            if committed {
                // The migration committed: the supervisor runs the new release.
                self.ctl.durable.release = target.release;
            }
            self.log(format!(
                "controller switch crashed midway; restarts as release {}",
                self.ctl.durable.release
            ));
            return;
        }
        // The new worker opens (and migrates) the database; the old one's
        // held requests end with it.
        self.log(format!("controller switches to release {}", target.release));
        self.with_ctl(|c, io| {
            c.crash(io);
            c.durable.release = target.release;
            c.start(io);
        });
    }

    // ---- the controller's timers and the operator ----

    fn controller_tick(&mut self) {
        if !self.ctl.is_up() {
            return;
        }
        self.with_ctl(|c, io| {
            c.wake_watches(io);
        });
        if self.ctl.tick_due(self.now) {
            let crash = (self.faults_on && self.chance(self.p.step_crash))
                .then(|| self.rng.random::<u64>());
            let input = Input::Tick {
                nodes: self.ctl.node_views(self.now),
                cluster: self.ctl.cluster_view(),
            };
            let was_paused = self.ctl.upgrade().map(|u| u.status == Status::Paused);
            let crashed = self.with_ctl(|c, io| c.step(input, crash, io));
            if crashed {
                self.stats.step_crashes += 1;
                self.crash_controller("crash point inside a step");
                return;
            }
            if was_paused == Some(false) {
                self.judge_failed_switch_pause();
            }
        }
        self.operator();
        if !self.faults_on {
            self.maybe_finish();
        }
    }

    /// The upgrade paused saying a node "could not switch" (its supervisor
    /// refused the new release): true only if that node's switch really
    /// crashed and reverted since it was last judged.
    fn judge_failed_switch_pause(&mut self) {
        let Some(up) = self.ctl.upgrade() else {
            return;
        };
        if up.status != Status::Paused || !up.waiting_for.contains("could not switch") {
            return;
        }
        let named: Vec<NodeIx> = up
            .waiting_for
            .split("node ")
            .filter_map(|part| part.split_once(" could not switch").map(|(id, _)| id))
            .filter_map(|id| self.nodes.iter().position(|n| n.spec.id == id))
            .collect();
        for ix in named {
            self.stats.failed_switch_pauses += 1;
            if !std::mem::take(&mut self.reverted[ix]) {
                self.stats.failed_switch_pauses_without_a_failed_switch += 1;
                let id = self.nodes[ix].spec.id.clone();
                self.log(format!(
                    "note: the upgrade says {id} could not switch, but its switch never failed"
                ));
            }
        }
    }

    fn plan(&self) -> Plan {
        Plan {
            target: Target {
                artifact_id: ARTIFACT_ID.into(),
                release: Release(2),
                schema: Schema(2),
                size: 1_000_000,
                facts: None,
                sha256: None,
                contracts: None,
            },
            from_release: Release(1),
            policy: self.p.policy,
            groups: (0..self.p.groups)
                .map(|g| PlanGroup {
                    name: format!("g{}", g + 1),
                    primary: format!("p{}", g + 1),
                    backup: format!("b{}", g + 1),
                })
                .collect(),
            pause_at: self.p.pause_at.clone(),
            node_switch_wait_ms: NODE_SWITCH_WAIT_MS,
        }
    }

    fn operator(&mut self) {
        let status = self.ctl.upgrade().map(|u| u.status.clone());
        match status {
            None => {
                let all_known = self.ctl.durable.nodes.len() == self.nodes.len();
                if self.now >= self.p.upgrade_at_ms && all_known {
                    self.start_upgrade("operator starts the upgrade");
                }
            }
            Some(Status::Failed { reason }) if reason.starts_with("preflight") => {
                let since = *self.preflight_failed_at.get_or_insert(self.now);
                if self.now >= since + PREFLIGHT_RETRY_MS {
                    self.stats.preflight_retries += 1;
                    self.start_upgrade("operator retries after a failed preflight");
                }
            }
            Some(Status::Paused) => {
                let since = *self.paused_since.get_or_insert(self.now);
                if self.now >= since + OPERATOR_RESUME_MS {
                    self.paused_since = None;
                    self.stats.operator_resumes += 1;
                    let why = self
                        .ctl
                        .upgrade()
                        .map(|u| u.waiting_for.clone())
                        .unwrap_or_default();
                    self.log(format!("operator resumes the upgrade (paused: {why})"));
                    self.with_ctl(|c, io| {
                        c.step(Input::Resume, None, io);
                    });
                }
            }
            _ => self.paused_since = None,
        }
    }

    fn start_upgrade(&mut self, why: &str) {
        let plan = self.plan();
        let started = self.with_ctl(|c, io| c.start_upgrade(plan, io));
        if started {
            self.preflight_failed_at = None;
            self.log(format!("{why} ({:?})", self.p.policy));
        }
    }

    // ---- faults ----

    fn fault(&mut self) {
        if !self.faults_on {
            return;
        }
        let gap = self.fault_gap();
        self.queue.push(self.now + gap, Event::Fault);
        let f = self.config.faults.clone();
        let mut kinds = Vec::new();
        if f.partitions {
            kinds.push(0);
        }
        if f.controller_crashes {
            kinds.push(1);
        }
        if f.node_crashes {
            kinds.push(2);
        }
        if kinds.is_empty() {
            return;
        }
        let kind = kinds[self.rng.random_range(0..kinds.len())];
        match kind {
            0 => {
                let ix = self.rng.random_range(0..self.nodes.len());
                let len = self.between(500, 15_000);
                self.partition_until[ix] = self.partition_until[ix].max(self.now + len);
                self.stats.partitions += 1;
                let id = self.nodes[ix].spec.id.clone();
                self.log(format!("partition: {id} cut off for {len} ms"));
            }
            1 => {
                self.stats.controller_crashes += 1;
                self.crash_controller("random crash");
            }
            _ => {
                let ix = self.rng.random_range(0..self.nodes.len());
                if self.nodes[ix].is_up() {
                    let down = self.between(100, 3_000);
                    self.stats.node_crashes += 1;
                    let n = &mut self.nodes[ix];
                    n.crash();
                    let (id, inc) = (n.spec.id.clone(), n.incarnation);
                    self.log(format!("{id} crashes; down {down} ms"));
                    self.queue.push(
                        self.now + down,
                        Event::NodeRestart {
                            node: ix,
                            incarnation: inc,
                        },
                    );
                }
            }
        }
    }

    // ---- the end of a run ----

    fn expected_outcome(&self) -> check::Expected {
        check::Expected {
            failed_switch: self.p.failing_switch,
            target: Release(2),
            from: Release(1),
        }
    }

    /// Once faults are over and the upgrade has ended, production stops;
    /// the run ends when everything has drained and settled.
    fn maybe_finish(&mut self) {
        let Some(up) = self.ctl.upgrade() else {
            return;
        };
        let over = match &up.status {
            Status::Failed { reason } => !reason.starts_with("preflight"),
            s => s.is_over(),
        };
        if !over {
            return;
        }
        if self.producing {
            self.producing = false;
            self.log("the upgrade is over: production stops, everything drains".into());
        }
        if check::settled(&self.ctl, &self.nodes, &self.expected_outcome()).is_err() {
            self.settled_since = None;
            return;
        }
        let since = *self.settled_since.get_or_insert(self.now);
        if since == self.now {
            self.log("settled; lingering for late messages".into());
        }
        if self.now >= since + LINGER_MS {
            self.log("still settled: the run ends".into());
            self.done = true;
        }
    }

    /// Where a run that did not converge got stuck.
    fn progress(&self) -> String {
        let up = self
            .ctl
            .upgrade()
            .cloned()
            .or_else(|| self.ctl.stored_upgrade());
        let upgrade = match &up {
            Some(Upgrade {
                phase,
                status,
                waiting_for,
                ..
            }) => format!(
                "upgrade {} {status:?}, waiting for {waiting_for:?}",
                phase.as_str()
            ),
            None => "no upgrade".into(),
        };
        let settled = check::settled(&self.ctl, &self.nodes, &self.expected_outcome())
            .err()
            .unwrap_or_default();
        format!("{upgrade}; {settled}")
    }
}

fn describe(payload: &Payload, nodes: &[Node]) -> String {
    match payload {
        Payload::ToController { node, req, id, .. } => {
            format!("{} → ctl {} #{id}", nodes[*node].spec.id, req.name())
        }
        Payload::ToNode { node, lane, id, .. } => {
            format!("ctl → {} {lane:?} #{id}", nodes[*node].spec.id)
        }
    }
}
