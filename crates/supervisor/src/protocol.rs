//! The control protocol between a worker and its supervisor: one JSON request
//! per line, one JSON answer per line, over the Unix socket
//! `<state_dir>/control.sock`.
//!
//! Requests: `{"ready":{"pid":N}}`,
//! `{"switch":{"release":N,"binary":"...","sha256":"...","contracts":{...}}}`
//! (`sha256` and `contracts` optional), `{"status":{}}`. Answers:
//! `{"ok":...}` or `{"error":code,"message":...}`.
//!
//! This is version [`CONTROL_VERSION`] (`CONTRACTS.supervisor_control`) of
//! the protocol. Fields are only ever added, optional, to requests and
//! answers of the same version: a request without them parses as before,
//! and an answer without them (from an older supervisor) reads with their
//! defaults. A supervisor of this version refuses fields it does not know,
//! so a client sends the optional `switch` fields only to a supervisor whose
//! `status` shows it knows them (`contracts` set). A change an older peer
//! could not live with gets a new version; a switch to a binary of another
//! version is refused.

use std::io;
use std::path::PathBuf;

use handover_core::release::{Contracts, CONTRACTS};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::Release;

/// The version of this control protocol.
pub const CONTROL_VERSION: u32 = CONTRACTS.supervisor_control;

/// Bound on one request or answer line, newline excluded.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// One request of a worker (or an operator tool) to the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Request {
    /// The worker with this pid passed its own health self-check.
    Ready { pid: u32 },
    /// Start this release on the same socket and retire the current worker.
    Switch(Release),
    /// What runs now.
    Status {},
}

/// One answer line: `{"ok": value}` or `{"error": code, "message": text}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Answer {
    Ok { ok: serde_json::Value },
    Error { error: String, message: String },
}

impl Answer {
    pub(crate) fn ok<T: Serialize>(value: &T) -> Answer {
        match serde_json::to_value(value) {
            Ok(ok) => Answer::Ok { ok },
            Err(e) => Answer::error("internal", format!("cannot encode answer: {e}")),
        }
    }

    pub(crate) fn error(code: &str, message: impl Into<String>) -> Answer {
        Answer::Error {
            error: code.to_string(),
            message: message.into(),
        }
    }

    /// The answer as one line, newline included.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"error":"internal","message":"cannot encode answer"}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}

/// What became of a switch request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum SwitchOutcome {
    /// The new worker is ready and active; the old one gets SIGTERM now.
    Switched { release: u32, pid: u32 },
    /// The requested release already runs; nothing changed.
    AlreadyActive { release: u32 },
    /// The new worker did not become ready and was stopped; the old one goes
    /// on serving.
    Failed { release: u32, reason: String },
}

/// What the supervisor runs now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorStatus {
    pub name: String,
    pub active: Release,
    /// Set while a switch (or the resolution of an interrupted one) runs.
    pub switching: Option<Release>,
    /// The worker serving the active release; None while it (re)starts.
    pub active_pid: Option<u32>,
    /// A worker started but not ready yet.
    pub starting_pid: Option<u32>,
    /// Workers finishing in-flight requests after SIGTERM.
    pub retiring_pids: Vec<u32>,
    /// Restarts of the active release after an unexpected exit.
    pub restarts: u64,
    /// The file the supervisor itself runs (`/proc/self/exe`).
    #[serde(default)]
    pub binary: PathBuf,
    /// SHA-256 of what this image was exec'd as: that file's, or for a
    /// release whose binary is a wrapper script, the script's (the digest
    /// an artifact names). Empty from a supervisor older than this field.
    #[serde(default)]
    pub sha256: String,
    /// The contract versions the supervisor speaks; None from a supervisor
    /// older than this field (one that refuses a switch's `sha256` and
    /// `contracts`).
    #[serde(default)]
    pub contracts: Option<Contracts>,
    /// SHA-256 of exactly the bytes the active worker was started from; None
    /// while no worker is active.
    #[serde(default)]
    pub active_sha256: Option<String>,
    /// Set while the supervisor does not run the active release's binary,
    /// saying why (its contracts are unknown or speak another hand-off, the
    /// exec failed, or it waits for retiring workers before it execs).
    #[serde(default)]
    pub reexec: Option<String>,
}

