//! The supervisor's main loop: start the active release, restart it when it
//! crashes, switch releases on request, resolve an interrupted switch on
//! restart, and replace its own image with the active release's binary.
//!
//! Re-exec: once the active worker runs a binary other than the supervisor's
//! own (by SHA-256, not path), the supervisor `execve`s that binary (same
//! pid) with its original argv, passing the listening socket, the control
//! socket and the worker in a [`Handoff`](crate::handoff); the new image
//! adopts the worker instead of starting another. It does so only when the
//! release's `contracts` are known and name this supervisor's hand-off
//! version, after every retiring worker was reaped, and after `state.json`
//! records the release as active. A supervisor started (by a service
//! manager, typically from the old binary) with `state.json` naming another
//! binary execs into it before it binds anything, once
//! ([`ENV_SUPERVISOR_EXECED_AT_START`](crate::ENV_SUPERVISOR_EXECED_AT_START)),
//! so a restarted fleet never goes back to an old supervisor binary.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::adopted::{Adopted, Proc};
use crate::control::{self, Live, Shared, SwitchRequest};
use crate::digest;
use crate::handoff::{self, HandedWorker, Handoff};
use crate::protocol::{Answer, SwitchOutcome};
use crate::spawn::{SpawnPlan, Spawner};
use crate::state::{self, State};
use crate::{Release, SupervisorConfig};

mod bind;
mod probe;
mod reexec;

use bind::{bind_control, bind_listener_retrying};
use probe::{probe_addr, wait_ready};
use reexec::exec_at_start;

/// First delay before restarting a release that crashed or failed to start.
const BACKOFF_MIN_MS: u64 = 100;
/// Largest delay between restarts.
const BACKOFF_MAX_MS: u64 = 5_000;
/// A worker that served this long before crashing restarts after the
/// shortest delay again; a crash loop keeps backing off.
const BACKOFF_RESET_AFTER_MS: u64 = 10_000;

/// Test hook of the process tests, compiled only with the `test-hooks`
/// feature (`cargo test` turns it on, no `cargo build` does):
/// `kill_before_reexec` makes the supervisor SIGKILL itself after
/// `state.json` committed a switch and right before it would re-execute, as
/// a crash at the worst moment would; `exit_after_reexec` makes a
/// re-executed image fail at start, as a broken new supervisor would.
#[cfg(feature = "test-hooks")]
const TEST_FAULT_ENV: &str = "HANDOVER_TEST_SUPERVISOR_FAULT";

/// A running worker process.
struct Worker {
    /// As asked for: `sha256` is the expected digest, if one was given.
    /// Only that one is persisted: a release without one (the service's
    /// own binary, say) may be replaced in place by a package upgrade, and
    /// must still start after a restart.
    release: Release,
    pid: u32,
    proc: Proc,
    /// SHA-256 of exactly the bytes it was started from.
    sha256: String,
    /// When it became ready; None until then.
    ready_at: Option<Instant>,
}

/// The file this image runs.
#[derive(Clone, Debug)]
struct Own {
    binary: PathBuf,
    sha256: String,
    /// Digest of the file an earlier image exec'd to become this one (a
    /// wrapper script's, say, when it differs from `sha256`).
    exec_sha256: Option<String>,
}

impl Own {
    /// Whether this image runs the binary of that digest.
    fn runs(&self, sha256: &str) -> bool {
        self.sha256 == sha256 || self.exec_sha256.as_deref() == Some(sha256)
    }
}

/// How starting a worker ended.
enum Started {
    Ready(Box<Worker>),
    Failed(String),
    Shutdown,
}

