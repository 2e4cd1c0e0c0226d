//! `handover artifact create|keygen|sign|verify|upload`: build an artifact
//! directory from a binary, make a signing key, sign and check an artifact,
//! and upload it to the controller.
//!
//! An artifact directory holds `manifest.json` (see
//! [`handover_core::artifact::Manifest`]), `handover`, the binary, and once
//! signed `manifest.json.minisig`: a standard minisign signature over the
//! exact bytes of `manifest.json` (`minisign -Vm manifest.json -p
//! handover.pub` verifies it too). The manifest names the binary's SHA-256,
//! so the signature covers the binary.

use crate::client::{now_ms, Operator};
use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use handover_artifacts::{
    self as artifacts, file_chunks, read_text, replace_file, write_new, ArtifactDir, BinaryCheck,
    NewDir, BINARY_MODE, FILE_MODE, IO_CHUNK_BYTES,
};
use handover_controller::artifacts::{MANIFEST_HEADER, SIGNATURE_HEADER};
use handover_core::artifact::ArtifactError;
use handover_core::artifact::{
    verify_manifest, Hasher, Manifest, PublicKey, ARTIFACT_BYTES_MAX, BINARY_FILE, MANIFEST_FILE,
    MANIFEST_VERSION, PUBLIC_KEY_BYTES_MAX, SIGNATURE_FILE,
};
use handover_core::release::{BinaryFacts, BINARY_FACTS_FORMAT};
use handover_core::Release;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An upload may take this long plus [`UPLOAD_MS_PER_MIB`] per MiB.
const UPLOAD_TIMEOUT_BASE_MS: u64 = 30_000;
/// Allows uploads down to about 50 KiB/s.
const UPLOAD_MS_PER_MIB: u64 = 20_000;
/// Name of the secret key `keygen` writes.
pub const SECRET_KEY_FILE: &str = "handover.key";
/// Name of the public key `keygen` writes.
pub const PUBLIC_KEY_FILE: &str = "handover.pub";
/// Largest secret key file read (a minisign one is about 250 bytes).
const SECRET_KEY_BYTES_MAX: usize = 4096;
/// A minisign secret key ends with its checksum, this many bytes.
const SECRET_KEY_CHECKSUM_BYTES: usize = 32;
/// The password of a password-protected secret key (one made with
/// `minisign -G`); `keygen` itself writes unencrypted keys.
pub const KEY_PASSWORD_ENV: &str = "HANDOVER_KEY_PASSWORD";

/// Longest `BINARY releases --json` may take.
const FACTS_WAIT_MS: u64 = 20_000;
/// Pause between two looks at whether `BINARY releases --json` exited.
const FACTS_POLL_MS: u64 = 10;
/// Tries of `BINARY releases --json` while the file is busy (ETXTBSY).
const FACTS_BUSY_RETRIES: u32 = 50;
/// Pause between those tries.
const FACTS_BUSY_PAUSE_MS: u64 = 20;
/// Largest answer of `BINARY releases --json` read.
const FACTS_BYTES_MAX: u64 = 64 << 10;

/// Builds an artifact in `out_dir` (created; an existing one must be empty)
/// for `release` of `binary`, by default the newest release it carries:
/// copies `binary` to `out_dir/handover` (mode 0755) while hashing it, asks
/// that copy for its facts (`handover releases --json`: the release's
/// schema, protocol range, window, migrations and contract versions come
/// from the binary being packaged, never from this CLI's own table), then
/// writes `out_dir/manifest.json`. Both files and the directory are fsync'd.
/// On failure nothing is left behind.
pub fn create(binary: &Path, release: Option<u32>, out_dir: &Path) -> anyhow::Result<Manifest> {
    create_inner(binary, release, out_dir, binary_facts)
}

/// Like [`create`], for a binary that cannot be asked (test fixtures that
/// are not programs): the facts are given.
pub fn create_with_facts(
    binary: &Path,
    release: Option<u32>,
    facts: &BinaryFacts,
    out_dir: &Path,
) -> anyhow::Result<Manifest> {
    create_inner(binary, release, out_dir, |_| Ok(facts.clone()))
}

