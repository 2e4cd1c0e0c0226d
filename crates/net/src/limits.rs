//! The limits every listener serves with: what each bounds, its value per
//! role and why.

use std::time::Duration;

/// What one listener allows. The controller and the node each serve with
/// their own ([`Limits::CONTROLLER`], [`Limits::NODE`]); an operator may
/// lower or raise the connection cap (`--connections-max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once. At the cap a new connection makes room by
    /// closing a connection that has had no request in flight for at least
    /// [`Limits::evictable_idle_ms`]: one that never sent a whole request
    /// first, oldest first, else the one idle longest. If there is none
    /// yet, the new one waits (accepted, unread; the next ones in the
    /// kernel's backlog) until there is. The cap in force is also kept
    /// [`FDS_RESERVED`] below the open-file limit, so accepting never fails
    /// for want of a descriptor.
    pub connections_max: usize,
    /// How long a connection must have had no request in flight (since it
    /// was accepted, or since its last response) before it may be closed to
    /// make room at the cap.
    pub evictable_idle_ms: u64,
    /// From the moment a connection can take a request (just accepted, or
    /// its last response written) until that request's whole header has
    /// arrived. hyper's header read timeout, whose clock starts when the
    /// connection becomes ready for a request: so it is the idle timeout
    /// too. A keep-alive connection with no request in flight, a client
    /// that sends nothing, and one that sends its header a byte at a time
    /// are all closed once it passes. It does not run while a request is in
    /// flight (a watch held for 25 s is not idle).
    pub header_read_timeout_ms: u64,
    /// A request body that delivers nothing for this long fails (tower-http's
    /// request body timeout: the clock restarts with every piece that
    /// arrives, so a large upload that keeps moving is never cut).
    pub body_read_timeout_ms: u64,
    /// A write to the client that makes no progress for this long (the
    /// client stopped reading a large answer, or vanished mid-answer) closes
    /// the connection, so a request in flight cannot hold its slot forever.
    /// The clock runs only while a write waits: a watch held for 25 s
    /// without writing is not cut.
    pub write_timeout_ms: u64,
    /// Once the listener stops (a worker handing its socket to its
    /// successor), how long a connection with no request in flight stays
    /// open: a request that arrives on it meanwhile is answered with
    /// `Connection: close`, so its client reconnects between requests (to
    /// the successor) instead of racing a close with its next one. 0 closes
    /// such connections at once.
    pub drain_idle_ms: u64,
}

/// A connection may be closed to make room at the cap only after this long
/// without a request in flight. A client that has just connected may have
/// sent its request already, still unread by a server busy accepting a
/// flood, and one that has just been answered may be sending its next:
/// closing either would fail a request. A flood faster than the cap per
/// this long makes new connections wait (in the backlog) instead.
pub const EVICTABLE_IDLE_MS: u64 = 2_000;

/// A node's header read and idle timeout. A playing viewer asks at least
/// once per segment (HLS segments are 1 to 6 s), so its keep-alive
/// connection never idles this long; a silent or slow client holds a slot
/// at most this long.
pub const NODE_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// The controller's header read and idle timeout: twice the longest
/// heartbeat period ([`handover_core::node::HEARTBEAT_MS_MAX`]), so a
/// node's pooled connection between heartbeats is never closed under it
/// (a close racing the next request would fail that request).
pub const CONTROLLER_HEADER_READ_TIMEOUT_MS: u64 = 2 * handover_core::node::HEARTBEAT_MS_MAX;

/// A request body that stalls this long fails, on every listener. Node
/// batches (at most `wire::limits::BODY_BYTES_MAX`) are sent whole at once
/// and an artifact upload streams steadily: ten silent seconds is a dead
/// or hostile client.
pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;

/// A write that makes no progress this long fails, on every listener. A
/// viewer's player reads a segment as fast as its link allows and a node
/// reads an artifact as it downloads; ten seconds with not one byte taken
/// is a dead or hostile client.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;

/// A node's [`Limits::drain_idle_ms`]: a playing viewer asks at least twice
/// a segment (HLS segments are 1 to 6 s; players poll at half the target
/// duration), so in this long nearly every keep-alive connection carries a
/// request and learns to reconnect; only a connection idle throughout is
/// closed, whose client is the least likely to be sending just then.
pub const NODE_DRAIN_IDLE_MS: u64 = 1_000;

/// The controller's [`Limits::drain_idle_ms`]: none. A retired controller
/// worker must stop answering soon after its successor is ready (the
/// successor may have migrated the store it still has open). Node agents
/// send again on their next round what a close cut off; an operator's
/// command that races it fails and says so.
pub const CONTROLLER_DRAIN_IDLE_MS: u64 = 0;

/// The controller's connection cap: it must carry 10,000 nodes, each with a
/// watch, a heartbeat and a shipping connection (`handover bench` measures
/// 10,000 watching nodes), plus operators; 32,768 leaves room for that.
pub const CONTROLLER_CONNECTIONS_MAX: usize = 32_768;

