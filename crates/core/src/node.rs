//! The content node's side of the protocol, sans-IO (quinn-proto style): one
//! state machine that takes events and the time and returns actions.
//!
//! It owns every decision a node makes towards the controller: when to say
//! hello (and again), the watch long-poll, heartbeats and the lease, which
//! channel to ship on and how much, what an acknowledgement lets it trim,
//! when to fetch parameters, and when to stage, quiesce and switch.
//! `handover-node` performs the actions over HTTP, SQLite and its
//! supervisor; the simulation performs them over its simulated network and
//! disks. Neither shell decides anything the other would have to copy.
//!
//! Each of the four lanes (session, heartbeat, params, shipper) has at most
//! one request in flight; every request has a deadline, and every retry a
//! bounded backoff. Grant, epoch and credential are handed to the shell to
//! persist ([`Action::Persist`]) before any later action acts on them.

use crate::admission::{refusal_needs_handshake, Channel};
use crate::agent::SwitchFailure;
use crate::grant::{decide_grant, Grant, GrantReason};
use crate::params::{events_for_group, LiveEvent};
use crate::release::{Release, ReleaseInfo, Schema};
use crate::ship;
use crate::upgrade::Desired;
use crate::wire::{
    if_protocol, BatchAck, GrantState, Heartbeat, Hello, OutboxState, ParamsAnswer, Role, Welcome,
    HLS_REQUESTS_PROTOCOL, MESSAGE_VERSION,
};
use serde::de::DeserializeOwned;

/// Timeout of hello, heartbeat and params requests.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// A heartbeat waits at least this long for its answer (at most the lease).
pub const HEARTBEAT_TIMEOUT_MS_MIN: u64 = 1_000;
/// Timeout of one batch request.
pub const SHIP_TIMEOUT_MS: u64 = 15_000;
/// How long the node asks the controller to hold a watch.
pub const WATCH_WAIT_MS: u64 = 25_000;
/// Our side gives up on a watch this much later than the controller should answer.
pub const WATCH_TIMEOUT_MS: u64 = WATCH_WAIT_MS + 5_000;
/// A watch that answers "unchanged" faster than this is followed by a pause
/// this long, so a controller that does not hold the request cannot make us spin.
pub const WATCH_SPIN_GUARD_MS: u64 = 250;
/// Bounds on the heartbeat period (lease_ms / 3).
pub const HEARTBEAT_MS_MIN: u64 = 100;
pub const HEARTBEAT_MS_MAX: u64 = 10_000;
/// First retry delay after a failure; retries double up to [`BACKOFF_MS_MAX`].
pub const BACKOFF_MS_MIN: u64 = 100;
pub const BACKOFF_MS_MAX: u64 = 2_000;
/// A quiescing node ships its outbox at most this long before it switches
/// or stops; what is left stays durable for the next start.
pub const DRAIN_ON_STOP_MS: u64 = 3_000;
/// First pause after a failed staging; doubles up to [`STAGE_RETRY_MS_MAX`].
pub const STAGE_RETRY_MS_MIN: u64 = 100;
pub const STAGE_RETRY_MS_MAX: u64 = 5_000;

/// Numbers the requests of one machine, so a late answer to an abandoned
/// request is recognised and ignored.
pub type RequestId = u64;

/// The node's request loops; each has at most one request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// `hello`, then the `watch` long-poll.
    Session,
    Heartbeat,
    Params,
    Shipper,
}

impl Lane {
    pub const ALL: [Lane; 4] = [Lane::Session, Lane::Heartbeat, Lane::Params, Lane::Shipper];
}

/// Who this node is, as hello tells the controller.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: String,
    pub release: &'static ReleaseInfo,
    pub role: Role,
    pub group: String,
    pub hls_url: String,
    /// The single-use token `handover node add` issued for this id: what a
    /// node with no (or a refused) credential says hello with. None once the
    /// shell knows it was traded and no new one was given.
    pub bootstrap_token: Option<String>,
    /// SHA-256 of the binary this worker runs (from its supervisor).
    pub binary_sha256: Option<String>,
}

