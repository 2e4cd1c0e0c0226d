//! Process tests: a real supervisor process (the `handover-test-supervisor`
//! fixture) running real workers (the `handover-test-worker` fixture) on
//! `127.4x.0.1`. Every process is killed when a test ends, pass or fail.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use handover_core::release::{Contracts, CONTRACTS};
use handover_supervisor::{
    Release, SupervisorClient, SupervisorError, SupervisorStatus, SwitchOutcome,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

const WORKER: &str = env!("CARGO_BIN_EXE_handover-test-worker");
const SUPERVISOR: &str = env!("CARGO_BIN_EXE_handover-test-supervisor");

/// Bound on one HTTP request of a test client (connect + answer); requests
/// may wait in the backlog while a worker restarts, never longer.
const REQUEST_TIMEOUT_MS: u64 = 20_000;
/// Bound on waiting for a condition (a worker serving, a process gone).
const WAIT_MS: u64 = 30_000;
/// Bound on a graceful stop of the supervisor when a test ends.
const STOP_MS: u64 = 20_000;
/// The supervisor's ready bound in these tests (keeps `--never-ready` short).
const READY_TIMEOUT_MS: u64 = 3_000;
/// The supervisor's stop grace in these tests.
const STOP_GRACE_MS: u64 = 5_000;
const PORT: u16 = 18_470;
/// Pause between polls of a condition.
const POLL_MS: u64 = 20;
/// Pause between two requests of the load loop.
const LOAD_PAUSE_MS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Whoami {
    release: u64,
    pid: u32,
}

/// One supervised role in a tempdir; kills everything it started on drop.
struct Harness {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    supervisor: Option<Child>,
    /// Worker pids seen, killed on drop if still there.
    workers: Mutex<Vec<u32>>,
}

impl Harness {
    fn new(ip: &str) -> io::Result<Harness> {
        let addr: SocketAddr = format!("{ip}:{PORT}")
            .parse()
            .map_err(|e| io::Error::other(format!("{e}")))?;
        Ok(Harness {
            dir: tempfile::tempdir()?,
            addr,
            supervisor: None,
            workers: Mutex::new(Vec::new()),
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("supervisor")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("supervisor.log")
    }

    fn start_supervisor(&mut self, release: u32, binary: &Path) -> io::Result<()> {
        self.start_supervisor_with(release, binary, &[])
    }

    /// The supervisor fixture with extra env vars (test hooks).
    fn start_supervisor_with(
        &mut self,
        release: u32,
        binary: &Path,
        env: &[(&str, &str)],
    ) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(SUPERVISOR)
            .envs(env.iter().copied())
            .args(["--name", "test-role", "--listen"])
            .arg(self.addr.to_string())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--initial-release", &release.to_string()])
            .arg("--initial-binary")
            .arg(binary)
            .args(["--ready-timeout-ms", &READY_TIMEOUT_MS.to_string()])
            .args(["--stop-grace-ms", &STOP_GRACE_MS.to_string()])
            .args(["--", "--role", "test-role"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.supervisor = Some(child);
        Ok(())
    }

    fn supervisor_pid(&self) -> io::Result<u32> {
        self.supervisor
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| io::Error::other("no supervisor running"))
    }

    /// Waits until the supervisor process exited by itself; its status.
    fn wait_supervisor_exit(&mut self, what: &str) -> io::Result<std::process::ExitStatus> {
        let child = self
            .supervisor
            .as_mut()
            .ok_or_else(|| io::Error::other("no supervisor running"))?;
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.supervisor = None;
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        panic!("{what}: the supervisor still runs after {WAIT_MS} ms");
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill_supervisor(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.supervisor.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn stop_supervisor(&mut self) {
        let Some(mut child) = self.supervisor.take() else {
            return;
        };
        signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(STOP_MS);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.addr, path)
    }

    fn whoami(&self) -> io::Result<Whoami> {
        let (code, body) = self.get("/whoami")?;
        let whoami = parse_whoami(code, &body)?;
        if let Ok(mut workers) = self.workers.lock() {
            if !workers.contains(&whoami.pid) {
                workers.push(whoami.pid);
            }
        }
        Ok(whoami)
    }

    /// Waits until `/whoami` answers and `accept` likes the answer.
    fn wait_whoami(&self, what: &str, accept: impl Fn(&Whoami) -> bool) -> Whoami {
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.whoami() {
                Ok(whoami) if accept(&whoami) => return whoami,
                Ok(whoami) => last = format!("{whoami:?}"),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        panic!("{what}: not within {WAIT_MS} ms (last: {last})");
    }

    /// Waits until `release` serves AND the supervisor counts its worker as
    /// the active one (a worker answers before the supervisor has seen it
    /// ready and recorded it).
    fn wait_active(&self, what: &str, release: u64) -> Whoami {
        let whoami = self.wait_whoami(what, |w| w.release == release);
        self.wait_status(what, |s| {
            s.switching.is_none() && s.active_pid == Some(whoami.pid)
        });
        whoami
    }

    /// The whole `/whoami` answer (release, pid, ppid, sha256).
    fn whoami_json(&self) -> io::Result<Value> {
        let (code, body) = self.get("/whoami")?;
        self.whoami()?;
        if code != 200 {
            return Err(io::Error::other(format!("/whoami: {code} {body}")));
        }
        serde_json::from_str(&body).map_err(io::Error::other)
    }

    fn client(&self) -> SupervisorClient {
        SupervisorClient::new(self.state_dir().join("control.sock"), READY_TIMEOUT_MS)
    }

    /// A switch asked straight on the control socket, as an operator tool
    /// (or a worker) would.
    fn switch_direct(&self, to: &Release) -> io::Result<Result<SwitchOutcome, SupervisorError>> {
        let client = self.client();
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client.switch(to)))
    }

    /// A copy of the supervisor fixture (which is also the worker) with a
    /// few bytes appended: an ELF still runs with trailing bytes, and the
    /// digest differs, as a new release's binary would.
    fn supervisor_copy(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!("{name}.tmp"));
        let mut bytes = fs::read(SUPERVISOR)?;
        bytes.extend_from_slice(format!("\0handover test release {name}\n").as_bytes());
        fs::write(&tmp, bytes)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &path)?;
        fs::canonicalize(path)
    }

    fn state(&self) -> io::Result<Value> {
        let text = fs::read(self.state_dir().join("state.json"))?;
        serde_json::from_slice(&text).map_err(io::Error::other)
    }

    fn write_state(&self, state: &Value) -> io::Result<()> {
        fs::create_dir_all(self.state_dir())?;
        fs::write(self.state_dir().join("state.json"), state.to_string())
    }

    fn status(&self) -> io::Result<SupervisorStatus> {
        let client = SupervisorClient::new(self.state_dir().join("control.sock"), READY_TIMEOUT_MS);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client.status())
            .map_err(io::Error::other)
    }

    fn wait_status(
        &self,
        what: &str,
        accept: impl Fn(&SupervisorStatus) -> bool,
    ) -> SupervisorStatus {
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.status() {
                Ok(status) if accept(&status) => return status,
                Ok(status) => last = format!("{status:?}"),
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        panic!("{what}: not within {WAIT_MS} ms (last: {last})");
    }

    /// A release binary that runs the worker fixture with `flag`: releases
    /// live side by side as different binaries. Written then renamed into
    /// place, so it is never executed half-written.
    fn release_binary(&self, name: &str, flag: &str) -> io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!("{name}.tmp"));
        fs::write(&tmp, format!("#!/bin/sh\nexec {WORKER} {flag} \"$@\"\n"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    fn switch(&self, release: u32, binary: &Path) -> io::Result<(u16, Value)> {
        self.switch_with(release, binary, "")
    }

    /// A switch asked through the worker's `/switch`, with `extra` query
    /// parameters (`&sha256=...`, `&contracts=this`).
    fn switch_with(&self, release: u32, binary: &Path, extra: &str) -> io::Result<(u16, Value)> {
        let (code, body) = self.get(&format!(
            "/switch?to={release}&binary={}{extra}",
            binary.display()
        ))?;
        let value =
            serde_json::from_str(&body).map_err(|e| io::Error::other(format!("{e}: {body}")))?;
        Ok((code, value))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_supervisor();
        // Workers die with the supervisor (PDEATHSIG); make sure anyway.
        if let Ok(workers) = self.workers.lock() {
            for pid in workers.iter() {
                if is_test_worker(*pid) {
                    signal(*pid, Signal::SIGKILL);
                }
            }
        }
        if thread::panicking() {
            if let Ok(log) = fs::read_to_string(self.log_path()) {
                eprintln!("---- supervisor log ----\n{log}---- end ----");
            }
        }
    }
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn is_test_worker(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("handover-test-worker"))
        .unwrap_or(false)
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn is_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    while Instant::now() < deadline {
        if is_gone(pid) {
            return;
        }
        thread::sleep(Duration::from_millis(POLL_MS));
    }
    panic!("{what}: pid {pid} still runs after {WAIT_MS} ms");
}

/// One `GET` over a fresh connection; HTTP status and body.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_answer(http_send(addr, path)?)
}

/// Connects and sends `GET path`: once this returns, the connection is in
/// the socket's accept queue (or already accepted), in order.
fn http_send(addr: SocketAddr, path: &str) -> io::Result<TcpStream> {
    let timeout = Duration::from_millis(REQUEST_TIMEOUT_MS);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    Ok(stream)
}

/// Reads the whole answer of a request sent with `http_send`.
fn http_answer(stream: TcpStream) -> io::Result<(u16, String)> {
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP head in {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
    Ok((code, body.to_string()))
}

fn parse_whoami(code: u16, body: &str) -> io::Result<Whoami> {
    if code != 200 {
        return Err(io::Error::other(format!("/whoami: {code} {body}")));
    }
    let value: Value = serde_json::from_str(body).map_err(io::Error::other)?;
    match (value["release"].as_u64(), value["pid"].as_u64()) {
        (Some(release), Some(pid)) => Ok(Whoami {
            release,
            pid: u32::try_from(pid).map_err(io::Error::other)?,
        }),
        _ => Err(io::Error::other(format!("/whoami: {body}"))),
    }
}

fn release_json(release: u32, binary: &Path) -> Value {
    serde_json::json!({ "release": release, "binary": binary })
}

/// Sequential GETs of `/whoami` from a thread, from `start` until `stop`:
/// every one must be answered.
struct Load {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(Vec<String>, Vec<u64>)>,
}

/// At least this many requests, so the load spans the whole change.
const MIN_LOAD_REQUESTS: usize = 200;
/// Bound on the requests of one load loop.
const MAX_LOAD_REQUESTS: usize = 20_000;
/// Requests answered before `Load::start` returns.
const LOAD_WARMUP_REQUESTS: usize = 20;

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let mut failures = Vec::new();
                let mut releases = Vec::new();
                for i in 0..MAX_LOAD_REQUESTS {
                    if i >= MIN_LOAD_REQUESTS && stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match http_get(addr, "/whoami").and_then(|(c, b)| parse_whoami(c, &b)) {
                        Ok(whoami) => releases.push(whoami.release),
                        Err(e) => failures.push(format!("request {i}: {e}")),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(LOAD_PAUSE_MS));
                }
                (failures, releases)
            })
        };
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        while done.load(Ordering::SeqCst) < LOAD_WARMUP_REQUESTS && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        Load { stop, thread }
    }

    /// Stops the loop; the release of every answer, in order. Fails the
    /// test if any request failed.
    fn stop(self) -> io::Result<Vec<u64>> {
        self.stop.store(true, Ordering::SeqCst);
        let (failures, releases) = self
            .thread
            .join()
            .map_err(|_| io::Error::other("load thread panicked"))?;
        assert!(failures.is_empty(), "failed requests: {failures:#?}");
        assert!(
            releases.len() >= MIN_LOAD_REQUESTS,
            "{} requests",
            releases.len()
        );
        Ok(releases)
    }
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let digest = Sha256::digest(fs::read(path)?);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn ppid_of(pid: u32) -> io::Result<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no ppid in {stat:?}")))
}