/// Runs until `shutdown` resolves (then SIGTERMs the worker, waits
/// `stop_grace_ms`, SIGKILLs, returns).
pub async fn run(
    config: SupervisorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut config = config;
    validate(&config)?;
    // Private: the control socket in it steers the role's releases.
    handover_private::dir(&config.state_dir).context("the supervisor's state dir")?;
    // Workers get the control socket's path; make it independent of cwd.
    config.state_dir = std::fs::canonicalize(&config.state_dir)
        .with_context(|| format!("resolve state dir {}", config.state_dir.display()))?;

    let (binary, sha256) = blocking(digest::own_binary)
        .await
        .context("hash this supervisor's own binary")?;
    let handoff = Handoff::from_env().context("read the hand-off of the previous image")?;
    let execed_at_start = std::env::var(crate::ENV_SUPERVISOR_EXECED_AT_START).ok();
    let own = Own {
        binary,
        sha256,
        exec_sha256: handoff
            .as_ref()
            .map(|h| h.exec_sha256.clone())
            .or(execed_at_start.clone()),
    };
    let reexeced = handoff.is_some() || execed_at_start.is_some();
    #[cfg(feature = "test-hooks")]
    if reexeced && std::env::var(TEST_FAULT_ENV).is_ok_and(|f| f == "exit_after_reexec") {
        bail!("test hook {TEST_FAULT_ENV}=exit_after_reexec: failing at start");
    }
    let spawner =
        Spawner::start(tokio::runtime::Handle::current()).context("start the spawner thread")?;

    let dir = config.state_dir.clone();
    let stored = blocking(move || state::load(&dir))
        .await
        .with_context(|| format!("read {}", state::state_path(&config.state_dir).display()))?;
    // An exec a previous image attempted that never came up: not again.
    let failed_attempt = match reexeced {
        true => None,
        false => state::load_attempt(&config.state_dir),
    };
    if let Some(a) = failed_attempt.as_ref().filter(|a| !a.exhausted()) {
        warn!(
            supervisor = %config.name,
            "an earlier re-exec into {} (SHA-256 {}) did not come up (try {} of {}); trying again",
            a.binary.display(),
            a.sha256,
            a.tries,
            state::REEXEC_TRIES_MAX,
        );
    }
    let failed_attempt = failed_attempt.filter(state::ReexecAttempt::exhausted);
    let reexec_failed = failed_attempt.map(|attempt| {
        let reason = format!(
            "re-execs into {} (SHA-256 {}) did not come up {} times; the supervisor stays on its binary until a switch to another binary (or remove {}/reexec.json)",
            attempt.binary.display(),
            attempt.sha256,
            attempt.tries,
            config.state_dir.display(),
        );
        error!(supervisor = %config.name, "{reason}");
        (attempt.sha256, reason)
    });
    if let (false, Some(state)) = (reexeced, &stored) {
        let blocked = reexec_failed.as_ref().map(|(sha256, _)| sha256.as_str());
        exec_at_start(&spawner, &config, &state.active, &own, blocked).await;
    }

    // Bound (or inherited) before anything else: from here on connections
    // queue, never fail.
    let listener = match &handoff {
        Some(handoff) => handoff::take_listener(handoff.listen_fd, config.listen)
            .context("take the listening socket from the previous image")?,
        None => bind_listener_retrying(config.listen)
            .await
            .with_context(|| format!("listen on {}", config.listen))?,
    };
    let state = match stored {
        Some(state) => state,
        None => {
            let state = State {
                active: config.initial.clone(),
                switching: None,
            };
            let dir = config.state_dir.clone();
            let first = state.clone();
            blocking(move || state::store(&dir, &first))
                .await
                .context("write the first state.json")?;
            state
        }
    };

    let control_path = config.state_dir.join("control.sock");
    let control_listener = match &handoff {
        Some(handoff) => UnixListener::from_std(
            handoff::take_control(handoff.control_fd)
                .context("take the control socket from the previous image")?,
        )
        .context("use the control socket of the previous image")?,
        None => bind_control(&control_path).await?,
    };
    let control_fd = control_listener.as_raw_fd();

    let (switch_tx, switch_rx) = mpsc::channel(1);
    let shared = Arc::new(Shared::new(
        config.name.clone(),
        (
            own.binary.clone(),
            own.exec_sha256
                .clone()
                .unwrap_or_else(|| own.sha256.clone()),
        ),
        Live {
            active: state.active.clone(),
            switching: state.switching.clone(),
            active_pid: None,
            starting_pid: None,
            retiring_pids: Vec::new(),
            restarts: handoff.as_ref().map_or(0, |h| h.restarts),
            switch_queued: false,
            active_sha256: None,
            reexec: None,
            reexecuting: false,
        },
        switch_tx,
    ));
    let control_task = tokio::spawn(control::serve(control_listener, shared.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_task = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });

    info!(
        supervisor = %config.name,
        listen = %config.listen,
        active = state.active.release,
        binary = %own.binary.display(),
        sha256 = %own.sha256,
        handed_over = handoff.is_some(),
        "supervisor listening"
    );
    let mut supervisor = Supervisor {
        listen_fd: listener.as_raw_fd(),
        control_fd,
        own,
        handoff,
        reexec_failed,
        reexeced,
        config,
        control_path: control_path.clone(),
        spawner,
        shared,
        switch_rx,
        shutdown_rx,
        retiring: JoinSet::new(),
        backoff_ms: BACKOFF_MIN_MS,
        state,
    };
    supervisor.main().await;
    // Every worker was asked to stop; wait for all of them (each bounded by
    // stop_grace_ms, then SIGKILL).
    while supervisor.retiring.join_next().await.is_some() {}
    control_task.abort();
    shutdown_task.abort();
    if let Err(e) = std::fs::remove_file(&control_path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", control_path.display());
        }
    }
    info!(supervisor = %supervisor.config.name, "supervisor stopped");
    // The spawner thread ends before the listener closes.
    drop(supervisor);
    drop(listener);
    Ok(())
}

