//! `handover artifact create|upload`: build an artifact directory from a
//! binary, check one, and upload it to the controller.
//!
//! An artifact directory holds `manifest.json` (see
//! [`handover_core::artifact::Manifest`]) and `handover`, the binary.

use crate::client::{now_ms, Operator};
use anyhow::{bail, ensure, Context};
use handover_controller::artifacts::MANIFEST_HEADER;
use handover_core::artifact::{
    DigestCheck, Hasher, Manifest, ARTIFACT_BYTES_MAX, BINARY_FILE, MANIFEST_BYTES_MAX,
    MANIFEST_FILE,
};
use handover_core::{Release, ReleaseInfo};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Read buffer while hashing and copying.
const IO_CHUNK_BYTES: usize = 256 << 10;
/// An upload may take this long plus [`UPLOAD_MS_PER_MIB`] per MiB.
const UPLOAD_TIMEOUT_BASE_MS: u64 = 30_000;
/// Allows uploads down to about 50 KiB/s.
const UPLOAD_MS_PER_MIB: u64 = 20_000;

/// Removes what `create` made unless it finished.
struct Undo {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    done: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", dir.display()))
}

/// Builds an artifact for `release` in `out_dir` (created; an existing one
/// must be empty): copies `binary` to `out_dir/handover` (mode 0755) while
/// hashing it, then writes `out_dir/manifest.json`. Both files and the
/// directory are fsync'd. On failure nothing is left behind.
pub fn create(binary: &Path, release: u32, out_dir: &Path) -> anyhow::Result<Manifest> {
    let release = Release(release);
    ReleaseInfo::of(release)?;
    let mut undo = Undo {
        files: Vec::new(),
        dir: None,
        done: false,
    };
    match std::fs::read_dir(out_dir) {
        Ok(mut entries) => {
            ensure!(
                entries.next().is_none(),
                "{} exists and is not empty; give a new or empty directory for the artifact",
                out_dir.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            undo.dir = Some(out_dir.to_path_buf());
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

    let dst_path = out_dir.join(BINARY_FILE);
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&dst_path)
        .with_context(|| format!("cannot create {}", dst_path.display()))?;
    undo.files.push(dst_path.clone());
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
    dst.set_permissions(std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dst_path.display()))?;
    dst.sync_all()
        .with_context(|| format!("cannot fsync {}", dst_path.display()))?;
    drop(dst);
    let (sha256, size) = hasher.finish();
    let manifest = Manifest::for_release(release, sha256, size, now_ms())?;

    let mpath = out_dir.join(MANIFEST_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&mpath)
        .with_context(|| format!("cannot create {}", mpath.display()))?;
    undo.files.push(mpath.clone());
    f.write_all(manifest.to_pretty_json().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", mpath.display()))?;
    drop(f);
    fsync_dir(out_dir)?;
    if let Some(parent) = out_dir.parent().filter(|_| undo.dir.is_some()) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        fsync_dir(parent)?;
    }
    undo.done = true;
    Ok(manifest)
}

/// Reads and validates `dir/manifest.json`, then re-checks the size and
/// SHA-256 of `dir/handover` against it. Returns the manifest and the
/// binary's path.
pub fn load(dir: &Path) -> anyhow::Result<(Manifest, PathBuf)> {
    let mpath = dir.join(MANIFEST_FILE);
    let mut doc = Vec::new();
    File::open(&mpath)
        .and_then(|f| f.take(MANIFEST_BYTES_MAX as u64 + 1).read_to_end(&mut doc))
        .with_context(|| format!("cannot read {}", mpath.display()))?;
    let manifest = Manifest::decode(&doc)
        .with_context(|| format!("{} is not a valid artifact manifest", mpath.display()))?;
    let binary = dir.join(BINARY_FILE);
    let mut f = File::open(&binary).with_context(|| format!("cannot open {}", binary.display()))?;
    let mut check = DigestCheck::new(&manifest);
    let mut buf = vec![0u8; IO_CHUNK_BYTES];
    let checked = loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", binary.display()))?;
        if n == 0 {
            break check.finish();
        }
        if let Err(e) = check.update(&buf[..n]) {
            break Err(e);
        }
    };
    checked.with_context(|| format!("{} does not match {}", binary.display(), mpath.display()))?;
    Ok((manifest, binary))
}

