//! Subnets for process tests: a fleet puts its controller and nodes on
//! `127.<subnet>.0.<n>`, so two fleets on the same subnet collide. Each test
//! claims one with [`claim`] and keeps the [`Subnet`] guard as long as its
//! fleet runs; no other thread or process gets that number meanwhile.
//!
//! A claim is an exclusive, non-blocking `flock(2)` on
//! `<temp dir>/handover-test-subnets/<n>.lock`, so it holds across test
//! binaries (and cargo-nextest's process per test) and is released when the
//! guard drops or its process dies (processes share claims if they agree
//! on `TMPDIR`). Claims go to the subnet unused longest (the lock file's
//! mtime is touched at claim and release), so a subnet is not handed out
//! again while the processes of the fleet that just dropped it may still be
//! exiting.
//!
//! The range [`FIRST`]`..=`[`LAST`] avoids what runs outside the tests: the
//! bench's 127.50-59 and the demo's default 127.201 and 127.202.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The first subnet tests claim.
pub const FIRST: u8 = 100;
/// The last subnet tests claim.
pub const LAST: u8 = 199;
/// How long [`claim`] waits, in all, for a subnet when every one is held.
pub const CLAIM_WAIT: Duration = Duration::from_secs(120);
/// Pause between two rounds over every subnet while all are held.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The directory (below the temp dir) of the lock files.
pub const LOCK_DIR: &str = "handover-test-subnets";

/// A claimed subnet, exclusively this guard's until it drops.
#[derive(Debug)]
pub struct Subnet {
    n: u8,
    lock: Flock<File>,
}

impl Subnet {
    /// The second octet of `127.<n>.0.<host>`.
    pub fn get(&self) -> u8 {
        self.n
    }
}

impl std::ops::Deref for Subnet {
    type Target = u8;
    fn deref(&self) -> &u8 {
        &self.n
    }
}

impl Drop for Subnet {
    fn drop(&mut self) {
        // Marks it used just now (the lock itself goes with the file).
        let _ = self.lock.set_modified(SystemTime::now());
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join(LOCK_DIR)
}

/// Claims a free subnet of [`FIRST`]`..=`[`LAST`], waiting up to
/// [`CLAIM_WAIT`] while every one is held; panics, naming the lock
/// directory, if none became free. For tests: see [`try_claim`].
pub fn claim() -> Subnet {
    try_claim(FIRST..=LAST, CLAIM_WAIT).unwrap_or_else(|e| panic!("no test subnet: {e}"))
}

/// Claims a free subnet of `range`, the one unused longest first. While
/// every one is held, tries again every [`RETRY_PAUSE`] for up to `wait`,
/// then fails naming the range and the lock directory.
pub fn try_claim(range: std::ops::RangeInclusive<u8>, wait: Duration) -> io::Result<Subnet> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut candidates: Vec<(SystemTime, u8)> = range
            .clone()
            .map(|n| {
                let used = std::fs::metadata(dir.join(format!("{n}.lock")))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (used, n)
            })
            .collect();
        candidates.sort();
        for (_, n) in candidates {
            if let Some(subnet) = try_one(&dir, n)? {
                return Ok(subnet);
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "every subnet of {}..={} stayed held for {wait:?} (locks in {}); \
                     fewer tests at once, or stale processes holding them?",
                    range.start(),
                    range.end(),
                    dir.display()
                ),
            ));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// Subnet `n` if no one holds it.
fn try_one(dir: &std::path::Path, n: u8) -> io::Result<Option<Subnet>> {
    let path = dir.join(format!("{n}.lock"));
    let opened = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path);
    // Another user's lock file: flock(2) needs only a read-only descriptor.
    let file = match opened {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => File::open(&path),
        other => other,
    }
    .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = lock.set_modified(SystemTime::now());
            Ok(Some(Subnet { n, lock }))
        }
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::other(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A range of its own, so these tests never take what process tests use.
    const RANGE: std::ops::RangeInclusive<u8> = 240..=243;

    #[test]
    fn held_claims_never_share_a_number_and_a_dropped_one_is_claimed_again() {
        let held: Vec<Subnet> = (0..4)
            .map(|_| try_claim(RANGE, Duration::ZERO).unwrap())
            .collect();
        let numbers: HashSet<u8> = held.iter().map(Subnet::get).collect();
        assert_eq!(numbers, RANGE.collect::<HashSet<u8>>());
        // All held: no fifth, after the bounded wait, with a clear message.
        let err = try_claim(RANGE, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("240..=243"), "{err}");
        // One dropped: exactly that one comes back.
        let mut held = held;
        let freed = held.remove(1).get();
        let again = try_claim(RANGE, Duration::ZERO).unwrap();
        assert_eq!(*again, freed);
    }

    #[test]
    fn claims_from_many_threads_are_exclusive() {
        let range = 244..=251;
        let claims: Vec<Subnet> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| try_claim(range.clone(), Duration::from_secs(5)).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let numbers: HashSet<u8> = claims.iter().map(Subnet::get).collect();
        assert_eq!(numbers.len(), 8, "{claims:?}");
    }

    /// Another process (util-linux `flock`) cannot take a held subnet's
    /// lock, and can once the guard is dropped.
    #[test]
    fn a_claim_excludes_other_processes_until_dropped() {
        let other_process_locks = |n: u8| -> Option<bool> {
            let path = lock_dir().join(format!("{n}.lock"));
            let out = std::process::Command::new("flock")
                .args(["--nonblock", "--conflict-exit-code", "75"])
                .arg(&path)
                .arg("true")
                .status()
                .ok()?;
            Some(out.success())
        };
        let held = try_claim(252..=252, Duration::ZERO).unwrap();
        let Some(locked) = other_process_locks(held.get()) else {
            eprintln!("no `flock` command here; skipping the cross-process check");
            return;
        };
        assert!(!locked, "another process took subnet {} while held", *held);
        drop(held);
        assert_eq!(other_process_locks(252), Some(true));
    }

    #[test]
    fn the_default_range_avoids_the_bench_and_the_demo() {
        let range = FIRST..=LAST;
        assert!(!range.contains(&50) && !range.contains(&59));
        assert!(!range.contains(&201) && !range.contains(&202));
    }
}
