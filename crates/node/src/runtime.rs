//! The node's runtime plumbing every task shares: the wall clock, the stop
//! signal and the test hooks (only with the `test-hooks` feature). A leaf module: it imports no
//! other module of this crate.

use tokio::sync::watch;

/// Retry delays after a failure (controller unreachable, disk error): the
/// node machine's.
pub use handover_core::node::{BACKOFF_MS_MAX, BACKOFF_MS_MIN};
/// How much of an unreadable error answer is kept for the log and /status.
pub const ERROR_BODY_CHARS_SHOWN: usize = 200;

/// reqwest hides the useful part ("connection refused") in the source chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The code and message of an error answer: its JSON `{"error", "message"}`,
/// or for any other body `http_<status>` and the start of the body.
pub(crate) fn refusal(status: u16, body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<handover_core::wire::ErrorBody>(body) {
        Ok(e) => (e.error, e.message),
        Err(_) => (
            format!("http_{status}"),
            String::from_utf8_lossy(body)
                .chars()
                .take(ERROR_BODY_CHARS_SHOWN)
                .collect(),
        ),
    }
}

/// Test hook, read only by the fault-injection process tests
/// (`crates/cli/tests/faults.rs`), which set it for one release through an
/// artifact whose binary is a wrapper script (or for one node's supervisor):
/// a comma-separated list of `name` or `name:value`. Compiled only with the
/// `test-hooks` feature, which `cargo test` turns on and no `cargo build`
/// does: a shipped binary does not read it. The node reads
/// `stage_slow_ms:N` (stage.rs), `ready_delay_ms:N` and `never_ready`
/// (agent.rs), `drain_slow_ms:N` (a quiesced worker waits before it asks
/// to switch, driver.rs), and the CLI reads `exit_at_start` for a node
/// worker.
#[cfg(feature = "test-hooks")]
pub const TEST_FAULT_ENV: &str = "HANDOVER_TEST_FAULT";

/// The value of test fault `name` in [`TEST_FAULT_ENV`] ("" for a bare name).
#[cfg(feature = "test-hooks")]
pub fn test_fault(name: &str) -> Option<String> {
    let all = std::env::var(TEST_FAULT_ENV).ok()?;
    all.split(',').find_map(|f| {
        let (n, v) = f.split_once(':').unwrap_or((f, ""));
        (n.trim() == name).then(|| v.trim().to_owned())
    })
}

/// Test fault `name` as milliseconds (see [`test_fault`]).
#[cfg(feature = "test-hooks")]
pub(crate) fn test_fault_ms(name: &str) -> Option<u64> {
    test_fault(name).and_then(|v| v.parse().ok())
}

/// Test hook `stage_slow_ms:N` (see [`TEST_FAULT_ENV`]): `chunks` with a
/// stall of N ms after the first one, so a test can kill a node mid-stage.
#[cfg(feature = "test-hooks")]
pub(crate) fn stall_after_first_chunk<S: futures_util::Stream>(
    chunks: S,
) -> impl futures_util::Stream<Item = S::Item> {
    use futures_util::StreamExt as _;
    let stall_ms = test_fault_ms("stage_slow_ms");
    let state = (Box::pin(chunks), false, stall_ms);
    futures_util::stream::unfold(state, |(mut chunks, started, mut stall_ms)| async move {
        if started {
            if let Some(ms) = stall_ms.take() {
                tracing::warn!(ms, "test hook: stalling the download");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
        }
        let chunk = chunks.next().await?;
        Some((chunk, (chunks, true, stall_ms)))
    })
}

/// Unix milliseconds from the system clock; the only clock the node reads.
pub(crate) fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The stop signal every loop watches.
#[derive(Clone, Debug)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub(crate) fn new(rx: watch::Receiver<bool>) -> Stop {
        Stop(rx)
    }

    /// Resolves once stop is requested (or the sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}