fn exe_of(pid: u32) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe"))
}

/// Whether SIGKILL is pending for `pid` (it was sent, the process has not
/// died yet).
fn sigkill_pending(pid: u32) -> io::Result<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    Ok(status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|mask| u64::from_str_radix(mask, 16).ok())
        .any(|mask| mask & SIGKILL_BIT != 0))
}

/// A release of the supervisor fixture's copy at `binary`, with this
/// build's contracts (so the supervisor may re-execute into it).
fn release_with_contracts(release: u32, binary: &Path) -> Release {
    Release {
        contracts: Some(CONTRACTS),
        ..Release::new(release, binary)
    }
}

/// Pids a test started outside the harness, SIGKILLed on drop if they
/// still run `comm`.
struct Strays {
    comm: &'static str,
    pids: Vec<u32>,
}

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in &self.pids {
            let runs = fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == self.comm);
            if runs {
                signal(*pid, Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn a_switch_under_load_refuses_no_request() -> io::Result<()> {
    let mut h = Harness::new("127.40.0.1")?;
    h.start_supervisor(1, Path::new(WORKER))?;
    let old = h.wait_active("release 1 serves", 1);

    let addr = h.addr;
    let load = Load::start(addr);

    // A slow request in flight on the old worker must finish after SIGTERM.
    // It is queued before the switch request, and only the old worker
    // accepts until the switch is asked for, so the old worker serves it.
    let slow = http_send(addr, "/slow?ms=1500")?;
    let slow = thread::spawn(move || http_answer(slow));

    let (code, outcome) = h.switch(2, Path::new(WORKER))?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "switched", "{outcome}");
    assert_eq!(outcome["release"], 2, "{outcome}");

    let new = h.wait_whoami("release 2 serves", |w| w.release == 2);
    assert_ne!(new.pid, old.pid);
    wait_gone(old.pid, "the old worker exits after SIGTERM");

    let releases = load.stop()?;
    assert_eq!(releases.first(), Some(&1));
    assert_eq!(releases.last(), Some(&2));

    let (code, body) = slow
        .join()
        .map_err(|_| io::Error::other("slow request thread panicked"))??;
    let slow_whoami = parse_whoami(code, &body)?;
    assert_eq!(
        slow_whoami, old,
        "the in-flight request finished on the old worker"
    );

    for _ in 0..20 {
        assert_eq!(h.whoami()?.release, 2);
    }
    let state = h.state()?;
    assert_eq!(
        state["active"],
        release_json(2, Path::new(WORKER)),
        "{state}"
    );
    assert_eq!(state["switching"], Value::Null, "{state}");
    let status = h.status()?;
    assert_eq!(status.active.release, 2);
    assert_eq!(status.active_pid, Some(new.pid));

    // Switching to what already runs changes nothing.
    let (code, outcome) = h.switch(2, Path::new(WORKER))?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "already_active", "{outcome}");
    assert_eq!(h.whoami()?, new);
    Ok(())
}

