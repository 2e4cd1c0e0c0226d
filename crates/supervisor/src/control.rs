//! The supervisor's end of the control socket. `ready` and `status` are
//! answered here from the shared live state, so they work while the main
//! loop is busy waiting for a new worker; `switch` goes to the main loop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use handover_core::release::CONTRACTS;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::protocol::{read_line_bounded, Answer, Request, SupervisorStatus, MAX_LINE_BYTES};
use crate::Release;

/// Bound on control connections served at once; more are refused.
const MAX_CONTROL_CONNECTIONS: usize = 16;
/// Bound on waiting for the next request line on an open connection.
const CONTROL_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Bound on writing one answer to a slow reader.
const CONTROL_WRITE_TIMEOUT_MS: u64 = 5_000;
/// Pause after a failed accept (e.g. out of fds) so the loop cannot spin.
const ACCEPT_RETRY_MS: u64 = 100;

/// What the supervisor runs now, as `status` reports it.
pub(crate) struct Live {
    pub active: Release,
    pub switching: Option<Release>,
    pub active_pid: Option<u32>,
    pub starting_pid: Option<u32>,
    pub retiring_pids: Vec<u32>,
    pub restarts: u64,
    /// A switch request was handed to the main loop and is not answered yet.
    pub switch_queued: bool,
    /// Digest of the bytes the active worker was started from.
    pub active_sha256: Option<String>,
    /// Why the supervisor does not run the active release's binary.
    pub reexec: Option<String>,
    /// The supervisor is replacing its image: no switch may start.
    pub reexecuting: bool,
}

/// A switch request for the main loop, with the channel for its answer.
pub(crate) struct SwitchRequest {
    pub to: Release,
    pub reply: oneshot::Sender<Answer>,
}

/// State shared between the main loop and the control connections.
pub(crate) struct Shared {
    pub name: String,
    /// The file this image runs and its digest.
    pub binary: PathBuf,
    pub sha256: String,
    live: Mutex<Live>,
    /// Pids of workers that sent `ready`.
    pub ready: watch::Sender<BTreeSet<u32>>,
    switches: mpsc::Sender<SwitchRequest>,
}

impl Shared {
    pub(crate) fn new(
        name: String,
        (binary, sha256): (PathBuf, String),
        live: Live,
        switches: mpsc::Sender<SwitchRequest>,
    ) -> Shared {
        Shared {
            name,
            binary,
            sha256,
            live: Mutex::new(live),
            ready: watch::Sender::new(BTreeSet::new()),
            switches,
        }
    }

    /// The live state; a panic while it was held cannot leave it
    /// inconsistent in a way that matters more than stopping would.
    pub(crate) fn live(&self) -> MutexGuard<'_, Live> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn status(&self) -> SupervisorStatus {
        let live = self.live();
        SupervisorStatus {
            name: self.name.clone(),
            active: live.active.clone(),
            switching: live.switching.clone(),
            active_pid: live.active_pid,
            starting_pid: live.starting_pid,
            retiring_pids: live.retiring_pids.clone(),
            restarts: live.restarts,
            binary: self.binary.clone(),
            sha256: self.sha256.clone(),
            contracts: Some(CONTRACTS),
            active_sha256: live.active_sha256.clone(),
            reexec: live.reexec.clone(),
        }
    }
}

/// Accepts control connections until the task is aborted.
pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(supervisor = %shared.name, "control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    connection(stream, &shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let answer = Answer::error(
                        "too_many_connections",
                        format!("more than {MAX_CONTROL_CONNECTIONS} control connections"),
                    );
                    let mut stream = stream;
                    let _ = tokio::time::timeout(
                        Duration::from_millis(CONTROL_WRITE_TIMEOUT_MS),
                        stream.write_all(&answer.to_line()),
                    )
                    .await;
                });
            }
        }
    }
}

