//! A simulated controller: the node API and the upgrade orchestrator of
//! `handover-controller` over an in-memory database that survives crashes.
//!
//! Request handling follows node_api.rs (decode, session, epoch check, grant,
//! store) and the orchestrator follows orchestrator.rs (views, step, effects,
//! store the state if it changed). The database is [`Durable`]; what a crash
//! loses is [`Mem`].

use crate::net::{Answer, Lane, NodeIx, Request, SentWith};
use crate::node::{CHANNELS, WALL_BASE_MS};
use crate::{Canary, Stats};
use handover_core::admission::{Admission, Channel, ErrorCode, Refusal};
use handover_core::grant::Grant;
use handover_core::identity::{self, BootstrapToken, Membership, Proof, SecretDigest};
use handover_core::record::{self, AnyRecord, ChannelDirectory, ChannelRef};
use handover_core::release::{Release, ReleaseInfo, Schema};
use handover_core::upgrade::{
    ClusterView, Desired, Effect, Input, NodeStep, NodeView, Plan, Status, Target, Upgrade,
};
use handover_core::wire::{
    self, limits, Batch, BatchAck, ControllerView, Heartbeat, Hello, OutboxState, ParamsAnswer,
    Role, WireError, MESSAGE_VERSION,
};
use std::collections::BTreeMap;

/// The lease the controller grants (the heartbeat period is a third of it).
pub const LEASE_MS: u64 = 3_000;
/// How often a running upgrade is stepped (as orchestrator.rs).
pub const TICK_MS: u64 = 200;
/// Free disk the preflight sees.
pub const DISK_FREE_BYTES: u64 = 1 << 40;

/// The simulated cluster's parameters in `schema`: its channels, no
/// events (a simulated node's events come from its [`crate::node::Spec`]).
fn params_document(schema: Schema, revision: u64) -> Result<serde_json::Value, Answer> {
    use handover_core::params::{v1, v2, v3};
    let v2_channels: Vec<v2::Channel> = CHANNELS
        .iter()
        .map(|c| v2::Channel {
            id: c.id,
            name: c.name.to_owned(),
            segment_ms: c.segment_ms,
            ladder: vec![v2::Rung {
                height: 720,
                kbps: 3_000,
            }],
        })
        .collect();
    let doc = match schema {
        Schema(1) => serde_json::to_value(v1::Params {
            revision,
            channels: CHANNELS
                .iter()
                .map(|c| v1::Channel {
                    name: c.name.to_owned(),
                    title: c.name.to_owned(),
                    segment_seconds: c.segment_ms / 1000,
                    resolution: "1280x720".into(),
                    bitrate_kbps: 3_000,
                })
                .collect(),
            groups: vec![],
            events: vec![],
        }),
        Schema(2) => serde_json::to_value(v2::Params {
            revision,
            channels: v2_channels,
            groups: vec![],
            events: vec![],
        }),
        // Release 3 adds a window per channel: release 2's fixed one.
        Schema(3) => serde_json::to_value(v3::Params {
            revision,
            channels: v2_channels
                .into_iter()
                .map(|c| v3::Channel {
                    id: c.id,
                    name: c.name,
                    segment_ms: c.segment_ms,
                    ladder: c.ladder,
                    window_segments: v3::WINDOW_SEGMENTS_DEFAULT,
                })
                .collect(),
            groups: vec![],
            events: vec![],
        }),
        other => {
            return Err(Answer::error(
                500,
                "internal",
                format!("no parameters of schema {other}"),
            ))
        }
    };
    doc.map_err(|e| Answer::error(500, "internal", e.to_string()))
}

/// One row of the node registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub release: Release,
    pub schema: Schema,
    pub role: Role,
    pub group: String,
    pub grant: Grant,
    pub epoch: u64,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub staged: Vec<String>,
    pub last_seen_ms: u64,
}

/// One stored record, in the database's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub record: AnyRecord,
    pub natural_key: String,
    pub translated_from: Option<Schema>,
}

