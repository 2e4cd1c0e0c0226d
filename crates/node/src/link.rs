//! What the session publishes to the rest of the node: the grant it holds
//! ([`Link`]) and the parameter cache. Plain data in a leaf module, so the
//! session, the producer, the shipper and the HTTP face depend on it one way.

use handover_core::grant::{Grant, GrantReason};
use handover_core::params::LiveEvent;
use handover_core::upgrade::Desired;
use handover_core::Schema;

/// The grant this node holds, as the rest of the node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub grant: Option<Grant>,
    pub reason: Option<GrantReason>,
    pub epoch: Option<u64>,
    pub lease_ms: u64,
    /// The parameter revision the controller announced last.
    pub controller_param_revision: Option<u64>,
    pub credential: Option<String>,
    /// A hello succeeded and nothing since asked for another one.
    pub established: bool,
    /// Counts successful hellos; a handshake request names the one it saw fail.
    pub generation: u64,
    /// What the controller wants done about upgrades, and its revision.
    pub desired: Desired,
    pub desired_rev: Option<u64>,
    /// Since when this node takes no new event (a primary before its switch).
    pub quiesce_since_ms: Option<i64>,
}

/// The parameter cache in memory: the events of our group, from our schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsCache {
    pub schema: Schema,
    pub revision: Option<u64>,
    pub events: Vec<LiveEvent>,
}
