//! A simulated content node: the real node's session, heartbeat and shipper
//! loops, its upgrade agent and a producer, over durable state that survives
//! a crash and in-memory state that does not.
//!
//! The loops follow `handover-node` (session.rs, shipper.rs, agent.rs):
//! one request in flight per loop, bounded timeouts and backoff, a new hello
//! on `stale_epoch`, `unauthorized`, `forbidden` or a lost lease, and grant
//! and epoch persisted before anything acts on them.

use crate::net::{Answer, Lane, NodeIx, Request, SentWith};
use crate::{Canary, Stats};
use handover_core::admission::Channel as ShipChannel;
use handover_core::agent;
use handover_core::grant::{Grant, GrantReason};
use handover_core::record::{self, v2::Kind, v3::Severity, Observation};
use handover_core::release::{Release, ReleaseInfo, Schema};
use handover_core::ship;
use handover_core::upgrade::Desired;
use handover_core::wire::{
    Batch, BatchAck, GrantState, Heartbeat, Hello, OutboxState, Role, Welcome, MESSAGE_VERSION,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Timeout of hello and heartbeat requests (the real node: 10 s; the
/// simulation runs a faster cluster so a seed covers more upgrades).
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// Timeout of one batch request.
pub const SHIP_TIMEOUT_MS: u64 = 3_000;
/// How long the node asks the controller to hold a watch.
pub const WATCH_WAIT_MS: u64 = 5_000;
/// Our side gives up on a watch this much later than the controller should answer.
pub const WATCH_TIMEOUT_MS: u64 = WATCH_WAIT_MS + 2_000;
/// An unchanged watch answer faster than this is followed by a pause of this long.
pub const WATCH_SPIN_GUARD_MS: u64 = 250;
pub const HEARTBEAT_MS_MIN: u64 = 100;
pub const HEARTBEAT_MS_MAX: u64 = 10_000;
pub const BACKOFF_MS_MIN: u64 = 100;
pub const BACKOFF_MS_MAX: u64 = 2_000;
/// A switching node drains its outbox at most this long before it stops.
pub const DRAIN_ON_STOP_MS: u64 = 3_000;
/// A failed staging is retried after this long.
pub const STAGE_RETRY_MS: u64 = 500;
/// Simulated time 0 on the wall clock (records carry wall-clock ms).
pub const WALL_BASE_MS: i64 = 1_795_000_000_000;
pub const JOIN_TOKEN: &str = "sim-join-token";

/// A channel as both releases know it: release 1 by name, release 2 by id.
#[derive(Clone, Copy, Debug)]
pub struct Channel {
    pub name: &'static str,
    pub id: i64,
    pub segment_ms: u32,
}

/// The controller's channels; ids are the ones the migration gives them.
pub const CHANNELS: [Channel; 2] = [
    Channel {
        name: "news",
        id: 1,
        segment_ms: 2_000,
    },
    Channel {
        name: "sport",
        id: 2,
        segment_ms: 6_000,
    },
];

/// Who a node is and how it behaves; fixed for a run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub ix: NodeIx,
    pub id: String,
    pub role: Role,
    pub group: String,
    pub channel: Channel,
    pub produce_every_ms: u64,
    /// Event k runs `[offset + k × period, offset + k × period + len)`.
    pub event_offset_ms: u64,
    pub event_period_ms: u64,
    pub event_len_ms: u64,
}

impl Spec {
    fn event_id(&self, k: u64) -> i64 {
        i64::try_from((self.ix as u64 + 1) * 100_000 + k).unwrap_or(i64::MAX)
    }

    fn event_k(&self, id: i64) -> u64 {
        u64::try_from(id).unwrap_or(0) % 100_000
    }

    fn event_start_ms(&self, k: u64) -> u64 {
        self.event_offset_ms + k * self.event_period_ms
    }

    /// The event live at `now_ms`, if any: (k, start).
    fn live_event(&self, now_ms: u64) -> Option<(u64, u64)> {
        let since = now_ms.checked_sub(self.event_offset_ms)?;
        let k = since / self.event_period_ms;
        let start = self.event_start_ms(k);
        (now_ms < start + self.event_len_ms).then_some((k, start))
    }
}

/// One outbox row: a record in the schema of the release that produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    pub seq: u64,
    pub schema: Schema,
    pub body: serde_json::Value,
}