#[test]
fn a_release_that_fails_to_start_or_never_becomes_ready_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.41.0.1")?;
    let fail_start = h.release_binary("release-2-fail-start", "--fail-start")?;
    let never_ready = h.release_binary("release-3-never-ready", "--never-ready")?;
    h.start_supervisor(1, Path::new(WORKER))?;
    let old = h.wait_active("release 1 serves", 1);

    let (code, outcome) = h.switch(2, &fail_start)?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exited before it was ready")),
        "{outcome}"
    );
    assert_eq!(h.whoami()?, old);

    let (code, outcome) = h.switch(3, &never_ready)?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not send ready")),
        "{outcome}"
    );

    // A binary that does not exist is refused before anything starts.
    let (code, answer) = h.switch(4, Path::new("/nonexistent/handover"))?;
    assert_eq!(code, 500, "{answer}");
    assert!(answer.to_string().contains("bad_request"), "{answer}");

    // The never-ready worker was stopped; only the old one is left.
    let status = h.wait_status("the refused workers are gone", |s| {
        s.retiring_pids.is_empty() && s.starting_pid.is_none()
    });
    assert_eq!(status.active.release, 1);
    assert_eq!(status.active_pid, Some(old.pid));
    assert_eq!(status.switching, None);
    assert_eq!(status.restarts, 0);
    for _ in 0..20 {
        assert_eq!(h.whoami()?, old, "the old worker goes on serving");
    }
    let state = h.state()?;
    assert_eq!(
        state["active"],
        release_json(1, Path::new(WORKER)),
        "{state}"
    );
    assert_eq!(state["switching"], Value::Null, "{state}");
    Ok(())
}