/// How the node behaves beyond who it is (no `Default`: every shell says
/// both, so the node cannot start without healing by accident).
#[derive(Clone, Debug)]
pub struct Config {
    /// Behave like nodes managed by hand (the demo's comparison): a record
    /// that cannot be stored right now is dropped, not queued, and nothing
    /// goes over the redundant channel. Never set in production.
    pub legacy: bool,
    /// Say hello again when a grant contradicts this release's schema (the
    /// controller registered a late hello of this node's previous release;
    /// found by the simulation). Always on in the node; the simulation can
    /// turn it off to show the failure it prevents.
    pub heal_stale_registration: bool,
}

/// What the node's database held at start.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    pub grant: Option<Grant>,
    pub epoch: Option<u64>,
    pub credential: Option<String>,
    /// A controller accepted `credential` (a welcome carried it). False for
    /// one the shell chose that no controller took yet: the first hello then
    /// presents the bootstrap token, with this credential as the new one.
    pub credential_confirmed: bool,
    /// The switch that failed here and was not yet asked for anew.
    pub switch_failure: Option<SwitchFailure>,
}

/// The parameter cache: the events of this node's group, in its schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsCache {
    pub schema: Schema,
    pub revision: Option<u64>,
    pub events: Vec<LiveEvent>,
}

/// An artifact staged in the node's data dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedArtifact {
    pub id: String,
    pub release: Release,
    /// SHA-256 of its binary (a patch build has the release of the one it replaces).
    pub sha256: Option<String>,
}

/// What the node's own parts report at the moment of a call.
#[derive(Clone, Debug, Default)]
pub struct Now {
    /// A monotonic clock, for deadlines and timers.
    pub ms: u64,
    /// Unix milliseconds, for what is compared with event times.
    pub wall_ms: i64,
    pub outbox: OutboxState,
    /// The events the producer runs now (none it would not take when quiesced).
    pub current_events: Vec<i64>,
    /// HLS requests answered since this worker started.
    pub hls_requests: u64,
}

/// A request for the shell to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// `POST /node/v1/hello` (the token is in the body).
    Hello(Hello),
    /// `GET /node/v1/watch?epoch=..&grant=..&wait_ms=..[&desired_rev=..]`
    Watch {
        epoch: u64,
        grant: Grant,
        wait_ms: u64,
        desired_rev: Option<u64>,
    },
    /// `POST /node/v1/heartbeat`
    Heartbeat(Heartbeat),
    /// `GET /node/v1/params?epoch=..`
    Params { epoch: u64 },
    /// `POST` [`Channel::path`]: a [`crate::wire::Batch`] of the first
    /// `count` records of the head the shell read last ([`Event::OutboxHead`]).
    Batch {
        channel: Channel,
        epoch: u64,
        schema: Schema,
        first_seq: u64,
        count: usize,
    },
}

/// A request and how to send it.
#[derive(Clone, Debug, PartialEq)]
pub struct Send {
    pub id: RequestId,
    pub lane: Lane,
    pub timeout_ms: u64,
    /// The bearer credential (none for hello).
    pub credential: Option<String>,
    pub request: Request,
}

/// How a request ended, as the shell saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A 2xx answer and its JSON body.
    Ok(Vec<u8>),
    /// An error answer: status and `{"error", "message"}`.
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// The controller answered, but not usably (too large, cut short).
    Invalid(String),
    /// No answer: connection refused or reset, or the timeout passed.
    Unreachable(String),
}