struct Supervisor {
    config: SupervisorConfig,
    listen_fd: RawFd,
    /// The control socket's listener (served by the control task).
    control_fd: RawFd,
    own: Own,
    /// From the previous image, until its worker is adopted.
    handoff: Option<Handoff>,
    /// The digest of a binary an exec into failed, and why: not tried again
    /// for that binary.
    reexec_failed: Option<(String, String)>,
    /// This image came from an exec of the supervisor: once it serves, the
    /// attempt is over (`reexec.json` is removed).
    reexeced: bool,
    control_path: PathBuf,
    spawner: Spawner,
    shared: Arc<Shared>,
    switch_rx: mpsc::Receiver<SwitchRequest>,
    shutdown_rx: watch::Receiver<bool>,
    /// Workers finishing in-flight requests after SIGTERM.
    retiring: JoinSet<()>,
    /// Delay before the next restart of a crashed or failed release.
    backoff_ms: u64,
    /// What state.json says (kept in step with every write).
    state: State,
}

impl Supervisor {
    /// Returns once shutdown was asked for and every worker was told to stop.
    async fn main(&mut self) {
        let first = match self.handoff.take() {
            Some(handoff) => self.adopt(handoff.worker).await,
            None => self.start().await,
        };
        let Some(mut active) = first else {
            return;
        };
        if self.reexeced {
            let dir = self.config.state_dir.clone();
            if let Err(e) = blocking(move || state::clear_attempt(&dir)).await {
                // The next start from an older binary would not exec again.
                error!(supervisor = %self.config.name, "cannot remove reexec.json: {e}");
            }
        }
        loop {
            self.consider_reexec(&active).await;
            let shutdown = self.shutdown_signal();
            tokio::select! {
                _ = shutdown => {
                    info!(supervisor = %self.config.name, "shutting down");
                    // No switch may start any more.
                    self.clear_active();
                    self.retire(active);
                    return;
                }
                // Reaps retiring workers, so a re-exec waiting for them goes on.
                Some(_) = self.retiring.join_next(), if !self.retiring.is_empty() => {}
                status = active.proc.wait() => {
                    let served = active.ready_at.map(|at| at.elapsed());
                    error!(
                        supervisor = %self.config.name,
                        release = active.release.release,
                        pid = active.pid,
                        "worker exited unexpectedly ({}); restarting release {}",
                        describe(&status),
                        active.release.release,
                    );
                    self.forget_ready(active.pid);
                    self.clear_active();
                    self.shared.live().restarts += 1;
                    if served.is_some_and(|d| d >= Duration::from_millis(BACKOFF_RESET_AFTER_MS)) {
                        self.backoff_ms = BACKOFF_MIN_MS;
                    }
                    let release = active.release.clone();
                    match self.start_with_backoff(&release, true).await {
                        Some(worker) => active = worker,
                        None => return,
                    }
                }
                Some(request) = self.switch_rx.recv() => {
                    match self.switch(active, request).await {
                        Some(worker) => active = worker,
                        None => return,
                    }
                }
            }
        }
    }