/// Runs `binary releases --json` (bounded in time and output) and reads
/// its facts.
pub fn binary_facts(binary: &Path) -> anyhow::Result<BinaryFacts> {
    let out = tempfile::tempfile().context("cannot make a temporary file")?;
    let spawn = || {
        std::process::Command::new(binary)
            .args(["releases", "--json"])
            .env_remove(handover_supervisor::ENV_WORKER)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    // A file just written may be briefly held open for writing by a child
    // another thread forked meanwhile (until it execs): ETXTBSY, retried.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) && tries < FACTS_BUSY_RETRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(FACTS_BUSY_PAUSE_MS));
            }
            other => {
                break other.with_context(|| {
                    format!(
                        "cannot run {} to ask for its releases (is it a handover binary for this machine?)",
                        binary.display()
                    )
                })?
            }
        }
    };
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for the binary")? {
            break status;
        }
        if started.elapsed() > Duration::from_millis(FACTS_WAIT_MS) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not answer `releases --json` within {FACTS_WAIT_MS} ms",
                binary.display()
            );
        }
        std::thread::sleep(Duration::from_millis(FACTS_POLL_MS));
    };
    ensure!(
        status.success(),
        "{} releases --json failed ({status}); is it a handover binary?",
        binary.display()
    );
    let mut text = Vec::new();
    let mut out = out;
    std::io::Seek::rewind(&mut out).context("cannot read the binary's answer")?;
    out.take(FACTS_BYTES_MAX + 1)
        .read_to_end(&mut text)
        .context("cannot read the binary's answer")?;
    ensure!(
        text.len() as u64 <= FACTS_BYTES_MAX,
        "{} answered more than {FACTS_BYTES_MAX} bytes to `releases --json`",
        binary.display()
    );
    #[derive(serde::Deserialize)]
    struct Format {
        format: Option<u32>,
    }
    let format = serde_json::from_slice::<Format>(&text)
        .ok()
        .and_then(|f| f.format)
        .with_context(|| {
            format!(
                "{} answered `releases --json` without a facts format: it is older than \
                 artifacts carrying release facts (manifest version {MANIFEST_VERSION})",
                binary.display()
            )
        })?;
    ensure!(
        format == BINARY_FACTS_FORMAT,
        "{} describes its releases in format {format}; this CLI reads format \
         {BINARY_FACTS_FORMAT}: package it with its own CLI (`{} artifact create ...`)",
        binary.display(),
        binary.display()
    );
    serde_json::from_slice(&text)
        .with_context(|| format!("{} answered `releases --json` malformed", binary.display()))
}

fn create_inner(
    binary: &Path,
    release: Option<u32>,
    out_dir: &Path,
    facts_of: impl FnOnce(&Path) -> anyhow::Result<BinaryFacts>,
) -> anyhow::Result<Manifest> {
    match std::fs::read_dir(out_dir) {
        Ok(mut entries) => {
            ensure!(
                entries.next().is_none(),
                "{} exists and is not empty; give a new or empty directory for the artifact",
                out_dir.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("{} is not a directory I can write to", out_dir.display())
            })
        }
    }

    let mut src =
        File::open(binary).with_context(|| format!("cannot open {}", binary.display()))?;
    let md = src
        .metadata()
        .with_context(|| format!("cannot read {}", binary.display()))?;
    ensure!(md.is_file(), "{} is not a regular file", binary.display());
    ensure!(
        md.len() > 0 && md.len() <= ARTIFACT_BYTES_MAX,
        "{} is {} bytes; an artifact binary is 1 to {ARTIFACT_BYTES_MAX} bytes",
        binary.display(),
        md.len()
    );

    // Built beside `out_dir` and renamed onto it once whole: dropped on
    // any failure, so nothing is left behind.
    let new = NewDir::create(out_dir)?;
    let dst_path = new.path().join(BINARY_FILE);
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(BINARY_MODE)
        .open(&dst_path)
        .with_context(|| format!("cannot create {}", dst_path.display()))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; IO_CHUNK_BYTES];
    loop {
        let n = src
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", binary.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        ensure!(
            hasher.len() <= ARTIFACT_BYTES_MAX,
            "{} grew past {ARTIFACT_BYTES_MAX} bytes while being read",
            binary.display()
        );
        dst.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", dst_path.display()))?;
    }
    // The umask may have narrowed the mode given at creation.
    dst.set_permissions(std::fs::Permissions::from_mode(BINARY_MODE))
        .with_context(|| format!("cannot chmod {}", dst_path.display()))?;
    dst.sync_all()
        .with_context(|| format!("cannot fsync {}", dst_path.display()))?;
    drop(dst);
    let (sha256, size) = hasher.finish();
    // Asked of the copy: the facts describe exactly the bytes shipped.
    let facts = facts_of(&dst_path)?;
    let carried = || {
        facts
            .releases
            .iter()
            .map(|r| r.release.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match release {
        Some(n) => facts.releases.iter().find(|r| r.release == Release(n)),
        None => facts.releases.iter().max_by_key(|r| r.release),
    }
    .ok_or_else(|| ArtifactError::UnknownRelease {
        release: release.unwrap_or(0),
        carried: carried(),
    })?;
    let manifest = Manifest::for_release(chosen, facts.contracts, sha256, size, now_ms())?;
    write_new(
        &new.path().join(MANIFEST_FILE),
        manifest.to_pretty_json().as_bytes(),
        FILE_MODE,
    )?;
    new.place()?;
    Ok(manifest)
}

/// Reads and validates `dir/manifest.json`, then re-checks the size and
/// SHA-256 of `dir/handover` against it. Returns the manifest and the
/// binary's path.
pub fn load(dir: &Path) -> anyhow::Result<(Manifest, PathBuf)> {
    let a = artifacts::load(dir, &[], BinaryCheck::Digest)?;
    Ok((a.manifest, a.binary))
}

/// The key files [`keygen`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFiles {
    pub secret: PathBuf,
    pub public: PathBuf,
    /// The key id, as minisign shows it.
    pub key_id: String,
}