/// A node's connection cap: thousands of players with one or two
/// keep-alive connections each, plus its peers. A node asked for more is
/// better split into more groups.
pub const NODE_CONNECTIONS_MAX: usize = 10_000;

/// File descriptors kept for what a process opens besides accepted
/// connections (its database and journal files, artifact files, its own
/// connections to the controller, logs): the cap in force is the open-file
/// limit less this.
pub const FDS_RESERVED: usize = 256;

/// The largest request head hyper reads (it answers 431 beyond): far above
/// any header this system sends, and it bounds the memory a connection
/// sending a header slowly can make the server hold (hyper's default is
/// about 400 KiB).
pub const READ_BUF_BYTES_MAX: usize = 64 << 10;

impl Limits {
    /// The controller: long-polls are not idle, heartbeats may be 10 s
    /// apart, 10,000 nodes.
    pub const CONTROLLER: Limits = Limits {
        connections_max: CONTROLLER_CONNECTIONS_MAX,
        evictable_idle_ms: EVICTABLE_IDLE_MS,
        header_read_timeout_ms: CONTROLLER_HEADER_READ_TIMEOUT_MS,
        body_read_timeout_ms: BODY_READ_TIMEOUT_MS,
        write_timeout_ms: WRITE_TIMEOUT_MS,
        drain_idle_ms: CONTROLLER_DRAIN_IDLE_MS,
    };

    /// A content node: HLS viewers.
    pub const NODE: Limits = Limits {
        connections_max: NODE_CONNECTIONS_MAX,
        evictable_idle_ms: EVICTABLE_IDLE_MS,
        header_read_timeout_ms: NODE_HEADER_READ_TIMEOUT_MS,
        body_read_timeout_ms: BODY_READ_TIMEOUT_MS,
        write_timeout_ms: WRITE_TIMEOUT_MS,
        drain_idle_ms: NODE_DRAIN_IDLE_MS,
    };

    /// These limits with another connection cap, if one is given.
    pub fn with_connections_max(self, connections_max: Option<usize>) -> Limits {
        Limits {
            connections_max: connections_max.unwrap_or(self.connections_max),
            ..self
        }
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub fn drain_idle(&self) -> Duration {
        Duration::from_millis(self.drain_idle_ms)
    }

    pub fn evictable_idle(&self) -> Duration {
        Duration::from_millis(self.evictable_idle_ms)
    }

    /// Every limit but the eviction grace and the drain is at least 1 (a zero would
    /// refuse every connection or close it at once).
    pub fn validate(&self) -> Result<(), crate::ServeError> {
        for (name, value) in [
            ("connections_max", self.connections_max as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ] {
            if value == 0 {
                return Err(crate::ServeError::ZeroLimit(name));
            }
        }
        Ok(())
    }

    /// The cap in force when the open-file limit is `open_files_soft`
    /// (`None`: unknown): [`Limits::connections_max`], kept
    /// [`FDS_RESERVED`] below that limit, and at least 1.
    pub fn connections_in_force(&self, open_files_soft: Option<u64>) -> usize {
        let by_fds = open_files_soft
            .map(|soft| usize::try_from(soft).unwrap_or(usize::MAX))
            .map(|soft| soft.saturating_sub(FDS_RESERVED))
            .unwrap_or(usize::MAX);
        self.connections_max.min(by_fds).max(1)
    }
}

/// Raises this process's soft open-file limit to its hard limit (as Go's
/// runtime does at start), so the connection cap, not the default soft
/// limit of 1,024, decides how many connections a listener holds. Returns
/// the soft limit in force afterwards, or `None` if it cannot be read.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some(hard),
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            Some(soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_in_force_stays_below_the_open_file_limit() {
        let l = Limits::CONTROLLER;
        assert_eq!(l.connections_in_force(None), CONTROLLER_CONNECTIONS_MAX);
        assert_eq!(l.connections_in_force(Some(20_000)), 20_000 - FDS_RESERVED);
        assert_eq!(
            l.connections_in_force(Some(1_000_000)),
            CONTROLLER_CONNECTIONS_MAX
        );
        assert_eq!(l.connections_in_force(Some(10)), 1);
        let small = l.with_connections_max(Some(500));
        assert_eq!(small.connections_in_force(Some(20_000)), 500);
        assert_eq!(l.with_connections_max(None), l);
    }

    #[test]
    fn a_zero_limit_is_refused() {
        assert!(Limits::NODE.validate().is_ok());
        assert!(Limits::CONTROLLER.validate().is_ok());
        let zero = Limits::NODE.with_connections_max(Some(0));
        assert!(matches!(
            zero.validate(),
            Err(crate::ServeError::ZeroLimit("connections_max"))
        ));
    }

    #[test]
    fn the_values_fit_the_protocol_and_each_other() {
        const {
            assert!(CONTROLLER_HEADER_READ_TIMEOUT_MS > handover_core::node::HEARTBEAT_MS_MAX);
            // A connection can make room before the idle timeout closes it.
            assert!(EVICTABLE_IDLE_MS < NODE_HEADER_READ_TIMEOUT_MS);
        }
    }
}
