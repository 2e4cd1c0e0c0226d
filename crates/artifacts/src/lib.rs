//! The IO shell around the core's pure artifact types
//! ([`handover_core::artifact`]): the one place that reads and writes
//! artifact directories, for the CLI (`artifact create|sign|verify|upload`),
//! the controller's store (`DATA_DIR/artifacts/<id>/`) and the node's staged
//! releases (`DATA_DIR/releases/<id>/`).
//!
//! ```text
//! <id>/manifest.json          the exact bytes that are (or will be) signed
//! <id>/manifest.json.minisig  its minisign signature, once signed
//! <id>/handover               the binary, mode 0755
//! .tmp-<id>-<16 hex>/         only while being built (see [`NewDir`])
//! ```
//!
//! - [`read_bounded`] / [`read_text`]: every manifest, signature and key
//!   file is read through one bounded read, with one error ([`ReadError`]:
//!   missing, too large, unreadable, not text).
//! - [`write_new`] / [`replace_file`]: a file written durably (written,
//!   fsync'd, and its directory fsync'd), new or atomically replaced.
//! - [`NewDir`]: a directory built under a temporary name and placed by one
//!   rename (then the parent is fsync'd), so `<id>/` exists only complete;
//!   removed if dropped unplaced. [`sweep`] removes what a crash left.
//! - [`write_checked`]: streams bytes into a new file through
//!   [`DigestCheck`](handover_core::artifact::DigestCheck); the partial
//!   file is removed on any failure (and if the future is dropped).
//! - [`load`] / [`load_id`]: an artifact directory, its manifest decoded and
//!   validated (or its signature verified, with trusted keys), its
//!   signature if present, and its binary checked ([`BinaryCheck`]).
//! - [`list`]: the artifact directories under a root.
//! - [`HostCache`]: checked binaries shared by the nodes of one host, by
//!   hard link (`DIR/<sha256>`).
//!
//! # Missing files: one rule
//!
//! - The directory: absent is [`LoadError::Absent`], which each caller
//!   answers in its own way (the controller: 404 `not_found`; the node:
//!   download it; the CLI: an error). A root that does not exist lists as
//!   empty.
//! - `manifest.json` and `handover` are required: a directory without one of
//!   them is torn, an error ([`ReadError::Missing`]), never an absent
//!   artifact nor a default. (Directories appear by one rename only when
//!   complete, so a torn one was damaged after the fact.)
//! - `manifest.json.minisig` is optional: absent (and only absent) means
//!   unsigned, which [`verify_manifest`](handover_core::artifact::verify_manifest)
//!   refuses as `unsigned` when keys are trusted. A signature file that is
//!   there but unreadable, too large or not text is an error whether or not
//!   keys are trusted: it is never taken for "unsigned".
//!
//! This was the controller's rule; the CLI used to ask `exists()` first
//! (an unreadable signature counted as none), and the node read the
//! signature only with trusted keys (a damaged one was ignored without).

mod cache;
mod dir;
mod read;
mod stream;
mod write;

pub use cache::{Entry as CacheEntry, HostCache, CACHE_LOCK_POLL_MS};
pub use dir::{
    check_binary, list, list_ids, load, load_id, ArtifactDir, BinaryCheck, Listing, LoadError,
};
pub use read::{read_bounded, read_signature, read_text, ReadError};
pub use stream::{check_stream, file_chunks, write_checked, StreamError};
pub use write::{
    fsync_dir, is_temporary, replace_file, sweep, temp_path, write_new, IoError, NewDir, PlaceError,
};

/// Read and write buffer while streaming, hashing or copying a binary.
pub const IO_CHUNK_BYTES: usize = 256 << 10;
/// Mode of an artifact's binary.
pub const BINARY_MODE: u32 = 0o755;
/// Mode of a manifest or signature file.
pub const FILE_MODE: u32 = 0o644;
/// Names of temporary files and directories start with this (never a
/// valid artifact id, and hidden).
pub const TEMP_PREFIX: &str = ".tmp-";

#[cfg(test)]
pub(crate) mod testing {
    use handover_core::artifact::{sha256_hex, Manifest};
    use handover_core::{Release, ReleaseInfo};

    pub fn binary(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    pub fn manifest_of(bytes: &[u8]) -> Manifest {
        Manifest::for_release(
            &ReleaseInfo::of(Release(2)).unwrap().facts(),
            handover_core::release::CONTRACTS,
            sha256_hex(bytes),
            bytes.len() as u64,
            1_000,
        )
        .unwrap()
    }
}
