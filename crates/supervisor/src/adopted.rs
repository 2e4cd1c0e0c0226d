//! A worker process: one this image spawned (a tokio `Child`), or one an
//! earlier image of this same process spawned and handed over across its
//! `execve` (same pid, so still our child, but unknown to this runtime).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;

/// Pause between two non-blocking `waitpid`s of an adopted worker: how late
/// its exit may be noticed.
const ADOPTED_POLL_MS: u64 = 50;

pub(crate) enum Proc {
    Spawned(Child),
    Adopted(Adopted),
}

/// A child this image did not spawn; reaped with `waitpid(pid)` (never
/// `waitpid(-1)`, which would steal tokio's children).
pub(crate) struct Adopted {
    pid: u32,
    /// Set once reaped: from then on the pid may belong to someone else.
    status: Option<ExitStatus>,
}

impl Adopted {
    /// `pid` if it is a child of this process (running or not yet reaped).
    pub(crate) fn new(pid: u32) -> io::Result<Adopted> {
        let mut adopted = Adopted { pid, status: None };
        adopted.try_wait()?;
        Ok(adopted)
    }

    fn raw_pid(&self) -> io::Result<libc::pid_t> {
        libc::pid_t::try_from(self.pid)
            .ok()
            .filter(|pid| *pid > 0)
            .ok_or_else(|| io::Error::other(format!("pid {} is not a pid", self.pid)))
    }

    /// Reaps it if it exited; Ok(None) while it runs. ECHILD: not our child.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let pid = self.raw_pid()?;
        let mut raw = 0;
        loop {
            // SAFETY: waitpid on one pid with WNOHANG writes only `raw`.
            let got = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
            if got == 0 {
                return Ok(None);
            }
            if got == pid {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                return Ok(Some(status));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Proc {
    /// The pid while it is not reaped.
    pub(crate) fn id(&self) -> Option<u32> {
        match self {
            Proc::Spawned(child) => child.id(),
            Proc::Adopted(adopted) => adopted.status.is_none().then_some(adopted.pid),
        }
    }

    /// Whether an earlier image of this process spawned it.
    pub(crate) fn is_adopted(&self) -> bool {
        matches!(self, Proc::Adopted(_))
    }

    /// Waits for the exit and reaps. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Proc::Spawned(child) => child.wait().await,
            Proc::Adopted(adopted) => loop {
                if let Some(status) = adopted.try_wait()? {
                    return Ok(status);
                }
                tokio::time::sleep(Duration::from_millis(ADOPTED_POLL_MS)).await;
            },
        }
    }

    /// Sends SIGKILL unless already reaped.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match self {
            Proc::Spawned(child) => child.start_kill(),
            Proc::Adopted(adopted) => {
                if adopted.try_wait()?.is_some() {
                    return Ok(());
                }
                let pid = adopted.raw_pid()?;
                // SAFETY: kill has no memory effects; the pid is our unreaped
                // child, so it cannot have been reused.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_adopted_child_is_waited_for_and_a_stranger_refused() -> io::Result<()> {
        // A std child is invisible to tokio, like an adopted worker.
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()?;
        let mut proc = Proc::Adopted(Adopted::new(child.id())?);
        assert!(proc.is_adopted());
        let status = proc.wait().await?;
        assert_eq!(status.code(), Some(7));
        assert_eq!(proc.id(), None);
        assert!(proc.start_kill().is_ok());

        // pid 1 is nobody's child here.
        assert!(Adopted::new(1).is_err());
        Ok(())
    }
}