/// The controller's database: everything here survives a crash.
#[derive(Clone, Debug)]
pub struct Durable {
    /// The release the supervisor runs (its `state.json`).
    pub release: Release,
    /// The schema the database is at.
    pub schema: Schema,
    pub epoch: u64,
    pub fenced: bool,
    pub param_revision: u64,
    pub cluster_release: Release,
    pub desired: BTreeMap<String, Desired>,
    pub nodes: BTreeMap<String, Registration>,
    pub records: BTreeMap<(String, u64), Stored>,
    pub acked_through: BTreeMap<String, u64>,
    /// The upgrade as serde_json, stored after every step that changed it.
    pub upgrade: Option<String>,
    pub credentials_issued: u64,
    /// The groups: node id → group and role (the operator's `group create`).
    pub members: BTreeMap<String, Membership>,
    /// Node id → the digest of its credential.
    pub credentials: BTreeMap<String, SecretDigest>,
    /// Node id → its bootstrap token (the operator's `node add`).
    pub bootstrap: BTreeMap<String, BootstrapToken>,
}

/// A watch request the controller holds until something changes.
#[derive(Clone, Debug)]
pub struct HeldWatch {
    pub node: NodeIx,
    pub incarnation: u64,
    pub id: u64,
    pub node_id: String,
    pub schema: Schema,
    pub epoch: u64,
    pub grant: Grant,
    pub desired_rev: Option<u64>,
    pub deadline_ms: u64,
}

/// What a crash loses: the worker's memory.
#[derive(Clone, Debug)]
pub struct Mem {
    pub desired_rev: u64,
    pub upgrade: Option<Upgrade>,
    /// A switch to the target was started by this process.
    pub switching: bool,
    pub watches: Vec<HeldWatch>,
    pub next_step_ms: u64,
    /// Records stored by this process (only for [`Canary::VolatileRecords`]).
    pub volatile: Vec<(String, u64)>,
}

/// An answer to send back to a node.
#[derive(Clone, Debug)]
pub struct Reply {
    pub node: NodeIx,
    pub incarnation: u64,
    pub lane: Lane,
    pub id: u64,
    pub answer: Answer,
}

/// The world's side of one call into the controller.
pub struct CtlIo<'a> {
    pub now_ms: u64,
    pub canary: Option<Canary>,
    pub replies: Vec<Reply>,
    pub log: Vec<String>,
    pub violation: Option<String>,
    /// Set when an effect asks for the controller's own switch.
    pub switch_requested: Option<Target>,
    pub stats: &'a mut Stats,
}

impl CtlIo<'_> {
    fn violate(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }
}

pub struct Controller {
    pub durable: Durable,
    /// `None` while the process is down.
    pub mem: Option<Mem>,
    pub incarnation: u64,
}

type Handled = Result<Option<Vec<u8>>, Answer>;

/// A refusal of the admission as an answer, counted as the real
/// controller's logs would show it.
fn refused(r: Refusal, io: &mut CtlIo) -> Answer {
    match r.code {
        ErrorCode::StaleEpoch => io.stats.stale_epoch_refusals += 1,
        c if c.grant_outdated() => io.stats.forbidden_refusals += 1,
        _ => {}
    }
    Answer::refused(r.code, r.message)
}

fn wire_error(e: WireError) -> Answer {
    Answer::refused(e.error_code(), e.to_string())
}

fn ok(body: serde_json::Result<Vec<u8>>) -> Handled {
    Ok(Some(body.expect("answers serialize")))
}

/// The channel directory of a database at `schema` (store::channel_directory).
pub fn directory(schema: Schema) -> (ChannelDirectory, BTreeMap<i64, String>) {
    let mut by_name = ChannelDirectory::new();
    let mut by_id = BTreeMap::new();
    for c in CHANNELS {
        let id = if schema.0 >= 2 { c.id } else { 0 };
        by_name.insert(
            c.name.to_owned(),
            ChannelRef {
                id,
                segment_ms: c.segment_ms,
            },
        );
        if schema.0 >= 2 {
            by_id.insert(c.id, c.name.to_owned());
        }
    }
    (by_name, by_id)
}

