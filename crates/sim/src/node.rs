//! A simulated content node: the shipped node machine
//! ([`handover_core::node::Machine`]) over a simulated database that
//! survives a crash, and a producer.
//!
//! This file decides nothing about the protocol: it performs the machine's
//! actions (requests on the simulated network, writes to the simulated
//! database, staging and switching through the world) as `handover-node`
//! performs them over HTTP, SQLite and its supervisor, with the same
//! timeouts, backoffs and batch limits, because they are the machine's.

use crate::net::{Answer, Lane, NodeIx, Request, SentWith};
use crate::{Canary, Stats};
use handover_core::admission::Channel as ShipChannel;
use handover_core::agent::SwitchFailure;
use handover_core::grant::Grant;
use handover_core::node::{
    self, Action, Event, Identity, Level, Machine, Now, ParamsCache, Reply, StagedArtifact,
    SwitchResult,
};
use handover_core::record::{self, v2::Kind, v3::Severity, Observation};
use handover_core::release::{Release, ReleaseInfo, Schema};
use handover_core::ship;
use handover_core::wire::{Batch, OutboxState, Role, MESSAGE_VERSION};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Simulated time 0 on the wall clock (records carry wall-clock ms).
pub const WALL_BASE_MS: i64 = 1_795_000_000_000;
/// The bootstrap token the simulated operator issued for node `id`.
pub fn bootstrap_token(id: &str) -> String {
    format!("hob_sim-{id}")
}

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
    /// A controller accepted `credential` (see the core's `Durable`).
    pub credential_confirmed: bool,
    pub staged: Vec<StagedArtifact>,
    /// The switch that failed here and was not asked for anew yet.
    pub switch_failure: Option<SwitchFailure>,
    pub progress: Progress,
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
    /// The worker gave up (a refused switch): it exits, and its supervisor
    /// starts the release it runs again.
    Exit,
}

/// The world's side of one call into a node.
pub struct Io<'a> {
    pub now_ms: u64,
    /// Whether the producer may run (the quiet end of a run stops it).
    pub produce: bool,
    pub canary: Option<Canary>,
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
    pub incarnation: u64,
    /// Model the node-side fix for stale registrations (the machine's
    /// `Config::heal_stale_registration`).
    pub heal_stale_registration: bool,
    /// The worker process: the shipped machine. `None` while down.
    machine: Option<Machine>,
    /// The producer runs (it stops when the machine quiesces).
    producing: bool,
    next_produce_ms: u64,
    /// The outbox head the machine asked for last (`Action::ReadOutbox`).
    head: Vec<OutboxRow>,
}

fn reply_of(answer: Answer) -> Reply {
    match answer {
        Answer::Ok(body) => Reply::Ok(body),
        Answer::Error {
            status,
            code,
            message,
        } => Reply::Refused {
            status,
            code,
            message,
        },
        Answer::Reset => Reply::Unreachable("connection reset".into()),
    }
}