    /// The first worker: resolves a switch a killed supervisor left behind
    /// (try the new release once, else revert), then runs the active
    /// release, retrying with backoff until it runs. None on shutdown.
    async fn start(&mut self) -> Option<Worker> {
        if let Some(next) = self.state.switching.clone() {
            let from = self.state.active.release;
            warn!(
                supervisor = %self.config.name,
                "state.json records an interrupted switch from release {from} to release {}; trying release {} once",
                next.release, next.release,
            );
            match self.try_start(&next, None).await {
                Started::Ready(worker) => {
                    let committed = State {
                        active: worker.release.clone(),
                        switching: None,
                    };
                    match self.write_state(committed).await {
                        Ok(()) => info!(
                            supervisor = %self.config.name,
                            "release {} is ready; interrupted switch committed", next.release
                        ),
                        // It serves; the next start would try it again, which is harmless.
                        Err(e) => error!(
                            supervisor = %self.config.name,
                            "release {} is ready but state.json could not be updated: {e}", next.release
                        ),
                    }
                    self.set_active(&worker);
                    return Some(*worker);
                }
                Started::Failed(reason) => {
                    warn!(
                        supervisor = %self.config.name,
                        "release {} did not become ready ({reason}); reverting to release {from}",
                        next.release,
                    );
                    self.abandon_switch().await;
                }
                Started::Shutdown => return None,
            }
        }
        let active = self.state.active.clone();
        self.start_with_backoff(&active, false).await
    }

    /// Starts `release` until a worker is ready: a role is never left
    /// without a runnable release. None on shutdown.
    async fn start_with_backoff(&mut self, release: &Release, delay_first: bool) -> Option<Worker> {
        let mut delay = delay_first;
        loop {
            if delay {
                let delay_ms = self.backoff_ms;
                info!(
                    supervisor = %self.config.name,
                    "starting release {} in {delay_ms} ms", release.release
                );
                if self.sleep_or_shutdown(delay_ms).await {
                    return None;
                }
                self.backoff_ms = (delay_ms * 2).min(BACKOFF_MAX_MS);
            }
            delay = true;
            match self.try_start(release, None).await {
                Started::Ready(worker) => {
                    self.set_active(&worker);
                    return Some(*worker);
                }
                Started::Failed(reason) => error!(
                    supervisor = %self.config.name,
                    "release {} failed to start: {reason}; retrying with backoff", release.release
                ),
                Started::Shutdown => return None,
            }
        }
    }

