//! The supervisor of one role (controller or node).
//!
//! It binds the role's listening TCP socket once and keeps it open while it
//! runs; the worker child of the chosen release serves on an inherited copy
//! (`LISTEN_FDS=1`, fd 3, the systemd convention). A release switch starts
//! the new worker on the same socket, waits until it is ready, and only then
//! lets the old one finish its in-flight requests and exit. Connections that
//! arrive while no worker is accepting wait in the socket's kernel backlog,
//! so a switch or a worker crash never refuses a connection.
//!
//! Supervisor side: [`run`]. Worker side: [`inherited_listener`] and
//! [`SupervisorClient`].

mod adopted;
mod control;
mod digest;
mod handoff;
mod protocol;
mod spawn;
mod state;
mod supervisor;
mod worker;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use handover_core::release::Contracts;
use serde::{Deserialize, Serialize};

pub use handoff::HANDOFF_VERSION;
pub use protocol::{SupervisorStatus, SwitchOutcome, CONTROL_VERSION};
pub use supervisor::run;
pub use worker::{inherited_listener, SupervisorClient, SupervisorError};

/// Default bound on a new worker becoming ready.
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 15_000;
/// Default bound on an old worker finishing in-flight requests after SIGTERM.
pub const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

/// Env var naming the supervisor's control socket, set for every worker.
pub const ENV_SUPERVISOR_SOCK: &str = "HANDOVER_SUPERVISOR_SOCK";
/// The SHA-256 of the binary this worker runs, as its supervisor reported
/// it; None for a process without a supervisor (or a malformed value).
pub fn binary_sha256() -> Option<String> {
    let v = std::env::var(ENV_BINARY_SHA256).ok()?;
    (v.len() == digest::SHA256_HEX_LEN && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(v)
}

/// The digest of the binary this worker's supervisor runs now; asked each
/// time, since a supervisor re-executes itself after an upgrade. None
/// without a supervisor (or one too old to say).
pub async fn supervisor_sha256() -> Option<String> {
    let client = SupervisorClient::from_env()?;
    let sha = client.status().await.ok()?.sha256;
    (!sha.is_empty()).then_some(sha)
}

/// The directory under a role's data dir that holds its supervisor's state
/// (`state.json`, `control.sock`): `DATA_DIR/supervisor`.
pub const STATE_DIR_NAME: &str = "supervisor";

/// The releases the supervisor state in `state_dir` names: the active one
/// and, while a switch is under way, the one it switches to. These are
/// what the supervisor may start again (a restart tries `switching` once,
/// else falls back to `active`) and exec into, so a worker must not remove
/// their binaries. Empty when no supervisor ever ran there; an error when
/// the state cannot be read (then nothing is known to be unused).
pub fn releases_named(state_dir: &Path) -> std::io::Result<Vec<Release>> {
    Ok(match state::load(state_dir)? {
        None => Vec::new(),
        Some(state) => std::iter::once(state.active)
            .chain(state.switching)
            .collect(),
    })
}

/// Env var set to `1` for every worker, so a worker knows it is supervised.
pub const ENV_WORKER: &str = "HANDOVER_WORKER";
/// Env var carrying the supervisor's `ready_timeout_ms`, so a worker's
/// `switch` call waits long enough for the answer.
pub const ENV_READY_TIMEOUT_MS: &str = "HANDOVER_SUPERVISOR_READY_TIMEOUT_MS";
/// Env var carrying the SHA-256 (lowercase hex) of exactly the bytes the
/// supervisor executed as this worker, so the worker can report it.
pub const ENV_BINARY_SHA256: &str = "HANDOVER_BINARY_SHA256";
/// Env var carrying the hand-off document from a supervisor to the new image
/// of itself (see [`handoff`](crate::handoff)): set only across its own
/// `execve`, never for a worker.
pub const ENV_SUPERVISOR_HANDOFF: &str = "HANDOVER_SUPERVISOR_HANDOFF";
/// Env var set (to the digest of the binary exec'd) when a starting
/// supervisor re-executed itself into the active release's binary; the new
/// image never does it a second time, so a wrapper script cannot loop.
pub const ENV_SUPERVISOR_EXECED_AT_START: &str = "HANDOVER_SUPERVISOR_EXECED_AT_START";

/// Which release a worker runs, and from which binary (releases live side by
/// side in the data dir, so the binary is part of the release's identity).
///
/// Persisted in `state.json` and sent in `switch` requests: the optional
/// fields are left out when unset, so a document without them (every one
/// written before they existed) still reads, and one written without them
/// reads in an older binary too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub release: u32,
    pub binary: PathBuf,
    /// SHA-256 (64 lowercase hex digits) the binary's bytes must have: a
    /// spawn of other bytes is refused, now and after any restart (it is
    /// kept in `state.json`). What a worker actually runs is reported apart
    /// (`SupervisorStatus::active_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The contract versions the binary speaks. The supervisor re-executes
    /// itself into a release's binary only when they are known and its
    /// `supervisor_handoff` is this supervisor's; a switch to a binary of
    /// another `worker_cli` or `supervisor_control` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contracts: Option<Contracts>,
}

impl Release {
    /// A release with no expected digest and unknown contracts.
    pub fn new(release: u32, binary: impl Into<PathBuf>) -> Release {
        Release {
            release,
            binary: binary.into(),
            sha256: None,
            contracts: None,
        }
    }

    /// The same release and binary: what a switch compares (the digest and
    /// contracts describe the binary, they do not name another release).
    pub fn same_as(&self, other: &Release) -> bool {
        self.release == other.release && self.binary == other.binary
    }
}

/// What one supervisor runs, and its bounds.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// "controller" or the node id, for logs.
    pub name: String,
    /// Bound once (SO_REUSEADDR) and never closed while the supervisor runs.
    pub listen: SocketAddr,
    /// Holds `state.json` and `control.sock`, e.g. `DATA_DIR/supervisor`.
    pub state_dir: PathBuf,
    /// Used only when `state.json` does not exist yet.
    pub initial: Release,
    /// argv after the binary; the supervisor appends `["--release", N]`.
    pub worker_args: Vec<String>,
    /// Path the supervisor probes to confirm the socket serves, e.g. "/healthz".
    pub health_url_path: String,
    /// The socket serves TLS: the probe speaks it (checking nothing about
    /// the certificate; it only asks whether the socket answers).
    pub health_tls: bool,
    /// Bound on a new worker becoming ready.
    pub ready_timeout_ms: u64,
    /// Bound on an old worker finishing in-flight requests after SIGTERM.
    pub stop_grace_ms: u64,
    /// The supervisor's own command line (`handover node ...`), argv[0]
    /// included: when it re-executes itself into a new release's binary, the
    /// new image gets this argv with argv[0] replaced by that binary.
    pub argv: Vec<OsString>,
}

impl SupervisorConfig {
    /// A config with the default bounds and `/healthz` as health path.
    pub fn new(
        name: impl Into<String>,
        listen: SocketAddr,
        state_dir: impl Into<PathBuf>,
        initial: Release,
        worker_args: Vec<String>,
    ) -> Self {
        SupervisorConfig {
            name: name.into(),
            listen,
            state_dir: state_dir.into(),
            initial,
            worker_args,
            health_url_path: "/healthz".to_string(),
            health_tls: false,
            ready_timeout_ms: DEFAULT_READY_TIMEOUT_MS,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            argv: std::env::args_os().collect(),
        }
    }
}
