//! The control protocol between a worker and its supervisor: one JSON request
//! per line, one JSON answer per line, over the Unix socket
//! `<state_dir>/control.sock`.
//!
//! Requests: `{"ready":{"pid":N}}`, `{"switch":{"release":N,"binary":"..."}}`,
//! `{"status":{}}`. Answers: `{"ok":...}` or `{"error":code,"message":...}`.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::Release;

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
    use std::path::PathBuf;

    #[test]
    fn requests_have_the_documented_shape() {
        let cases = [
            (Request::Ready { pid: 7 }, r#"{"ready":{"pid":7}}"#),
            (
                Request::Switch(Release {
                    release: 2,
                    binary: PathBuf::from("/r/2/handover"),
                }),
                r#"{"switch":{"release":2,"binary":"/r/2/handover"}}"#,
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