/// Reads one line of at most `max_bytes` (newline excluded). `Ok(None)` at a
/// clean end of stream; an error for a longer line or a cut-off last line,
/// so a peer can never make us buffer without bound.
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_bytes: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "line cut off by end of stream",
            ));
        }
        let (taken, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if line.len() + taken > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max_bytes} bytes"),
            ));
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(if done { taken + 1 } else { taken });
        if done {
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let cases = [
            (Request::Ready { pid: 7 }, r#"{"ready":{"pid":7}}"#),
            (
                Request::Switch(Release::new(2, "/r/2/handover")),
                r#"{"switch":{"release":2,"binary":"/r/2/handover"}}"#,
            ),
            (
                Request::Switch(Release {
                    sha256: Some("ab".repeat(32)),
                    contracts: Some(Contracts {
                        worker_cli: 1,
                        supervisor_control: 1,
                        supervisor_handoff: 1,
                        upgrade_state: 1,
                    }),
                    ..Release::new(2, "/r/2/handover")
                }),
                concat!(
                    r#"{"switch":{"release":2,"binary":"/r/2/handover","#,
                    r#""sha256":"abababababababababababababababababababababababababababababababab","#,
                    r#""contracts":{"worker_cli":1,"supervisor_control":1,"supervisor_handoff":1,"upgrade_state":1}}}"#,
                ),
            ),
            (Request::Status {}, r#"{"status":{}}"#),
        ];
        for (request, text) in cases {
            assert_eq!(serde_json::to_string(&request).ok().as_deref(), Some(text));
            let back: Request = serde_json::from_str(text).expect("parse");
            assert_eq!(back, request);
        }
    }

    #[test]
    fn unknown_requests_and_fields_are_refused() {
        for text in [
            r#"{"reboot":{}}"#,
            r#"{"ready":{"pid":7,"extra":1}}"#,
            r#"{"switch":{"release":2}}"#,
            r#"{"switch":{"release":2,"binary":"/x","sha":"y"}}"#,
            r#"{"switch":{"release":2,"binary":"/x","contracts":{"worker_cli":1}}}"#,
            r#"{"ready":{"pid":-1}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn answers_have_the_documented_shape() {
        let ok = Answer::ok(&SwitchOutcome::AlreadyActive { release: 3 });
        assert_eq!(
            String::from_utf8_lossy(&ok.to_line()),
            "{\"ok\":{\"outcome\":\"already_active\",\"release\":3}}\n"
        );
        let err = Answer::error("busy", "a switch is already in progress");
        let line = err.to_line();
        let back: Answer = serde_json::from_slice(&line).expect("parse");
        assert_eq!(back, err);
    }

    #[test]
    fn a_status_of_an_older_supervisor_still_reads() -> serde_json::Result<()> {
        // The shape every supervisor before `binary`, `sha256`, `contracts`,
        // `active_sha256` and `reexec` answered.
        let old = r#"{"name":"n1","active":{"release":1,"binary":"/r/1/handover"},"switching":null,"active_pid":7,"starting_pid":null,"retiring_pids":[],"restarts":0}"#;
        let status: SupervisorStatus = serde_json::from_str(old)?;
        assert_eq!(status.active, Release::new(1, "/r/1/handover"));
        assert_eq!(status.contracts, None);
        assert_eq!(status.sha256, "");
        assert_eq!(status.reexec, None);
        Ok(())
    }

    #[tokio::test]
    async fn lines_are_bounded() -> io::Result<()> {
        let mut input: &[u8] = b"short\n";
        let line = read_line_bounded(&mut input, 8).await?;
        assert_eq!(line.as_deref(), Some(&b"short"[..]));
        assert!(read_line_bounded(&mut input, 8).await?.is_none());

        let mut long: &[u8] = b"123456789\n";
        assert!(read_line_bounded(&mut long, 8).await.is_err());
        let mut exact: &[u8] = b"12345678\n";
        assert!(read_line_bounded(&mut exact, 8).await.is_ok());
        let mut cut: &[u8] = b"1234";
        assert!(read_line_bounded(&mut cut, 8).await.is_err());
        Ok(())
    }
}
