//! Starting a worker process on the inherited listening socket, and
//! replacing the supervisor's own image with a new binary.
//!
//! Every spawn runs on one dedicated thread that lives as long as the
//! supervisor: `PR_SET_PDEATHSIG` fires when the *thread* that forked the
//! child exits, not the process, so forking from a runtime thread that may
//! be retired would kill a healthy worker.
//!
//! The supervisor's own `execve` runs on that same thread, for the same
//! reason: `execve` in a threaded process first ends every other thread, and
//! each of those exits counts as the death of the parent for the children it
//! forked (the kernel's `forget_original_parent` sends their PDEATHSIG). The
//! thread that calls `execve` does not exit: it becomes the only thread of
//! the new image, keeping the process's pid, so the workers it forked keep
//! running and stay our children. `tests/process.rs` checks both sides of
//! this with real processes (`pdeathsig_*` tests). It follows that only
//! workers this image spawned may be alive when it execs: a worker adopted
//! from an earlier image was forked by what is now the main thread, which
//! the exec would end (the supervisor retires and reaps such a worker
//! before it may exec again).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;
use std::thread;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::digest::Opened;

/// The systemd convention: passed sockets start at fd 3.
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// Env vars the supervisor sets for a worker; copies inherited from the
/// supervisor's own environment are dropped so they cannot contradict.
/// The supervisor's own hand-off markers are dropped too: they are meant for
/// a new image of the supervisor, never for a worker.
const OWN_ENV_KEYS: [&str; 9] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    crate::ENV_SUPERVISOR_SOCK,
    crate::ENV_WORKER,
    crate::ENV_READY_TIMEOUT_MS,
    crate::ENV_BINARY_SHA256,
    crate::ENV_SUPERVISOR_HANDOFF,
    crate::ENV_SUPERVISOR_EXECED_AT_START,
];

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for the decimal digits of any pid_t plus the NUL.
const LISTEN_PID_DIGITS_BYTES: usize = 21;

/// What to start: the binary (its path is argv[0]; the exec goes through
/// the open, hashed file), its argv after the binary, the env vars to add
/// (besides `LISTEN_PID`, which only the child knows) and the listener fd.
pub(crate) struct SpawnPlan {
    pub binary: PathBuf,
    pub exec: Opened,
    pub args: Vec<String>,
    pub env: Vec<(String, OsString)>,
    pub listen_fd: RawFd,
}

/// What to become: the open, hashed binary, the whole argv (argv[0]
/// included) and environment, and the fds the new image inherits (their
/// close-on-exec flag is cleared right before the exec and set again if it
/// fails).
pub(crate) struct ExecPlan {
    pub exec: Opened,
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub inherit_fds: Vec<RawFd>,
}

enum Job {
    Spawn {
        plan: SpawnPlan,
        reply: oneshot::Sender<io::Result<Child>>,
    },
    Exec {
        plan: ExecPlan,
        reply: oneshot::Sender<io::Error>,
    },
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
                    match job {
                        // The receiver is gone only if the supervisor stopped
                        // waiting; kill_on_drop then stops the child.
                        Job::Spawn { plan, reply } => {
                            let _ = reply.send(spawn_now(plan));
                        }
                        // Returns only if the exec failed.
                        Job::Exec { plan, reply } => {
                            let _ = reply.send(exec_now(plan));
                        }
                    }
                }
            })?;
        Ok(Spawner {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub(crate) async fn spawn(&self, plan: SpawnPlan) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Spawn { plan, reply })?;
        answer
            .await
            .map_err(|_| io::Error::other("spawner thread dropped the job"))?
    }

    /// Replaces this process's image, from the spawner thread (see the
    /// module doc). Returns only if the exec failed, with its error.
    pub(crate) async fn exec(&self, plan: ExecPlan) -> io::Error {
        let (reply, answer) = oneshot::channel();
        if let Err(e) = self.send(Job::Exec { plan, reply }) {
            return e;
        }
        answer
            .await
            .unwrap_or_else(|_| io::Error::other("spawner thread dropped the job"))
    }

    fn send(&self, job: Job) -> io::Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("spawner stopped"))?;
        jobs.send(job)
            .map_err(|_| io::Error::other("spawner thread is gone"))
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
    // Never exec'd by std: `exec_in_child` execs or fails the spawn.
    let mut command = Command::new(plan.exec.exec_path());
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
    // The parent's copy of the binary's fd closes when `plan` drops.
    command.spawn()
}

/// Clears close-on-exec on the fds the new image inherits and execs; on
/// failure sets it again and returns the error.
fn exec_now(plan: ExecPlan) -> io::Error {
    let prepared = (|| -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = c_string(plan.exec.exec_path().as_os_str())?;
        let argv = plan
            .argv
            .iter()
            .map(|a| c_string(a))
            .collect::<io::Result<Vec<_>>>()?;
        let env = plan
            .env
            .iter()
            .map(|(k, v)| env_entry(k, v))
            .collect::<io::Result<Vec<_>>>()?;
        Ok((path, argv, env))
    })();
    let (path, argv, env) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return e,
    };
    if argv.is_empty() {
        return io::Error::new(io::ErrorKind::InvalidInput, "empty argv");
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());

    let mut inherit = plan.inherit_fds.clone();
    if plan.exec.script {
        // The interpreter opens /proc/self/fd/N after the exec.
        inherit.push(plan.exec.fd.as_raw_fd());
    }
    for fd in &inherit {
        if let Err(e) = set_cloexec(*fd, false) {
            restore_cloexec(&inherit);
            return e;
        }
    }
    // SAFETY: every pointer points into a CString owned above and both
    // arrays end with NULL; execve returns only on failure.
    unsafe {
        libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
    }
    let e = io::Error::last_os_error();
    restore_cloexec(&inherit);
    e
}

fn restore_cloexec(fds: &[RawFd]) {
    for fd in fds {
        // Best effort: the fd is ours and open, so this does not fail.
        let _ = set_cloexec(*fd, true);
    }
}

pub(crate) fn set_cloexec(fd: RawFd, cloexec: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and write the fd's flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags == -1 {
            return Err(io::Error::last_os_error());
        }
        let flags = if cloexec {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Everything the child needs to exec, prepared before the fork so the child
/// allocates nothing. The env is passed to execve directly rather than set
/// with setenv in the child: std replaces `environ` with its own copy right
/// before exec, and setenv after a fork in a threaded process may allocate
/// or take a lock another thread held.
struct ChildExec {
    listen_fd: RawFd,
    /// The open binary; kept open across the exec only for a script.
    exec_fd: Option<RawFd>,
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
        let path = c_string(plan.exec.exec_path().as_os_str())?;
        let mut argv = vec![c_string(plan.binary.as_os_str())?];
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
            exec_fd: plan.exec.script.then(|| plan.exec.fd.as_raw_fd()),
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
        // A script's interpreter opens /proc/self/fd/N after the exec; the fd
        // is at least 4, so the dup2 above cannot have replaced it.
        if let Some(fd) = self.exec_fd {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
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