/// What the producer remembers across restarts (the real node keeps it in kv).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub started: BTreeSet<i64>,
    pub finished: BTreeSet<i64>,
    pub media_seq: u64,
    pub stats_second: Option<i64>,
    pub steps: u64,
    /// Natural keys produced, so no fact is recorded twice.
    pub keys: BTreeSet<String>,
}

/// What survives a crash: the node's database.
#[derive(Clone, Debug)]
pub struct Durable {
    /// The release the supervisor runs (its `state.json`).
    pub release: Release,
    pub outbox: VecDeque<OutboxRow>,
    pub next_seq: u64,
    /// Every record ever produced: (seq, natural key).
    pub journal: Vec<(u64, String)>,
    /// The observation behind each seq (the checker's copy, for content checks).
    pub ledger: BTreeMap<u64, Observation>,
    pub grant: Option<Grant>,
    pub epoch: Option<u64>,
    pub credential: Option<String>,
    pub staged: Vec<String>,
    pub progress: Progress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    Down,
    Up,
    /// Told to switch: producing stopped, draining until `until_ms`.
    Quiescing {
        until_ms: u64,
        to: Release,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingKind {
    Hello { with_credential: bool },
    Watch,
    Heartbeat,
    Batch { first: u64, last: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u64,
    sent_ms: u64,
    deadline_ms: u64,
    /// The session generation the request was made in.
    generation: u64,
    kind: PendingKind,
}

#[derive(Clone, Debug)]
struct LaneState {
    pending: Option<Pending>,
    not_before_ms: u64,
    backoff_ms: u64,
}

impl LaneState {
    fn new() -> LaneState {
        LaneState {
            pending: None,
            not_before_ms: 0,
            backoff_ms: BACKOFF_MS_MIN,
        }
    }

    fn back_off(&mut self, now_ms: u64) {
        self.not_before_ms = now_ms + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MS_MAX);
    }

    fn reset(&mut self, now_ms: u64) {
        self.backoff_ms = BACKOFF_MS_MIN;
        self.not_before_ms = now_ms;
    }
}

/// What a crash loses: the worker process's memory.
#[derive(Clone, Debug)]
pub struct Mem {
    pub established: bool,
    pub generation: u64,
    pub lease_ms: u64,
    pub desired: Desired,
    pub desired_rev: Option<u64>,
    pub quiesce_since_ms: Option<u64>,
    session: LaneState,
    heartbeat: LaneState,
    shipper: LaneState,
    last_contact_ms: Option<u64>,
    next_heartbeat_ms: Option<u64>,
    next_produce_ms: u64,
    staging: Option<String>,
    stage_not_before_ms: u64,
    /// The persisted credential was refused: the next hello presents the join token.
    join_next: bool,
    /// The controller's release, as the last welcome said.
    controller_release: Option<Release>,
}

impl Mem {
    fn new(now_ms: u64) -> Mem {
        Mem {
            established: false,
            generation: 0,
            lease_ms: 0,
            desired: Desired::default(),
            desired_rev: None,
            quiesce_since_ms: None,
            session: LaneState::new(),
            heartbeat: LaneState::new(),
            shipper: LaneState::new(),
            last_contact_ms: None,
            next_heartbeat_ms: None,
            next_produce_ms: now_ms,
            staging: None,
            stage_not_before_ms: 0,
            join_next: false,
            controller_release: None,
        }
    }
}

/// What a node asks the world to do.
#[derive(Clone, Debug)]
pub enum Out {
    Send {
        lane: Lane,
        id: u64,
        req: Request,
    },
    /// Start downloading and verifying an artifact.
    Stage {
        artifact: String,
    },
    /// Drained: stop this worker and start `to` (through the supervisor).
    Switch {
        to: Release,
    },
}

/// The world's side of one call into a node.
pub struct Io<'a> {
    pub now_ms: u64,
    /// Whether the producer may run (the quiet end of a run stops it).
    pub produce: bool,
    pub canary: Option<Canary>,
    /// Model the proposed node-side fix for stale registrations.
    pub heal_stale_registration: bool,
    pub out: Vec<Out>,
    pub log: Vec<String>,
    pub violation: Option<String>,
    pub stats: &'a mut Stats,
}

impl Io<'_> {
    fn violate(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }
}

