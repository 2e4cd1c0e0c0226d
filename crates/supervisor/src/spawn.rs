//! Starting a worker process on the inherited listening socket.
//!
//! Every spawn runs on one dedicated thread that lives as long as the
//! supervisor: `PR_SET_PDEATHSIG` fires when the *thread* that forked the
//! child exits, not the process, so forking from a runtime thread that may
//! be retired would kill a healthy worker.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;
use std::thread;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// The systemd convention: passed sockets start at fd 3.
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// Env vars the supervisor sets for a worker; copies inherited from the
/// supervisor's own environment are dropped so they cannot contradict.
const OWN_ENV_KEYS: [&str; 6] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    crate::ENV_SUPERVISOR_SOCK,
    crate::ENV_WORKER,
    crate::ENV_READY_TIMEOUT_MS,
];

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for the decimal digits of any pid_t plus the NUL.
const LISTEN_PID_DIGITS_BYTES: usize = 21;

/// What to start: the binary, its argv after the binary, the env vars to add
/// (besides `LISTEN_PID`, which only the child knows) and the listener fd.
pub(crate) struct SpawnPlan {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, OsString)>,
    pub listen_fd: RawFd,
}

struct Job {
    plan: SpawnPlan,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Owner of the spawning thread.
pub(crate) struct Spawner {
    jobs: Option<std_mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Spawner {
    /// Starts the spawning thread; `runtime` is entered there so the
    /// children are tokio children (reaped through the runtime's SIGCHLD
    /// driver).
    pub(crate) fn start(runtime: tokio::runtime::Handle) -> io::Result<Spawner> {
        let (jobs, queue) = std_mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("supervisor-spawner".to_string())
            .spawn(move || {
                let _entered = runtime.enter();
                while let Ok(job) = queue.recv() {
                    // The receiver is gone only if the supervisor stopped
                    // waiting; kill_on_drop then stops the child.
                    let _ = job.reply.send(spawn_now(job.plan));
                }
            })?;
        Ok(Spawner {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub(crate) async fn spawn(&self, plan: SpawnPlan) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("spawner stopped"))?;
        jobs.send(Job { plan, reply })
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("spawner thread dropped the job"))?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            // The thread ends as soon as the channel is closed.
            let _ = thread.join();
        }
    }
}

fn spawn_now(plan: SpawnPlan) -> io::Result<Child> {
    let mut exec = ChildExec::new(&plan)?;
    let mut command = Command::new(&plan.binary);
    command
        .args(&plan.args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child between fork and exec,
    // where only async-signal-safe work is allowed. `exec_in_child` only
    // calls prctl, getppid, getpid, fcntl, dup2 and execve, writes digits
    // into a buffer it already owns and allocates nothing; every pointer it
    // passes to execve points into CStrings owned by the closure.
    unsafe {
        command.pre_exec(move || exec.exec_in_child());
    }
    command.spawn()
}

/// Everything the child needs to exec, prepared before the fork so the child
/// allocates nothing. The env is passed to execve directly rather than set
/// with setenv in the child: std replaces `environ` with its own copy right
/// before exec, and setenv after a fork in a threaded process may allocate
/// or take a lock another thread held.
struct ChildExec {
    listen_fd: RawFd,
    parent_pid: libc::pid_t,
    path: CString,
    _argv: Vec<CString>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits, filled in the child.
    listen_pid: Vec<u8>,
    /// NULL-terminated pointer arrays, stored as addresses so the closure
    /// stays Send + Sync; they point into the owned CStrings above.
    argv_ptrs: Vec<usize>,
    envp_ptrs: Vec<usize>,
}

impl ChildExec {
    fn new(plan: &SpawnPlan) -> io::Result<ChildExec> {
        let path = c_string(plan.binary.as_os_str())?;
        let mut argv = vec![path.clone()];
        for arg in &plan.args {
            argv.push(c_string(OsStr::new(arg))?);
        }

        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            let own = key
                .to_str()
                .is_some_and(|k| OWN_ENV_KEYS.contains(&k) || plan.env.iter().any(|(o, _)| o == k));
            if !own {
                env.push(env_entry(&key, &value)?);
            }
        }
        for (key, value) in &plan.env {
            env.push(env_entry(OsStr::new(key), value)?);
        }

        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + LISTEN_PID_DIGITS_BYTES, 0);

        let mut argv_ptrs: Vec<usize> = argv.iter().map(|a| a.as_ptr() as usize).collect();
        argv_ptrs.push(0);
        let mut envp_ptrs: Vec<usize> = env.iter().map(|e| e.as_ptr() as usize).collect();
        envp_ptrs.push(listen_pid.as_ptr() as usize);
        envp_ptrs.push(0);

        let parent_pid = libc::pid_t::try_from(std::process::id())
            .map_err(|_| io::Error::other("own pid does not fit pid_t"))?;
        Ok(ChildExec {
            listen_fd: plan.listen_fd,
            parent_pid,
            path,
            _argv: argv,
            _env: env,
            listen_pid,
            argv_ptrs,
            envp_ptrs,
        })
    }

    /// Puts the listener at fd 3, records our own pid in `LISTEN_PID`, makes
    /// the kernel SIGKILL us if the supervisor dies, and execs the worker.
    /// Returns only on failure.
    ///
    /// # Safety
    ///
    /// Call only in the forked child before exec (from `pre_exec`).
    unsafe fn exec_in_child(&mut self) -> io::Result<()> {
        // A worker must never outlive a SIGKILLed supervisor: it would keep
        // serving a release nobody supervises.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) == -1
        {
            return Err(io::Error::last_os_error());
        }
        // The supervisor may have died before the prctl took effect.
        if libc::getppid() != self.parent_pid {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }

        if self.listen_fd == LISTEN_FDS_START {
            // dup2 onto itself would keep FD_CLOEXEC; clear it instead.
            if libc::fcntl(LISTEN_FDS_START, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(self.listen_fd, LISTEN_FDS_START) == -1 {
            return Err(io::Error::last_os_error());
        }

        // Decimal digits of our pid, right-aligned in a stack buffer.
        let mut pid = libc::getpid().unsigned_abs();
        let mut digits = [0u8; LISTEN_PID_DIGITS_BYTES];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (pid % 10) as u8;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let text = &digits[start..];
        let slot = &mut self.listen_pid[LISTEN_PID_PREFIX.len()..];
        slot[..text.len()].copy_from_slice(text);
        slot[text.len()] = 0;

        libc::execve(
            self.path.as_ptr(),
            self.argv_ptrs.as_ptr() as *const *const libc::c_char,
            self.envp_ptrs.as_ptr() as *const *const libc::c_char,
        );
        Err(io::Error::last_os_error())
    }
}

fn c_string(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{text:?} contains a NUL byte"),
        )
    })
}

fn env_entry(key: &OsStr, value: &OsStr) -> io::Result<CString> {
    let mut entry = key.as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    CString::new(entry).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("env var {key:?} contains a NUL byte"),
        )
    })
}
