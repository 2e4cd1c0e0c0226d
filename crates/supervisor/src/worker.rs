//! The worker's side: take the inherited listener, report readiness, ask
//! for a switch.

use std::env;
use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{read_line_bounded, Answer, Request, MAX_LINE_BYTES};
use crate::spawn::LISTEN_FDS_START;
use crate::{Release, SupervisorStatus, SwitchOutcome};

/// Bound on a `ready` or `status` exchange with the supervisor.
const CONTROL_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Added to the supervisor's `ready_timeout_ms` for a `switch` answer: the
/// supervisor also writes state.json and stops the failed worker.
const SWITCH_ANSWER_MARGIN_MS: u64 = 5_000;

/// fd 3 may be wrapped only once, or two owners would close it twice.
static LISTENER_TAKEN: AtomicBool = AtomicBool::new(false);

/// Errors talking to the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("supervisor control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the supervisor within {after_ms} ms")]
    Timeout { after_ms: u64 },
    #[error("unexpected answer from the supervisor: {0}")]
    Protocol(String),
    #[error("the supervisor refused ({code}): {message}")]
    Refused { code: String, message: String },
}

/// The listener the supervisor passed (`LISTEN_FDS=1` at fd 3, the systemd
/// convention; `LISTEN_PID`, if set, must be our pid), or None when not
/// supervised. Returned non-blocking and close-on-exec, ready for
/// `tokio::net::TcpListener::from_std`. The socket is shared with the
/// supervisor and any other worker, so the mode is theirs too.
pub fn inherited_listener() -> io::Result<Option<TcpListener>> {
    let Some(fds) = env::var_os("LISTEN_FDS") else {
        return Ok(None);
    };
    if let Some(pid) = env::var_os("LISTEN_PID") {
        let pid: u32 = pid
            .to_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| invalid(format!("LISTEN_PID={pid:?} is not a pid")))?;
        if pid != std::process::id() {
            // Meant for another process (a parent that did not clean up).
            return Ok(None);
        }
    }
    let count: u32 = fds
        .to_str()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| invalid(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if count != 1 {
        return Err(invalid(format!(
            "LISTEN_FDS={count}: expected exactly one listening socket"
        )));
    }
    if LISTENER_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the inherited listener was already taken",
        ));
    }
    // SAFETY: LISTEN_FDS=1 for this pid says fd 3 was passed to us and
    // belongs to nothing else in this process; LISTENER_TAKEN makes this the
    // only place that takes ownership of it. F_GETFD first checks it is open.
    let fd = unsafe {
        if libc::fcntl(LISTEN_FDS_START, libc::F_GETFD) == -1 {
            return Err(invalid(format!(
                "LISTEN_FDS=1 but fd {LISTEN_FDS_START} is not open"
            )));
        }
        OwnedFd::from_raw_fd(LISTEN_FDS_START)
    };
    let mode = fstat(&fd).map_err(io::Error::from)?.st_mode;
    if SFlag::from_bits_truncate(mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        // Not ours to close: leave the fd as it was.
        let _ = fd.into_raw_fd();
        return Err(invalid(format!("fd {LISTEN_FDS_START} is not a socket")));
    }
    // Our own children must not inherit the role's socket.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    let listener = TcpListener::from(fd);
    listener.local_addr()?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Client of the supervisor's control socket; one connection per request.
#[derive(Clone, Debug)]
pub struct SupervisorClient {
    socket: PathBuf,
    ready_timeout_ms: u64,
}

impl SupervisorClient {
    /// The client for the supervisor that started this process (path from
    /// `HANDOVER_SUPERVISOR_SOCK`); None when not supervised.
    pub fn from_env() -> Option<SupervisorClient> {
        let socket = PathBuf::from(env::var_os(crate::ENV_SUPERVISOR_SOCK)?);
        let ready_timeout_ms = env::var(crate::ENV_READY_TIMEOUT_MS)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(crate::DEFAULT_READY_TIMEOUT_MS);
        Some(SupervisorClient {
            socket,
            ready_timeout_ms,
        })
    }

