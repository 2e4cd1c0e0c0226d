//! Process tests: a real supervisor process (the `handover-test-supervisor`
//! fixture) running real workers (the `handover-test-worker` fixture) on
//! `127.4x.0.1`. Every process is killed when a test ends, pass or fail.

mod support;

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use handover_core::release::{Contracts, CONTRACTS};
use handover_supervisor::{
    Release, SupervisorClient, SupervisorError, SupervisorStatus, SwitchOutcome,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::{
    block_on, comm_of, exe_of, http_get, is_gone, is_test_worker, parse_whoami, ppid_of, sha256_of,
    sigkill_pending, signal, wait_gone, wait_until, Load, Pending, Strays, Whoami, POLL_MS,
};

const WORKER: &str = env!("CARGO_BIN_EXE_handover-test-worker");
const SUPERVISOR: &str = env!("CARGO_BIN_EXE_handover-test-supervisor");

/// Bound on a graceful stop of the supervisor when a test ends.
const STOP_MS: u64 = 20_000;
/// The supervisor's ready bound in these tests (keeps `--never-ready` short).
const READY_TIMEOUT_MS: u64 = 3_000;
/// The supervisor's stop grace in these tests.
const STOP_GRACE_MS: u64 = 5_000;
const PORT: u16 = 18_470;
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

    /// Starts the supervisor on release 1 of `binary` and waits until it
    /// serves; its first worker.
    fn start_serving(&mut self, binary: &Path) -> io::Result<Whoami> {
        self.start_supervisor(1, binary)?;
        Ok(self.wait_active("release 1 serves", 1))
    }

    /// Starts the supervisor fixture; its pid.
    fn start_supervisor(&mut self, release: u32, binary: &Path) -> io::Result<u32> {
        self.start_supervisor_with(release, binary, None)
    }

    /// The supervisor fixture with a test `fault` (its test hook).
    fn start_supervisor_with(
        &mut self,
        release: u32,
        binary: &Path,
        fault: Option<&str>,
    ) -> io::Result<u32> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(SUPERVISOR)
            .envs(fault.map(|f| ("HANDOVER_TEST_SUPERVISOR_FAULT", f)))
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
        let pid = child.id();
        self.supervisor = Some(child);
        Ok(pid)
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
        let exit = wait_until(
            &format!("{what}: the supervisor exits"),
            || child.try_wait(),
            Option::is_some,
        );
        self.supervisor = None;
        exit.ok_or_else(|| io::Error::other("no exit status"))
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
        Ok(self.seen(parse_whoami(code, &body)?))
    }

    /// Notes the worker that answered, to be killed on drop if still there.
    fn seen(&self, whoami: Whoami) -> Whoami {
        if let Ok(mut workers) = self.workers.lock() {
            if !workers.contains(&whoami.pid) {
                workers.push(whoami.pid);
            }
        }
        whoami
    }

    /// Waits until `/whoami` answers and `accept` likes the answer.
    fn wait_whoami(&self, what: &str, accept: impl Fn(&Whoami) -> bool) -> Whoami {
        wait_until(what, || self.whoami(), accept)
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

    /// The whole `/whoami` answer (release, pid, ppid, sha256), and the
    /// worker it names.
    fn whoami_json(&self) -> io::Result<(Whoami, Value)> {
        let (code, body) = self.get("/whoami")?;
        let whoami = self.seen(parse_whoami(code, &body)?);
        Ok((
            whoami,
            serde_json::from_str(&body).map_err(io::Error::other)?,
        ))
    }

    fn client(&self) -> SupervisorClient {
        SupervisorClient::new(self.state_dir().join("control.sock"), READY_TIMEOUT_MS)
    }

    /// A switch asked straight on the control socket, as an operator tool
    /// (or a worker) would.
    fn switch_direct(&self, to: &Release) -> io::Result<Result<SwitchOutcome, SupervisorError>> {
        block_on(self.client().switch(to))
    }

    /// A direct switch to `to` that must answer `switched`; the new worker's pid.
    fn switch_direct_ok(&self, to: &Release) -> io::Result<u32> {
        match self.switch_direct(to)? {
            Ok(SwitchOutcome::Switched { release, pid }) if release == to.release => Ok(pid),
            other => panic!("switch to {}: {other:?}", to.release),
        }
    }

    /// A copy of the supervisor fixture (which is also the worker) with a
    /// few bytes appended: an ELF still runs with trailing bytes, and the
    /// digest differs, as a new release's binary would.
    fn supervisor_copy(&self, name: &str) -> io::Result<PathBuf> {
        let mut bytes = fs::read(SUPERVISOR)?;
        bytes.extend_from_slice(format!("\0handover test release {name}\n").as_bytes());
        fs::canonicalize(self.install(name, &bytes)?)
    }

    /// An executable `name` in the test's dir: written then renamed into
    /// place, so it is never executed half-written.
    fn install(&self, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!("{name}.tmp"));
        fs::write(&tmp, bytes)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &path)?;
        Ok(path)
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
        block_on(self.client().status())?.map_err(io::Error::other)
    }

    fn wait_status(
        &self,
        what: &str,
        accept: impl Fn(&SupervisorStatus) -> bool,
    ) -> SupervisorStatus {
        wait_until(what, || self.status(), accept)
    }

    /// A release binary that runs the worker fixture with `flag`: releases
    /// live side by side as different binaries.
    fn release_binary(&self, name: &str, flag: &str) -> io::Result<PathBuf> {
        let script = format!("#!/bin/sh\nexec {WORKER} {flag} \"$@\"\n");
        self.install(name, script.as_bytes())
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

    /// A `/switch` (see [`Harness::switch_with`]) answered 200 with
    /// `outcome`; the answer.
    fn switch_answers(
        &self,
        release: u32,
        binary: &Path,
        extra: &str,
        outcome: &str,
    ) -> io::Result<Value> {
        let (code, answer) = self.switch_with(release, binary, extra)?;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["outcome"], outcome, "{answer}");
        Ok(answer)
    }

    /// A `/switch` that fails for a reason that says each of `reason`.
    fn switch_fails(
        &self,
        release: u32,
        binary: &Path,
        extra: &str,
        reason: &[&str],
    ) -> io::Result<()> {
        let answer = self.switch_answers(release, binary, extra, "failed")?;
        let said = answer["reason"].as_str();
        assert!(
            said.is_some_and(|r| reason.iter().all(|part| r.contains(part))),
            "{answer}"
        );
        Ok(())
    }

    /// The state file once nothing is switching: `active` and no switch.
    fn assert_settled(&self, active: &Value) -> io::Result<()> {
        let state = self.state()?;
        assert_eq!(state["active"], *active, "{state}");
        assert_eq!(state["switching"], Value::Null, "{state}");
        Ok(())
    }

    /// Twenty requests in a row, every one answered by a worker `serving`
    /// accepts; the workers that answered.
    fn assert_serves(
        &self,
        what: &str,
        serving: impl Fn(&Whoami) -> bool,
    ) -> io::Result<Vec<Whoami>> {
        let seen = (0..20)
            .map(|_| self.whoami())
            .collect::<io::Result<Vec<_>>>()?;
        assert!(seen.iter().all(serving), "{what}: {seen:?}");
        Ok(seen)
    }

    /// Waits until the supervisor says why it does not re-execute into the
    /// active release's binary, and checks the reason says `why`.
    fn wait_reexec_refused(&self, why: &str) -> SupervisorStatus {
        let status = self.wait_status("the supervisor says why it stays", |s| s.reexec.is_some());
        assert!(
            status.reexec.as_deref().is_some_and(|r| r.contains(why)),
            "{status:?}"
        );
        status
    }

    /// Kills the supervisor (its worker `worker_pid` dies with it), leaves
    /// the state of a switch from `active` to `switching` it was in the
    /// middle of, and starts it again.
    fn restart_mid_switch(
        &mut self,
        worker_pid: u32,
        active: Value,
        switching: Value,
    ) -> io::Result<()> {
        self.kill_supervisor()?;
        wait_gone(worker_pid, "the worker dies with its supervisor");
        self.write_state(&serde_json::json!({ "active": active, "switching": switching }))?;
        self.start_supervisor(1, Path::new(WORKER))?;
        Ok(())
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

fn release_json(release: u32, binary: &Path) -> Value {
    serde_json::json!({ "release": release, "binary": binary })
}

/// A release of the supervisor fixture's copy at `binary`, with this
/// build's contracts (so the supervisor may re-execute into it).
fn release_with_contracts(release: u32, binary: &Path) -> Release {
    Release {
        contracts: Some(CONTRACTS),
        ..Release::new(release, binary)
    }
}

#[test]
fn a_switch_under_load_refuses_no_request() -> io::Result<()> {
    let mut h = Harness::new("127.40.0.1")?;
    let old = h.start_serving(Path::new(WORKER))?;

    let addr = h.addr;
    let load = Load::start(addr);

    // A slow request in flight on the old worker must finish after SIGTERM.
    // It is queued before the switch request, and only the old worker
    // accepts until the switch is asked for, so the old worker serves it.
    let slow = Pending::send(addr, "/slow?ms=1500")?;

    let outcome = h.switch_answers(2, Path::new(WORKER), "", "switched")?;
    assert_eq!(outcome["release"], 2, "{outcome}");

    let new = h.wait_whoami("release 2 serves", |w| w.release == 2);
    assert_ne!(new.pid, old.pid);
    wait_gone(old.pid, "the old worker exits after SIGTERM");

    load.stop_from_to(1, 2)?;

    assert_eq!(
        slow.whoami()?,
        old,
        "the in-flight request finished on the old worker"
    );

    h.assert_serves("release 2 serves", |w| w.release == 2)?;
    h.assert_settled(&release_json(2, Path::new(WORKER)))?;
    let status = h.status()?;
    assert_eq!(status.active.release, 2);
    assert_eq!(status.active_pid, Some(new.pid));

    // Switching to what already runs changes nothing.
    h.switch_answers(2, Path::new(WORKER), "", "already_active")?;
    assert_eq!(h.whoami()?, new);
    Ok(())
}

#[test]
fn a_release_that_fails_to_start_or_never_becomes_ready_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.41.0.1")?;
    let fail_start = h.release_binary("release-2-fail-start", "--fail-start")?;
    let never_ready = h.release_binary("release-3-never-ready", "--never-ready")?;
    let old = h.start_serving(Path::new(WORKER))?;

    h.switch_fails(2, &fail_start, "", &["exited before it was ready"])?;
    assert_eq!(h.whoami()?, old);
    h.switch_fails(3, &never_ready, "", &["did not send ready"])?;

    // A binary that does not exist is refused before anything starts.
    let (code, answer) = h.switch_with(4, Path::new("/nonexistent/handover"), "")?;
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
    h.assert_serves("the old worker goes on serving", |w| *w == old)?;
    h.assert_settled(&release_json(1, Path::new(WORKER)))?;
    Ok(())
}