/// What the supervisor said to a switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchResult {
    /// The new release serves (or already did); this worker is about to be stopped.
    Switched,
    /// The new release did not become ready; the old one goes on.
    Refused(String),
    /// The supervisor could not be asked.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed (a timer the shell set from [`Machine::next_timer_ms`],
    /// or a record appended to the outbox).
    Tick,
    Reply {
        id: RequestId,
        reply: Reply,
    },
    /// The oldest queued records, asked for by [`Action::ReadOutbox`]
    /// (at most [`ship::BATCH_RECORDS_MAX`], oldest first).
    OutboxHead(Vec<ship::Queued>),
    /// Staging asked for by [`Action::Stage`] ended: what is staged now, or why not.
    Staged {
        artifact: String,
        result: Result<Vec<StagedArtifact>, String>,
    },
    /// The digest of the binary this node's supervisor runs now.
    SupervisorDigest(Option<String>),
    /// The answer to [`Action::Switch`].
    Switch(SwitchResult),
    /// A local read or write an action asked for failed; the lane backs off.
    DiskFailed {
        lane: Lane,
        error: String,
    },
    /// Stop gracefully: stop producing, drain (bounded), then [`Action::Stopped`].
    Stop,
    /// [`Action::Quiesce`] is done: the producer stopped, and whatever its
    /// last tick appended is in the outbox. Until then a drain cannot end
    /// (an empty outbox may be about to get that record).
    Quiesced,
}

/// What `fenced` at an epoch leaves in the node's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceAlert {
    pub epoch: u64,
    pub reason: GrantReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write grant, epoch (and a new credential) in one transaction, with
    /// the fence alert if there is one, before performing any later action.
    Persist {
        grant: Grant,
        epoch: u64,
        credential: Option<String>,
        fence_alert: Option<FenceAlert>,
    },
    Send(Box<Send>),
    /// Abandon a request; its answer, if one comes, is ignored anyway.
    Cancel(RequestId),
    /// Read the oldest queued records and answer with [`Event::OutboxHead`].
    ReadOutbox,
    /// Delete queued records through this seq (acknowledged; or, in legacy
    /// mode, dropped), then [`Event::Tick`]: the next batch, or the end of
    /// a drain, is decided on the outbox as it is now.
    Trim {
        through: u64,
    },
    /// Cache these parameters durably (they parsed as this node's schema).
    CacheParams {
        revision: u64,
        params: serde_json::Value,
    },
    /// Download and verify this artifact; answer with [`Event::Staged`].
    Stage {
        artifact: String,
    },
    /// Stop producing (the outbox is drained next).
    Quiesce,
    /// Ask the supervisor to run this staged artifact as `to`; answer with [`Event::Switch`].
    Switch {
        artifact: String,
        to: Release,
    },
    /// Keep (or, with `None`, forget) the failed switch durably.
    RememberSwitchFailure(Option<SwitchFailure>),
    /// Give up: the worker exits with this reason and its supervisor
    /// starts the release it knows to work.
    Fail(String),
    /// Drained after [`Event::Stop`]: the loops are done.
    Stopped,
    Log {
        level: Level,
        message: String,
    },
}

/// What the rest of the node reads: the producer (the quiesce mark), the
/// HTTP status, and readiness (established, grant).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub grant: Option<Grant>,
    pub reason: Option<GrantReason>,
    pub epoch: Option<u64>,
    /// A hello succeeded and nothing since asked for another one.
    pub established: bool,
    /// Since when (Unix ms) this node takes no new event.
    pub quiesce_since_ms: Option<i64>,
    /// The controller answered the last request (any answer counts).
    pub reachable: bool,
    /// The last shipping failure; cleared by the next ack.
    pub ship_error: Option<String>,
    /// Why the artifact the controller names is not staged.
    pub stage_error: Option<String>,
    pub switch_failure: Option<SwitchFailure>,
    /// Why the last hello was refused (who the node says it is, its token);
    /// cleared by a welcome.
    pub hello_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Hello { with_credential: bool },
    Watch,
    Heartbeat,
    Params { revision: u64 },
    Batch { first: u64, last: u64 },
}

