//! A host's cache of checked binaries, shared by the nodes of one machine
//! (`handover node --artifact-cache DIR`): the first node to stage an
//! artifact downloads it and links its checked binary here; every other
//! node of the host links it from here instead of downloading and writing
//! the same bytes again. A hard link shares the bytes on disk and in the
//! page cache. Each node still checks what it linked against its own signed
//! manifest (size and SHA-256) before it stages it, so a damaged or
//! tampered entry costs one download, never a wrong binary.
//!
//! ```text
//! DIR/<sha256>                     a binary whose bytes hash to <sha256> (a hard link)
//! DIR/<sha256>.lock                flock'd while a process looks up, fills or removes it
//! DIR/.tmp-<sha256>-<16 hex>       only while being published
//! ```
//!
//! Only processes of one user share a cache (it is made 0700): they can
//! already write each other's data dirs, so the cache adds no trust.
//! An entry no staged release links any more (link count 1) is removed by
//! [`HostCache::prune`], so the cache holds at most what the host's nodes
//! keep staged.

use crate::write::{fsync_dir, io_err, temp_path, IoError};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a process waiting for an entry another one holds tries again.
pub const CACHE_LOCK_POLL_MS: u64 = 50;
/// The suffix of an entry's lock file.
const LOCK_SUFFIX: &str = ".lock";

/// A host's cache directory.
#[derive(Clone, Debug)]
pub struct HostCache {
    dir: PathBuf,
}

/// One entry, held exclusively among the host's processes until dropped.
#[derive(Debug)]
pub struct Entry {
    path: PathBuf,
    dir: PathBuf,
    _lock: Flock<File>,
}