    /// One switch: persist `switching`, start the new worker, and either
    /// commit it and retire the old one, or stop it and keep the old one.
    /// Returns the worker that is active afterwards; None on shutdown.
    async fn switch(&mut self, mut old: Worker, request: SwitchRequest) -> Option<Worker> {
        let SwitchRequest { to, reply } = request;
        let name = self.config.name.clone();
        let from = old.release.release;
        let same_bytes = to
            .sha256
            .as_ref()
            .is_none_or(|sha256| *sha256 == old.sha256);
        if to.same_as(&old.release) && same_bytes && old.proc.id().is_some() {
            let _ = reply.send(Answer::ok(&SwitchOutcome::AlreadyActive {
                release: to.release,
            }));
            self.shared.live().switch_queued = false;
            return Some(old);
        }
        info!(
            supervisor = %name,
            "switching from release {from} (pid {}) to release {} ({})",
            old.pid, to.release, to.binary.display(),
        );
        let intent = State {
            active: old.release.clone(),
            switching: Some(to.clone()),
        };
        if let Err(e) = self.write_state(intent).await {
            error!(supervisor = %name, "cannot record the switch in state.json: {e}; not switching");
            let _ = reply.send(Answer::error(
                "state_write_failed",
                format!("cannot record the switch in state.json: {e}"),
            ));
            self.shared.live().switch_queued = false;
            return Some(old);
        }
        {
            let mut live = self.shared.live();
            live.switching = Some(to.clone());
            live.switch_queued = false;
        }

        let outcome = match self.try_start(&to, Some(&mut old)).await {
            Started::Ready(new) => {
                let new = *new;
                let committed = State {
                    active: new.release.clone(),
                    switching: None,
                };
                match self.write_state(committed).await {
                    Ok(()) => {
                        self.set_active(&new);
                        let _ = reply.send(Answer::ok(&SwitchOutcome::Switched {
                            release: to.release,
                            pid: new.pid,
                        }));
                        info!(
                            supervisor = %name,
                            "switched to release {} (pid {}); sending SIGTERM to release {from} (pid {})",
                            to.release, new.pid, old.pid,
                        );
                        self.retire(old);
                        return Some(new);
                    }
                    Err(e) => {
                        error!(
                            supervisor = %name,
                            "cannot commit the switch in state.json: {e}; stopping release {} and keeping release {from}",
                            to.release,
                        );
                        self.retire(new);
                        Err(format!("cannot commit the switch in state.json: {e}"))
                    }
                }
            }
            Started::Failed(reason) => {
                warn!(
                    supervisor = %name,
                    "release {} failed ({reason}); release {from} goes on serving", to.release,
                );
                Err(reason)
            }
            // Ok: nothing failed, the supervisor is stopping.
            Started::Shutdown => Ok(()),
        };
        self.abandon_switch().await;
        match outcome {
            Err(reason) => {
                let _ = reply.send(Answer::ok(&SwitchOutcome::Failed {
                    release: to.release,
                    reason,
                }));
                // If the old worker died meanwhile, the main loop sees its
                // exit at once and restarts it.
                Some(old)
            }
            Ok(()) => {
                let _ = reply.send(Answer::error("shutting_down", "the supervisor is stopping"));
                self.clear_active();
                self.retire(old);
                None
            }
        }
    }