#[derive(Clone, Debug)]
struct Pending {
    id: RequestId,
    sent_ms: u64,
    deadline_ms: u64,
    /// The session generation the request was made in.
    generation: u64,
    kind: Kind,
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

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Producing stops; shipping what is queued until `until_ms`.
    Draining {
        until_ms: u64,
        then: AfterDrain,
        /// The producer has stopped ([`Event::Quiesced`]).
        quiesced: bool,
    },
    /// Asked the supervisor to switch: no more requests.
    Switching {
        artifact: String,
        to: Release,
    },
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AfterDrain {
    Switch { artifact: String, to: Release },
    Stop,
}

/// What one adoption of a welcome or a grant state carries.
struct Adopt {
    grant: Grant,
    reason: GrantReason,
    epoch: u64,
    lease_ms: u64,
    param_revision: u64,
    desired: Desired,
    desired_rev: u64,
    /// Set for a welcome: authoritative, starts a new generation.
    credential: Option<String>,
}

pub struct Machine {
    id: Identity,
    config: Config,
    // What is persisted (the shell writes it when told).
    grant: Option<Grant>,
    epoch: Option<u64>,
    credential: Option<String>,
    switch_failure: Option<SwitchFailure>,
    params: ParamsCache,
    staged: Vec<StagedArtifact>,
    // What a crash forgets.
    phase: Phase,
    established: bool,
    generation: u64,
    reason: Option<GrantReason>,
    lease_ms: u64,
    desired: Desired,
    desired_rev: Option<u64>,
    quiesce_since_ms: Option<i64>,
    controller_param_revision: Option<u64>,
    controller_release: Option<Release>,
    protocol: Option<u32>,
    /// The persisted credential was refused: the next hello presents the bootstrap token.
    bootstrap_next: bool,
    last_contact_ms: Option<u64>,
    reachable: bool,
    next_heartbeat_ms: Option<u64>,
    supervisor_now: Option<String>,
    supervisor_said: Option<String>,
    /// The announced parameter revision last dealt with (cached or refused).
    params_settled: Option<u64>,
    /// An [`Action::ReadOutbox`] is out.
    reading_outbox: bool,
    ship_error: Option<String>,
    hello_error: Option<String>,
    staging: Option<String>,
    stage_not_before_ms: u64,
    stage_retry_ms: u64,
    stage_error: Option<String>,
    lanes: [LaneState; 4],
    next_request_id: RequestId,
    epoch_regressions: u64,
    out: Vec<Action>,
}

fn lane_ix(lane: Lane) -> usize {
    match lane {
        Lane::Session => 0,
        Lane::Heartbeat => 1,
        Lane::Params => 2,
        Lane::Shipper => 3,
    }
}

fn needs_handshake(reply: &Reply) -> bool {
    matches!(reply, Reply::Refused { status, code, .. } if refusal_needs_handshake(*status, code))
}

/// `grant_forbids_*`: our idea of the grant is out of date.
fn forbidden(reply: &Reply) -> bool {
    matches!(reply, Reply::Refused { status: 403, .. })
}

fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Ok(_) => "ok".into(),
        Reply::Refused {
            status,
            code,
            message,
        } => format!("controller answered {status} {code}: {message}"),
        Reply::Invalid(why) => format!("controller answer is not valid: {why}"),
        Reply::Unreachable(why) => format!("controller unreachable: {why}"),
    }
}

/// Decodes an answer and checks its message version.
fn decode<T: DeserializeOwned>(body: &[u8], version: impl Fn(&T) -> u32) -> Result<T, String> {
    let t: T = serde_json::from_slice(body).map_err(|e| format!("answer is not valid: {e}"))?;
    match version(&t) {
        MESSAGE_VERSION => Ok(t),
        v => Err(format!("answer of message version {v}")),
    }
}

