//! The supervisor's main loop: start the active release, restart it when it
//! crashes, switch releases on request, and resolve an interrupted switch on
//! restart.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::control::{self, Live, Shared, SwitchRequest};
use crate::protocol::{Answer, SwitchOutcome};
use crate::spawn::{SpawnPlan, Spawner};
use crate::state::{self, State};
use crate::{Release, SupervisorConfig};

/// Bound on connections waiting in the kernel while no worker accepts (the
/// kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG_CONNECTIONS: u32 = 4096;
/// First delay before restarting a release that crashed or failed to start.
const BACKOFF_MIN_MS: u64 = 100;
/// Largest delay between restarts.
const BACKOFF_MAX_MS: u64 = 5_000;
/// A worker that served this long before crashing restarts after the
/// shortest delay again; a crash loop keeps backing off.
const BACKOFF_RESET_AFTER_MS: u64 = 10_000;
/// Bound on one health probe (connect, request, status line).
const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Pause between health probes of a worker that sent `ready`.
const PROBE_INTERVAL_MS: u64 = 50;
/// Bound on the status line of a health probe answer.
const PROBE_MAX_STATUS_LINE_BYTES: usize = 1024;

/// A running worker process.
struct Worker {
    release: Release,
    pid: u32,
    child: Child,
    /// When it became ready; None until then.
    ready_at: Option<Instant>,
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
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state dir {}", config.state_dir.display()))?;
    // Workers get the control socket's path; make it independent of cwd.
    config.state_dir = std::fs::canonicalize(&config.state_dir)
        .with_context(|| format!("resolve state dir {}", config.state_dir.display()))?;