/// The natural key the store writes beside a record (sqlite.rs `v1_natural_key`, `insert_v2`).
pub fn stored_natural_key(
    rec: &AnyRecord,
    by_id: &BTreeMap<i64, String>,
) -> Result<String, String> {
    use handover_core::record::{v1, v2};
    match rec {
        AnyRecord::V1(r) => {
            let kind = match r.kind {
                v1::Kind::Segment => v2::Kind::SegmentPublished,
                v1::Kind::Stats => v2::Kind::ViewerStats,
                v1::Kind::Alert => v2::Kind::Alert,
                v1::Kind::EventStart => v2::Kind::EventStarted,
                v1::Kind::EventEnd => v2::Kind::EventFinished,
            };
            let at_ms = handover_core::timefmt::ms_from_rfc3339(&r.at).unwrap_or(0);
            Ok(record::natural_key(kind, &r.channel, at_ms, r.seq, r.event))
        }
        AnyRecord::V2(r) => {
            let channel = by_id
                .get(&r.channel_id)
                .ok_or_else(|| format!("unknown channel id {}", r.channel_id))?;
            Ok(record::natural_key(
                r.kind,
                channel,
                r.produced_at_ms,
                r.media_seq,
                r.event_id,
            ))
        }
        AnyRecord::V3(r) => {
            let channel = by_id
                .get(&r.channel_id)
                .ok_or_else(|| format!("unknown channel id {}", r.channel_id))?;
            Ok(record::natural_key(
                r.kind,
                channel,
                r.produced_at_ms,
                r.media_seq,
                r.event_id,
            ))
        }
    }
}

impl Controller {
    /// A release-1 controller on a fresh database at epoch 1; not started yet.
    pub fn new() -> Controller {
        Controller {
            durable: Durable {
                release: Release(1),
                schema: Schema(1),
                epoch: 1,
                fenced: false,
                param_revision: 1,
                cluster_release: Release(1),
                desired: BTreeMap::new(),
                nodes: BTreeMap::new(),
                records: BTreeMap::new(),
                acked_through: BTreeMap::new(),
                upgrade: None,
                credentials_issued: 0,
                members: BTreeMap::new(),
                credentials: BTreeMap::new(),
                bootstrap: BTreeMap::new(),
            },
            mem: None,
            incarnation: 0,
        }
    }

    /// What the operator does before a node starts: its group names it, and
    /// `node add` issues its bootstrap token (good for the whole run).
    pub fn add_node(&mut self, node_id: &str, membership: Membership, token: &str) {
        self.durable.members.insert(node_id.to_owned(), membership);
        self.durable.bootstrap.insert(
            node_id.to_owned(),
            BootstrapToken {
                digest: SecretDigest::of(token),
                expires_ms: i64::MAX,
                used_ms: None,
            },
        );
    }

