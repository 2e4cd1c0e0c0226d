//! What the node machine publishes to the rest of the node: its view (grant,
//! epoch, quiesce mark, errors) and the parameter cache. Types of the core,
//! named here so the producer, the HTTP face and readiness depend on this
//! leaf one way.

pub use handover_core::node::{ParamsCache, View};