impl Machine {
    /// A node worker starting from its database: nothing is sent until the
    /// first [`Machine::handle`].
    pub fn new(
        id: Identity,
        config: Config,
        durable: Durable,
        params: ParamsCache,
        staged: Vec<StagedArtifact>,
    ) -> Machine {
        let mut out = Vec::new();
        let mut switch_failure = durable.switch_failure;
        if switch_failure
            .as_ref()
            .is_some_and(|f| f.release == id.release.release.0)
        {
            // This worker runs the release that once failed: the failure is history.
            switch_failure = None;
            out.push(Action::RememberSwitchFailure(None));
        }
        let bootstrap_next = !durable.credential_confirmed && id.bootstrap_token.is_some();
        Machine {
            id,
            config,
            grant: durable.grant,
            epoch: durable.epoch,
            credential: durable.credential,
            switch_failure,
            params,
            staged,
            phase: Phase::Running,
            established: false,
            generation: 0,
            reason: None,
            lease_ms: 0,
            desired: Desired::default(),
            desired_rev: None,
            quiesce_since_ms: None,
            controller_param_revision: None,
            controller_release: None,
            protocol: None,
            bootstrap_next,
            last_contact_ms: None,
            reachable: false,
            next_heartbeat_ms: None,
            supervisor_now: None,
            supervisor_said: None,
            params_settled: None,
            reading_outbox: false,
            ship_error: None,
            hello_error: None,
            staging: None,
            stage_not_before_ms: 0,
            stage_retry_ms: STAGE_RETRY_MS_MIN,
            stage_error: None,
            lanes: [
                LaneState::new(),
                LaneState::new(),
                LaneState::new(),
                LaneState::new(),
            ],
            next_request_id: 0,
            epoch_regressions: 0,
            out,
        }
    }