    // Bound before anything else: from here on connections queue, never fail.
    let listener = bind_listener_retrying(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;

    let dir = config.state_dir.clone();
    let stored = blocking(move || state::load(&dir))
        .await
        .with_context(|| format!("read {}", state::state_path(&config.state_dir).display()))?;
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
    let control_listener = bind_control(&control_path).await?;

    let (switch_tx, switch_rx) = mpsc::channel(1);
    let shared = Arc::new(Shared::new(
        config.name.clone(),
        Live {
            active: state.active.clone(),
            switching: state.switching.clone(),
            active_pid: None,
            starting_pid: None,
            retiring_pids: Vec::new(),
            restarts: 0,
            switch_queued: false,
        },
        switch_tx,
    ));
    let control_task = tokio::spawn(control::serve(control_listener, shared.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_task = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });

    let spawner =
        Spawner::start(tokio::runtime::Handle::current()).context("start the spawner thread")?;
    info!(
        supervisor = %config.name,
        listen = %config.listen,
        active = state.active.release,
        "supervisor listening"
    );
    let mut supervisor = Supervisor {
        listen_fd: listener.as_raw_fd(),
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
    listen_fd: std::os::fd::RawFd,
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
        let Some(mut active) = self.start().await else {
            return;
        };
        loop {
            let shutdown = self.shutdown_signal();
            tokio::select! {
                _ = shutdown => {
                    info!(supervisor = %self.config.name, "shutting down");
                    // No switch may start any more.
                    self.shared.live().active_pid = None;
                    self.retire(active);
                    return;
                }
                status = active.child.wait() => {
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
                    {
                        let mut live = self.shared.live();
                        live.active_pid = None;
                        live.restarts += 1;
                    }
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
                        active: next.clone(),
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
        if to == old.release && old.child.id().is_some() {
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
                    active: to.clone(),
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
                self.shared.live().active_pid = None;
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
        );
        tokio::pin!(ready);
        let shutdown = self.shutdown_signal();
        tokio::pin!(shutdown);
        let mut old_alive = old.as_mut().is_some_and(|o| o.child.id().is_some());

        let outcome = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Err(None),
                status = worker.child.wait() => {
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

    async fn spawn_worker(&self, release: &Release) -> io::Result<Worker> {
        let mut args = self.config.worker_args.clone();
        args.push("--release".to_string());
        args.push(release.release.to_string());
        let plan = SpawnPlan {
            binary: release.binary.clone(),
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
            child,
            ready_at: None,
        })
    }

    /// SIGTERM now; SIGKILL if it has not exited after `stop_grace_ms`. Runs
    /// in the background so a slow worker never delays an answer.
    fn retire(&mut self, mut worker: Worker) {
        self.forget_ready(worker.pid);
        while self.retiring.try_join_next().is_some() {}
        // None once reaped: its pid may belong to someone else by now.
        let Some(pid) = worker.child.id() else {
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
                worker.child.wait(),
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
                    if let Err(e) = worker.child.start_kill() {
                        warn!(supervisor = %shared.name, "SIGKILL to pid {pid}: {e}");
                    }
                    worker.child.wait().await
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

    fn set_active(&self, worker: &Worker) {
        let mut live = self.shared.live();
        live.active = worker.release.clone();
        live.active_pid = Some(worker.pid);
        live.switching = None;
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
        Some(worker) => worker.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Resolves once `pid` sent `ready` and the socket answers the health path
/// with 200. Both workers accept on one socket, so the probe alone cannot
/// tell who answered: `ready` is the signal, the probe confirms the socket
/// serves.
async fn wait_ready(
    mut ready: watch::Receiver<BTreeSet<u32>>,
    pid: u32,
    addr: SocketAddr,
    path: String,
) {
    if ready.wait_for(|pids| pids.contains(&pid)).await.is_err() {
        std::future::pending::<()>().await;
    }
    loop {
        match probe(addr, &path).await {
            Ok(200) => return,
            Ok(code) => warn!("health probe GET {path}: {code}"),
            Err(e) => warn!("health probe GET {path}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(PROBE_INTERVAL_MS)).await;
    }
}

/// One `GET path` over a fresh connection; the HTTP status code.
async fn probe(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: handover-supervisor\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > PROBE_MAX_STATUS_LINE_BYTES {
                break;
            }
        }
        parse_status_line(&head).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no HTTP status line in the answer",
            )
        })
    };
    tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {PROBE_TIMEOUT_MS} ms"),
            )
        })?
}

fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Where to probe: a wildcard listen address is reached over loopback.
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

fn validate(config: &SupervisorConfig) -> anyhow::Result<()> {
    if config.ready_timeout_ms == 0 {
        bail!("ready_timeout_ms must be at least 1");
    }
    let path = &config.health_url_path;
    if !path.starts_with('/') || path.len() > 1024 || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!("health_url_path {path:?} must start with '/' and hold no spaces or control characters (1024 bytes at most)");
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

/// Binds retries on EADDRINUSE: a worker of a supervisor that was just
/// SIGKILLed may hold the inherited socket for a moment before it dies too.
const BIND_RETRIES_MAX: u32 = 50;
const BIND_RETRY_MS: u64 = 100;

async fn bind_listener_retrying(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let mut tries = 0;
    loop {
        match bind_listener(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < BIND_RETRIES_MAX => {
                tries += 1;
                if tries == 1 {
                    tracing::warn!(%addr, "address in use; retrying for a few seconds");
                }
                tokio::time::sleep(std::time::Duration::from_millis(BIND_RETRY_MS)).await;
            }
            other => return other,
        }
    }
}

/// The role's listening socket, bound once with SO_REUSEADDR. In blocking
/// mode as systemd passes sockets; a worker sets its own mode.
fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG_CONNECTIONS)?.into_std()?;
    listener.set_nonblocking(false)?;
    Ok(listener)
}

/// The control socket; a stale one from a killed supervisor is removed, a
/// live one means another supervisor owns this state dir.
async fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another supervisor answers on {}; refusing to share its state dir",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("bind control socket {}", path.display()))?;
    // Only the owner (the supervisor's user, and so its workers) may steer it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restrict control socket {}", path.display()))?;
    Ok(listener)
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
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Busy\r\nx: y"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn wildcard_listen_addresses_are_probed_over_loopback() {
        let any: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(probe_addr(any), "127.0.0.1:8080".parse().expect("addr"));
        let any6: SocketAddr = "[::]:8080".parse().expect("addr");
        assert_eq!(probe_addr(any6), "[::1]:8080".parse().expect("addr"));
        let one: SocketAddr = "127.40.0.1:80".parse().expect("addr");
        assert_eq!(probe_addr(one), one);
    }

    #[test]
    fn configs_are_validated() {
        let mut config = SupervisorConfig::new(
            "n1",
            "127.0.0.1:1".parse().expect("addr"),
            "/tmp/x",
            Release {
                release: 1,
                binary: PathBuf::from("/bin/true"),
            },
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
