//! The network boundary: every listener of handover (the controller's and
//! each node's) serves HTTP through [`serve`], with limits, so no client
//! can hold the server's connections, memory or descriptors for long.
//!
//! - **Header read and idle timeout** ([`Limits::header_read_timeout_ms`],
//!   hyper's): a connection with no request in flight (just accepted,
//!   between keep-alive requests, or still sending a header) is closed
//!   once it passes. A request in flight (a watch held 25 s) is never idle.
//! - **Body read timeout** ([`Limits::body_read_timeout_ms`],
//!   tower-http's): a request body that stalls fails; a handler sees the
//!   error when it reads the body ([`is_body_timeout`] recognises it).
//! - **Write timeout** ([`Limits::write_timeout_ms`], tokio-io-timeout's,
//!   on the socket): a client that stops reading an answer is closed, so
//!   a request in flight, which the cap never closes, cannot hold its slot
//!   for good.
//! - **Connection cap** ([`Limits::connections_max`], kept below the
//!   open-file limit). At the cap a new connection closes one that has had
//!   no request in flight for [`Limits::evictable_idle_ms`] (2 s): first
//!   one that never sent a whole request (a silent or slow client loses
//!   nothing), oldest first, then the longest-idle keep-alive one (its
//!   client reconnects for its next request, as HTTP clients do after an
//!   idle close). The grace spares a client whose request is on its way or
//!   not yet read by a busy server. A connection with a request in flight
//!   is never closed to make room; if there is no candidate yet, the new
//!   connection waits (in the backlog) until there is. So connections that
//!   only hold a slot cannot keep out a viewer or a node for long: they
//!   make room for it, and the timeouts close them anyway. Refusing at the
//!   cap instead would fail the viewers; only waiting would make them wait
//!   out an idle client's timeout.
//! - **Graceful shutdown**: stop accepting, close connections without a
//!   request, finish the requests in flight.
//!
//! Modules: [`limits`] (the values and why), `registry` (the open
//! connections, which one makes room at the cap), `serve` (the accept loop
//! and the connection task: the write timeout, the TLS handshake, HTTP),
//! [`tls`] (server and client configs, pinned client certificates).

pub mod controllers;
pub mod limits;
mod registry;
mod serve;
pub mod tls;

pub use limits::{raise_open_files_limit, Limits};
pub use serve::{serve, ACCEPT_RETRY_MS};

/// Why [`serve`] could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the limit {0} must be at least 1")]
    ZeroLimit(&'static str),
}

/// Whether `e` (a body extractor's rejection, or anything else) is, or was
/// caused by, a request body that stalled past the body read timeout.
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = c.source();
    }
    false
}