#[test]
fn a_supervisor_killed_mid_switch_resolves_to_a_runnable_release() -> io::Result<()> {
    let mut h = Harness::new("127.42.0.1")?;
    let worker = Path::new(WORKER);
    let first = h.start_serving(worker)?;

    // Killed mid-switch to a good release: on restart it commits release 2.
    h.restart_mid_switch(first.pid, release_json(1, worker), release_json(2, worker))?;
    let second = h.wait_active("the interrupted switch commits", 2);
    h.assert_settled(&release_json(2, worker))?;

    // Killed mid-switch to a release that cannot start: it reverts.
    let fail_start = h.release_binary("release-3-fail-start", "--fail-start")?;
    h.restart_mid_switch(
        second.pid,
        release_json(2, worker),
        release_json(3, &fail_start),
    )?;
    let third = h.wait_active("the interrupted switch reverts", 2);
    h.assert_settled(&release_json(2, worker))?;

    // Even the active release cannot start (its binary is missing): the
    // supervisor keeps retrying with backoff and serves once it can.
    let missing = h.dir.path().join("release-5");
    h.restart_mid_switch(
        third.pid,
        release_json(5, &missing),
        release_json(6, &fail_start),
    )?;
    h.wait_status("the supervisor retries release 5", |s| {
        s.switching.is_none() && s.active.release == 5 && s.active_pid.is_none()
    });
    // A client connecting now waits in the backlog instead of being refused.
    let waiting = Pending::send(h.addr, "/whoami")?;
    h.release_binary("release-5", "")?;
    assert_eq!(waiting.whoami()?.release, 5);
    h.wait_active("release 5 serves", 5);
    h.assert_settled(&release_json(5, &missing))?;
    Ok(())
}

