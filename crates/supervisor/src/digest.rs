//! SHA-256 of exactly the bytes the supervisor executes.
//!
//! A binary is opened once; the digest is taken from that open file and the
//! exec goes through the same open file (`/proc/self/fd/N`), never through
//! the path again. Replacing or renaming the file at the path after it was
//! hashed changes nothing: the exec runs the inode that was hashed.
//!
//! Why `/proc/self/fd/N` and not a sealed in-memory copy (memfd): a memfd
//! would close the last window (a writer modifying the very inode in place
//! between the hash and the exec, which takes write permission on a release
//! file the supervisor's user owns), but the process would then run
//! `/memfd:… (deleted)`: `/proc/PID/exe` and `current_exe()` would no longer
//! name the release's file, which the supervisor itself relies on to know
//! what it runs, and the binary's pages would be copied per process.
//!
//! Scripts: for `#!` files the kernel passes `/proc/self/fd/N` to the
//! interpreter, which opens it after the exec, so the fd must survive the
//! exec (not close-on-exec) in that one case; `fexecve` of a close-on-exec
//! fd fails with ENOENT for a script. ELF binaries are exec'd with the fd
//! close-on-exec, so the new process does not inherit it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bound on the size of a binary the supervisor hashes and executes.
pub(crate) const BINARY_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Read size while hashing.
const HASH_CHUNK_BYTES: usize = 256 * 1024;
/// Length of a SHA-256 in hex.
pub(crate) const SHA256_HEX_LEN: usize = 64;
/// The lowest fd an opened binary may get: fds 0-2 are stdio and 3 is where
/// the listening socket goes in a worker, so `dup2` onto 3 in the child can
/// never close the binary's fd.
const BINARY_FD_MIN: RawFd = 4;

/// A binary opened for exec, and the digest of the bytes of that open file.
#[derive(Debug)]
pub(crate) struct Opened {
    /// Close-on-exec, at least [`BINARY_FD_MIN`].
    pub fd: OwnedFd,
    pub sha256: String,
    /// Starts with `#!`: the fd must stay open across the exec.
    pub script: bool,
}

impl Opened {
    /// The path that execs exactly this open file.
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Opens `path` and hashes the open file. Refuses anything but a regular
/// file of at most [`BINARY_MAX_BYTES`].
pub(crate) fn open_and_hash(path: &Path) -> io::Result<Opened> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > BINARY_MAX_BYTES {
        return Err(too_long(path));
    }
    let fd = fd_at_least(file, BINARY_FD_MIN)?;
    let mut reader = File::from(fd);
    let (sha256, head, len) = hash(&mut reader)?;
    if len > BINARY_MAX_BYTES {
        return Err(too_long(path));
    }
    Ok(Opened {
        fd: OwnedFd::from(reader),
        sha256,
        script: head.starts_with(b"#!"),
    })
}

fn too_long(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is longer than {BINARY_MAX_BYTES} bytes", path.display()),
    )
}

/// The digest of the file this process runs (`/proc/self/exe`, which opens
/// the running inode even if its path was replaced since) and its path.
pub(crate) fn own_binary() -> io::Result<(PathBuf, String)> {
    let path = std::fs::read_link("/proc/self/exe")?;
    let mut file = File::open("/proc/self/exe")?;
    let (sha256, _, _) = hash(&mut file)?;
    Ok((path, sha256))
}

/// Whether `text` is a SHA-256 as the supervisor writes it.
pub(crate) fn is_sha256_hex(text: &str) -> bool {
    text.len() == SHA256_HEX_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Digest, first bytes and length, reading at most `BINARY_MAX_BYTES + 1`.
fn hash(reader: &mut File) -> io::Result<(String, Vec<u8>, u64)> {
    let mut sha = Sha256::new();
    let mut head = Vec::new();
    let mut len: u64 = 0;
    let mut buf = vec![0u8; HASH_CHUNK_BYTES];
    let mut limited = reader.take(BINARY_MAX_BYTES + 1);
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if head.len() < 2 {
            head.extend_from_slice(&buf[..n.min(2 - head.len())]);
        }
        sha.update(&buf[..n]);
        len += n as u64;
    }
    Ok((to_hex(&sha.finalize()), head, len))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The same open file at an fd >= `min`, close-on-exec.
fn fd_at_least(file: File, min: RawFd) -> io::Result<OwnedFd> {
    let raw = file.as_raw_fd();
    if raw >= min {
        return Ok(OwnedFd::from(file));
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
    let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, min) };
    if dup == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digests_are_of_the_open_file() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bin");
        std::fs::write(&path, b"abc")?;
        let opened = open_and_hash(&path)?;
        assert_eq!(
            opened.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!opened.script);
        assert!(opened.fd.as_raw_fd() >= BINARY_FD_MIN);
        // Replacing the path does not change what the fd names.
        let tmp = dir.path().join("bin.tmp");
        std::fs::File::create(&tmp)?.write_all(b"#!/bin/sh\n")?;
        std::fs::rename(&tmp, &path)?;
        let again = std::fs::read(opened.exec_path())?;
        assert_eq!(again, b"abc");
        assert!(open_and_hash(&path)?.script);
        Ok(())
    }

    #[test]
    fn only_regular_files_are_hashed() {
        assert!(open_and_hash(Path::new("/")).is_err());
        assert!(open_and_hash(Path::new("/nonexistent/handover")).is_err());
    }

    #[test]
    fn digest_text_is_checked() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }

    #[test]
    fn own_binary_is_hashed() -> io::Result<()> {
        let (path, sha256) = own_binary()?;
        assert!(path.is_absolute());
        assert!(is_sha256_hex(&sha256));
        Ok(())
    }
}
