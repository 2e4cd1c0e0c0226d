//! Sans-IO core of handover.
//!
//! Everything here is a plain type or a pure function: releases and their
//! compatibility, grants, the handshake decision, wire messages, parameter and
//! record formats with their upcasters, the HLS schedule and segment bytes,
//! and the operator API's requests and answers.
//! Nothing in this crate opens a socket, touches a disk or reads the clock:
//! callers pass `now_ms` in. That is what lets every interleaving be tested.

pub mod admission;
pub mod agent;
pub mod api;
pub mod artifact;
pub mod grant;
pub mod hls;
pub mod identity;
pub mod node;
pub mod params;
pub mod record;
pub mod release;
pub mod role;
pub mod ship;
pub mod timefmt;
pub mod ts;
pub mod upgrade;
pub mod wire;

pub use grant::{decide_grant, Grant, GrantDecision, GrantReason};
pub use release::{ProtocolRange, Release, ReleaseInfo, Schema};