async fn connection(stream: UnixStream, shared: &Shared) {
    // The kernel's word on who is calling, to check `ready` claims.
    let peer_pid = stream
        .peer_cred()
        .ok()
        .and_then(|cred| cred.pid())
        .and_then(|pid| u32::try_from(pid).ok());
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let line = match tokio::time::timeout(
            Duration::from_millis(CONTROL_IDLE_TIMEOUT_MS),
            read_line_bounded(&mut read, MAX_LINE_BYTES),
        )
        .await
        {
            Err(_) | Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let answer = Answer::error("bad_request", e.to_string());
                let _ = send(&mut write, &answer).await;
                return;
            }
            Ok(Ok(Some(line))) => line,
        };
        let answer = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => handle(request, peer_pid, shared).await,
            Err(e) => Answer::error("bad_request", format!("not a control request: {e}")),
        };
        if send(&mut write, &answer).await.is_err() {
            return;
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, answer: &Answer) -> Result<(), ()> {
    match tokio::time::timeout(
        Duration::from_millis(CONTROL_WRITE_TIMEOUT_MS),
        write.write_all(&answer.to_line()),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn handle(request: Request, peer_pid: Option<u32>, shared: &Shared) -> Answer {
    match request {
        Request::Status {} => Answer::ok(&shared.status()),
        Request::Ready { pid } => ready(pid, peer_pid, shared),
        Request::Switch(to) => switch(to, shared).await,
    }
}

fn ready(pid: u32, peer_pid: Option<u32>, shared: &Shared) -> Answer {
    if let Some(peer) = peer_pid {
        if peer != pid {
            return Answer::error(
                "pid_mismatch",
                format!("ready claims pid {pid} but the caller is pid {peer}"),
            );
        }
    }
    if !is_own_child(pid) {
        return Answer::error(
            "unknown_worker",
            format!("pid {pid} is not a worker of this supervisor"),
        );
    }
    info!(supervisor = %shared.name, pid, "worker reports ready");
    shared.ready.send_modify(|ready| {
        ready.insert(pid);
    });
    Answer::ok(&serde_json::json!({}))
}

async fn switch(to: Release, shared: &Shared) -> Answer {
    if to.release == 0 {
        return Answer::error("bad_request", "release numbers start at 1");
    }
    if !to.binary.is_absolute() {
        return Answer::error(
            "bad_request",
            format!("binary {} is not an absolute path", to.binary.display()),
        );
    }
    if let Some(sha256) = &to.sha256 {
        if !crate::digest::is_sha256_hex(sha256) {
            return Answer::error(
                "bad_request",
                format!("sha256 {sha256:?} is not 64 lowercase hex digits"),
            );
        }
    }
    if let Some(contracts) = &to.contracts {
        if contracts.worker_cli != CONTRACTS.worker_cli
            || contracts.supervisor_control != CONTRACTS.supervisor_control
        {
            return Answer::error(
                "incompatible_contracts",
                format!(
                    "release {} speaks worker_cli {} and supervisor_control {}; this supervisor speaks worker_cli {} and supervisor_control {}",
                    to.release,
                    contracts.worker_cli,
                    contracts.supervisor_control,
                    CONTRACTS.worker_cli,
                    CONTRACTS.supervisor_control,
                ),
            );
        }
    }
    match tokio::fs::metadata(&to.binary).await {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Answer::error(
                "bad_request",
                format!("binary {} is not a file", to.binary.display()),
            )
        }
        Err(e) => {
            return Answer::error(
                "bad_request",
                format!("binary {}: {e}", to.binary.display()),
            )
        }
    }
    {
        let mut live = shared.live();
        if live.switch_queued || live.switching.is_some() {
            return Answer::error("busy", "a switch is already in progress");
        }
        if live.reexecuting {
            return Answer::error(
                "busy",
                "the supervisor is replacing itself with the active release's binary; try again",
            );
        }
        if live.active_pid.is_none() {
            return Answer::error(
                "not_ready",
                "no active worker right now (starting or restarting); try again",
            );
        }
        live.switch_queued = true;
    }
    let (reply, answer) = oneshot::channel();
    debug!(supervisor = %shared.name, release = to.release, "switch requested");
    if shared
        .switches
        .try_send(SwitchRequest { to, reply })
        .is_err()
    {
        shared.live().switch_queued = false;
        return Answer::error("shutting_down", "the supervisor is stopping");
    }
    answer
        .await
        .unwrap_or_else(|_| Answer::error("shutting_down", "the supervisor is stopping"))
}

/// Whether `pid` is a direct child of this process, so a stranger on the
/// socket cannot mark itself ready.
fn is_own_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    else {
        return false;
    };
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state, ppid, ...
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    rest.split_whitespace()
        .nth(1)
        .and_then(|ppid| ppid.parse::<u32>().ok())
        == Some(std::process::id())
}