    pub fn info(&self) -> &'static ReleaseInfo {
        ReleaseInfo::of(self.durable.release).expect("the simulation runs known releases")
    }

    pub fn is_up(&self) -> bool {
        self.mem.is_some()
    }

    pub fn upgrade(&self) -> Option<&Upgrade> {
        self.mem.as_ref().and_then(|m| m.upgrade.as_ref())
    }

    /// The upgrade as stored in the database (readable while down).
    pub fn stored_upgrade(&self) -> Option<Upgrade> {
        self.durable
            .upgrade
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
    }

    /// Starts the worker of `durable.release`: opens the database (migrating
    /// it up to this release's schema), self-checks, resumes the stored upgrade.
    pub fn start(&mut self, io: &mut CtlIo) {
        let info = self.info();
        while self.durable.schema < info.schema {
            self.migrate(io);
        }
        if self.durable.schema != info.schema {
            io.violate(format!(
                "self-check: the database is at schema {}, release {} runs schema {}",
                self.durable.schema, info.release, info.schema
            ));
        }
        let upgrade = match self.durable.upgrade.as_deref().map(serde_json::from_str) {
            None => None,
            Some(Ok(up)) => Some(up),
            Some(Err(e)) => {
                io.violate(format!("the stored upgrade state does not read back: {e}"));
                None
            }
        };
        self.incarnation += 1;
        self.mem = Some(Mem {
            // From the clock, so a restarted controller never repeats a revision.
            desired_rev: (WALL_BASE_MS as u64) + io.now_ms,
            upgrade,
            switching: false,
            watches: Vec::new(),
            next_step_ms: io.now_ms,
            volatile: Vec::new(),
        });
        io.log.push(format!(
            "controller up: release {}, schema {}, epoch {}, fenced {}",
            info.release, self.durable.schema, self.durable.epoch, self.durable.fenced
        ));
    }

    /// The process dies: held watches see their connection reset.
    pub fn crash(&mut self, io: &mut CtlIo) {
        let Some(mem) = self.mem.take() else {
            return;
        };
        self.incarnation += 1;
        for w in mem.watches {
            io.replies.push(Reply {
                node: w.node,
                incarnation: w.incarnation,
                lane: Lane::Session,
                id: w.id,
                answer: Answer::Reset,
            });
        }
        if io.canary == Some(Canary::VolatileRecords) {
            for key in mem.volatile {
                self.durable.records.remove(&key);
            }
        }
    }

    /// One schema step (the simulated upgrade is 1 → 2) in one transaction:
    /// every record through the same upcaster the redundant channel uses.
    fn migrate(&mut self, io: &mut CtlIo) {
        let from = self.durable.schema;
        let to = Schema(from.0 + 1);
        let (dir, by_id) = directory(to);
        let mut migrated = BTreeMap::new();
        for ((node, seq), stored) in &self.durable.records {
            let record = match &stored.record {
                AnyRecord::V1(r) => match record::upcast_1_to_2(r.clone(), node, &dir) {
                    Ok(r2) => AnyRecord::V2(r2),
                    Err(e) => {
                        io.violate(format!("migration cannot translate ({node}, {seq}): {e}"));
                        return;
                    }
                },
                AnyRecord::V2(r) if to == Schema(3) => {
                    AnyRecord::V3(record::upcast_2_to_3(r.clone()))
                }
                other => other.clone(),
            };
            let key = match stored_natural_key(&record, &by_id) {
                Ok(k) => k,
                Err(e) => {
                    io.violate(format!("migration: ({node}, {seq}): {e}"));
                    return;
                }
            };
            if key != stored.natural_key {
                io.violate(format!(
                    "migration changed the natural key of ({node}, {seq}): {} → {key}",
                    stored.natural_key
                ));
            }
            migrated.insert(
                (node.clone(), *seq),
                Stored {
                    record,
                    natural_key: key,
                    translated_from: stored.translated_from.or(Some(from)),
                },
            );
        }
        self.durable.records = migrated;
        self.durable.schema = to;
        self.durable.param_revision += 1;
        io.log.push(format!(
            "database migrated from schema {from} to {to} ({} records)",
            self.durable.records.len()
        ));
    }

    /// What admits node requests: the shipped controller's own rule.
    fn admission(&self) -> Admission<'static> {
        Admission {
            controller: self.info(),
            epoch: self.durable.epoch,
            fenced: self.durable.fenced,
        }
    }

    fn view(&self) -> ControllerView {
        let mem = self
            .mem
            .as_ref()
            .expect("only a running controller answers");
        ControllerView {
            info: self.info(),
            desired_rev: mem.desired_rev,
            epoch: self.durable.epoch,
            fenced: self.durable.fenced,
            lease_ms: LEASE_MS,
            param_revision: self.durable.param_revision,
        }
    }

    fn desired_of(&self, node_id: &str) -> Desired {
        self.durable
            .desired
            .get(node_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The session a bearer credential belongs to: (node id, schema).
    fn session(&self, credential: &str, node_hint: &str) -> Result<(String, Schema), Answer> {
        let digest = SecretDigest::of(credential);
        let found = self
            .durable
            .credentials
            .iter()
            .find(|(_, d)| d.matches(&digest))
            .and_then(|(id, _)| Some((id.clone(), self.durable.nodes.get(id)?.schema)));
        match found {
            None => Err(Answer::refused(
                ErrorCode::Unauthorized,
                "unknown credential; send hello again",
            )),
            Some((id, _)) if id != node_hint => Err(Answer::refused(
                ErrorCode::Unauthorized,
                "this credential belongs to another node",
            )),
            Some(s) => Ok(s),
        }
    }

    /// Handles one request; its answer goes to `io.replies`, except for a
    /// watch that is held until something changes or its wait ends.
    pub fn handle(
        &mut self,
        node: NodeIx,
        incarnation: u64,
        lane: Lane,
        id: u64,
        req: Request,
        io: &mut CtlIo,
    ) {
        let handled = match req {
            Request::Hello { body } => self.hello(&body, io),
            Request::Heartbeat { credential, body } => self.heartbeat(&credential, &body, io),
            Request::Watch {
                credential,
                node: node_id,
                epoch,
                grant,
                wait_ms,
                desired_rev,
            } => {
                let held = HeldWatch {
                    node,
                    incarnation,
                    id,
                    node_id,
                    schema: Schema(0),
                    epoch,
                    grant,
                    desired_rev,
                    deadline_ms: io.now_ms + wait_ms.min(limits::WATCH_WAIT_MS_MAX),
                };
                self.watch(&credential, held, io)
            }
            Request::Params {
                credential,
                node: node_id,
                epoch,
            } => self.params(&credential, &node_id, epoch, io),
            Request::Records {
                credential,
                body,
                sent_with,
            } => self.ingest(&credential, &body, sent_with, Grant::Full, io),
            Request::Deliver {
                credential,
                body,
                sent_with,
            } => self.ingest(&credential, &body, sent_with, Grant::Deliver, io),
        };
        let answer = match handled {
            Ok(None) => return,
            Ok(Some(body)) => Answer::Ok(body),
            Err(e) => e,
        };
        io.replies.push(Reply {
            node,
            incarnation,
            lane,
            id,
            answer,
        });
    }

    fn hello(&mut self, body: &[u8], io: &mut CtlIo) -> Handled {
        let hello: Hello = wire::decode(body).map_err(wire_error)?;
        let id = hello.node_id.clone();
        let known = identity::Known {
            membership: self.durable.members.get(&id),
            credential: self.durable.credentials.get(&id),
            bootstrap: self.durable.bootstrap.get(&id),
        };
        let presented = identity::Presented::bearer(&hello);
        let credential = match identity::admit_hello(&hello, &presented, known, to_ms(io.now_ms)) {
            Err(r) => return Err(Answer::refused(r.code, r.message)),
            Ok(Proof::Credential) => hello.token.clone(),
            Ok(Proof::Bootstrap) => {
                self.durable.credentials_issued += 1;
                let c = hello.new_credential.clone().unwrap_or_default();
                if let Some(t) = self.durable.bootstrap.get_mut(&id) {
                    t.used_ms = Some(to_ms(io.now_ms));
                }
                self.durable
                    .credentials
                    .insert(id.clone(), SecretDigest::of(&c));
                c
            }
        };
        let view = self.view();
        let desired = self.desired_of(&hello.node_id);
        let welcome = wire::welcome(&view, &hello, credential.clone(), desired)
            .map_err(|e| Answer::refused(ErrorCode::NoCommonProtocol, e.to_string()))?;
        self.durable.nodes.insert(
            hello.node_id.clone(),
            Registration {
                release: hello.release,
                schema: hello.schema,
                role: hello.role,
                group: hello.group.clone(),
                grant: welcome.grant,
                epoch: welcome.epoch,
                outbox: hello.outbox,
                current_events: hello.current_events.clone(),
                staged: hello.staged.clone(),
                last_seen_ms: io.now_ms,
            },
        );
        io.log.push(format!(
            "ctl welcomes {} (release {}) with {} at epoch {}",
            hello.node_id, hello.release, welcome.grant, welcome.epoch
        ));
        ok(serde_json::to_vec(&welcome))
    }

    fn heartbeat(&mut self, credential: &str, body: &[u8], io: &mut CtlIo) -> Handled {
        let hb: Heartbeat = wire::decode(body).map_err(wire_error)?;
        let (node_id, schema) = self.session(credential, &hb.node_id)?;
        self.admission()
            .heartbeat(hb.epoch)
            .map_err(|r| refused(r, io))?;
        let grant = self.view().grant_state(schema, self.desired_of(&node_id));
        if let Some(r) = self.durable.nodes.get_mut(&node_id) {
            r.outbox = hb.outbox;
            r.current_events = hb.current_events;
            r.staged = hb.staged;
            r.grant = grant.grant;
            r.epoch = hb.epoch;
            r.last_seen_ms = io.now_ms;
        }
        ok(serde_json::to_vec(&grant))
    }

    /// `GET /node/v1/params`: admitted as the shipped controller admits it,
    /// answered with parameters of the database's schema.
    fn params(&mut self, credential: &str, node_id: &str, epoch: u64, io: &mut CtlIo) -> Handled {
        let (_, schema) = self.session(credential, node_id)?;
        self.admission()
            .params(schema, epoch)
            .map_err(|r| refused(r, io))?;
        let revision = self.durable.param_revision;
        let answer = ParamsAnswer {
            schema: self.durable.schema,
            revision,
            params: params_document(self.durable.schema, revision)?,
        };
        ok(serde_json::to_vec(&answer))
    }

    fn watch(&mut self, credential: &str, mut held: HeldWatch, io: &mut CtlIo) -> Handled {
        let (_, schema) = self.session(credential, &held.node_id)?;
        held.schema = schema;
        if let Some(answer) = self.watch_answer(&held, io.now_ms) {
            return ok(serde_json::to_vec(&answer));
        }
        if let Some(mem) = self.mem.as_mut() {
            mem.watches.push(held);
        }
        Ok(None)
    }

    /// The grant state for a held watch, if it should answer now.
    fn watch_answer(&self, w: &HeldWatch, now_ms: u64) -> Option<wire::GrantState> {
        let current = self
            .view()
            .grant_state(w.schema, self.desired_of(&w.node_id));
        let desired_moved = w.desired_rev.is_some_and(|r| r != current.desired_rev);
        let changed = current.epoch != w.epoch || current.grant != w.grant || desired_moved;
        (changed || now_ms >= w.deadline_ms).then_some(current)
    }

    /// Answers every held watch whose state changed or whose wait is over.
    pub fn wake_watches(&mut self, io: &mut CtlIo) {
        let Some(mem) = self.mem.as_mut() else {
            return;
        };
        let watches = std::mem::take(&mut mem.watches);
        let mut keep = Vec::new();
        for w in watches {
            match self.watch_answer(&w, io.now_ms) {
                Some(gs) => io.replies.push(Reply {
                    node: w.node,
                    incarnation: w.incarnation,
                    lane: Lane::Session,
                    id: w.id,
                    answer: Answer::Ok(serde_json::to_vec(&gs).expect("answers serialize")),
                }),
                None => keep.push(w),
            }
        }
        if let Some(mem) = self.mem.as_mut() {
            mem.watches = keep;
        }
    }

    fn ingest(
        &mut self,
        credential: &str,
        body: &[u8],
        sent_with: SentWith,
        needed: Grant,
        io: &mut CtlIo,
    ) -> Handled {
        let batch: Batch = wire::decode(body).map_err(wire_error)?;
        let (node_id, schema) = self.session(credential, &batch.node_id)?;
        // The canary pretends the batch carried the current epoch, so the
        // invariants below must catch what the admission would have refused.
        let held = if io.canary == Some(Canary::SkipBatchEpochCheck) {
            self.durable.epoch
        } else {
            batch.epoch
        };
        let channel = match needed {
            Grant::Full => Channel::Main,
            _ => Channel::Redundant,
        };
        let name = channel.as_str();
        self.admission()
            .batch(channel, schema, held, batch.schema)
            .map_err(|r| refused(r, io))?;
        // The invariants, asserted where a record is accepted.
        if batch.epoch != self.durable.epoch {
            io.violate(format!(
                "{node_id}: batch accepted under epoch {} while the controller is at epoch {}",
                batch.epoch, self.durable.epoch
            ));
        }
        if self.durable.fenced {
            io.violate(format!("{node_id}: batch accepted while fenced"));
        }
        if sent_with.grant != needed || sent_with.epoch != batch.epoch {
            io.violate(format!(
                "{node_id}: shipped on the {name} channel holding {} at epoch {}",
                sent_with.grant, sent_with.epoch
            ));
        }
        let ack = self.store_batch(&node_id, &batch, name, io)?;
        ok(serde_json::to_vec(&ack))
    }

    /// Upcast all, then insert all, idempotent on (node, seq) (sqlite.rs `store_batch`).
    fn store_batch(
        &mut self,
        node_id: &str,
        batch: &Batch,
        channel: &str,
        io: &mut CtlIo,
    ) -> Result<BatchAck, Answer> {
        let to = self.durable.schema;
        let (dir, by_id) = directory(to);
        let mut decoded = Vec::with_capacity(batch.records.len());
        for (i, raw) in batch.records.iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            let untranslatable = |e: String| {
                Answer::error(
                    422,
                    "untranslatable",
                    format!("record {seq} cannot be stored: {e}"),
                )
            };
            let rec = record::upcast(batch.schema, to, raw, node_id, &dir)
                .map_err(|e| untranslatable(e.to_string()))?;
            let key = stored_natural_key(&rec, &by_id).map_err(untranslatable)?;
            decoded.push((seq, rec, key));
        }
        let translated_from = (batch.schema != to).then_some(batch.schema);
        let mut stored = 0;
        let copies: u64 = if io.canary == Some(Canary::StoreTwice) {
            2
        } else {
            1
        };
        for (seq, rec, key) in decoded {
            for copy in 0..copies {
                let k = (node_id.to_owned(), seq + copy * 1_000_000);
                if self.durable.records.contains_key(&k) {
                    io.stats.records_already_stored += 1;
                    continue;
                }
                self.durable.records.insert(
                    k.clone(),
                    Stored {
                        record: rec.clone(),
                        natural_key: key.clone(),
                        translated_from,
                    },
                );
                if let Some(mem) = self.mem.as_mut() {
                    mem.volatile.push(k);
                }
                stored += 1;
            }
        }
        let last = batch.first_seq + batch.records.len() as u64 - 1;
        let through = self
            .durable
            .acked_through
            .entry(node_id.to_owned())
            .or_insert(0);
        *through = (*through).max(last);
        io.stats.batches_stored += 1;
        let translated = if translated_from.is_some() { stored } else { 0 };
        io.stats.records_translated += translated;
        if channel == "main" && translated_from.is_some() {
            io.stats.leftover_batches_on_main += 1;
        }
        io.log.push(format!(
            "ctl stores {node_id} {}..{last} ({channel}, schema {}): {stored} new",
            batch.first_seq, batch.schema
        ));
        Ok(BatchAck {
            v: MESSAGE_VERSION,
            acked_through: last,
            stored,
            translated,
        })
    }

    // ---- the orchestrator ----

    pub fn node_views(&self, now_ms: u64) -> Vec<NodeView> {
        self.durable
            .nodes
            .iter()
            .map(|(id, r)| NodeView {
                id: id.clone(),
                role: r.role,
                group: r.group.clone(),
                release: r.release,
                schema: r.schema,
                reachable: now_ms.saturating_sub(r.last_seen_ms) <= LEASE_MS,
                grant: r.grant,
                epoch: r.epoch,
                staged: r.staged.clone(),
                outbox_count: r.outbox.count,
                current_events: r.current_events.clone(),
                binary_sha256: None,
                supervisor_sha256: None,
            })
            .collect()
    }

    pub fn cluster_view(&self) -> ClusterView {
        ClusterView {
            epoch: self.durable.epoch,
            fenced: self.durable.fenced,
            controller_release: self.info().release,
            controller_sha256: None,
            controller_supervisor_sha256: None,
            replicas_behind: vec![],
            database_schema: self.info().schema,
            disk_free_bytes: DISK_FREE_BYTES,
        }
    }

    /// The operator starts an upgrade (the API refuses while one runs).
    pub fn start_upgrade(&mut self, plan: Plan, io: &mut CtlIo) -> bool {
        let Some(mem) = self.mem.as_mut() else {
            return false;
        };
        if mem.upgrade.as_ref().is_some_and(|u| !u.status.is_over()) {
            return false;
        }
        let up = Upgrade::new(plan, io.now_ms);
        self.durable.upgrade = Some(serde_json::to_string(&up).expect("upgrade serializes"));
        mem.upgrade = Some(up);
        true
    }

    /// Whether the orchestrator's timer is due; steps the running upgrade then.
    pub fn tick_due(&mut self, now_ms: u64) -> bool {
        let Some(mem) = self.mem.as_mut() else {
            return false;
        };
        if now_ms < mem.next_step_ms {
            return false;
        }
        mem.next_step_ms = now_ms + TICK_MS;
        mem.upgrade
            .as_ref()
            .is_some_and(|u| u.status == Status::Running)
    }

    /// One step under the lock: effects, then the state if it changed.
    /// `crash_at` crashes the process after that many effects, before the
    /// state is stored (a crash point); returns whether it crashed.
    pub fn step(&mut self, input: Input, crash_at: Option<u64>, io: &mut CtlIo) -> bool {
        let Some(up) = self.mem.as_mut().and_then(|m| m.upgrade.as_mut()) else {
            return false;
        };
        let before = up.clone();
        let effects = up.step(input, io.now_ms);
        let after = up.clone();
        if effects.iter().any(|e| matches!(e, Effect::Finalize { .. })) {
            // The point of no return: only with every node of the plan upgraded.
            let behind: Vec<String> = after
                .nodes
                .iter()
                .filter(|(_, step)| !matches!(step, NodeStep::Upgraded { .. }))
                .map(|(id, step)| format!("{id} {step:?}"))
                .collect();
            if !behind.is_empty() {
                io.violate(format!(
                    "the upgrade finalizes with nodes not upgraded: {}",
                    behind.join(", ")
                ));
            }
        }
        let crash_after = crash_at
            .filter(|_| !effects.is_empty())
            .map(|r| (r % (effects.len() as u64 + 1)) as usize);
        for (i, effect) in effects.into_iter().enumerate() {
            if crash_after == Some(i) {
                io.log
                    .push(format!("ctl crashes after {i} effects of a step"));
                return true;
            }
            self.apply(effect, io);
        }
        if crash_after.is_some() {
            io.log.push("ctl crashes before storing the step".into());
            return true;
        }
        if after != before {
            self.durable.upgrade = Some(serde_json::to_string(&after).expect("upgrade serializes"));
            if before.phase != after.phase {
                io.log.push(format!(
                    "upgrade phase {} → {}",
                    before.phase.as_str(),
                    after.phase.as_str()
                ));
            }
            if before.status != after.status {
                io.log.push(format!("upgrade status {:?}", after.status));
            }
        }
        self.wake_watches(io);
        false
    }

    fn apply(&mut self, effect: Effect, io: &mut CtlIo) {
        match effect {
            Effect::Fence => {
                if !self.durable.fenced {
                    self.durable.epoch += 1;
                    self.durable.fenced = true;
                    io.log
                        .push(format!("ctl fences at epoch {}", self.durable.epoch));
                }
            }
            Effect::Unfence => {
                if self.durable.fenced {
                    self.durable.fenced = false;
                    io.log.push(format!(
                        "ctl lifts the fence at epoch {}",
                        self.durable.epoch
                    ));
                }
            }
            Effect::SetDesired { node, desired } => {
                if self.desired_of(&node) != desired {
                    io.log.push(format!("ctl desires {node}: {desired:?}"));
                    self.durable.desired.insert(node, desired);
                    if let Some(mem) = self.mem.as_mut() {
                        mem.desired_rev = mem.desired_rev.wrapping_add(1);
                    }
                }
            }
            Effect::SwitchController { target } => {
                if let Some(mem) = self.mem.as_mut() {
                    if !mem.switching {
                        mem.switching = true;
                        io.log.push(format!(
                            "ctl starts its switch to release {}",
                            target.release
                        ));
                        io.switch_requested = Some(target);
                    }
                }
            }
            Effect::Finalize { release } => {
                self.durable.cluster_release = release;
                io.log.push(format!("cluster release moves to {release}"));
            }
        }
    }
}

impl Default for Controller {
    fn default() -> Controller {
        Controller::new()
    }
}

/// Simulated milliseconds as the core's signed clock.
fn to_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