/// Checks the artifact in `dir` (as [`load`]) and uploads it to the
/// controller: `PUT /api/v1/artifacts/{sha256}` with the manifest in the
/// `x-handover-manifest` header and the binary streamed as the body.
/// An artifact the controller already has is not sent again; the answer is
/// the controller's manifest.
pub async fn upload(op: &Operator, dir: &Path) -> anyhow::Result<Manifest> {
    let owned = dir.to_path_buf();
    let (manifest, binary) = tokio::task::spawn_blocking(move || load(&owned))
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
        return Ok(m);
    }
    let file = tokio::fs::File::open(&binary)
        .await
        .with_context(|| format!("cannot open {}", binary.display()))?;
    // Never more than the manifest's size, even if the file grew since.
    let reader = tokio::io::AsyncReadExt::take(file, manifest.size);
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; IO_CHUNK_BYTES];
        match tokio::io::AsyncReadExt::read(&mut r, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    let header = serde_json::to_string(&manifest).context("cannot encode the manifest")?;
    let size = manifest.size.to_string();
    let timeout = Duration::from_millis(
        UPLOAD_TIMEOUT_BASE_MS + manifest.size.div_ceil(1 << 20) * UPLOAD_MS_PER_MIB,
    );
    let stored: Manifest = op
        .put_raw(
            &format!("/api/v1/artifacts/{}", manifest.sha256),
            &[(MANIFEST_HEADER, &header), ("content-length", &size)],
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

#[cfg(test)]
mod tests {
    use super::*;
    use handover_controller::artifacts::{routes, ArtifactHost, ArtifactStore};
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
        let m = create(&bin, 2, &out).unwrap();
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
        create(&bin, 1, &empty).unwrap();
        assert_eq!(load(&empty).unwrap().0.release, Release(1));
    }

    #[test]
    fn create_refuses_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, _) = binary(tmp.path(), 100);
        let out = tmp.path().join("out");
        create(&bin, 2, &out).unwrap();
        let err = create(&bin, 2, &out).unwrap_err();
        assert!(format!("{err:#}").contains("not empty"), "{err:#}");

        let fresh = tmp.path().join("fresh");
        let err = create(&bin, 9, &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("release 9"), "{err:#}");
        assert!(!fresh.exists());
        let err = create(&tmp.path().join("missing"), 2, &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
        assert!(!fresh.exists());
        let empty_bin = tmp.path().join("zero");
        std::fs::write(&empty_bin, b"").unwrap();
        let err = create(&empty_bin, 2, &fresh).unwrap_err();
        assert!(format!("{err:#}").contains("1 to"), "{err:#}");
        assert!(!fresh.exists());
        let err = create(&bin, 2, &bin).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
    }

    #[test]
    fn load_refuses_a_tampered_binary_or_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, mut bytes) = binary(tmp.path(), 5000);
        let out = tmp.path().join("out");
        let m = create(&bin, 2, &out).unwrap();

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
    struct Host(Arc<ArtifactStore>);

    impl ArtifactHost for Host {
        fn artifacts(&self) -> &ArtifactStore {
            &self.0
        }
        fn operator_token(&self) -> &str {
            OP
        }
        async fn check_node(&self, _: &axum::http::HeaderMap) -> ApiResult<()> {
            Err(ApiError::unauthorized("no nodes here"))
        }
    }

    #[tokio::test]
    async fn upload_to_a_controller() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path().join("store")).unwrap();
        let app = axum::Router::new()
            .merge(routes::<Host>())
            .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
            .with_state(Host(Arc::new(store)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let (bin, bytes) = binary(tmp.path(), (2 << 20) + 123);
        let out = tmp.path().join("out");
        let m = create(&bin, 2, &out).unwrap();
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
}