    /// Spawns `release` and waits until it is ready: it sent `ready` with
    /// its pid AND our own GET of the health path answers 200. Watches the
    /// old worker meanwhile (its exit is logged; the caller sees it later).
    async fn try_start(&mut self, release: &Release, mut old: Option<&mut Worker>) -> Started {
        let name = self.config.name.clone();
        let mut worker = match self.spawn_worker(release).await {
            Ok(worker) => worker,
            Err(e) => {
                return Started::Failed(format!("cannot start {}: {e}", release.binary.display()));
            }
        };
        self.shared.live().starting_pid = Some(worker.pid);
        let timeout_ms = self.config.ready_timeout_ms;
        info!(
            supervisor = %name,
            "started release {} as pid {}; waiting up to {timeout_ms} ms for it to become ready",
            release.release, worker.pid,
        );
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let ready = wait_ready(
            self.shared.ready.subscribe(),
            worker.pid,
            probe_addr(self.config.listen),
            self.config.health_url_path.clone(),
            self.config.health_tls,
        );
        tokio::pin!(ready);
        let shutdown = self.shutdown_signal();
        tokio::pin!(shutdown);
        let mut old_alive = old.as_mut().is_some_and(|o| o.proc.id().is_some());

        let outcome = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Err(None),
                status = worker.proc.wait() => {
                    break Err(Some(format!("exited before it was ready ({})", describe(&status))));
                }
                _ = &mut ready => break Ok(()),
                _ = tokio::time::sleep_until(deadline) => {
                    let reason = if self.shared.ready.borrow().contains(&worker.pid) {
                        format!(
                            "sent ready, but GET {} did not answer 200 within {timeout_ms} ms",
                            self.config.health_url_path,
                        )
                    } else {
                        format!("did not send ready within {timeout_ms} ms")
                    };
                    break Err(Some(reason));
                }
                status = wait_old(&mut old), if old_alive => {
                    old_alive = false;
                    warn!(
                        supervisor = %name,
                        "the old worker exited while release {} was starting ({})",
                        release.release, describe(&status),
                    );
                }
            }
        };
        self.shared.live().starting_pid = None;
        match outcome {
            Ok(()) => {
                worker.ready_at = Some(Instant::now());
                info!(supervisor = %name, "release {} (pid {}) is ready", release.release, worker.pid);
                Started::Ready(Box::new(worker))
            }
            Err(Some(reason)) => {
                self.retire(worker);
                Started::Failed(reason)
            }
            Err(None) => {
                self.retire(worker);
                Started::Shutdown
            }
        }
    }

    /// Hashes the open binary and starts exactly that file; refused when a
    /// digest was expected and the bytes differ.
    async fn spawn_worker(&self, release: &Release) -> io::Result<Worker> {
        let path = release.binary.clone();
        let exec = blocking(move || digest::open_and_hash(&path)).await?;
        if let Some(expected) = &release.sha256 {
            if *expected != exec.sha256 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "refused: its SHA-256 is {}, not the expected {expected}",
                        exec.sha256
                    ),
                ));
            }
        }
        let sha256 = exec.sha256.clone();
        let mut args = self.config.worker_args.clone();
        args.push("--release".to_string());
        args.push(release.release.to_string());
        let plan = SpawnPlan {
            binary: release.binary.clone(),
            exec,
            args,
            env: vec![
                ("LISTEN_FDS".to_string(), "1".into()),
                ("LISTEN_FDNAMES".to_string(), "http".into()),
                (
                    crate::ENV_SUPERVISOR_SOCK.to_string(),
                    self.control_path.clone().into_os_string(),
                ),
                (crate::ENV_WORKER.to_string(), "1".into()),
                (
                    crate::ENV_READY_TIMEOUT_MS.to_string(),
                    self.config.ready_timeout_ms.to_string().into(),
                ),
                (crate::ENV_BINARY_SHA256.to_string(), sha256.clone().into()),
            ],
            listen_fd: self.listen_fd,
        };
        let child = self.spawner.spawn(plan).await?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the new worker has no pid"))?;
        Ok(Worker {
            release: release.clone(),
            pid,
            proc: Proc::Spawned(child),
            sha256,
            ready_at: None,
        })
    }

    /// SIGTERM now; SIGKILL if it has not exited after `stop_grace_ms`. Runs
    /// in the background so a slow worker never delays an answer.
    fn retire(&mut self, mut worker: Worker) {
        self.forget_ready(worker.pid);
        while self.retiring.try_join_next().is_some() {}
        // None once reaped: its pid may belong to someone else by now.
        let Some(pid) = worker.proc.id() else {
            return;
        };
        self.shared.live().retiring_pids.push(pid);
        if let Ok(raw) = i32::try_from(pid) {
            if let Err(e) = kill(Pid::from_raw(raw), Signal::SIGTERM) {
                warn!(supervisor = %self.config.name, "SIGTERM to pid {pid}: {e}");
            }
        }
        let grace_ms = self.config.stop_grace_ms;
        let shared = self.shared.clone();
        self.retiring.spawn(async move {
            let status = match tokio::time::timeout(
                Duration::from_millis(grace_ms),
                worker.proc.wait(),
            )
            .await
            {
                Ok(status) => status,
                Err(_) => {
                    warn!(
                        supervisor = %shared.name,
                        "pid {pid} (release {}) still runs {grace_ms} ms after SIGTERM; sending SIGKILL",
                        worker.release.release,
                    );
                    if let Err(e) = worker.proc.start_kill() {
                        warn!(supervisor = %shared.name, "SIGKILL to pid {pid}: {e}");
                    }
                    worker.proc.wait().await
                }
            };
            info!(
                supervisor = %shared.name,
                "stopped worker pid {pid} (release {}) exited: {}",
                worker.release.release,
                describe(&status),
            );
            shared.live().retiring_pids.retain(|p| *p != pid);
        });
    }

    /// The worker the previous image of this process handed over: a child
    /// of ours (exec kept the pid), ready and serving the release
    /// `state.json` records as active. Anything else is a bug of the
    /// previous image: that worker is retired and the active release
    /// started afresh. None on shutdown.
    async fn adopt(&mut self, handed: HandedWorker) -> Option<Worker> {
        let name = self.config.name.clone();
        let active = &self.state.active;
        let matches = self.state.switching.is_none()
            && active.release == handed.release
            && active.binary == handed.binary
            && active.sha256.as_ref().is_none_or(|s| *s == handed.sha256);
        let adopted = match Adopted::new(handed.pid) {
            Ok(adopted) => adopted,
            Err(e) => {
                error!(supervisor = %name, "cannot adopt worker pid {}: {e}; starting release {} afresh", handed.pid, active.release);
                return self.start().await;
            }
        };
        let worker = Worker {
            release: active.clone(),
            pid: handed.pid,
            proc: Proc::Adopted(adopted),
            sha256: handed.sha256,
            ready_at: Some(Instant::now()),
        };
        if !matches {
            error!(
                supervisor = %name,
                "the hand-off names worker pid {} of release {} ({}), but state.json says {:?}; retiring it",
                handed.pid, handed.release, handed.binary.display(), self.state,
            );
            self.retire(worker);
            return self.start().await;
        }
        info!(
            supervisor = %name,
            "adopted worker pid {} of release {} from the previous image", worker.pid, worker.release.release,
        );
        self.set_active(&worker);
        Some(worker)
    }

    fn set_active(&self, worker: &Worker) {
        let mut live = self.shared.live();
        live.active = worker.release.clone();
        live.active_pid = Some(worker.pid);
        live.active_sha256 = Some(worker.sha256.clone());
        live.switching = None;
    }

    /// No worker is active (stopping, or restarting a crashed one).
    fn clear_active(&self) {
        let mut live = self.shared.live();
        live.active_pid = None;
        live.active_sha256 = None;
    }

    /// Clears `switching` on disk and in the live state after a failed or
    /// aborted switch; the active release stays.
    async fn abandon_switch(&mut self) {
        let reverted = State {
            active: self.state.active.clone(),
            switching: None,
        };
        if let Err(e) = self.write_state(reverted).await {
            // On disk the switch stays pending; the next start tries it once
            // more and reverts again, which is safe.
            error!(supervisor = %self.config.name, "cannot clear the switch in state.json: {e}");
        }
        self.shared.live().switching = None;
    }

    async fn write_state(&mut self, next: State) -> io::Result<()> {
        let dir = self.config.state_dir.clone();
        let written = next.clone();
        blocking(move || state::store(&dir, &written)).await?;
        self.state = next;
        Ok(())
    }

    fn forget_ready(&self, pid: u32) {
        self.shared.ready.send_modify(|ready| {
            ready.remove(&pid);
        });
    }

    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shutdown_rx.clone();
        async move {
            // An error means the sender is gone, which happens only at the end.
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }

    /// Sleeps `ms`; true when shutdown came first.
    async fn sleep_or_shutdown(&self, ms: u64) -> bool {
        tokio::select! {
            _ = self.shutdown_signal() => true,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
        }
    }
}