/// Writes a new minisign key pair into `out_dir` (created if needed):
/// [`SECRET_KEY_FILE`] (mode 0600, **not** password-protected: keep it
/// offline) and [`PUBLIC_KEY_FILE`] (give it to the controller and every
/// node with `--trusted-key`). Existing key files are never overwritten;
/// on failure nothing is left behind.
pub fn keygen(out_dir: &Path) -> anyhow::Result<KeyFiles> {
    // A new directory is private (0700); an existing one is the operator's.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(handover_private::DIR_MODE)
        .create(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let secret = out_dir.join(SECRET_KEY_FILE);
    let public = out_dir.join(PUBLIC_KEY_FILE);
    for p in [&secret, &public] {
        ensure!(
            !p.exists(),
            "{} exists; keys are never overwritten: choose another --out or remove it",
            p.display()
        );
    }
    let kp = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| anyhow::anyhow!("cannot generate a key pair: {e}"))?;
    let pk_text = kp
        .pk
        .to_box()
        .map_err(|e| anyhow::anyhow!("cannot encode the public key: {e}"))?
        .into_string();
    let key_id = PublicKey::decode(&pk_text)
        .context("the new public key does not read back")?
        .id()
        .to_owned();
    let sk_text = kp
        .sk
        .to_box(Some(&format!(
            "handover artifact signing key {key_id} (unencrypted)"
        )))
        .map_err(|e| anyhow::anyhow!("cannot encode the secret key: {e}"))?
        .into_string();
    write_new(&secret, sk_text.as_bytes(), handover_private::FILE_MODE)?;
    if let Err(e) = write_new(&public, pk_text.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&secret);
        return Err(e.into());
    }
    Ok(KeyFiles {
        secret,
        public,
        key_id,
    })
}

/// Reads a minisign secret key file: unencrypted (as [`keygen`] writes
/// it), or password-protected (`minisign -G`) with `password`.
fn read_secret_key(path: &Path, password: Option<String>) -> anyhow::Result<minisign::SecretKey> {
    let text = read_text(path, SECRET_KEY_BYTES_MAX)?;
    let not_a_key = || {
        format!(
            "{} is not a minisign secret key (made by `handover artifact keygen`)",
            path.display()
        )
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .with_context(not_a_key)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line)
        .ok()
        .with_context(not_a_key)?;
    let parsed = minisign::SecretKey::from_bytes(&raw)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(not_a_key)?;
    let boxed = minisign::SecretKeyBox::from_string(&text)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(not_a_key)?;
    if !parsed.is_encrypted() {
        // minisign 0.11's `-W` keys carry no checksum (all zero), which the
        // signing library refuses as corrupt.
        let no_checksum = raw.len() > SECRET_KEY_CHECKSUM_BYTES
            && raw[raw.len() - SECRET_KEY_CHECKSUM_BYTES..]
                .iter()
                .all(|b| *b == 0);
        return boxed.into_unencrypted_secret_key().map_err(|e| {
            if no_checksum {
                anyhow::anyhow!(
                    "{} is an unencrypted key without a checksum (as `minisign -G -W` makes \
                     them), which cannot be used here: make one with `handover artifact keygen`, \
                     or a password-protected one with `minisign -G`",
                    path.display()
                )
            } else {
                anyhow::anyhow!("{} is damaged: {e}", path.display())
            }
        });
    }
    let password = password.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is password-protected: give its password in {KEY_PASSWORD_ENV}",
            path.display()
        )
    })?;
    boxed
        .into_secret_key(Some(password))
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))
}