impl HostCache {
    /// The cache at `dir`, created (mode 0700) if it does not exist.
    pub fn open(dir: &Path) -> Result<HostCache, IoError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;
        Ok(HostCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry of the binary whose SHA-256 is `sha256` (64 lowercase hex
    /// digits, as a valid manifest names it), once no other process of
    /// the host holds it; `None` if one still does after `wait` (the
    /// caller then goes without the cache). Blocking: call it off the
    /// async threads.
    pub fn entry(&self, sha256: &str, wait: Duration) -> Result<Option<Entry>, IoError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io_err("name an entry", &self.dir)(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("{sha256:?} is not a SHA-256 in hex"),
            )));
        }
        let until = Instant::now() + wait;
        loop {
            if let Some(entry) = self.try_entry(sha256)? {
                return Ok(Some(entry));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(CACHE_LOCK_POLL_MS));
        }
    }

    /// The entry if no other process holds it now.
    fn try_entry(&self, sha256: &str) -> Result<Option<Entry>, IoError> {
        let lock_path = self.dir.join(format!("{sha256}{LOCK_SUFFIX}"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(io_err("lock", &lock_path)(e.into())),
        };
        // A pruning process removes a lock file while it holds it: a lock
        // taken on the removed file guards nothing, so try again.
        let held = lock.metadata().map_err(io_err("stat", &lock_path))?;
        match std::fs::metadata(&lock_path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("stat", &lock_path)(e)),
        }
        Ok(Some(Entry {
            path: self.dir.join(sha256),
            dir: self.dir.clone(),
            _lock: lock,
        }))
    }

    /// Removes every entry that no staged release links any more (link
    /// count 1) and that no process holds, with its lock file; returns
    /// what it removed. Blocking.
    pub fn prune(&self) -> Result<Vec<PathBuf>, IoError> {
        let mut removed = Vec::new();
        let listing = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for item in listing {
            let item = item.map_err(io_err("list", &self.dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let path = item.path();
            if !only_link(&path)? {
                continue;
            }
            let Some(entry) = self.try_entry(name)? else {
                continue;
            };
            // Checked again under the lock: a node may have linked it since.
            if only_link(&path)? {
                entry.remove()?;
                let lock_path = self.dir.join(format!("{name}{LOCK_SUFFIX}"));
                remove_if_present(&lock_path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

impl Entry {
    /// Links the cached binary at `dest` (which must not exist): true if
    /// there is one, false if the cache has none (or it sits on another
    /// file system than `dest`, where no hard link can reach).
    pub fn link_to(&self, dest: &Path) -> Result<bool, IoError> {
        match std::fs::hard_link(&self.path, dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) if e.kind() == ErrorKind::CrossesDevices => Ok(false),
            Err(e) => Err(io_err("link", dest)(e)),
        }
    }

    /// Makes the checked binary at `binary` this entry (replacing what it
    /// held): linked under a temporary name, then renamed, then the
    /// directory fsync'd. `binary` must have been checked against its
    /// manifest and fsync'd.
    pub fn publish(&self, binary: &Path) -> Result<(), IoError> {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let temp = temp_path(&self.dir, name);
        match std::fs::hard_link(binary, &temp) {
            Ok(()) => {}
            // Another file system: the cache cannot share this copy.
            Err(e) if e.kind() == ErrorKind::CrossesDevices => return Ok(()),
            Err(e) => return Err(io_err("link", &temp)(e)),
        }
        if let Err(e) = std::fs::rename(&temp, &self.path) {
            let _ = std::fs::remove_file(&temp);
            return Err(io_err("rename", &self.path)(e));
        }
        fsync_dir(&self.dir)
    }

    /// Removes the entry's binary (one that failed its check).
    pub fn remove(&self) -> Result<(), IoError> {
        remove_if_present(&self.path)
    }
}

/// Whether `path` is a file that nothing else links (false if absent).
fn only_link(path: &Path) -> Result<bool, IoError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => Ok(md.is_file() && md.nlink() == 1),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), IoError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_published_binary_is_linked_by_the_next_one_and_pruned_once_unlinked() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HostCache::open(&tmp.path().join("cache")).unwrap();
        let first = tmp.path().join("first");
        write(&first, b"binary");
        let entry = cache.entry(SHA, Duration::ZERO).unwrap().unwrap();
        assert!(!entry.link_to(&tmp.path().join("nothing")).unwrap());
        entry.publish(&first).unwrap();
        drop(entry);

        let second = tmp.path().join("second");
        let entry = cache.entry(SHA, Duration::ZERO).unwrap().unwrap();
        assert!(entry.link_to(&second).unwrap());
        drop(entry);
        assert_eq!(std::fs::read(&second).unwrap(), b"binary");
        let (a, b) = (
            std::fs::metadata(&first).unwrap(),
            std::fs::metadata(&second).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 3), "one file, three names");

        // Still linked by the nodes: kept.
        assert!(cache.prune().unwrap().is_empty());
        std::fs::remove_file(&first).unwrap();
        std::fs::remove_file(&second).unwrap();
        assert_eq!(cache.prune().unwrap(), vec![cache.dir().join(SHA)]);
        assert!(!cache.dir().join(SHA).exists());
        assert!(!cache.dir().join(format!("{SHA}.lock")).exists());
    }

    #[test]
    fn a_held_entry_is_neither_given_twice_nor_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HostCache::open(&tmp.path().join("cache")).unwrap();
        let first = tmp.path().join("first");
        write(&first, b"binary");
        let held = cache.entry(SHA, Duration::ZERO).unwrap().unwrap();
        held.publish(&first).unwrap();
        std::fs::remove_file(&first).unwrap();
        // flock is per open file: a second open in this process contends
        // as another process's would.
        let waited = cache
            .entry(SHA, Duration::from_millis(2 * CACHE_LOCK_POLL_MS))
            .unwrap();
        assert!(waited.is_none());
        assert!(cache.prune().unwrap().is_empty(), "pruned while held");
        drop(held);
        assert!(cache.entry(SHA, Duration::ZERO).unwrap().is_some());
    }

    #[test]
    fn a_name_that_is_not_a_digest_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HostCache::open(tmp.path()).unwrap();
        assert!(cache.entry("../etc", Duration::ZERO).is_err());
    }
}