    /// Takes one event at `now` and returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: &Now) -> Vec<Action> {
        match event {
            Event::Tick => {}
            Event::Reply { id, reply } => self.on_reply(id, reply, now),
            Event::OutboxHead(head) => self.on_outbox_head(head, now),
            Event::Staged { artifact, result } => self.on_staged(artifact, result, now),
            Event::SupervisorDigest(d) => self.supervisor_now = d,
            Event::Switch(result) => self.on_switch(result, now),
            Event::DiskFailed { lane, error } => self.on_disk_failed(lane, error, now),
            Event::Stop => self.on_stop(now),
            Event::Quiesced => {
                if let Phase::Draining { quiesced, .. } = &mut self.phase {
                    *quiesced = true;
                }
            }
        }
        self.poll(now);
        std::mem::take(&mut self.out)
    }

    /// The earliest time after `now_ms` at which something falls due
    /// without any event (a deadline, a backoff's end, the next heartbeat,
    /// the drain's end, a staging retry): when to [`Event::Tick`] next.
    pub fn next_timer_ms(&self, now_ms: u64) -> Option<u64> {
        let mut due: Vec<u64> = Vec::new();
        for lane in &self.lanes {
            match &lane.pending {
                Some(p) => due.push(p.deadline_ms),
                None => due.push(lane.not_before_ms),
            }
        }
        due.extend(self.next_heartbeat_ms);
        if let Phase::Draining { until_ms, .. } = self.phase {
            due.push(until_ms);
        }
        if self.staging.is_none() && self.desired.stage.is_some() {
            due.push(self.stage_not_before_ms);
        }
        due.into_iter().filter(|t| *t > now_ms).min()
    }

    pub fn view(&self) -> View {
        View {
            grant: self.grant,
            reason: self.reason,
            epoch: self.epoch,
            established: self.established,
            quiesce_since_ms: self.quiesce_since_ms,
            reachable: self.reachable,
            ship_error: self.ship_error.clone(),
            stage_error: self.stage_error.clone(),
            switch_failure: self.switch_failure.clone(),
            hello_error: self.hello_error.clone(),
        }
    }

    /// Whether a hello succeeded and nothing since asked for another one.
    pub fn established(&self) -> bool {
        self.established
    }

    /// The credential to present (for downloads the shell makes on the machine's behalf).
    pub fn credential(&self) -> Option<&str> {
        self.credential.as_deref()
    }

    pub fn params(&self) -> &ParamsCache {
        &self.params
    }

    pub fn quiesce_since_ms(&self) -> Option<i64> {
        self.quiesce_since_ms
    }

    /// Welcomes at a lower epoch than the one held (a controller that lost
    /// its state would cause them; counted by the simulation).
    pub fn epoch_regressions(&self) -> u64 {
        self.epoch_regressions
    }

    fn staged_ids(&self) -> Vec<String> {
        self.staged.iter().map(|s| s.id.clone()).collect()
    }

    fn log(&mut self, level: Level, message: String) {
        self.out.push(Action::Log { level, message });
    }

    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        &mut self.lanes[lane_ix(lane)]
    }

    fn sends(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Draining { .. })
    }

    /// Everything due at `now`, in the order the node's loops would do it.
    fn poll(&mut self, now: &Now) {
        self.expire(now);
        if !self.sends() {
            return;
        }
        self.poll_agent(now);
        self.poll_session(now);
        self.poll_heartbeat(now);
        self.poll_params(now);
        self.poll_shipper(now);
        self.poll_drain(now);
    }

    /// Requests whose deadline passed fail like an unreachable controller.
    fn expire(&mut self, now: &Now) {
        for lane in Lane::ALL {
            let expired = self
                .lane(lane)
                .pending
                .as_ref()
                .filter(|p| now.ms >= p.deadline_ms)
                .map(|p| p.id);
            if let Some(id) = expired {
                self.out.push(Action::Cancel(id));
                self.on_reply(id, Reply::Unreachable("timed out".into()), now);
            }
        }
    }

    fn send(
        &mut self,
        lane: Lane,
        kind: Kind,
        timeout_ms: u64,
        credential: Option<String>,
        request: Request,
        now: &Now,
    ) {
        self.next_request_id += 1;
        let id = self.next_request_id;
        let generation = self.generation;
        self.lane(lane).pending = Some(Pending {
            id,
            sent_ms: now.ms,
            deadline_ms: now.ms + timeout_ms,
            generation,
            kind,
        });
        self.out.push(Action::Send(Box::new(Send {
            id,
            lane,
            timeout_ms,
            credential,
            request,
        })));
    }

    fn on_reply(&mut self, id: RequestId, reply: Reply, now: &Now) {
        let Some(lane) = Lane::ALL.into_iter().find(|l| {
            self.lanes[lane_ix(*l)]
                .pending
                .as_ref()
                .is_some_and(|p| p.id == id)
        }) else {
            return; // not the request a loop waits for: never read, as over HTTP
        };
        let Some(p) = self.lane(lane).pending.take() else {
            return;
        };
        let answered = !matches!(reply, Reply::Unreachable(_));
        self.reachable = answered;
        if answered {
            self.last_contact_ms = Some(now.ms);
        }
        match p.kind {
            Kind::Hello { with_credential } => self.hello_done(with_credential, reply, now),
            Kind::Watch => self.watch_done(&p, reply, now),
            Kind::Heartbeat => self.heartbeat_done(&p, reply, now),
            Kind::Params { revision } => self.params_done(&p, revision, reply, now),
            Kind::Batch { first, last } => self.batch_done(&p, first, last, reply, now),
        }
    }

    /// Asks for a new hello, unless one already happened since `generation`.
    fn request_handshake(&mut self, generation: u64, why: &str, now: &Now) {
        if self.generation != generation || !self.established {
            return;
        }
        self.log(Level::Info, format!("handshaking again: {why}"));
        self.established = false;
        // The session loop abandons its watch and says hello.
        let session = self.lane(Lane::Session);
        if let Some(p) = session.pending.take_if(|p| p.kind == Kind::Watch) {
            session.not_before_ms = now.ms;
            self.out.push(Action::Cancel(p.id));
        }
    }

    // ---- shipper ----

    /// The channel to ship on now; `None`: queue locally and wait.
    fn ship_channel(&self) -> Option<Channel> {
        let ch = self.grant.and_then(ship::channel_of)?;
        (!(self.config.legacy && ch == Channel::Redundant)).then_some(ch)
    }

    fn poll_shipper(&mut self, now: &Now) {
        let lane = &self.lanes[lane_ix(Lane::Shipper)];
        if lane.pending.is_some() || self.reading_outbox || now.ms < lane.not_before_ms {
            return;
        }
        let can_send = self.established && self.ship_channel().is_some();
        let dropping = self.config.legacy && !can_send;
        if now.outbox.count == 0 || !(can_send || dropping) {
            return;
        }
        self.reading_outbox = true;
        self.out.push(Action::ReadOutbox);
    }

    fn on_outbox_head(&mut self, head: Vec<ship::Queued>, now: &Now) {
        if !std::mem::replace(&mut self.reading_outbox, false) || !self.sends() {
            return;
        }
        let Some(newest) = head.last().map(|q| q.seq) else {
            return;
        };
        let channel = self.ship_channel().filter(|_| self.established);
        if self.config.legacy && channel.is_none() {
            // Records that cannot be stored now are dropped (the checker reports them lost).
            self.log(
                Level::Warn,
                format!(
                    "legacy mode: {} records that cannot be stored now are dropped",
                    head.len()
                ),
            );
            self.out.push(Action::Trim { through: newest });
            return;
        }
        let (Some(channel), Some(epoch), Some(credential)) =
            (channel, self.epoch, self.credential.clone())
        else {
            return;
        };
        let count = ship::batch_len(head.iter().copied());
        let (Some(first), Some(last)) = (head.first(), head.get(count.wrapping_sub(1))) else {
            return;
        };
        let (first, last) = (*first, *last);
        self.send(
            Lane::Shipper,
            Kind::Batch {
                first: first.seq,
                last: last.seq,
            },
            SHIP_TIMEOUT_MS,
            Some(credential),
            Request::Batch {
                channel,
                epoch,
                schema: first.schema,
                first_seq: first.seq,
                count,
            },
            now,
        );
    }

    fn batch_done(&mut self, p: &Pending, first: u64, last: u64, reply: Reply, now: &Now) {
        let failure = match &reply {
            Reply::Ok(body) => match decode::<BatchAck>(body, |a| a.v) {
                Ok(ack) => match ship::trim_through(first, last, ack.acked_through) {
                    Ok(through) => {
                        self.out.push(Action::Trim { through });
                        self.ship_error = None;
                        self.lane(Lane::Shipper).reset(now.ms);
                        return;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            },
            r if needs_handshake(r) || forbidden(r) => {
                self.ship_error = Some(describe(r));
                self.request_handshake(p.generation, &describe(r), now);
                self.lane(Lane::Shipper).not_before_ms = now.ms;
                return;
            }
            // e.g. 422 untranslatable: the record is kept (never dropped) and
            // retried; it blocks the records behind it until an operator or a
            // new controller helps.
            r => describe(r),
        };
        if self.config.legacy {
            self.out.push(Action::Trim { through: last });
            return;
        }
        self.log(
            Level::Warn,
            format!("batch {first}..={last} not acked ({failure}); retrying"),
        );
        self.ship_error = Some(failure);
        self.lane(Lane::Shipper).back_off(now.ms);
    }

    fn on_disk_failed(&mut self, lane: Lane, error: String, now: &Now) {
        self.log(Level::Error, format!("local write failed: {error}"));
        if lane == Lane::Shipper {
            self.ship_error = Some(error);
        }
        if lane == Lane::Session {
            // What we adopted may not be durable: take it again from a hello.
            self.request_handshake(self.generation, "grant could not be persisted", now);
        }
        self.lane(lane).back_off(now.ms);
    }

    fn on_stop(&mut self, now: &Now) {
        match self.phase {
            Phase::Running => {
                self.phase = Phase::Draining {
                    until_ms: now.ms + DRAIN_ON_STOP_MS,
                    then: AfterDrain::Stop,
                    quiesced: false,
                };
                self.out.push(Action::Quiesce);
            }
            Phase::Draining { .. } => {
                if let Phase::Draining { then, .. } = &mut self.phase {
                    *then = AfterDrain::Stop;
                }
            }
            Phase::Switching { .. } => {
                self.phase = Phase::Stopped;
                self.out.push(Action::Stopped);
            }
            Phase::Stopped => {}
        }
    }
}

mod agent;
mod session;
#[cfg(test)]
mod tests;
