//! Messages between nodes and the controller, and the one queue that orders
//! every message and timer by simulated time.
//!
//! Request bodies are the real wire messages serialized to JSON (the
//! controller reads them with `wire::decode`); answers are serialized too
//! and read back with serde on the node, as over HTTP.

use handover_core::admission::ErrorCode;
use handover_core::Grant;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Index of a node in the simulated fleet.
pub type NodeIx = usize;

/// The node machine's request loops (`handover_core::node::Lane`).
pub use handover_core::node::Lane;

/// What a node held when it sent a batch: simulation metadata beside the
/// wire body, for the invariant checked when the controller accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentWith {
    pub grant: Grant,
    pub epoch: u64,
}

#[derive(Clone, Debug)]
pub enum Request {
    Hello {
        body: Vec<u8>,
    },
    Heartbeat {
        credential: String,
        body: Vec<u8>,
    },
    /// `GET /node/v1/watch?node=..&epoch=..&grant=..&wait_ms=..&desired_rev=..`
    Watch {
        credential: String,
        node: String,
        epoch: u64,
        grant: Grant,
        wait_ms: u64,
        desired_rev: Option<u64>,
    },
    /// `GET /node/v1/params?node=..&epoch=..`
    Params {
        credential: String,
        node: String,
        epoch: u64,
    },
    /// Main channel (`full`).
    Records {
        credential: String,
        body: Vec<u8>,
        sent_with: SentWith,
    },
    /// Redundant channel (`deliver`).
    Deliver {
        credential: String,
        body: Vec<u8>,
        sent_with: SentWith,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Heartbeat { .. } => "heartbeat",
            Request::Watch { .. } => "watch",
            Request::Params { .. } => "params",
            Request::Records { .. } => "records",
            Request::Deliver { .. } => "deliver",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Answer {
    /// A 200 with a JSON body (`Welcome`, `GrantState` or `BatchAck`).
    Ok(Vec<u8>),
    /// An error answer: status and `{"error", "message"}`.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// The controller process went away with the connection open.
    Reset,
}

impl Answer {
    /// A node-protocol refusal: the code and the status it carries.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Answer {
        Answer::error(code.status(), code.as_str(), message)
    }

    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Answer {
        Answer::Error {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Payload {
    ToController {
        node: NodeIx,
        /// The node process (incarnation) that sent it.
        incarnation: u64,
        lane: Lane,
        id: u64,
        req: Request,
    },
    ToNode {
        node: NodeIx,
        incarnation: u64,
        lane: Lane,
        id: u64,
        answer: Answer,
    },
}

impl Payload {
    pub fn node(&self) -> NodeIx {
        match self {
            Payload::ToController { node, .. } | Payload::ToNode { node, .. } => *node,
        }
    }
}

/// Everything that can happen at a point of simulated time.
#[derive(Clone, Debug)]
pub enum Event {
    Deliver(Payload),
    NodeTick(NodeIx),
    ControllerTick,
    ControllerRestart {
        incarnation: u64,
    },
    ControllerSwitchDone {
        incarnation: u64,
    },
    NodeRestart {
        node: NodeIx,
        incarnation: u64,
    },
    StageDone {
        node: NodeIx,
        incarnation: u64,
        artifact: String,
        ok: bool,
    },
    Fault,
    FaultsEnd,
}

struct Scheduled {
    at_ms: u64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.order) == (other.at_ms, other.order)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest time first, then the first scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.order).cmp(&(self.at_ms, self.order))
    }
}

/// Events by delivery time; ties go in the order they were scheduled.
#[derive(Default)]
pub struct Queue {
    heap: BinaryHeap<Scheduled>,
    scheduled: u64,
}

impl Queue {
    pub fn push(&mut self, at_ms: u64, event: Event) {
        self.scheduled += 1;
        self.heap.push(Scheduled {
            at_ms,
            order: self.scheduled,
            event,
        });
    }

    pub fn pop(&mut self) -> Option<(u64, Event)> {
        self.heap.pop().map(|s| (s.at_ms, s.event))
    }
}
