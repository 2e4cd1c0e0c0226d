//! The hand-off from a supervisor to the new image of itself, across its
//! own `execve` (same pid): one JSON document in the env var
//! [`ENV_SUPERVISOR_HANDOFF`](crate::ENV_SUPERVISOR_HANDOFF):
//!
//! ```json
//! {"v":1,"listen_fd":5,"control_fd":9,"exec_sha256":"…",
//!  "worker":{"pid":4242,"release":3,"binary":"/data/releases/a3/handover","sha256":"…"},
//!  "restarts":0}
//! ```
//!
//! - `v`: [`HANDOFF_VERSION`], `CONTRACTS.supervisor_handoff`. A document of
//!   another version is refused as a whole; a supervisor execs only a binary
//!   that declared this version (the `contracts` of its release).
//! - `listen_fd`: the role's listening socket, open across the exec; it was
//!   never closed, so connections queue in its backlog meanwhile.
//! - `control_fd`: the control socket's listener, open across the exec, so
//!   a worker's request waits in its backlog rather than failing.
//! - `exec_sha256`: digest of the file exec'd (for a wrapper script, the
//!   script's, not the interpreter's): the new image runs that release's
//!   binary and must not exec again for it.
//! - `worker`: the active worker, a child of this process (exec keeps the
//!   pid), ready and serving; the new image adopts it instead of starting
//!   another. It is the release `state.json` records as active.
//! - `restarts`: the count `status` reports, carried on.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use handover_core::release::CONTRACTS;
use nix::sys::stat::{fstat, SFlag};
use serde::{Deserialize, Serialize};

use crate::spawn::set_cloexec;

/// The version of the hand-off document this binary writes and reads.
pub const HANDOFF_VERSION: u32 = CONTRACTS.supervisor_handoff;
/// Bound on the hand-off document's length.
const HANDOFF_MAX_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Handoff {
    pub v: u32,
    pub listen_fd: RawFd,
    pub control_fd: RawFd,
    pub exec_sha256: String,
    pub worker: HandedWorker,
    pub restarts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HandedWorker {
    pub pid: u32,
    pub release: u32,
    pub binary: PathBuf,
    pub sha256: String,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

impl Handoff {
    pub(crate) fn encode(&self) -> io::Result<String> {
        serde_json::to_string(self).map_err(io::Error::other)
    }

    /// Version first (a clear error for another version), then every field.
    pub(crate) fn decode(text: &str) -> io::Result<Handoff> {
        if text.len() > HANDOFF_MAX_BYTES {
            return Err(invalid(format!(
                "the hand-off is longer than {HANDOFF_MAX_BYTES} bytes"
            )));
        }
        let version: VersionOnly = serde_json::from_str(text)
            .map_err(|e| invalid(format!("the hand-off has no version: {e}")))?;
        if version.v != HANDOFF_VERSION {
            return Err(invalid(format!(
                "hand-off version {}, this binary reads version {HANDOFF_VERSION}",
                version.v
            )));
        }
        let handoff: Handoff = serde_json::from_str(text)
            .map_err(|e| invalid(format!("not a hand-off of version {HANDOFF_VERSION}: {e}")))?;
        if handoff.listen_fd < 3
            || handoff.control_fd < 3
            || handoff.listen_fd == handoff.control_fd
        {
            return Err(invalid(format!(
                "hand-off fds {} and {} are not two passed fds",
                handoff.listen_fd, handoff.control_fd
            )));
        }
        Ok(handoff)
    }

    /// The document this process was exec'd with, if any.
    pub(crate) fn from_env() -> io::Result<Option<Handoff>> {
        match std::env::var_os(crate::ENV_SUPERVISOR_HANDOFF) {
            None => Ok(None),
            Some(text) => {
                let text = text.to_str().ok_or_else(|| {
                    invalid(format!("{} is not UTF-8", crate::ENV_SUPERVISOR_HANDOFF))
                })?;
                Handoff::decode(text).map(Some)
            }
        }
    }
}

/// Takes the passed listening socket: a TCP listener on `expected`, made
/// close-on-exec again.
pub(crate) fn take_listener(fd: RawFd, expected: SocketAddr) -> io::Result<std::net::TcpListener> {
    let owned = take_socket(fd)?;
    let listener = std::net::TcpListener::from(owned);
    let addr = listener.local_addr()?;
    if addr != expected {
        // Not the role's socket: leave it to nobody rather than serve on it.
        return Err(invalid(format!(
            "passed fd {fd} listens on {addr}, not on {expected}"
        )));
    }
    Ok(listener)
}

/// Takes the passed control socket listener, made close-on-exec again.
pub(crate) fn take_control(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    let owned = take_socket(fd)?;
    let listener = std::os::unix::net::UnixListener::from(owned);
    listener.local_addr()?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn take_socket(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only checks the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(invalid(format!("passed fd {fd} is not open")));
    }
    // SAFETY: the hand-off says the previous image left `fd` open for us;
    // nothing else in this image knows it (std and tokio open every fd
    // close-on-exec, so none of theirs survived the exec).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mode = fstat(&owned).map_err(io::Error::from)?.st_mode;
    if SFlag::from_bits_truncate(mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        // Not a socket: not ours to close.
        let _ = owned.into_raw_fd();
        return Err(invalid(format!("passed fd {fd} is not a socket")));
    }
    set_cloexec(fd, true)?;
    Ok(owned)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            v: 1,
            listen_fd: 5,
            control_fd: 9,
            exec_sha256: "a".repeat(64),
            worker: HandedWorker {
                pid: 4242,
                release: 3,
                binary: PathBuf::from("/data/releases/a3/handover"),
                sha256: "a".repeat(64),
            },
            restarts: 0,
        }
    }

    #[test]
    fn the_handoff_has_the_documented_shape() -> io::Result<()> {
        let a = "a".repeat(64);
        let text = format!(
            r#"{{"v":1,"listen_fd":5,"control_fd":9,"exec_sha256":"{a}","worker":{{"pid":4242,"release":3,"binary":"/data/releases/a3/handover","sha256":"{a}"}},"restarts":0}}"#
        );
        assert_eq!(sample().encode()?, text);
        assert_eq!(Handoff::decode(&text)?, sample());
        Ok(())
    }

    #[test]
    fn other_versions_and_shapes_are_refused() {
        let text = sample().encode().unwrap_or_default();
        let cases = [
            text.replacen("\"v\":1", "\"v\":2", 1),
            text.replacen("\"restarts\":0", "\"restarts\":0,\"x\":1", 1),
            text.replacen("\"control_fd\":9", "\"control_fd\":5", 1),
            text.replacen("\"listen_fd\":5", "\"listen_fd\":1", 1),
            "{}".to_string(),
            " ".repeat(HANDOFF_MAX_BYTES + 1),
        ];
        for case in cases {
            assert!(Handoff::decode(&case).is_err(), "{case}");
        }
        let err = Handoff::decode(&text.replacen("\"v\":1", "\"v\":2", 1))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("version 2"), "{err}");
    }
}