#[test]
fn a_supervisor_killed_mid_switch_resolves_to_a_runnable_release() -> io::Result<()> {
    let mut h = Harness::new("127.42.0.1")?;
    let worker = Path::new(WORKER);
    h.start_supervisor(1, worker)?;
    let first = h.wait_active("release 1 serves", 1);

    // Killed mid-switch to a good release: on restart it commits release 2.
    h.kill_supervisor()?;
    wait_gone(first.pid, "the worker dies with its supervisor");
    h.write_state(&serde_json::json!({
        "active": release_json(1, worker),
        "switching": release_json(2, worker),
    }))?;
    h.start_supervisor(1, worker)?;
    let second = h.wait_active("the interrupted switch commits", 2);
    let state = h.state()?;
    assert_eq!(state["active"], release_json(2, worker), "{state}");
    assert_eq!(state["switching"], Value::Null, "{state}");

    // Killed mid-switch to a release that cannot start: it reverts.
    h.kill_supervisor()?;
    wait_gone(second.pid, "the worker dies with its supervisor");
    let fail_start = h.release_binary("release-3-fail-start", "--fail-start")?;
    h.write_state(&serde_json::json!({
        "active": release_json(2, worker),
        "switching": release_json(3, &fail_start),
    }))?;
    h.start_supervisor(1, worker)?;
    let third = h.wait_active("the interrupted switch reverts", 2);
    let state = h.state()?;
    assert_eq!(state["active"], release_json(2, worker), "{state}");
    assert_eq!(state["switching"], Value::Null, "{state}");

    // Even the active release cannot start (its binary is missing): the
    // supervisor keeps retrying with backoff and serves once it can.
    h.kill_supervisor()?;
    wait_gone(third.pid, "the worker dies with its supervisor");
    let missing = h.dir.path().join("release-5");
    h.write_state(&serde_json::json!({
        "active": release_json(5, &missing),
        "switching": release_json(6, &fail_start),
    }))?;
    h.start_supervisor(1, worker)?;
    h.wait_status("the supervisor retries release 5", |s| {
        s.switching.is_none() && s.active.release == 5 && s.active_pid.is_none()
    });
    // A client connecting now waits in the backlog instead of being refused.
    let waiting = http_send(h.addr, "/whoami")?;
    let waiting = thread::spawn(move || http_answer(waiting));
    h.release_binary("release-5", "")?;
    let (code, body) = waiting
        .join()
        .map_err(|_| io::Error::other("client thread panicked"))??;
    assert_eq!(parse_whoami(code, &body)?.release, 5);
    h.wait_active("release 5 serves", 5);
    let state = h.state()?;
    assert_eq!(state["active"], release_json(5, &missing), "{state}");
    assert_eq!(state["switching"], Value::Null, "{state}");
    Ok(())
}

