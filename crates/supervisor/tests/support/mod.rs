//! What the process tests use besides their harness: a plain HTTP client
//! of the worker fixture (`/whoami`, requests left pending, a load loop),
//! polling with a bound, and what `/proc` says about a process.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bound on one HTTP request of a test client (connect + answer); requests
/// may wait in the backlog while a worker restarts, never longer.
pub const REQUEST_TIMEOUT_MS: u64 = 20_000;
/// Bound on waiting for a condition (a worker serving, a process gone).
pub const WAIT_MS: u64 = 30_000;
/// Pause between polls of a condition.
pub const POLL_MS: u64 = 20;
/// Pause between two requests of the load loop.
pub const LOAD_PAUSE_MS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whoami {
    pub release: u64,
    pub pid: u32,
}

pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

pub fn is_test_worker(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("handover-test-worker"))
        .unwrap_or(false)
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
pub fn is_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

pub fn wait_gone(pid: u32, what: &str) {
    wait_until(
        &format!("{what}: pid {pid} gone"),
        || Ok(is_gone(pid)),
        |gone| *gone,
    );
}

/// Polls `get` until it gives a value `accept` likes, for at most
/// `WAIT_MS`; panics with `what` and the last value (or error) seen.
pub fn wait_until<T: std::fmt::Debug>(
    what: &str,
    mut get: impl FnMut() -> io::Result<T>,
    accept: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    let mut last = String::new();
    while Instant::now() < deadline {
        match get() {
            Ok(value) if accept(&value) => return value,
            Ok(value) => last = format!("{value:?}"),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(POLL_MS));
    }
    panic!("{what}: not within {WAIT_MS} ms (last: {last})");
}

/// Runs `future` (a call of the supervisor's client) to its end.
pub fn block_on<F: std::future::Future>(future: F) -> io::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}

/// One `GET` over a fresh connection; HTTP status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_answer(http_send(addr, path)?)
}

/// Connects and sends `GET path`: once this returns, the connection is in
/// the socket's accept queue (or already accepted), in order.
pub fn http_send(addr: SocketAddr, path: &str) -> io::Result<TcpStream> {
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
pub fn http_answer(stream: TcpStream) -> io::Result<(u16, String)> {
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

pub fn parse_whoami(code: u16, body: &str) -> io::Result<Whoami> {
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

/// A request sent now (so it is queued in order) and answered on a thread.
pub struct Pending(thread::JoinHandle<io::Result<(u16, String)>>);

impl Pending {
    pub fn send(addr: SocketAddr, path: &str) -> io::Result<Pending> {
        let stream = http_send(addr, path)?;
        Ok(Pending(thread::spawn(move || http_answer(stream))))
    }

    /// The answer, read as a `/whoami` answer.
    pub fn whoami(self) -> io::Result<Whoami> {
        let (code, body) = self
            .0
            .join()
            .map_err(|_| io::Error::other("client thread panicked"))??;
        parse_whoami(code, &body)
    }
}

/// Sequential GETs of `/whoami` from a thread, from `start` until `stop`:
/// every one must be answered.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(Vec<String>, Vec<u64>)>,
}

/// At least this many requests, so the load spans the whole change.
pub const MIN_LOAD_REQUESTS: usize = 200;
/// Bound on the requests of one load loop.
pub const MAX_LOAD_REQUESTS: usize = 20_000;
/// Requests answered before `Load::start` returns.
pub const LOAD_WARMUP_REQUESTS: usize = 20;

impl Load {
    pub fn start(addr: SocketAddr) -> Load {
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
    pub fn stop(self) -> io::Result<Vec<u64>> {
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

    /// Stops the loop and checks the first answer came from release `from`
    /// and the last from release `to`.
    pub fn stop_from_to(self, from: u64, to: u64) -> io::Result<()> {
        let releases = self.stop()?;
        assert_eq!(releases.first(), Some(&from));
        assert_eq!(releases.last(), Some(&to));
        Ok(())
    }
}

pub fn sha256_of(path: &Path) -> io::Result<String> {
    let digest = Sha256::digest(fs::read(path)?);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
pub fn ppid_of(pid: u32) -> io::Result<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no ppid in {stat:?}")))
}

/// The command name of `pid`, from `/proc/PID/comm`.
pub fn comm_of(pid: u32) -> io::Result<String> {
    Ok(fs::read_to_string(format!("/proc/{pid}/comm"))?
        .trim()
        .to_owned())
}

pub fn exe_of(pid: u32) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe"))
}

/// Whether SIGKILL is pending for `pid` (it was sent, the process has not
/// died yet).
pub fn sigkill_pending(pid: u32) -> io::Result<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    Ok(status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|mask| u64::from_str_radix(mask, 16).ok())
        .any(|mask| mask & SIGKILL_BIT != 0))
}

/// Pids a test started outside the harness, SIGKILLed on drop if they
/// still run `comm`.
pub struct Strays {
    pub comm: &'static str,
    pub pids: Vec<u32>,
}

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in &self.pids {
            if comm_of(*pid).is_ok_and(|comm| comm == self.comm) {
                signal(*pid, Signal::SIGKILL);
            }
        }
    }
}