    /// A client for an explicit socket (operator tools, tests);
    /// `ready_timeout_ms` is the supervisor's, to bound `switch`.
    pub fn new(socket: impl Into<PathBuf>, ready_timeout_ms: u64) -> SupervisorClient {
        SupervisorClient {
            socket: socket.into(),
            ready_timeout_ms,
        }
    }

    /// Tell the supervisor this worker is ready to serve (after its own
    /// health self-check passed).
    pub async fn ready(&self) -> Result<(), SupervisorError> {
        let pid = std::process::id();
        let _: serde_json::Value = self
            .request(&Request::Ready { pid }, CONTROL_REQUEST_TIMEOUT_MS)
            .await?;
        Ok(())
    }

    /// Ask to switch to `to`: the supervisor starts it on the same socket
    /// and answers once it is ready, failed, exited or timed out. On
    /// success the supervisor then sends SIGTERM to the old worker, which
    /// must finish in-flight requests and exit; on failure the old worker
    /// goes on serving.
    ///
    /// `to.sha256` (the digest the binary must have) and `to.contracts` (the
    /// binary's contract versions: a binary of another `worker_cli` or
    /// `supervisor_control` is refused before anything starts, and the
    /// supervisor re-executes itself into the binary only when they are
    /// given) are sent only to a supervisor that knows them; an older one
    /// gets the request without them (it checks no digest and never
    /// re-executes).
    pub async fn switch(&self, to: &Release) -> Result<SwitchOutcome, SupervisorError> {
        let bound_ms = self
            .ready_timeout_ms
            .saturating_add(SWITCH_ANSWER_MARGIN_MS);
        let mut to = to.clone();
        if to.sha256.is_some() || to.contracts.is_some() {
            let status = self.status().await?;
            if status.contracts.is_none() {
                tracing::warn!(
                    release = to.release,
                    "the supervisor predates digests and contracts in a switch; asking without them"
                );
                to.sha256 = None;
                to.contracts = None;
            }
        }
        self.request(&Request::Switch(to), bound_ms).await
    }

    /// Active release, pending switch, worker pids.
    pub async fn status(&self) -> Result<SupervisorStatus, SupervisorError> {
        self.request(&Request::Status {}, CONTROL_REQUEST_TIMEOUT_MS)
            .await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        request: &Request,
        bound_ms: u64,
    ) -> Result<T, SupervisorError> {
        let exchange = async {
            let io_error = |source| SupervisorError::Io {
                path: self.socket.clone(),
                source,
            };
            let mut line = serde_json::to_vec(request)
                .map_err(|e| SupervisorError::Protocol(format!("cannot encode request: {e}")))?;
            line.push(b'\n');
            let stream = UnixStream::connect(&self.socket).await.map_err(io_error)?;
            let (read, mut write) = stream.into_split();
            write.write_all(&line).await.map_err(io_error)?;
            let mut read = BufReader::new(read);
            let answer = read_line_bounded(&mut read, MAX_LINE_BYTES)
                .await
                .map_err(io_error)?
                .ok_or_else(|| {
                    SupervisorError::Protocol("connection closed without an answer".to_string())
                })?;
            let answer: Answer = serde_json::from_slice(&answer)
                .map_err(|e| SupervisorError::Protocol(format!("not an answer: {e}")))?;
            match answer {
                Answer::Ok { ok } => serde_json::from_value(ok)
                    .map_err(|e| SupervisorError::Protocol(format!("unexpected answer: {e}"))),
                Answer::Error { error, message } => Err(SupervisorError::Refused {
                    code: error,
                    message,
                }),
            }
        };
        tokio::time::timeout(Duration::from_millis(bound_ms), exchange)
            .await
            .map_err(|_| SupervisorError::Timeout { after_ms: bound_ms })?
    }
}