#[test]
fn a_crashed_worker_is_restarted_and_no_connection_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.43.0.1")?;
    h.start_supervisor(1, Path::new(WORKER))?;
    let mut current = h.wait_active("release 1 serves", 1);
    for crash in 1..=2u64 {
        signal(current.pid, Signal::SIGKILL);
        wait_gone(current.pid, "the killed worker");
        // Every request gets an answer: the first ones wait in the backlog
        // until the restarted worker accepts.
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.push(h.whoami()?);
        }
        assert!(
            seen.iter().all(|w| w.release == 1 && w.pid != current.pid),
            "{seen:?}"
        );
        current = seen[0];
        let status = h.wait_status("the restarted worker is active", |s| {
            s.active_pid == Some(current.pid)
        });
        assert_eq!(status.restarts, crash);
    }
    let state = h.state()?;
    assert_eq!(
        state["active"],
        release_json(1, Path::new(WORKER)),
        "{state}"
    );
    assert_eq!(state["switching"], Value::Null, "{state}");
    Ok(())
}

/// The experiment behind the spawner's design (see spawn.rs): a child forked
/// with PDEATHSIG by one thread is SIGKILLed when another thread of its
/// parent execs (the forking thread exits with every other thread), and
/// lives on, still a child of the same pid, when the forking thread itself
/// execs.
#[test]
fn pdeathsig_fires_when_another_thread_execs_not_when_the_forking_thread_does() -> io::Result<()> {
    for (mode, survives) in [("other-thread", false), ("same-thread", true)] {
        let mut probe = Command::new(SUPERVISOR)
            .args(["--pdeathsig-probe", mode])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut strays = Strays {
            comm: "sleep",
            pids: vec![probe.id()],
        };
        let mut line = String::new();
        if let Some(stdout) = probe.stdout.take() {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        let child: u32 = line
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("{mode}: no child pid in {line:?}: {e}")))?;
        strays.pids.push(child);

        // Wait until the probe runs `sleep`: the exec is over.
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        while fs::read_to_string(format!("/proc/{}/comm", probe.id()))
            .map(|comm| comm.trim() != "sleep")
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "{mode}: the probe never exec'd");
            thread::sleep(Duration::from_millis(POLL_MS));
        }
        if survives {
            // PDEATHSIG would have been sent before the exec completed.
            assert!(!is_gone(child), "{mode}: the child died");
            assert!(!sigkill_pending(child)?, "{mode}: the child got SIGKILL");
            assert_eq!(ppid_of(child)?, probe.id(), "{mode}: still our child");
        } else {
            wait_gone(
                child,
                "the child of a thread ended by another thread's exec",
            );
        }
        signal(probe.id(), Signal::SIGKILL);
        probe.wait()?;
    }
    Ok(())
}