pub struct Node {
    pub spec: Spec,
    pub durable: Durable,
    pub mem: Mem,
    pub life: Life,
    pub incarnation: u64,
    next_request_id: u64,
}

/// What to adopt from a welcome or a grant state (as session.rs).
struct Adopt {
    grant: Grant,
    reason: GrantReason,
    epoch: u64,
    lease_ms: u64,
    desired: Desired,
    desired_rev: u64,
    /// Set for a welcome: authoritative, starts a new generation.
    credential: Option<String>,
}

/// As the real node (`CallError::needs_handshake`): a schema mismatch means
/// a late hello of this node's previous release overtook the current one.
fn needs_handshake(answer: &Answer) -> bool {
    matches!(answer, Answer::Error { status, code, .. }
        if handover_core::admission::refusal_needs_handshake(*status, code))
}

fn forbidden(answer: &Answer) -> bool {
    matches!(answer, Answer::Error { status: 403, .. })
}

fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Ok(_) => "ok".into(),
        Answer::Error { status, code, .. } => format!("{status} {code}"),
        Answer::Reset => "connection reset".into(),
    }
}

impl Node {
    pub fn new(spec: Spec, release: Release) -> Node {
        Node {
            spec,
            durable: Durable {
                release,
                outbox: VecDeque::new(),
                next_seq: 1,
                journal: Vec::new(),
                ledger: BTreeMap::new(),
                grant: None,
                epoch: None,
                credential: None,
                staged: Vec::new(),
                progress: Progress::default(),
            },
            mem: Mem::new(0),
            life: Life::Up,
            incarnation: 1,
            next_request_id: 0,
        }
    }