impl Node {
    /// A node not started yet (the world starts it).
    pub fn new(spec: Spec, release: Release, heal_stale_registration: bool) -> Node {
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
                credential_confirmed: false,
                staged: Vec::new(),
                switch_failure: None,
                progress: Progress::default(),
            },
            incarnation: 1,
            heal_stale_registration,
            machine: None,
            producing: false,
            next_produce_ms: 0,
            head: Vec::new(),
        }
    }

    pub fn info(&self) -> &'static ReleaseInfo {
        ReleaseInfo::of(self.durable.release).expect("the simulation runs known releases")
    }

    pub fn is_up(&self) -> bool {
        self.machine.is_some()
    }

    /// Whether the node holds a session (a hello succeeded since the last
    /// request for a new one).
    pub fn established(&self) -> bool {
        self.machine.as_ref().is_some_and(Machine::established)
    }

    /// A crash: the process and its memory are gone; the database stays.
    pub fn crash(&mut self) {
        self.incarnation += 1;
        self.machine = None;
        self.producing = false;
        self.head.clear();
    }

    /// A (re)start as `release`, from the database alone.
    pub fn start(&mut self, release: Release, now_ms: u64) {
        self.durable.release = release;
        self.incarnation += 1;
        let info = self.info();
        let id = Identity {
            node_id: self.spec.id.clone(),
            release: info,
            role: self.spec.role,
            group: self.spec.group.clone(),
            hls_url: format!("http://sim.invalid/{}", self.spec.id),
            bootstrap_token: Some(bootstrap_token(&self.spec.id)),
            binary_sha256: None,
        };
        let config = node::Config {
            legacy: false,
            heal_stale_registration: self.heal_stale_registration,
        };
        // As the node's shell: a node with no credential chooses one and
        // keeps it before its first hello.
        if self.durable.credential.is_none() {
            self.durable.credential = Some(format!(
                "sim-credential-{}-{:016x}",
                self.spec.id, self.incarnation
            ));
        }
        let durable = node::Durable {
            grant: self.durable.grant,
            epoch: self.durable.epoch,
            credential: self.durable.credential.clone(),
            credential_confirmed: self.durable.credential_confirmed,
            switch_failure: self.durable.switch_failure.clone(),
        };
        // Simulated nodes take their events from their spec, not from parameters.
        let params = ParamsCache {
            schema: info.schema,
            revision: None,
            events: Vec::new(),
        };
        self.machine = Some(Machine::new(
            id,
            config,
            durable,
            params,
            self.durable.staged.clone(),
        ));
        self.producing = true;
        self.next_produce_ms = now_ms;
        self.head.clear();
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
        let quiesce = self
            .machine
            .as_ref()
            .and_then(|m| m.quiesce_since_ms())
            .map(|wall| wall - WALL_BASE_MS);
        match self.spec.live_event(now_ms) {
            Some((k, start)) if quiesce.is_none_or(|q| (start as i64) < q) => {
                vec![self.spec.event_id(k)]
            }
            _ => vec![],
        }
    }

    fn now(&self, now_ms: u64) -> Now {
        Now {
            ms: now_ms,
            wall_ms: WALL_BASE_MS + now_ms as i64,
            outbox: self.outbox_state(),
            current_events: self.current_events(now_ms),
            hls_requests: 0,
        }
    }

    /// Staging ended: `Some(release)` staged the artifact as that release.
    pub fn stage_done(&mut self, artifact: &str, staged: Option<Release>, io: &mut Io) {
        let result = match staged {
            Some(release) => {
                if !self.durable.staged.iter().any(|a| a.id == artifact) {
                    self.durable.staged.push(StagedArtifact {
                        id: artifact.to_owned(),
                        release,
                        sha256: None,
                    });
                }
                Ok(self.durable.staged.clone())
            }
            None => Err("simulated download failure".to_owned()),
        };
        self.feed(
            Event::Staged {
                artifact: artifact.to_owned(),
                result,
            },
            io,
        );
    }

    /// The supervisor's answer to a switch this node asked for: refused
    /// (the new release did not come up), this worker gives up and
    /// remembers why.
    pub fn switch_refused(&mut self, reason: &str, io: &mut Io) {
        self.feed(Event::Switch(SwitchResult::Refused(reason.to_owned())), io);
    }

    /// Everything the node does at `io.now_ms` on its own.
    pub fn poll(&mut self, io: &mut Io) {
        if !self.is_up() {
            return;
        }
        self.produce(io);
        self.feed(Event::Tick, io);
    }

    /// An answer from the controller to the request `id`.
    pub fn on_answer(&mut self, id: u64, answer: Answer, io: &mut Io) {
        self.feed(
            Event::Reply {
                id,
                reply: reply_of(answer),
            },
            io,
        );
        self.poll(io);
    }

    /// Hands one event to the machine and performs its actions in order,
    /// feeding back what they produce (the outbox head).
    fn feed(&mut self, event: Event, io: &mut Io) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let now = self.now(io.now_ms);
            let Some(machine) = self.machine.as_mut() else {
                return;
            };
            let before = machine.epoch_regressions();
            let actions = machine.handle(event, &now);
            io.stats.node_epoch_regressions += machine.epoch_regressions() - before;
            for action in actions {
                if let Some(next) = self.perform(action, io) {
                    events.push_back(next);
                }
            }
        }
    }

    fn perform(&mut self, action: Action, io: &mut Io) -> Option<Event> {
        match action {
            Action::Persist {
                grant,
                epoch,
                credential,
                fence_alert,
            } => {
                if let Some(alert) = fence_alert {
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
                            alert.epoch, alert.reason
                        )),
                        severity: Some(Severity::Warning),
                    };
                    self.commit(vec![alert], io);
                }
                self.durable.grant = Some(grant);
                self.durable.epoch = Some(epoch);
                if credential.is_some() {
                    self.durable.credential_confirmed = true;
                    self.durable.credential = credential;
                }
            }
            Action::Send(send) => {
                let req = self.request(*send.clone(), io)?;
                io.out.push(Out::Send {
                    lane: send.lane,
                    id: send.id,
                    req,
                });
            }
            // A simulated request cannot be withdrawn from the network; its
            // answer, if one comes, is ignored by the machine.
            Action::Cancel(_) => {}
            Action::ReadOutbox => {
                self.head = self
                    .durable
                    .outbox
                    .iter()
                    .take(ship::BATCH_RECORDS_MAX)
                    .cloned()
                    .collect();
                let head = self
                    .head
                    .iter()
                    .map(|r| ship::Queued {
                        seq: r.seq,
                        schema: r.schema,
                        bytes: serde_json::to_vec(&r.body).map_or(0, |b| b.len()),
                    })
                    .collect();
                return Some(Event::OutboxHead(head));
            }
            Action::Trim { through } => {
                // The outbox changed: the machine looks again at once, as
                // in the node's driver.
                self.trim(through);
                return Some(Event::Tick);
            }
            // Simulated nodes take their events from their spec.
            Action::CacheParams { .. } => {}
            Action::Stage { artifact } => io.out.push(Out::Stage { artifact }),
            Action::Quiesce => {
                self.producing = false;
                return Some(Event::Quiesced);
            }
            Action::Switch { to, .. } => io.out.push(Out::Switch { to }),
            Action::RememberSwitchFailure(f) => self.durable.switch_failure = f,
            Action::Fail(why) => {
                io.log.push(format!("{} gives up: {why}", self.spec.id));
                io.out.push(Out::Exit);
            }
            Action::Stopped => {}
            Action::Log { level, message } => {
                if level != Level::Debug {
                    io.log.push(format!("{} {message}", self.spec.id));
                }
            }
        }
        None
    }

    /// The simulated request for a machine's [`node::Send`].
    fn request(&mut self, send: node::Send, io: &mut Io) -> Option<Request> {
        let credential = send.credential.unwrap_or_default();
        Some(match send.request {
            node::Request::Hello(hello) => Request::Hello {
                body: serde_json::to_vec(&hello).expect("hello serializes"),
            },
            node::Request::Heartbeat(hb) => Request::Heartbeat {
                credential,
                body: serde_json::to_vec(&hb).expect("heartbeat serializes"),
            },
            node::Request::Watch {
                epoch,
                grant,
                wait_ms,
                desired_rev,
            } => Request::Watch {
                credential,
                node: self.spec.id.clone(),
                epoch,
                grant,
                wait_ms,
                desired_rev,
            },
            node::Request::Params { epoch } => Request::Params {
                credential,
                node: self.spec.id.clone(),
                epoch,
            },
            node::Request::Batch {
                channel,
                epoch,
                schema,
                first_seq,
                count,
            } => {
                let rows = self.head.get(..count)?;
                if rows.first().map(|r| r.seq) != Some(first_seq) {
                    io.violate(format!(
                        "{} was told to ship from seq {first_seq}, its head starts elsewhere",
                        self.spec.id
                    ));
                    return None;
                }
                let last_seq = first_seq + count as u64 - 1;
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
                let sent_with = SentWith {
                    grant: self.durable.grant.unwrap_or(Grant::Fenced),
                    epoch,
                };
                if io.canary == Some(Canary::TrimOnSend) {
                    self.trim(last_seq);
                }
                match channel {
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
                }
            }
        })
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

    // ---- producer ----

    fn produce(&mut self, io: &mut Io) {
        if !self.producing || !io.produce || io.now_ms < self.next_produce_ms {
            return;
        }
        let now = io.now_ms;
        self.next_produce_ms = now + self.spec.produce_every_ms;
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