/// Reads a minisign public key file (`handover.pub`, or any `minisign.pub`).
pub fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let text = read_text(path, PUBLIC_KEY_BYTES_MAX)?;
    PublicKey::decode(&text).with_context(|| format!("cannot use {}", path.display()))
}

/// What [`sign`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub manifest: Manifest,
    pub key_id: String,
    pub signature: PathBuf,
}

/// Signs the artifact in `dir` with the secret key in `key`: checks the
/// artifact first (as [`load`]: a binary that does not match its manifest
/// is never signed), signs the exact bytes of `manifest.json`, checks the
/// signature with the key's public half, and writes
/// `manifest.json.minisig` (replacing an older signature atomically). A
/// password-protected key takes its password from [`KEY_PASSWORD_ENV`].
pub fn sign(dir: &Path, key: &Path) -> anyhow::Result<Signed> {
    sign_with(dir, key, std::env::var(KEY_PASSWORD_ENV).ok())
}

/// [`sign`] with the key's password (if it has one) given.
pub fn sign_with(dir: &Path, key: &Path, password: Option<String>) -> anyhow::Result<Signed> {
    let ArtifactDir {
        document: doc,
        manifest,
        ..
    } = artifacts::load(dir, &[], BinaryCheck::Digest)
        .context("refusing to sign: the artifact does not check")?;
    let sk = read_secret_key(key, password)?;
    let pk = minisign::PublicKey::from_secret_key(&sk)
        .map_err(|e| anyhow::anyhow!("cannot derive the public key of {}: {e}", key.display()))?;
    let public = PublicKey::from_base64(&pk.to_base64())
        .with_context(|| format!("cannot derive the public key of {}", key.display()))?;
    let trusted_comment = format!(
        "timestamp:{}\tfile:{MANIFEST_FILE}\thashed\tartifact:{} release:{}",
        now_ms().max(0) / 1000,
        manifest.id(),
        manifest.release
    );
    let untrusted_comment = format!("signature from handover secret key {}", public.id());
    let text = minisign::sign(
        Some(&pk),
        &sk,
        doc.as_slice(),
        Some(&trusted_comment),
        Some(&untrusted_comment),
    )
    .map_err(|e| anyhow::anyhow!("cannot sign {}: {e}", dir.join(MANIFEST_FILE).display()))?
    .into_string();
    verify_manifest(&doc, Some(&text), std::slice::from_ref(&public))
        .context("the new signature does not verify; nothing was written")?;
    let path = dir.join(SIGNATURE_FILE);
    replace_file(&path, text.as_bytes(), FILE_MODE)?;
    Ok(Signed {
        manifest,
        key_id: public.id().to_owned(),
        signature: path,
    })
}