    pub fn info(&self) -> &'static ReleaseInfo {
        ReleaseInfo::of(self.durable.release).expect("the simulation runs known releases")
    }

    pub fn is_up(&self) -> bool {
        self.life != Life::Down
    }

    /// A crash: the process and its memory are gone; the database stays.
    pub fn crash(&mut self) {
        self.life = Life::Down;
        self.incarnation += 1;
        self.mem = Mem::new(0);
    }

    /// A (re)start as `release`, from the database alone.
    pub fn start(&mut self, release: Release, now_ms: u64) {
        self.durable.release = release;
        self.life = Life::Up;
        self.incarnation += 1;
        self.mem = Mem::new(now_ms);
    }

    pub fn outbox_state(&self) -> OutboxState {
        OutboxState {
            next_seq: self.durable.next_seq,
            oldest_unacked_seq: self.durable.outbox.front().map(|r| r.seq),
            count: self.durable.outbox.len() as u64,
        }
    }

    /// Events running now; a quiesced node takes no event that started after.
    pub fn current_events(&self, now_ms: u64) -> Vec<i64> {
        match self.spec.live_event(now_ms) {
            Some((k, start)) if self.mem.quiesce_since_ms.is_none_or(|q| start < q) => {
                vec![self.spec.event_id(k)]
            }
            _ => vec![],
        }
    }

    pub fn stage_done(&mut self, artifact: &str, ok: bool, now_ms: u64) {
        self.mem.staging = None;
        if ok {
            if !self.durable.staged.iter().any(|a| a == artifact) {
                self.durable.staged.push(artifact.to_owned());
            }
        } else {
            self.mem.stage_not_before_ms = now_ms + STAGE_RETRY_MS;
        }
    }

    /// Everything the node does at `io.now_ms` on its own.
    pub fn poll(&mut self, io: &mut Io) {
        if !self.is_up() {
            return;
        }
        self.expire(io);
        self.agent(io);
        self.produce(io);
        self.session(io);
        self.heartbeat(io);
        self.shipper(io);
        self.drain(io);
    }

    fn next_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        match lane {
            Lane::Session => &mut self.mem.session,
            Lane::Heartbeat => &mut self.mem.heartbeat,
            Lane::Shipper => &mut self.mem.shipper,
        }
    }

    /// Requests whose timeout passed fail like an unreachable controller.
    fn expire(&mut self, io: &mut Io) {
        for lane in [Lane::Session, Lane::Heartbeat, Lane::Shipper] {
            let expired = self
                .lane(lane)
                .pending
                .filter(|p| io.now_ms >= p.deadline_ms);
            if let Some(p) = expired {
                self.lane(lane).pending = None;
                io.log.push(format!(
                    "{} {lane:?} request {} timed out",
                    self.spec.id, p.id
                ));
                self.finish(lane, p, None, io);
            }
        }
    }

    /// An answer from the controller to the request `id` on `lane`.
    pub fn on_answer(&mut self, lane: Lane, id: u64, answer: Answer, io: &mut Io) {
        let Some(p) = self.lane(lane).pending.filter(|p| p.id == id) else {
            return; // not the request this loop waits for: never read, as over HTTP
        };
        self.lane(lane).pending = None;
        if !matches!(answer, Answer::Reset) {
            self.mem.last_contact_ms = Some(io.now_ms);
        }
        self.finish(lane, p, Some(answer), io);
        self.poll(io);
    }

    /// A request is over: `None` is a timeout.
    fn finish(&mut self, lane: Lane, p: Pending, answer: Option<Answer>, io: &mut Io) {
        match p.kind {
            PendingKind::Hello { with_credential } => self.hello_done(with_credential, answer, io),
            PendingKind::Watch => self.watch_done(p, answer, io),
            PendingKind::Heartbeat => self.heartbeat_done(p, answer, io),
            PendingKind::Batch { first, last } => self.batch_done(p, first, last, answer, io),
        }
        debug_assert!(self.lane(lane).pending.is_none());
    }

    /// Asks for a new hello, unless one already happened since `generation`.
    fn request_handshake(&mut self, generation: u64, why: &str, io: &mut Io) {
        if self.mem.generation == generation && self.mem.established {
            io.log
                .push(format!("{} handshaking again: {why}", self.spec.id));
            self.mem.established = false;
            // The session loop abandons its watch and says hello.
            if matches!(
                self.mem.session.pending,
                Some(Pending {
                    kind: PendingKind::Watch,
                    ..
                })
            ) {
                self.mem.session.pending = None;
                self.mem.session.not_before_ms = io.now_ms;
            }
        }
    }

    // ---- session: hello, then the watch long-poll ----

    fn session(&mut self, io: &mut Io) {
        if self.mem.session.pending.is_some() || io.now_ms < self.mem.session.not_before_ms {
            return;
        }
        if !self.mem.established {
            let (token, with_credential) = match (&self.durable.credential, self.mem.join_next) {
                (Some(c), false) => (c.clone(), true),
                _ => (JOIN_TOKEN.to_owned(), false),
            };
            let hello = Hello {
                v: MESSAGE_VERSION,
                node_id: self.spec.id.clone(),
                token,
                release: self.info().release,
                schema: self.info().schema,
                protocol: self.info().protocol,
                role: self.spec.role,
                group: self.spec.group.clone(),
                hls_url: format!("http://sim.invalid/{}", self.spec.id),
                outbox: self.outbox_state(),
                current_events: self.current_events(io.now_ms),
                param_revision: None,
                staged: self.durable.staged.clone(),
                binary_sha256: None,
                supervisor_sha256: None,
            };
            let body = serde_json::to_vec(&hello).expect("hello serializes");
            self.send(
                Lane::Session,
                PendingKind::Hello { with_credential },
                REQUEST_TIMEOUT_MS,
                Request::Hello { body },
                io,
            );
            return;
        }
        let (Some(epoch), Some(grant), Some(credential)) = (
            self.durable.epoch,
            self.durable.grant,
            self.durable.credential.clone(),
        ) else {
            let generation = self.mem.generation;
            self.request_handshake(generation, "incomplete session state", io);
            return;
        };
        let req = Request::Watch {
            credential,
            node: self.spec.id.clone(),
            epoch,
            grant,
            wait_ms: WATCH_WAIT_MS,
            desired_rev: self.mem.desired_rev,
        };
        self.send(Lane::Session, PendingKind::Watch, WATCH_TIMEOUT_MS, req, io);
    }

    fn hello_done(&mut self, with_credential: bool, answer: Option<Answer>, io: &mut Io) {
        let now = io.now_ms;
        let welcome = match answer {
            Some(Answer::Ok(body)) => serde_json::from_slice::<Welcome>(&body)
                .map_err(|e| format!("welcome is not valid: {e}")),
            Some(Answer::Error { status: 401, .. }) if with_credential => {
                self.mem.join_next = true;
                self.mem.session.not_before_ms = now;
                return;
            }
            Some(a) => Err(describe(&a)),
            None => Err("timeout".into()),
        };
        match welcome {
            Ok(w) if w.v == MESSAGE_VERSION => {
                self.mem.join_next = false;
                self.mem.controller_release = Some(w.controller_release);
                self.adopt(
                    Adopt {
                        grant: w.grant,
                        reason: w.grant_reason,
                        epoch: w.epoch,
                        lease_ms: w.lease_ms,
                        desired: w.desired,
                        desired_rev: w.desired_rev,
                        credential: Some(w.credential),
                    },
                    io,
                );
                self.mem.session.reset(now);
            }
            Ok(w) => {
                io.log
                    .push(format!("{} welcome of version {}", self.spec.id, w.v));
                self.mem.session.back_off(now);
            }
            Err(why) => {
                io.log
                    .push(format!("{} hello failed: {why}; retrying", self.spec.id));
                self.mem.session.back_off(now);
            }
        }
    }

    fn watch_done(&mut self, p: Pending, answer: Option<Answer>, io: &mut Io) {
        let now = io.now_ms;
        match answer {
            Some(Answer::Ok(body)) => match serde_json::from_slice::<GrantState>(&body) {
                Ok(gs) if gs.v == MESSAGE_VERSION => {
                    let changed = self.adopt_state(gs, io);
                    self.mem.session.backoff_ms = BACKOFF_MS_MIN;
                    let quick = now.saturating_sub(p.sent_ms) < WATCH_SPIN_GUARD_MS;
                    self.mem.session.not_before_ms = if !changed && quick {
                        now + WATCH_SPIN_GUARD_MS
                    } else {
                        now
                    };
                }
                _ => self.mem.session.back_off(now),
            },
            Some(a) if needs_handshake(&a) || forbidden(&a) => {
                self.request_handshake(p.generation, &describe(&a), io);
                self.mem.session.not_before_ms = now;
            }
            _ => self.mem.session.back_off(now),
        }
    }

    /// Adopts a grant state; an older epoch than the one held lost a race and is ignored.
    fn adopt_state(&mut self, gs: GrantState, io: &mut Io) -> bool {
        if io.heal_stale_registration && gs.grant != Grant::Fenced {
            // The proposed fix: a grant that contradicts our own schema means the
            // controller registered someone else's hello for us; say hello again.
            let expected = self
                .mem
                .controller_release
                .and_then(|r| ReleaseInfo::of(r).ok())
                .map(|c| handover_core::decide_grant(c, self.info().schema, false).grant);
            if expected.is_some_and(|g| g != gs.grant) {
                let generation = self.mem.generation;
                let why = format!("grant {} contradicts this release's schema", gs.grant);
                self.request_handshake(generation, &why, io);
                return false;
            }
        }
        self.adopt(
            Adopt {
                grant: gs.grant,
                reason: gs.grant_reason,
                epoch: gs.epoch,
                lease_ms: gs.lease_ms,
                desired: gs.desired,
                desired_rev: gs.desired_rev,
                credential: None,
            },
            io,
        )
    }

    /// Persists grant, epoch and credential (with the fence alert in the
    /// same commit) before anything acts on them. Returns whether grant,
    /// epoch or the desired state changed.
    fn adopt(&mut self, a: Adopt, io: &mut Io) -> bool {
        let from_hello = a.credential.is_some();
        let held = self.durable.epoch;
        if !from_hello && held.is_some_and(|e| a.epoch < e) {
            return false;
        }
        if from_hello && held.is_some_and(|e| a.epoch < e) {
            io.stats.node_epoch_regressions += 1;
            io.log.push(format!(
                "{} welcome at epoch {} after holding {}",
                self.spec.id,
                a.epoch,
                held.unwrap_or(0)
            ));
        }
        let grant_changed = self.durable.grant != Some(a.grant);
        let epoch_changed = held != Some(a.epoch);
        if a.grant == Grant::Fenced && self.durable.grant != Some(Grant::Fenced) {
            let alert = Observation {
                kind: Kind::Alert,
                channel: self.spec.channel.name.to_owned(),
                channel_id: Some(self.spec.channel.id),
                at_ms: WALL_BASE_MS + io.now_ms as i64,
                media_seq: None,
                duration_ms: None,
                viewers: None,
                event_id: None,
                message: Some(format!(
                    "grant changed to fenced at epoch {} ({:?}); records are queued locally",
                    a.epoch, a.reason
                )),
                severity: Some(Severity::Warning),
            };
            self.commit(vec![alert], io);
        }
        if grant_changed || epoch_changed {
            io.log.push(format!(
                "{} adopts {} at epoch {} ({:?})",
                self.spec.id, a.grant, a.epoch, a.reason
            ));
        }
        self.durable.grant = Some(a.grant);
        self.durable.epoch = Some(a.epoch);
        let desired_changed = self.mem.desired != a.desired;
        self.mem.lease_ms = a.lease_ms;
        self.mem.quiesce_since_ms = match (a.desired.quiesce, self.mem.quiesce_since_ms) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(io.now_ms),
            (false, _) => None,
        };
        self.mem.desired = a.desired;
        self.mem.desired_rev = Some(a.desired_rev);
        if let Some(c) = a.credential {
            self.durable.credential = Some(c);
            self.mem.established = true;
            self.mem.generation = self.mem.generation.wrapping_add(1);
        }
        grant_changed || epoch_changed || desired_changed
    }

    // ---- heartbeat ----

    fn heartbeat_period_ms(&self) -> u64 {
        (self.mem.lease_ms / 3).clamp(HEARTBEAT_MS_MIN, HEARTBEAT_MS_MAX)
    }

    fn heartbeat(&mut self, io: &mut Io) {
        if self.mem.heartbeat.pending.is_some() {
            return;
        }
        if !self.mem.established {
            self.mem.next_heartbeat_ms = None;
            return;
        }
        let Some(at) = self.mem.next_heartbeat_ms else {
            self.mem.next_heartbeat_ms = Some(io.now_ms + self.heartbeat_period_ms());
            return;
        };
        if io.now_ms < at {
            return;
        }
        let (Some(epoch), Some(credential)) = (self.durable.epoch, self.durable.credential.clone())
        else {
            return;
        };
        let hb = Heartbeat {
            v: MESSAGE_VERSION,
            node_id: self.spec.id.clone(),
            epoch,
            outbox: self.outbox_state(),
            current_events: self.current_events(io.now_ms),
            staged: self.durable.staged.clone(),
            hls_requests: None,
        };
        let body = serde_json::to_vec(&hb).expect("heartbeat serializes");
        let timeout = self.mem.lease_ms.clamp(1_000, 10_000);
        self.send(
            Lane::Heartbeat,
            PendingKind::Heartbeat,
            timeout,
            Request::Heartbeat { credential, body },
            io,
        );
    }

    fn heartbeat_done(&mut self, p: Pending, answer: Option<Answer>, io: &mut Io) {
        match answer {
            Some(Answer::Ok(body)) => {
                if let Ok(gs) = serde_json::from_slice::<GrantState>(&body) {
                    if gs.v == MESSAGE_VERSION {
                        self.adopt_state(gs, io);
                    }
                }
            }
            Some(a) if needs_handshake(&a) || forbidden(&a) => {
                self.request_handshake(p.generation, &describe(&a), io);
            }
            _ => {}
        }
        let lease = self.mem.lease_ms.max(HEARTBEAT_MS_MIN);
        let lost = self
            .mem
            .last_contact_ms
            .is_some_and(|t| io.now_ms.saturating_sub(t) > lease);
        if lost {
            self.request_handshake(p.generation, "lease lost", io);
        }
        self.mem.next_heartbeat_ms = Some(io.now_ms + self.heartbeat_period_ms());
    }

    // ---- shipper ----

    fn shipper(&mut self, io: &mut Io) {
        if self.mem.shipper.pending.is_some() || io.now_ms < self.mem.shipper.not_before_ms {
            return;
        }
        if !self.mem.established {
            return;
        }
        let (Some(grant), Some(epoch), Some(credential)) = (
            self.durable.grant,
            self.durable.epoch,
            self.durable.credential.clone(),
        ) else {
            return;
        };
        // The shipped node's decisions: channel, then batch.
        let Some(channel) = ship::channel_of(grant) else {
            return; // fenced: queue locally until the grant changes
        };
        let Some(first) = self.durable.outbox.front() else {
            return;
        };
        let (first_seq, schema) = (first.seq, first.schema);
        let n = ship::batch_len(self.durable.outbox.iter().map(|r| ship::Queued {
            seq: r.seq,
            schema: r.schema,
            bytes: serde_json::to_vec(&r.body).map_or(0, |b| b.len()),
        }));
        let rows: Vec<&OutboxRow> = self.durable.outbox.iter().take(n).collect();
        let last_seq = first_seq + rows.len() as u64 - 1;
        let batch = Batch {
            v: MESSAGE_VERSION,
            node_id: self.spec.id.clone(),
            epoch,
            schema,
            first_seq,
            records: rows.iter().map(|r| r.body.clone()).collect(),
        };
        let body = serde_json::to_vec(&batch).expect("batch serializes");
        // What the node held, checked by the controller where it accepts the batch.
        let sent_with = SentWith { grant, epoch };
        let req = match channel {
            ShipChannel::Main => Request::Records {
                credential,
                body,
                sent_with,
            },
            ShipChannel::Redundant => Request::Deliver {
                credential,
                body,
                sent_with,
            },
        };
        self.send(
            Lane::Shipper,
            PendingKind::Batch {
                first: first_seq,
                last: last_seq,
            },
            SHIP_TIMEOUT_MS,
            req,
            io,
        );
        if io.canary == Some(Canary::TrimOnSend) {
            self.trim(last_seq);
        }
    }

    fn trim(&mut self, through: u64) {
        while self
            .durable
            .outbox
            .front()
            .is_some_and(|r| r.seq <= through)
        {
            self.durable.outbox.pop_front();
        }
    }

    fn batch_done(
        &mut self,
        p: Pending,
        first: u64,
        last: u64,
        answer: Option<Answer>,
        io: &mut Io,
    ) {
        let now = io.now_ms;
        let failure = match answer {
            Some(Answer::Ok(body)) => match serde_json::from_slice::<BatchAck>(&body) {
                Ok(ack) if ack.v == MESSAGE_VERSION => {
                    match ship::trim_through(first, last, ack.acked_through) {
                        Err(e) => e,
                        Ok(through) => {
                            self.trim(through);
                            self.mem.shipper.reset(now);
                            return;
                        }
                    }
                }
                Ok(ack) => format!("batch ack of version {}", ack.v),
                Err(e) => format!("batch ack is not valid: {e}"),
            },
            Some(a) if needs_handshake(&a) || forbidden(&a) => {
                self.request_handshake(p.generation, &describe(&a), io);
                self.mem.shipper.not_before_ms = now;
                return;
            }
            Some(a) => describe(&a),
            None => "timeout".into(),
        };
        io.log.push(format!(
            "{} batch {first}..{last} not acked ({failure}); retrying",
            self.spec.id
        ));
        self.mem.shipper.back_off(now);
    }

    fn send(&mut self, lane: Lane, kind: PendingKind, timeout_ms: u64, req: Request, io: &mut Io) {
        let id = self.next_id();
        let generation = self.mem.generation;
        let now_ms = io.now_ms;
        self.lane(lane).pending = Some(Pending {
            id,
            sent_ms: now_ms,
            deadline_ms: now_ms + timeout_ms,
            generation,
            kind,
        });
        io.out.push(Out::Send { lane, id, req });
    }

    // ---- upgrade agent ----

    fn agent(&mut self, io: &mut Io) {
        if self.life != Life::Up {
            return;
        }
        let desired = self.mem.desired.clone();
        // The shipped agent's plan. The simulated binary of a release is
        // one binary, so running the release is running the artifact.
        let already_runs = desired.switch_to == Some(self.durable.release);
        let todo = agent::plan(&desired, &self.durable.staged, already_runs, None);
        if let (Some(id), Some(_)) = (todo.stage, &self.durable.credential) {
            if self.mem.staging.is_none() && io.now_ms >= self.mem.stage_not_before_ms {
                self.mem.staging = Some(id.clone());
                io.out.push(Out::Stage { artifact: id });
            }
        }
        if let Some((_, to)) = todo.switch {
            io.log.push(format!(
                "{} quiesces to switch to release {to}",
                self.spec.id
            ));
            self.life = Life::Quiescing {
                until_ms: io.now_ms + DRAIN_ON_STOP_MS,
                to,
            };
        }
    }

    /// A quiescing node stops once drained, when it may not ship, or at the deadline.
    fn drain(&mut self, io: &mut Io) {
        let Life::Quiescing { until_ms, to } = self.life else {
            return;
        };
        let can_ship = matches!(self.durable.grant, Some(Grant::Full | Grant::Deliver));
        if self.durable.outbox.is_empty() || !can_ship || io.now_ms >= until_ms {
            io.out.push(Out::Switch { to });
        }
    }

    // ---- producer ----

    fn produce(&mut self, io: &mut Io) {
        if self.life != Life::Up || !io.produce || io.now_ms < self.mem.next_produce_ms {
            return;
        }
        let now = io.now_ms;
        self.mem.next_produce_ms = now + self.spec.produce_every_ms;
        self.durable.progress.steps += 1;
        let at_ms = WALL_BASE_MS + now as i64;
        let ch = self.spec.channel;
        let base = |kind: Kind| Observation {
            kind,
            channel: ch.name.to_owned(),
            channel_id: Some(ch.id),
            at_ms,
            media_seq: None,
            duration_ms: None,
            viewers: None,
            event_id: None,
            message: None,
            severity: None,
        };
        let mut obs = Vec::new();
        let ended: Vec<i64> = self
            .durable
            .progress
            .started
            .difference(&self.durable.progress.finished)
            .copied()
            .filter(|id| {
                let k = self.spec.event_k(*id);
                self.spec.event_start_ms(k) + self.spec.event_len_ms <= now
            })
            .collect();
        for id in ended {
            self.durable.progress.finished.insert(id);
            obs.push(Observation {
                event_id: Some(id),
                ..base(Kind::EventFinished)
            });
        }
        if let Some(&id) = self.current_events(now).first() {
            if self.durable.progress.started.insert(id) {
                obs.push(Observation {
                    event_id: Some(id),
                    ..base(Kind::EventStarted)
                });
            }
            self.durable.progress.media_seq += 1;
            obs.push(Observation {
                media_seq: Some(self.durable.progress.media_seq),
                duration_ms: Some(ch.segment_ms),
                event_id: None,
                ..base(Kind::SegmentPublished)
            });
            let second = at_ms.div_euclid(1000);
            if self.durable.progress.stats_second != Some(second) {
                self.durable.progress.stats_second = Some(second);
                obs.push(Observation {
                    viewers: Some(u32::try_from(self.durable.progress.steps % 5000).unwrap_or(0)),
                    ..base(Kind::ViewerStats)
                });
            }
        }
        if self.durable.progress.steps % 7 == 0 {
            obs.push(Observation {
                message: Some(format!("simulated alert {}", self.durable.progress.steps)),
                severity: Some(Severity::Warning),
                ..base(Kind::Alert)
            });
        }
        self.commit(obs, io);
    }

    /// Appends observations to outbox and journal in one step (one
    /// transaction in the real node), in this release's record format.
    fn commit(&mut self, obs: Vec<Observation>, io: &mut Io) {
        let schema = self.info().schema;
        for o in obs {
            let key = o.natural_key();
            if !self.durable.progress.keys.insert(key.clone()) {
                continue; // this fact is already recorded
            }
            let body = match record::encode(schema, &self.spec.id, &o) {
                Ok(b) => b,
                Err(e) => {
                    io.violate(format!(
                        "{} cannot encode its own observation in schema {schema}: {e}",
                        self.spec.id
                    ));
                    continue;
                }
            };
            let seq = self.durable.next_seq;
            self.durable.next_seq += 1;
            self.durable.journal.push((seq, key));
            self.durable.ledger.insert(seq, o);
            self.durable
                .outbox
                .push_back(OutboxRow { seq, schema, body });
        }
    }
}