#[test]
fn a_crashed_worker_is_restarted_and_no_connection_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.43.0.1")?;
    let mut current = h.start_serving(Path::new(WORKER))?;
    for crash in 1..=2u64 {
        signal(current.pid, Signal::SIGKILL);
        wait_gone(current.pid, "the killed worker");
        // Every request gets an answer: the first ones wait in the backlog
        // until the restarted worker accepts.
        let seen = h.assert_serves("the restarted worker", |w| {
            w.release == 1 && w.pid != current.pid
        })?;
        current = seen[0];
        let status = h.wait_status("the restarted worker is active", |s| {
            s.active_pid == Some(current.pid)
        });
        assert_eq!(status.restarts, crash);
    }
    h.assert_settled(&release_json(1, Path::new(WORKER)))?;
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
        wait_until(
            &format!("{mode}: the probe execs"),
            || comm_of(probe.id()),
            |comm| comm == "sleep",
        );
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
    let pid = h.start_supervisor(1, &own)?;
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
    h.switch_direct_ok(&Release::new(2, &unknown))?;
    h.wait_active("release 2 serves", 2);
    let status = h.wait_reexec_refused("contracts are unknown");
    assert_eq!(status.sha256, sha256_of(&own)?);
    assert_eq!(status.active_sha256, Some(sha256_of(&unknown)?));
    assert_eq!(exe_of(pid)?, own);

    // Contracts known: the supervisor re-executes into the new binary.
    let started = h.switch_direct_ok(&release_with_contracts(3, &next))?;
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
    let (adopted, worker) = h.whoami_json()?;
    let worker_pid = adopted.pid;
    assert_eq!(worker["release"], 3, "{worker}");
    assert_eq!(worker["sha256"], next_sha.as_str(), "{worker}");
    assert_eq!(worker_pid, started, "adopted, not started again");
    assert_eq!(status.active_pid, Some(worker_pid));
    assert_eq!(ppid_of(worker_pid)?, pid);
    assert!(is_gone(first.pid));

    load.stop_from_to(1, 3)?;
    h.assert_serves("the adopted worker serves", |w| w.pid == worker_pid)?;
    h.assert_settled(
        &serde_json::to_value(release_with_contracts(3, &next)).map_err(io::Error::other)?,
    )?;

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
    h.start_supervisor_with(1, &own, Some("kill_before_reexec"))?;
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
    let pid = h.start_supervisor(1, &own)?;
    let worker = h.wait_active("release 2 serves", 2);
    let next_sha = sha256_of(&next)?;
    let status = h.status()?;
    assert_eq!(status.sha256, next_sha);
    assert_eq!(status.binary, next);
    assert_eq!(exe_of(pid)?, next);
    assert_eq!(status.reexec, None);
    assert_eq!(ppid_of(worker.pid)?, pid);
    assert_eq!(h.whoami_json()?.1["sha256"], next_sha.as_str());

    // Started again, it stays on the new binary (no exec loop, no way back).
    h.stop_supervisor();
    wait_gone(worker.pid, "the worker stops with its supervisor");
    let pid = h.start_supervisor(1, &own)?;
    h.wait_active("release 2 serves again", 2);
    assert_eq!(exe_of(pid)?, next);
    assert_eq!(h.status()?.sha256, next_sha);
    Ok(())
}