async fn wait_old(old: &mut Option<&mut Worker>) -> io::Result<ExitStatus> {
    match old {
        Some(worker) => worker.proc.wait().await,
        None => std::future::pending().await,
    }
}

fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// Longest health path: it goes into the probe's request line, which has
/// to stay small.
const HEALTH_PATH_BYTES_MAX: usize = 1024;

fn validate(config: &SupervisorConfig) -> anyhow::Result<()> {
    if config.ready_timeout_ms == 0 {
        bail!("ready_timeout_ms must be at least 1");
    }
    let path = &config.health_url_path;
    if !path.starts_with('/')
        || path.len() > HEALTH_PATH_BYTES_MAX
        || path.bytes().any(|b| b <= b' ' || b == 0x7f)
    {
        bail!("health_url_path {path:?} must start with '/' and hold no spaces or control characters ({HEALTH_PATH_BYTES_MAX} bytes at most)");
    }
    if config.initial.release == 0 {
        bail!("release numbers start at 1");
    }
    if !config.initial.binary.is_absolute() {
        bail!(
            "the initial release's binary {} is not an absolute path",
            config.initial.binary.display()
        );
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_validated() {
        let mut config = SupervisorConfig::new(
            "n1",
            "127.0.0.1:1".parse().expect("addr"),
            "/tmp/x",
            Release::new(1, "/bin/true"),
            Vec::new(),
        );
        assert!(validate(&config).is_ok());
        config.health_url_path = "/healthz HTTP/1.1\r\nX: y".to_string();
        assert!(validate(&config).is_err());
        config.health_url_path = "/healthz".to_string();
        config.initial.binary = PathBuf::from("handover");
        assert!(validate(&config).is_err());
    }
}