#[test]
fn a_switch_to_another_binary_reexecutes_the_supervisor_which_keeps_its_worker() -> io::Result<()> {
    let mut h = Harness::new("127.44.0.1")?;
    let unknown = h.supervisor_copy("release-2")?;
    let next = h.supervisor_copy("release-3")?;
    let own = fs::canonicalize(SUPERVISOR)?;
    // Like `handover`, the supervisor's own binary is release 1's worker.
    h.start_supervisor(1, &own)?;
    let pid = h.supervisor_pid()?;
    let first = h.wait_active("release 1 serves", 1);
    let status = h.status()?;
    assert_eq!(status.binary, own);
    assert_eq!(status.sha256, sha256_of(&own)?);
    assert_eq!(status.active_sha256, Some(sha256_of(&own)?));
    assert_eq!(status.contracts, Some(CONTRACTS));
    assert_eq!(status.reexec, None);

    let load = Load::start(h.addr);

    // Contracts unknown: the worker runs the new binary, the supervisor
    // stays on its own and says why.
    let outcome = h.switch_direct(&Release::new(2, &unknown))?;
    assert!(
        matches!(outcome, Ok(SwitchOutcome::Switched { release: 2, .. })),
        "{outcome:?}"
    );
    h.wait_active("release 2 serves", 2);
    let status = h.wait_status("the supervisor says why it stays", |s| s.reexec.is_some());
    assert!(
        status
            .reexec
            .as_deref()
            .is_some_and(|r| r.contains("contracts are unknown")),
        "{status:?}"
    );
    assert_eq!(status.sha256, sha256_of(&own)?);
    assert_eq!(status.active_sha256, Some(sha256_of(&unknown)?));
    assert_eq!(exe_of(pid)?, own);

    // Contracts known: the supervisor re-executes into the new binary.
    let outcome = h.switch_direct(&release_with_contracts(3, &next))?;
    let Ok(SwitchOutcome::Switched {
        release: 3,
        pid: started,
    }) = outcome
    else {
        panic!("{outcome:?}");
    };
    let next_sha = sha256_of(&next)?;
    let status = h.wait_status("the supervisor runs release 3's binary", |s| {
        s.sha256 == next_sha && s.active_pid.is_some()
    });
    assert_eq!(h.supervisor_pid()?, pid, "exec keeps the pid");
    assert_eq!(exe_of(pid)?, next);
    assert_eq!(status.binary, next);
    assert_eq!(status.active.release, 3);
    assert_eq!(status.active_sha256, Some(next_sha.clone()));
    assert_eq!(status.reexec, None);
    assert_eq!(status.restarts, 0);

    // The worker started before the exec still serves, a child of the
    // same pid, and is the one the new image adopted.
    let worker = h.whoami_json()?;
    assert_eq!(worker["release"], 3, "{worker}");
    assert_eq!(worker["sha256"], next_sha.as_str(), "{worker}");
    let worker_pid = worker["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| io::Error::other(format!("{worker}")))?;
    assert_eq!(worker_pid, started, "adopted, not started again");
    assert_eq!(status.active_pid, Some(worker_pid));
    assert_eq!(ppid_of(worker_pid)?, pid);
    assert!(is_gone(first.pid));

    let releases = load.stop()?;
    assert_eq!(releases.first(), Some(&1));
    assert_eq!(releases.last(), Some(&3));
    for _ in 0..20 {
        assert_eq!(h.whoami()?.pid, worker_pid);
    }

    let state = h.state()?;
    assert_eq!(
        state["active"],
        serde_json::to_value(release_with_contracts(3, &next)).map_err(io::Error::other)?,
        "{state}"
    );
    assert_eq!(state["switching"], Value::Null, "{state}");

    // The new image goes on supervising: a crash of the adopted worker is
    // seen and restarted from the same binary.
    signal(worker_pid, Signal::SIGKILL);
    wait_gone(worker_pid, "the killed adopted worker");
    let restarted = h.wait_active("release 3 restarts", 3);
    assert_ne!(restarted.pid, worker_pid);
    assert_eq!(ppid_of(restarted.pid)?, pid);
    assert_eq!(h.status()?.restarts, 1);
    Ok(())
}

#[test]
fn a_supervisor_killed_before_its_reexec_restarts_from_the_old_binary_into_the_new_one(
) -> io::Result<()> {
    let mut h = Harness::new("127.45.0.1")?;
    let next = h.supervisor_copy("release-2")?;
    let own = fs::canonicalize(SUPERVISOR)?;
    h.start_supervisor_with(
        1,
        &own,
        &[("HANDOVER_TEST_SUPERVISOR_FAULT", "kill_before_reexec")],
    )?;
    let first = h.wait_active("release 1 serves", 1);

    // The switch commits, then the supervisor dies right before its exec;
    // the answer may or may not make it out first.
    let _ = h.switch_direct(&release_with_contracts(2, &next))?;
    let exit = h.wait_supervisor_exit("the supervisor kills itself before its exec")?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(9),
        "{exit:?}"
    );
    wait_gone(first.pid, "the old worker");
    let state = h.state()?;
    assert_eq!(
        state["active"],
        serde_json::to_value(release_with_contracts(2, &next)).map_err(io::Error::other)?,
        "{state}"
    );

    // The service manager starts the OLD binary again: it execs into the
    // active release's binary before it serves.
    h.start_supervisor(1, &own)?;
    let pid = h.supervisor_pid()?;
    let worker = h.wait_active("release 2 serves", 2);
    let next_sha = sha256_of(&next)?;
    let status = h.status()?;
    assert_eq!(status.sha256, next_sha);
    assert_eq!(status.binary, next);
    assert_eq!(exe_of(pid)?, next);
    assert_eq!(status.reexec, None);
    assert_eq!(ppid_of(worker.pid)?, pid);
    assert_eq!(h.whoami_json()?["sha256"], next_sha.as_str());

    // Started again, it stays on the new binary (no exec loop, no way back).
    h.stop_supervisor();
    wait_gone(worker.pid, "the worker stops with its supervisor");
    h.start_supervisor(1, &own)?;
    let pid = h.supervisor_pid()?;
    h.wait_active("release 2 serves again", 2);
    assert_eq!(exe_of(pid)?, next);
    assert_eq!(h.status()?.sha256, next_sha);
    Ok(())
}