/// Checks the artifact in `dir` as a controller or node with `pubkeys`
/// trusted would: `manifest.json.minisig` is a valid signature of the exact
/// `manifest.json` by one of them, and the binary matches the manifest.
/// Returns the manifest and the id of the key that signed it.
pub fn verify(dir: &Path, pubkeys: &[PathBuf]) -> anyhow::Result<(Manifest, String)> {
    ensure!(
        !pubkeys.is_empty(),
        "give the public key(s) to trust with --pubkey"
    );
    let trusted = pubkeys
        .iter()
        .map(|p| read_public_key(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ArtifactDir {
        manifest,
        signature,
        ..
    } = artifacts::load(dir, &trusted, BinaryCheck::Digest)?;
    let key_id = signature
        .as_deref()
        .map(handover_core::artifact::signature_key_id)
        .transpose()?
        .unwrap_or_default();
    Ok((manifest, key_id))
}

/// Checks the artifact in `dir` (as [`load`]) and uploads it to the
/// controller: `PUT /api/v1/artifacts/{sha256}` with the base64 of the exact
/// `manifest.json` in the `x-handover-manifest` header, the base64 of
/// `manifest.json.minisig` (when signed) in the `x-handover-signature`
/// header, and the binary streamed as the body. An artifact the controller
/// already has (with the same signature) is not sent again; the answer is
/// the controller's manifest. With several controller URLs (replicas),
/// every replica gets it: each serves its nodes and may switch to it.
pub async fn upload(op: &Operator, dir: &Path) -> anyhow::Result<Manifest> {
    let mut stored = None;
    for replica in op.replicas()? {
        let m = upload_one(&replica, dir)
            .await
            .with_context(|| format!("controller replica {}", replica.url()))?;
        stored = Some(m);
    }
    stored.context("no controller URL")
}

async fn upload_one(op: &Operator, dir: &Path) -> anyhow::Result<Manifest> {
    let owned = dir.to_path_buf();
    let (doc, manifest, signature, binary) = tokio::task::spawn_blocking(move || {
        let a = artifacts::load(&owned, &[], BinaryCheck::Digest)?;
        anyhow::Ok((a.document, a.manifest, a.signature, a.binary))
    })
    .await
    .context("artifact check failed")??;
    // A cheap call first: a wrong token or an unreachable controller shows
    // as such (not as a broken pipe mid-body), and an artifact the
    // controller already holds is not sent again.
    let present: Vec<Manifest> = op
        .get("/api/v1/artifacts")
        .await
        .context("cannot list the controller's artifacts")?;
    if let Some(m) = present
        .into_iter()
        .find(|m| m.sha256 == manifest.sha256 && m.release == manifest.release)
    {
        if signature.is_none() || stored_signature(op, &m).await? == signature {
            return Ok(m);
        }
    }
    let file = tokio::fs::File::open(&binary)
        .await
        .with_context(|| format!("cannot open {}", binary.display()))?;
    // Never more than the manifest's size, even if the file grew since.
    let stream = file_chunks(file, manifest.size);
    let b64 = base64::engine::general_purpose::STANDARD;
    let header = b64.encode(&doc);
    let sig_header = signature.as_ref().map(|s| b64.encode(s.as_bytes()));
    let size = manifest.size.to_string();
    let timeout = Duration::from_millis(
        UPLOAD_TIMEOUT_BASE_MS + manifest.size.div_ceil(1 << 20) * UPLOAD_MS_PER_MIB,
    );
    let mut headers = vec![
        (MANIFEST_HEADER, header.as_str()),
        ("content-length", &size),
    ];
    if let Some(sig) = &sig_header {
        headers.push((SIGNATURE_HEADER, sig));
    }
    let stored: Manifest = op
        .put_raw(
            &format!("/api/v1/artifacts/{}", manifest.sha256),
            &headers,
            reqwest::Body::wrap_stream(stream),
            timeout,
        )
        .await
        .with_context(|| format!("cannot upload artifact {}", manifest.id()))?;
    if stored.sha256 != manifest.sha256 || stored.release != manifest.release {
        bail!(
            "the controller answered with artifact {} instead of {}",
            stored.id(),
            manifest.id()
        );
    }
    Ok(stored)
}

/// The signature the controller stores for `m` (`None`: unsigned).
async fn stored_signature(op: &Operator, m: &Manifest) -> anyhow::Result<Option<String>> {
    op.get_text(&format!("/api/v1/artifacts/{}/signature", m.id()))
        .await
        .with_context(|| format!("cannot ask the controller for the signature of {}", m.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> BinaryFacts {
        BinaryFacts::of_this_binary()
    }
    use handover_controller::artifacts::{routes, ArtifactHost, ArtifactStore};
    use handover_controller::auth::{guard, OperatorAuth, OperatorCredentials};
    use handover_controller::{ApiError, ApiResult};
    use handover_core::artifact::sha256_hex;
    use std::sync::Arc;

    const OP: &str = "operator-token-0123456789";

    fn binary(dir: &Path, n: usize) -> (PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
        let p = dir.join("handover-build");
        std::fs::write(&p, &bytes).unwrap();
        (p, bytes)
    }

    #[test]
    fn create_then_load() {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, bytes) = binary(tmp.path(), 700_000);
        let out = tmp.path().join("a/r2");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        assert_eq!(m.sha256, sha256_hex(&bytes));
        assert_eq!(m.size, bytes.len() as u64);
        assert_eq!(m.release, Release(2));
        assert_eq!(std::fs::read(out.join(BINARY_FILE)).unwrap(), bytes);
        let mode = std::fs::metadata(out.join(BINARY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let (loaded, path) = load(&out).unwrap();
        assert_eq!(loaded, m);
        assert_eq!(path, out.join(BINARY_FILE));

        // An existing empty directory is fine too.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        create_with_facts(&bin, Some(1), &own(), &empty).unwrap();
        assert_eq!(load(&empty).unwrap().0.release, Release(1));
    }

    #[test]
    fn create_refuses_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, _) = binary(tmp.path(), 100);
        let out = tmp.path().join("out");
        create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        let err = create_with_facts(&bin, Some(2), &own(), &out).unwrap_err();
        assert!(format!("{err:#}").contains("not empty"), "{err:#}");

        let fresh = tmp.path().join("fresh");
        let err = create_with_facts(&bin, Some(9), &own(), &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("release 9"), "{err:#}");
        assert!(!fresh.exists());
        let err =
            create_with_facts(&tmp.path().join("missing"), Some(2), &own(), &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
        assert!(!fresh.exists());
        let empty_bin = tmp.path().join("zero");
        std::fs::write(&empty_bin, b"").unwrap();
        let err = create_with_facts(&empty_bin, Some(2), &own(), &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("1 to"), "{err:#}");
        assert!(!fresh.exists());
        let err = create_with_facts(&bin, Some(2), &own(), &bin).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
    }

    #[test]
    fn load_refuses_a_tampered_binary_or_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, mut bytes) = binary(tmp.path(), 5000);
        let out = tmp.path().join("out");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();

        bytes[100] ^= 4;
        std::fs::write(out.join(BINARY_FILE), &bytes).unwrap();
        let err = format!("{:#}", load(&out).unwrap_err());
        assert!(err.contains("digest mismatch"), "{err}");
        bytes[100] ^= 4;
        bytes.push(1);
        std::fs::write(out.join(BINARY_FILE), &bytes).unwrap();
        let err = format!("{:#}", load(&out).unwrap_err());
        assert!(err.contains("size mismatch"), "{err}");
        bytes.pop();
        std::fs::write(out.join(BINARY_FILE), &bytes).unwrap();
        load(&out).unwrap();

        let mut edited = m.clone();
        edited.schema = handover_core::Schema(1);
        std::fs::write(out.join(MANIFEST_FILE), edited.to_pretty_json()).unwrap();
        let err = format!("{:#}", load(&out).unwrap_err());
        assert!(err.contains("not a valid artifact manifest"), "{err}");
        std::fs::remove_file(out.join(MANIFEST_FILE)).unwrap();
        let err = format!("{:#}", load(&out).unwrap_err());
        assert!(err.contains("cannot read"), "{err}");
    }

    #[derive(Clone)]
    struct Host(Arc<ArtifactStore>, OperatorCredentials);

    impl OperatorAuth for Host {
        fn operator_credentials(&self) -> &OperatorCredentials {
            &self.1
        }
    }

    impl ArtifactHost for Host {
        fn artifacts(&self) -> &ArtifactStore {
            &self.0
        }
        async fn check_node(&self, _: &handover_controller::NodeProof) -> ApiResult<()> {
            Err(ApiError::unauthorized("no nodes here"))
        }
        async fn nodes(&self) -> ApiResult<Vec<handover_store::NodeRow>> {
            Ok(Vec::new())
        }
        fn lease_ms(&self) -> u64 {
            3_000
        }
    }

    /// The artifact routes on `store` as the controller mounts them: behind
    /// the operator API's check, with `OP` the operator token.
    fn app(store: ArtifactStore, body_bytes_max: usize) -> axum::Router {
        let host = Host(
            Arc::new(store),
            OperatorCredentials::new(OP.into(), None).unwrap(),
        );
        let routes = axum::Router::new()
            .merge(routes::<Host>())
            .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max));
        guard(routes, host.clone()).with_state(host)
    }

    #[tokio::test]
    async fn upload_to_a_controller() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path().join("store")).unwrap();
        let app = app(store, 1 << 20);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let (bin, bytes) = binary(tmp.path(), (2 << 20) + 123);
        let out = tmp.path().join("out");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        let op = Operator::with(&base, OP).unwrap();
        assert_eq!(upload(&op, &out).await.unwrap(), m);
        // Again: idempotent.
        assert_eq!(upload(&op, &out).await.unwrap(), m);
        let listed: Vec<Manifest> = op.get("/api/v1/artifacts").await.unwrap();
        assert_eq!(listed, vec![m.clone()]);
        let stored = tmp.path().join("store").join(m.id()).join(BINARY_FILE);
        assert_eq!(std::fs::read(stored).unwrap(), bytes);

        let wrong = Operator::with(&base, "not-the-operator-token").unwrap();
        let err = format!("{:#}", upload(&wrong, &out).await.unwrap_err());
        assert!(err.contains("unauthorized"), "{err}");

        // An authenticated refusal mid-body still reaches the operator as
        // the controller's JSON error: another artifact holds this id.
        let mut other = m.clone();
        let last = if other.sha256.ends_with('0') {
            "1"
        } else {
            "0"
        };
        other.sha256.replace_range(63..64, last);
        let store_dir = tmp.path().join("store");
        std::fs::remove_dir_all(store_dir.join(m.id())).unwrap();
        std::fs::create_dir(store_dir.join(m.id())).unwrap();
        std::fs::write(
            store_dir.join(m.id()).join(MANIFEST_FILE),
            other.to_pretty_json(),
        )
        .unwrap();
        std::fs::write(store_dir.join(m.id()).join(BINARY_FILE), &bytes).unwrap();
        let err = format!("{:#}", upload(&op, &out).await.unwrap_err());
        assert!(err.contains("exists (409"), "{err}");
        assert!(err.contains("ids collide"), "{err}");

        // A binary changed after create is refused before anything is sent.
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        std::fs::write(out.join(BINARY_FILE), &bad).unwrap();
        let err = format!("{:#}", upload(&op, &out).await.unwrap_err());
        assert!(err.contains("digest mismatch"), "{err}");
    }

    #[test]
    fn keygen_sign_verify_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = keygen(&tmp.path().join("keys")).unwrap();
        assert_eq!(keys.secret, tmp.path().join("keys").join(SECRET_KEY_FILE));
        let mode = std::fs::metadata(&keys.secret)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(tmp.path().join("keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700, "a new key dir is private");
        let pub_text = std::fs::read_to_string(&keys.public).unwrap();
        assert!(
            pub_text.starts_with("untrusted comment: minisign public key: "),
            "{pub_text}"
        );
        assert_eq!(read_public_key(&keys.public).unwrap().id(), keys.key_id);
        // Never overwritten.
        let err = format!("{:#}", keygen(&tmp.path().join("keys")).unwrap_err());
        assert!(err.contains("never overwritten"), "{err}");

        let (bin, _) = binary(tmp.path(), 300_000);
        let out = tmp.path().join("art");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        let err = format!(
            "{:#}",
            verify(&out, std::slice::from_ref(&keys.public)).unwrap_err()
        );
        assert!(err.contains("not signed"), "{err}");
        assert!(err.contains(SIGNATURE_FILE), "{err}");

        let signed = sign(&out, &keys.secret).unwrap();
        assert_eq!(signed.manifest, m);
        assert_eq!(signed.key_id, keys.key_id);
        assert_eq!(signed.signature, out.join(SIGNATURE_FILE));
        let sig = std::fs::read_to_string(&signed.signature).unwrap();
        assert!(sig.starts_with("untrusted comment: "), "{sig}");
        assert!(sig.contains(&format!("artifact:{}", m.id())), "{sig}");
        assert_eq!(
            verify(&out, std::slice::from_ref(&keys.public)).unwrap(),
            (m.clone(), keys.key_id.clone())
        );
        // Signing again replaces the signature; it still verifies.
        sign(&out, &keys.secret).unwrap();
        verify(&out, std::slice::from_ref(&keys.public)).unwrap();
        assert!(!out.join(format!(".{SIGNATURE_FILE}.tmp")).exists());

        // Another key is not trusted; trusting both is fine.
        let other = keygen(&tmp.path().join("other")).unwrap();
        let err = format!(
            "{:#}",
            verify(&out, std::slice::from_ref(&other.public)).unwrap_err()
        );
        assert!(
            err.contains("untrusted") || err.contains("not trusted"),
            "{err}"
        );
        assert!(err.contains(&keys.key_id), "{err}");
        verify(&out, &[other.public.clone(), keys.public.clone()]).unwrap();
        let err = format!("{:#}", verify(&out, &[]).unwrap_err());
        assert!(err.contains("--pubkey"), "{err}");
        // A secret key is not a public key, nor the reverse.
        let err = format!(
            "{:#}",
            verify(&out, std::slice::from_ref(&keys.secret)).unwrap_err()
        );
        assert!(err.contains("not a minisign public key"), "{err}");
        let err = format!("{:#}", sign(&out, &keys.public).unwrap_err());
        assert!(err.contains("not a minisign secret key"), "{err}");
    }

    #[test]
    fn verify_refuses_a_tampered_binary_or_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = keygen(tmp.path()).unwrap();
        let (bin, mut bytes) = binary(tmp.path(), 20_000);
        let out = tmp.path().join("art");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        sign(&out, &keys.secret).unwrap();
        let trusted = [keys.public.clone()];

        // The binary changed after signing: the signature still matches the
        // manifest, but the binary does not match its digest.
        bytes[10_000] ^= 0x40;
        std::fs::write(out.join(BINARY_FILE), &bytes).unwrap();
        let err = format!("{:#}", verify(&out, &trusted).unwrap_err());
        assert!(err.contains("digest mismatch"), "{err}");
        // ... and it is never signed as is.
        let err = format!("{:#}", sign(&out, &keys.secret).unwrap_err());
        assert!(
            err.contains("refusing to sign") && err.contains("digest mismatch"),
            "{err}"
        );
        bytes[10_000] ^= 0x40;
        std::fs::write(out.join(BINARY_FILE), &bytes).unwrap();
        verify(&out, &trusted).unwrap();

        // The manifest changed after signing (still a valid manifest).
        let mut edited = m.clone();
        edited.created_ms += 1;
        std::fs::write(out.join(MANIFEST_FILE), edited.to_pretty_json()).unwrap();
        let err = format!("{:#}", verify(&out, &trusted).unwrap_err());
        assert!(err.contains("changed after signing"), "{err}");
        // Even a byte that does not change the JSON value.
        let mut doc = m.to_pretty_json();
        doc.push(' ');
        std::fs::write(out.join(MANIFEST_FILE), &doc).unwrap();
        let err = format!("{:#}", verify(&out, &trusted).unwrap_err());
        assert!(err.contains("changed after signing"), "{err}");
        std::fs::write(out.join(MANIFEST_FILE), m.to_pretty_json()).unwrap();
        verify(&out, &trusted).unwrap();

        // A damaged signature file.
        std::fs::write(out.join(SIGNATURE_FILE), "untrusted comment: x\n").unwrap();
        let err = format!("{:#}", verify(&out, &trusted).unwrap_err());
        assert!(err.contains("not a minisign signature"), "{err}");
    }

    #[test]
    fn a_password_protected_key_needs_its_password() {
        let tmp = tempfile::tempdir().unwrap();
        let kp =
            minisign::KeyPair::generate_encrypted_keypair(Some("correct horse".into())).unwrap();
        let key = tmp.path().join("enc.key");
        std::fs::write(&key, kp.sk.to_box(None).unwrap().to_bytes()).unwrap();
        let pubkey = tmp.path().join("enc.pub");
        std::fs::write(&pubkey, kp.pk.to_box().unwrap().to_bytes()).unwrap();
        let (bin, _) = binary(tmp.path(), 1000);
        let out = tmp.path().join("art");
        create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        let err = format!("{:#}", sign_with(&out, &key, None).unwrap_err());
        assert!(err.contains(KEY_PASSWORD_ENV), "{err}");
        let err = format!(
            "{:#}",
            sign_with(&out, &key, Some("wrong".into())).unwrap_err()
        );
        assert!(err.contains("cannot open"), "{err}");
        sign_with(&out, &key, Some("correct horse".into())).unwrap();
        verify(&out, &[pubkey]).unwrap();
    }

    #[tokio::test]
    async fn signed_upload_to_a_controller_with_trusted_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = keygen(&tmp.path().join("a")).unwrap();
        let other = keygen(&tmp.path().join("b")).unwrap();
        let store = ArtifactStore::open(tmp.path().join("store"))
            .unwrap()
            .with_trusted_keys(vec![read_public_key(&keys.public).unwrap()]);
        let app = app(store, handover_core::wire::limits::BODY_BYTES_MAX);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let op = Operator::with(&base, OP).unwrap();

        let (bin, bytes) = binary(tmp.path(), 70_000);
        let out = tmp.path().join("art");
        let m = create_with_facts(&bin, Some(2), &own(), &out).unwrap();
        let err = format!("{:#}", upload(&op, &out).await.unwrap_err());
        assert!(err.contains("unsigned (400"), "{err}");
        sign(&out, &other.secret).unwrap();
        let err = format!("{:#}", upload(&op, &out).await.unwrap_err());
        assert!(err.contains("untrusted_key (400"), "{err}");
        sign(&out, &keys.secret).unwrap();
        assert_eq!(upload(&op, &out).await.unwrap(), m);
        let stored = tmp.path().join("store").join(m.id());
        assert_eq!(std::fs::read(stored.join(BINARY_FILE)).unwrap(), bytes);
        assert_eq!(
            std::fs::read(stored.join(MANIFEST_FILE)).unwrap(),
            std::fs::read(out.join(MANIFEST_FILE)).unwrap()
        );
        assert_eq!(
            std::fs::read(stored.join(SIGNATURE_FILE)).unwrap(),
            std::fs::read(out.join(SIGNATURE_FILE)).unwrap()
        );
        // Again: the controller has it with this signature, nothing is sent.
        assert_eq!(upload(&op, &out).await.unwrap(), m);
        // Signed again (a new signature): sent, and it replaces the old one.
        sign(&out, &keys.secret).unwrap();
        assert_eq!(upload(&op, &out).await.unwrap(), m);
        assert_eq!(
            std::fs::read(stored.join(SIGNATURE_FILE)).unwrap(),
            std::fs::read(out.join(SIGNATURE_FILE)).unwrap()
        );
    }
}