#[test]
fn workers_see_their_digest_and_a_binary_of_another_digest_is_refused() -> io::Result<()> {
    let mut h = Harness::new("127.46.0.1")?;
    let worker = fs::canonicalize(WORKER)?;
    let old = h.start_serving(&worker)?;
    let worker_sha = sha256_of(&worker)?;
    assert_eq!(h.whoami_json()?.1["sha256"], worker_sha.as_str());
    assert_eq!(h.status()?.active_sha256, Some(worker_sha.clone()));

    // Another digest than the expected one: refused, the old worker goes on.
    let wrong = "0".repeat(64);
    h.switch_fails(
        2,
        &worker,
        &format!("&sha256={wrong}"),
        &[&worker_sha, &wrong],
    )?;
    h.assert_serves("the old worker goes on serving", |w| *w == old)?;
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
    h.switch_answers(3, &script, &format!("&sha256={script_sha}"), "switched")?;
    h.wait_active("release 3 serves", 3);
    assert_eq!(h.whoami_json()?.1["sha256"], script_sha.as_str());
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
fn a_new_supervisor_image_that_fails_at_start_twice_is_not_exec_d_again() -> io::Result<()> {
    let mut h = Harness::new("127.47.0.1")?;
    let broken = h.supervisor_copy("release-2")?;
    let own = fs::canonicalize(SUPERVISOR)?;
    // Inherited across the exec: the new image fails at start.
    h.start_supervisor_with(1, &own, Some("exit_after_reexec"))?;
    h.wait_active("release 1 serves", 1);
    h.switch_direct_ok(&release_with_contracts(2, &broken))?;
    let exit = h.wait_supervisor_exit("the new image fails at start")?;
    assert_eq!(exit.code(), Some(1), "{exit:?}");
    // Started again from the old binary, it tries once more (the first try
    // may have been cut short by a kill rather than the binary), and that
    // fails too.
    h.start_supervisor_with(1, &own, Some("exit_after_reexec"))?;
    let exit = h.wait_supervisor_exit("the new image fails at start again")?;
    assert_eq!(exit.code(), Some(1), "{exit:?}");

    // Started again, it does not exec into the binary that did not come up
    // twice: it serves release 2 from its own binary and says why.
    let pid = h.start_supervisor(1, &own)?;
    let worker = h.wait_active("release 2 serves", 2);
    let status = h.wait_reexec_refused("did not come up");
    assert_eq!(status.sha256, sha256_of(&own)?);
    assert_eq!(exe_of(pid)?, own);
    assert_eq!(ppid_of(worker.pid)?, pid);
    Ok(())
}