#[test]
fn workers_see_their_digest_and_a_binary_of_another_digest_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.46.0.1")?;
    let worker = fs::canonicalize(WORKER)?;
    h.start_supervisor(1, &worker)?;
    let old = h.wait_active("release 1 serves", 1);
    let worker_sha = sha256_of(&worker)?;
    assert_eq!(h.whoami_json()?["sha256"], worker_sha.as_str());
    assert_eq!(h.status()?.active_sha256, Some(worker_sha.clone()));

    // Another digest than the expected one: refused, the old worker goes on.
    let wrong = "0".repeat(64);
    let (code, outcome) = h.switch_with(2, &worker, &format!("&sha256={wrong}"))?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    let reason = outcome["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&worker_sha) && reason.contains(&wrong),
        "{outcome}"
    );
    for _ in 0..20 {
        assert_eq!(h.whoami()?, old, "the old worker goes on serving");
    }
    let status = h.status()?;
    assert_eq!(
        (status.active.release, status.active_pid),
        (1, Some(old.pid))
    );
    assert_eq!(h.state()?["switching"], Value::Null);

    // The expected digest of a script release: exec'd by fd, it serves and
    // sees the digest of the script it was started from.
    let script = h.release_binary("release-3", "")?;
    let script_sha = sha256_of(&script)?;
    let (code, outcome) = h.switch_with(3, &script, &format!("&sha256={script_sha}"))?;
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "switched", "{outcome}");
    h.wait_active("release 3 serves", 3);
    assert_eq!(h.whoami_json()?["sha256"], script_sha.as_str());
    assert_eq!(
        h.state()?["active"]["sha256"],
        script_sha.as_str(),
        "the expected digest is kept"
    );

    // A binary of another worker or control contract is refused before
    // anything starts.
    for contracts in [
        Contracts {
            worker_cli: CONTRACTS.worker_cli + 1,
            ..CONTRACTS
        },
        Contracts {
            supervisor_control: CONTRACTS.supervisor_control + 1,
            ..CONTRACTS
        },
    ] {
        let to = Release {
            contracts: Some(contracts),
            ..Release::new(4, &worker)
        };
        match h.switch_direct(&to)? {
            Err(SupervisorError::Refused { code, .. }) => {
                assert_eq!(code, "incompatible_contracts")
            }
            other => panic!("{contracts:?}: {other:?}"),
        }
    }
    assert_eq!(h.status()?.active.release, 3);
    Ok(())
}

#[test]
fn a_new_supervisor_image_that_fails_at_start_is_not_exec_d_again() -> io::Result<()> {
    let mut h = Harness::new("127.47.0.1")?;
    let broken = h.supervisor_copy("release-2")?;
    let own = fs::canonicalize(SUPERVISOR)?;
    // Inherited across the exec: the new image fails at start.
    h.start_supervisor_with(
        1,
        &own,
        &[("HANDOVER_TEST_SUPERVISOR_FAULT", "exit_after_reexec")],
    )?;
    h.wait_active("release 1 serves", 1);
    let outcome = h.switch_direct(&release_with_contracts(2, &broken))?;
    assert!(
        matches!(outcome, Ok(SwitchOutcome::Switched { release: 2, .. })),
        "{outcome:?}"
    );
    let exit = h.wait_supervisor_exit("the new image fails at start")?;
    assert_eq!(exit.code(), Some(1), "{exit:?}");

    // Started again from the old binary, it does not exec into the binary
    // that did not come up: it serves release 2 from its own binary and says
    // why.
    h.start_supervisor(1, &own)?;
    let pid = h.supervisor_pid()?;
    let worker = h.wait_active("release 2 serves", 2);
    let status = h.wait_status("the supervisor says why it stays", |s| s.reexec.is_some());
    assert!(
        status
            .reexec
            .as_deref()
            .is_some_and(|r| r.contains("did not come up")),
        "{status:?}"
    );
    assert_eq!(status.sha256, sha256_of(&own)?);
    assert_eq!(exe_of(pid)?, own);
    assert_eq!(ppid_of(worker.pid)?, pid);
    Ok(())
}
