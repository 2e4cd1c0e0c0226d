//! Staging an upgrade artifact: download it from the controller, verify it
//! while it arrives, and keep it beside the other releases in the data dir:
//!
//! ```text
//! DATA_DIR/releases/<id>/manifest.json          (the exact bytes that were signed)
//! DATA_DIR/releases/<id>/manifest.json.minisig  (with trusted keys)
//! DATA_DIR/releases/<id>/handover               (mode 0755)
//! DATA_DIR/releases/.tmp-<id>-<16 hex>/        (only while downloading)
//! ```
//!
//! With trusted keys (`--trusted-key`), the manifest and its signature are
//! fetched first and the signature must be a valid one by a trusted key
//! before a byte of the binary is downloaded; [`staged`] checks it again,
//! so a release never runs from an artifact that does not verify.
//! `releases/<id>/` appears (by one rename) only once the binary matched the
//! manifest's size and SHA-256 and every file is fsync'd. Any failure leaves
//! nothing staged and returns an error; the node keeps running. Reading,
//! writing, placing and listing the directories is `handover_artifacts`'s.

use crate::runtime::error_chain;
use futures_util::FutureExt as _;
use handover_artifacts::{
    load_id, sweep, write_checked, write_new, BinaryCheck, IoError, LoadError, NewDir, PlaceError,
    StreamError, BINARY_MODE, FILE_MODE,
};
use handover_core::artifact::{
    check_id, verify_manifest, ArtifactError, Manifest, PublicKey, BINARY_FILE, MANIFEST_BYTES_MAX,
    MANIFEST_FILE, SIGNATURE_BYTES_MAX, SIGNATURE_FILE,
};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The directory under the data dir that holds staged releases.
pub const RELEASES_DIR: &str = "releases";
/// Longest wait for the manifest.
pub const MANIFEST_TIMEOUT_MS: u64 = 10_000;
/// Longest a whole binary download may take.
pub const BINARY_TIMEOUT_MS: u64 = 30 * 60_000;
/// A download that delivers no byte for this long is abandoned.
pub const CHUNK_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Longest error answer read from the controller.
const ERROR_BODY_BYTES_MAX: usize = 64 << 10;

/// A verified artifact in the releases dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub manifest: Manifest,
    /// `DATA_DIR/releases/<id>/handover`, executable.
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot stage: {0}")]
    BadId(ArtifactError),
    #[error("cannot fetch artifact {id} from the controller: {reason}; will retry")]
    Unreachable { id: String, reason: String },
    #[error("the controller refused artifact {id}: {code} (HTTP {status}): {message}")]
    Refused {
        id: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("the controller's manifest for artifact {id} is not acceptable: {reason}")]
    Manifest { id: String, reason: String },
    #[error(
        "artifact {id} is refused before download: {source}; nothing was staged and \
         this node keeps running its release"
    )]
    Signature {
        id: String,
        #[source]
        source: ArtifactError,
    },
    #[error("artifact {id} failed verification and was not staged: {source}")]
    Digest {
        id: String,
        #[source]
        source: ArtifactError,
    },
    #[error("artifact {id} is already being staged by another task")]
    Busy { id: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StageError {
    let path = path.display().to_string();
    move |source| StageError::Io { op, path, source }
}

impl From<IoError> for StageError {
    fn from(e: IoError) -> StageError {
        io_err(e.op, &e.path)(e.error)
    }
}

impl From<PlaceError> for StageError {
    fn from(e: PlaceError) -> StageError {
        match e {
            PlaceError::Taken { target, error } => io_err("rename into", &target)(error),
            PlaceError::Io(e) => e.into(),
        }
    }
}

/// `DATA_DIR/releases/<id>/handover`: where artifact `id`'s binary is once staged.
pub fn binary_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(RELEASES_DIR).join(id).join(BINARY_FILE)
}

/// Staging dirs in progress in this process; a second `stage` of the same
/// artifact would write the same partial file.
static IN_FLIGHT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// This process's claim on `releases/<id>/`: staging it, or removing it
/// ([`crate::prune`]); one at a time.
pub(crate) struct Claim(PathBuf);

impl Claim {
    pub(crate) fn take(target: PathBuf, id: &str) -> Result<Claim, StageError> {
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(target.clone()) {
            return Err(StageError::Busy { id: id.to_owned() });
        }
        Ok(Claim(target))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.0);
    }
}

/// Checks a manifest document: with `trusted` keys, that `signature` is a
/// valid one by one of them; without, only that the manifest is valid.
fn check_manifest(
    document: &[u8],
    signature: Option<&str>,
    trusted: &[PublicKey],
) -> Result<Manifest, ArtifactError> {
    if trusted.is_empty() {
        Manifest::decode(document)
    } else {
        verify_manifest(document, signature, trusted)
    }
}

/// The staged artifact `releases/<id>/` (`None`: there is none), with its
/// signature and its binary's size and digest checked again, and its binary
/// made executable if it lost the mode (sync: call it off the async threads).
fn verify_staged(
    releases: &Path,
    id: &str,
    trusted: &[PublicKey],
) -> Result<Option<Staged>, String> {
    let found = match load_id(releases, id, trusted, BinaryCheck::Digest) {
        Ok(found) => found,
        Err(LoadError::Absent { .. }) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let binary = found.binary;
    let mode = std::fs::metadata(&binary)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if mode & BINARY_MODE != BINARY_MODE {
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(BINARY_MODE))
            .map_err(|e| format!("{}: {e}", binary.display()))?;
    }
    Ok(Some(Staged {
        manifest: found.manifest,
        binary,
    }))
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, StageError> + Send + 'static,
) -> Result<T, StageError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StageError::Io {
            op: what,
            path: String::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Reads a whole answer, refusing more than `max` bytes.
async fn read_answer(
    resp: &mut reqwest::Response,
    max: usize,
    id: &str,
) -> Result<Vec<u8>, StageError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| StageError::Unreachable {
        id: id.to_owned(),
        reason: error_chain(&e),
    })? {
        if body.len() + chunk.len() > max {
            return Err(StageError::Manifest {
                id: id.to_owned(),
                reason: format!("answer larger than {max} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Sends a GET to the node artifact API; a non-2xx answer becomes `Refused`.
async fn fetch(
    http: &reqwest::Client,
    url: String,
    credential: &str,
    timeout_ms: u64,
    id: &str,
) -> Result<reqwest::Response, StageError> {
    let mut req = http.get(&url);
    // A certificate's digest is not sent: the connection proves it.
    if handover_core::identity::is_bearer_secret(credential) {
        req = req.bearer_auth(credential);
    }
    let mut resp = req
        .timeout(Duration::from_millis(timeout_ms))
        .send()
        .await
        .map_err(|e| StageError::Unreachable {
            id: id.to_owned(),
            reason: error_chain(&e),
        })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_answer(&mut resp, ERROR_BODY_BYTES_MAX, id)
        .await
        .unwrap_or_default();
    let (code, message) = crate::runtime::refusal(status.as_u16(), &body);
    Err(StageError::Refused {
        id: id.to_owned(),
        status: status.as_u16(),
        code,
        message,
    })
}

/// The signature of artifact `id`; `None` when the controller has none
/// (404 `unsigned`).
async fn fetch_signature(
    http: &reqwest::Client,
    base: &str,
    credential: &str,
    id: &str,
) -> Result<Option<String>, StageError> {
    let url = format!("{base}/node/v1/artifacts/{id}/signature");
    let mut resp = match fetch(http, url, credential, MANIFEST_TIMEOUT_MS, id).await {
        Ok(resp) => resp,
        Err(StageError::Refused {
            status: 404, code, ..
        }) if code == handover_core::api::ErrorCode::Unsigned.as_str() => return Ok(None),
        Err(e) => return Err(e),
    };
    let bytes = read_answer(&mut resp, SIGNATURE_BYTES_MAX, id).await?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| StageError::Signature {
            id: id.to_owned(),
            source: ArtifactError::BadSignature("the signature is not UTF-8 text".into()),
        })
}

/// Downloads artifact `id` from the controller (manifest and, with
/// `trusted` keys, its signature; then the binary, streamed and checked),
/// and stages it as `DATA_DIR/releases/<id>/`.
///
/// Already staged: the signature and the binary on disk are verified again
/// and returned at once (a staged copy that no longer verifies is removed
/// and downloaded again). With trusted keys, a manifest that is unsigned,
/// signed by another key or changed after signing gives
/// [`StageError::Signature`] before the binary is requested; a binary that
/// does not match its manifest gives [`StageError::Digest`]. Either way
/// nothing is staged.
pub async fn stage(
    http: &reqwest::Client,
    controller_url: &str,
    credential: &str,
    data_dir: &Path,
    id: &str,
    trusted: &[PublicKey],
) -> Result<Staged, StageError> {
    check_id(id).map_err(StageError::BadId)?;
    let releases = data_dir.join(RELEASES_DIR);
    let target = releases.join(id);
    let _claim = Claim::take(target.clone(), id)?;
    handover_private::dir(&releases).map_err(|e| StageError::Io {
        op: e.op,
        path: e.path.display().to_string(),
        source: e.source,
    })?;

    let (root, key, keys) = (releases.clone(), id.to_owned(), trusted.to_vec());
    match blocking("verify", move || Ok(verify_staged(&root, &key, &keys))).await? {
        Ok(Some(staged)) => return Ok(staged),
        Ok(None) => {}
        Err(reason) => {
            tracing::warn!(
                id,
                reason,
                "staged artifact no longer verifies; downloading it again"
            );
            let removed = if target.is_dir() {
                tokio::fs::remove_dir_all(&target).await
            } else {
                tokio::fs::remove_file(&target).await
            };
            removed.map_err(io_err("remove", &target))?;
        }
    }
    // What a stage of this artifact left when its process died (this
    // process holds the artifact's claim, so nothing else builds it).
    let (root, key) = (releases.clone(), id.to_owned());
    for p in blocking("sweep", move || Ok(sweep(&root, Some(&key))?)).await? {
        tracing::info!(id, path = %p.display(), "removed an interrupted stage");
    }

    let base = controller_url.trim_end_matches('/');
    let mut resp = fetch(
        http,
        format!("{base}/node/v1/artifacts/{id}/manifest"),
        credential,
        MANIFEST_TIMEOUT_MS,
        id,
    )
    .await?;
    let document = read_answer(&mut resp, MANIFEST_BYTES_MAX, id).await?;
    let signature = if trusted.is_empty() {
        None
    } else {
        fetch_signature(http, base, credential, id).await?
    };
    let manifest = check_manifest(&document, signature.as_deref(), trusted).map_err(|e| {
        if trusted.is_empty() {
            StageError::Manifest {
                id: id.to_owned(),
                reason: e.to_string(),
            }
        } else {
            StageError::Signature {
                id: id.to_owned(),
                source: e,
            }
        }
    })?;
    if manifest.id() != id {
        return Err(StageError::Manifest {
            id: id.to_owned(),
            reason: format!("it describes artifact {}", manifest.id()),
        });
    }

    let digest = |source| StageError::Digest {
        id: id.to_owned(),
        source,
    };
    let resp = fetch(
        http,
        format!("{base}/node/v1/artifacts/{id}/binary"),
        credential,
        BINARY_TIMEOUT_MS,
        id,
    )
    .await?;
    if let Some(len) = resp.content_length() {
        if len != manifest.size {
            return Err(digest(ArtifactError::SizeMismatch {
                expected: manifest.size,
                actual: len,
            }));
        }
    }
    let new = NewDir::create(&target)?;
    let chunks = futures_util::stream::unfold(resp, |mut resp| async move {
        let next = tokio::time::timeout(
            Duration::from_millis(CHUNK_IDLE_TIMEOUT_MS),
            resp.chunk().map(|r| r.map_err(|e| error_chain(&e))),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no byte for {CHUNK_IDLE_TIMEOUT_MS} ms")));
        match next {
            Ok(Some(chunk)) => Some((Ok(chunk), resp)),
            Ok(None) => None,
            Err(reason) => Some((Err(reason), resp)),
        }
    });
    // Test hook (crate::runtime::TEST_FAULT_ENV): a download that stalls after its first chunk.
    #[cfg(feature = "test-hooks")]
    let chunks = crate::runtime::stall_after_first_chunk(chunks);
    let size = manifest.size;
    write_checked(&new.path().join(BINARY_FILE), &manifest, chunks)
        .await
        .map_err(|e| match e {
            StreamError::Interrupted { received, reason } => StageError::Unreachable {
                id: id.to_owned(),
                reason: format!("download cut off after {received} of {size} bytes: {reason}"),
            },
            StreamError::Check(source) => digest(source),
            StreamError::Io(e) => e.into(),
        })?;

    let staged = blocking("stage", move || {
        write_new(&new.path().join(MANIFEST_FILE), &document, FILE_MODE)?;
        if let Some(sig) = &signature {
            write_new(&new.path().join(SIGNATURE_FILE), sig.as_bytes(), FILE_MODE)?;
        }
        let dir = new.place()?;
        Ok(Staged {
            manifest,
            binary: dir.join(BINARY_FILE),
        })
    })
    .await?;
    tracing::info!(
        id,
        release = staged.manifest.release.0,
        size = staged.manifest.size,
        "artifact staged"
    );
    Ok(staged)
}

/// A staged artifact and when it was staged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedDir {
    pub manifest: Manifest,
    /// When `releases/<id>/` was staged: its directory's mtime (set by the
    /// files written into it just before it was placed; nothing writes
    /// into it after), in ms since the Unix epoch; 0 when unreadable
    /// (counted oldest).
    pub staged_ms: u64,
}

/// Sorts newest staging first (ties: the greater id first): the order
/// [`staged`] reports and pruning keeps.
pub fn newest_first(dirs: &mut [StagedDir]) {
    dirs.sort_by_key(|d| std::cmp::Reverse((d.staged_ms, d.manifest.id())));
}

/// When the directory `dir` was staged ([`StagedDir::staged_ms`]).
fn staged_ms(dir: &Path) -> u64 {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What [`staged_dirs`] found.
pub(crate) struct StagedListing {
    /// Newest staging first.
    pub dirs: Vec<StagedDir>,
    /// The artifact directories that do not load, and why.
    pub refused: Vec<(String, LoadError)>,
}

/// The artifacts under `releases` that load (with `trusted` keys, only
/// those they verify), with when each was staged; and those that do not.
pub(crate) fn staged_dirs(
    releases: &Path,
    trusted: &[PublicKey],
) -> Result<StagedListing, IoError> {
    let listing = handover_artifacts::list(releases, trusted)?;
    let mut dirs: Vec<StagedDir> = listing
        .artifacts
        .into_iter()
        .map(|a| StagedDir {
            staged_ms: staged_ms(&a.dir),
            manifest: a.manifest,
        })
        .collect();
    newest_first(&mut dirs);
    Ok(StagedListing {
        dirs,
        refused: listing.refused,
    })
}

/// The artifacts staged under `data_dir`, newest staging first: those whose
/// manifest is valid, names its directory, is signed by one of the
/// `trusted` keys (when there are any), and whose binary has the
/// manifest's size. (The digest is checked when staged and again by
/// [`stage`]; a listing does not re-read every binary.)
pub fn staged(data_dir: &Path, trusted: &[PublicKey]) -> Vec<Manifest> {
    let releases = data_dir.join(RELEASES_DIR);
    let listing = match staged_dirs(&releases, trusted) {
        Ok(listing) => listing,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the staged releases");
            return Vec::new();
        }
    };
    for (id, e) in &listing.refused {
        tracing::warn!(id, error = %e, "ignoring a staged release");
    }
    listing.dirs.into_iter().map(|d| d.manifest).collect()
}

/// Staged artifacts made on disk without a controller, for the tests of
/// what reads and prunes `releases/`.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use handover_core::release::CONTRACTS;
    use handover_core::{Release, ReleaseInfo};

    /// A release-2 manifest whose binary is `bytes`.
    pub fn manifest(bytes: &[u8]) -> Manifest {
        Manifest::for_release(
            &ReleaseInfo::of(Release(2)).unwrap().facts(),
            CONTRACTS,
            handover_core::artifact::sha256_hex(bytes),
            bytes.len() as u64,
            1_700_000_000_000,
        )
        .unwrap()
    }

    /// `releases/<id>/` for artifact `n` (its binary `n`'s bytes), as
    /// [`stage`] leaves it.
    pub fn stage_on_disk(releases: &Path, n: u32) -> Manifest {
        let bytes = n.to_le_bytes();
        let m = manifest(&bytes);
        let new = NewDir::create(&releases.join(m.id())).unwrap();
        write_new(&new.path().join(BINARY_FILE), &bytes, BINARY_MODE).unwrap();
        write_new(
            &new.path().join(MANIFEST_FILE),
            m.to_pretty_json().as_bytes(),
            FILE_MODE,
        )
        .unwrap();
        new.place().unwrap();
        m
    }

    /// Sets when `releases/<id>/` was staged to `ms` after the epoch.
    pub fn set_staged_ms(releases: &Path, m: &Manifest, ms: u64) {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
        std::fs::File::open(releases.join(m.id()))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use handover_core::artifact::sha256_hex;
    use handover_core::Release;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const CRED: &str = "node-credential-0123456789";
    const NOKEYS: &[PublicKey] = &[];

    /// What the fake controller serves.
    #[derive(Clone, Copy, PartialEq)]
    enum Serve {
        Good,
        FlippedByte,
        /// Extra bytes, sent chunked (no Content-Length).
        TooLongChunked,
        /// Fewer bytes, with an honest Content-Length.
        TooShort,
        /// Another artifact's manifest.
        OtherManifest,
    }

    struct Fake {
        manifest: Manifest,
        bytes: Vec<u8>,
        serve: Mutex<Serve>,
        /// The signature served (`None`: 404 `unsigned`).
        signature: Mutex<Option<String>>,
        binary_gets: AtomicUsize,
    }

    fn authorized(h: &HeaderMap) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {CRED}"))
    }

    fn refuse() -> Response {
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                serde_json::json!({"error": "unauthorized", "message": "unknown credential"}),
            ),
        )
            .into_response()
    }

    async fn serve_manifest(
        State(f): State<Arc<Fake>>,
        UrlPath(id): UrlPath<String>,
        h: HeaderMap,
    ) -> Response {
        if !authorized(&h) {
            return refuse();
        }
        if id != f.manifest.id() {
            return StatusCode::NOT_FOUND.into_response();
        }
        let mut m = f.manifest.clone();
        if *f.serve.lock().unwrap() == Serve::OtherManifest {
            m.sha256 = "f".repeat(64);
        }
        // As the controller serves it: the stored document, byte for byte.
        m.to_pretty_json().into_response()
    }

    async fn serve_signature(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
        if !authorized(&h) {
            return refuse();
        }
        match f.signature.lock().unwrap().clone() {
            Some(sig) => sig.into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"error": "unsigned", "message": "no signature"})),
            )
                .into_response(),
        }
    }

    async fn serve_binary(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
        if !authorized(&h) {
            return refuse();
        }
        f.binary_gets.fetch_add(1, Ordering::SeqCst);
        let mut bytes = f.bytes.clone();
        match *f.serve.lock().unwrap() {
            Serve::Good | Serve::OtherManifest => bytes.into_response(),
            Serve::FlippedByte => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x20;
                bytes.into_response()
            }
            Serve::TooShort => {
                bytes.pop();
                bytes.into_response()
            }
            Serve::TooLongChunked => {
                bytes.extend_from_slice(b"trailing junk");
                let parts: Vec<Result<Vec<u8>, std::io::Error>> =
                    bytes.chunks(1000).map(|c| Ok(c.to_vec())).collect();
                Body::from_stream(futures_util::stream::iter(parts)).into_response()
            }
        }
    }

    async fn server(serve: Serve) -> (String, Arc<Fake>) {
        let bytes: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let manifest = Manifest::for_release(
            &handover_core::ReleaseInfo::of(Release(2)).unwrap().facts(),
            handover_core::release::CONTRACTS,
            sha256_hex(&bytes),
            bytes.len() as u64,
            1_700_000_000_000,
        )
        .unwrap();
        let fake = Arc::new(Fake {
            manifest,
            bytes,
            serve: Mutex::new(serve),
            signature: Mutex::new(None),
            binary_gets: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/node/v1/artifacts/{id}/manifest", get(serve_manifest))
            .route("/node/v1/artifacts/{id}/binary", get(serve_binary))
            .route("/node/v1/artifacts/{id}/signature", get(serve_signature))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/"), fake)
    }

    /// What every staging test starts from: a fake controller serving
    /// `serve`, an empty data dir and a client.
    struct Bed {
        url: String,
        fake: Arc<Fake>,
        dir: tempfile::TempDir,
        http: reqwest::Client,
        /// The fake's artifact.
        id: String,
    }

    impl Bed {
        async fn new(serve: Serve) -> Bed {
            let (url, fake) = server(serve).await;
            let id = fake.manifest.id();
            Bed {
                url,
                fake,
                dir: tempfile::tempdir().unwrap(),
                http: reqwest::Client::new(),
                id,
            }
        }

        fn dir(&self) -> &Path {
            self.dir.path()
        }

        /// Stages the fake's artifact, trusting `trusted`.
        async fn stage(&self, trusted: &[PublicKey]) -> Result<Staged, StageError> {
            stage(&self.http, &self.url, CRED, self.dir(), &self.id, trusted).await
        }

        fn assert_nothing_left(&self) {
            let left = leftovers(self.dir());
            assert!(left.is_empty(), "{left:?}");
        }
    }

    fn leftovers(data_dir: &Path) -> Vec<String> {
        match std::fs::read_dir(data_dir.join(RELEASES_DIR)) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => vec![],
        }
    }

    #[tokio::test]
    async fn stages_a_good_artifact_once() {
        let bed = Bed::new(Serve::Good).await;
        let s = bed.stage(NOKEYS).await.unwrap();
        assert_eq!(s.manifest, bed.fake.manifest);
        assert_eq!(s.binary, binary_path(bed.dir(), &bed.id));
        assert_eq!(std::fs::read(&s.binary).unwrap(), bed.fake.bytes);
        let mode = std::fs::metadata(&s.binary).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let on_disk = std::fs::read(
            bed.dir()
                .join(RELEASES_DIR)
                .join(&bed.id)
                .join(MANIFEST_FILE),
        )
        .unwrap();
        assert_eq!(Manifest::decode(&on_disk).unwrap(), bed.fake.manifest);
        assert_eq!(leftovers(bed.dir()), vec![bed.id.clone()]);
        assert_eq!(staged(bed.dir(), NOKEYS), vec![bed.fake.manifest.clone()]);

        // Already staged: verified on disk, not downloaded again.
        let again = bed.stage(NOKEYS).await.unwrap();
        assert_eq!(again, s);
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 1);

        // Corrupted on disk: removed and downloaded again.
        let mut bytes = std::fs::read(&s.binary).unwrap();
        bytes[7] ^= 1;
        std::fs::write(&s.binary, &bytes).unwrap();
        let healed = bed.stage(NOKEYS).await.unwrap();
        assert_eq!(std::fs::read(&healed.binary).unwrap(), bed.fake.bytes);
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 2);
    }

    async fn refused_and_nothing_staged(serve: Serve, code: &str) {
        let bed = Bed::new(serve).await;
        let err = bed.stage(NOKEYS).await.unwrap_err();
        match &err {
            StageError::Digest { source, .. } => assert_eq!(source.code(), code, "{err}"),
            other => panic!("expected a digest error, got {other}"),
        }
        assert!(err.to_string().contains("not staged"), "{err}");
        bed.assert_nothing_left();
        assert!(staged(bed.dir(), NOKEYS).is_empty());

        // Once the controller serves the right bytes, it stages.
        *bed.fake.serve.lock().unwrap() = Serve::Good;
        bed.stage(NOKEYS).await.unwrap();
        assert_eq!(staged(bed.dir(), NOKEYS).len(), 1);
    }

    #[tokio::test]
    async fn a_flipped_byte_is_refused() {
        refused_and_nothing_staged(Serve::FlippedByte, "digest_mismatch").await;
    }

    #[tokio::test]
    async fn too_long_is_refused_while_streaming() {
        refused_and_nothing_staged(Serve::TooLongChunked, "size_mismatch").await;
    }

    #[tokio::test]
    async fn too_short_is_refused() {
        refused_and_nothing_staged(Serve::TooShort, "size_mismatch").await;
    }

    #[tokio::test]
    async fn other_refusals() {
        let bed = Bed::new(Serve::OtherManifest).await;
        let err = bed.stage(NOKEYS).await.unwrap_err();
        assert!(matches!(err, StageError::Manifest { .. }), "{err}");
        let err = stage(&bed.http, &bed.url, "wrong", bed.dir(), &bed.id, NOKEYS)
            .await
            .unwrap_err();
        match &err {
            StageError::Refused { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (401, "unauthorized"))
            }
            other => panic!("expected a refusal, got {other}"),
        }
        let err = stage(
            &bed.http,
            &bed.url,
            CRED,
            bed.dir(),
            "r2-000000000000",
            NOKEYS,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, StageError::Refused { status: 404, .. }),
            "{err}"
        );
        let err = stage(&bed.http, &bed.url, CRED, bed.dir(), "../../etc", NOKEYS)
            .await
            .unwrap_err();
        assert!(matches!(err, StageError::BadId(_)), "{err}");
        let err = stage(
            &bed.http,
            "http://127.0.0.1:9",
            CRED,
            bed.dir(),
            &bed.id,
            NOKEYS,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StageError::Unreachable { .. }), "{err}");
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 0);
        assert!(staged(bed.dir(), NOKEYS).is_empty());
    }

    #[tokio::test]
    async fn a_second_concurrent_stage_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let id = "r2-0123456789ab";
        let _claim = Claim::take(dir.path().join(RELEASES_DIR).join(id), id).unwrap();
        let err = stage(
            &reqwest::Client::new(),
            "http://127.0.0.1:9",
            CRED,
            dir.path(),
            id,
            NOKEYS,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StageError::Busy { .. }), "{err}");
    }

    #[test]
    fn staged_ignores_torn_and_foreign_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let releases = dir.path().join(RELEASES_DIR);
        std::fs::create_dir_all(releases.join("r2-0123456789ab")).unwrap();
        std::fs::create_dir_all(releases.join(".r2-0123456789ab.staging")).unwrap();
        std::fs::create_dir_all(releases.join("something-else")).unwrap();
        std::fs::write(releases.join("r2-0123456789ab").join(MANIFEST_FILE), b"{}").unwrap();
        assert!(staged(dir.path(), NOKEYS).is_empty());
        assert!(staged(&dir.path().join("missing"), NOKEYS).is_empty());
    }

    fn keypair() -> (minisign::KeyPair, PublicKey) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let key = PublicKey::decode(&kp.pk.to_box().unwrap().into_string()).unwrap();
        (kp, key)
    }

    fn sign(kp: &minisign::KeyPair, doc: &[u8]) -> String {
        minisign::sign(None, &kp.sk, doc, None, None)
            .unwrap()
            .into_string()
    }

    #[tokio::test]
    async fn stages_a_signed_artifact_and_checks_it_again() {
        let bed = Bed::new(Serve::Good).await;
        let (kp_a, key_a) = keypair();
        let (_, key_b) = keypair();
        let doc = bed.fake.manifest.to_pretty_json();
        let sig = sign(&kp_a, doc.as_bytes());
        *bed.fake.signature.lock().unwrap() = Some(sig.clone());
        let trusted = std::slice::from_ref(&key_a);
        let s = bed.stage(trusted).await.unwrap();
        assert_eq!(s.manifest, bed.fake.manifest);
        let release_dir = bed.dir().join(RELEASES_DIR).join(&bed.id);
        assert_eq!(
            std::fs::read_to_string(release_dir.join(MANIFEST_FILE)).unwrap(),
            doc
        );
        assert_eq!(
            std::fs::read_to_string(release_dir.join(SIGNATURE_FILE)).unwrap(),
            sig
        );
        assert_eq!(staged(bed.dir(), trusted), vec![bed.fake.manifest.clone()]);
        // Another node's keys: this staged copy is not one it would run.
        assert!(staged(bed.dir(), &[key_b]).is_empty());
        // Already staged and still verifies: not downloaded again.
        bed.stage(trusted).await.unwrap();
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 1);
        // A staged manifest edited on disk no longer verifies: staged()
        // drops it, and stage() downloads it again.
        let mut edited = bed.fake.manifest.clone();
        edited.created_ms += 1;
        std::fs::write(release_dir.join(MANIFEST_FILE), edited.to_pretty_json()).unwrap();
        assert!(staged(bed.dir(), trusted).is_empty());
        bed.stage(trusted).await.unwrap();
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 2);
        assert_eq!(staged(bed.dir(), trusted), vec![bed.fake.manifest.clone()]);
    }

    #[tokio::test]
    async fn an_artifact_staged_unsigned_is_fetched_again_once_keys_are_trusted() {
        let bed = Bed::new(Serve::Good).await;
        bed.stage(NOKEYS).await.unwrap();
        let (kp, key) = keypair();
        let trusted = std::slice::from_ref(&key);
        assert!(staged(bed.dir(), trusted).is_empty());
        // The controller has no signature: refused, and nothing is left.
        let err = bed.stage(trusted).await.unwrap_err();
        assert!(
            matches!(
                &err,
                StageError::Signature {
                    source: ArtifactError::Unsigned,
                    ..
                }
            ),
            "{err}"
        );
        bed.assert_nothing_left();
        *bed.fake.signature.lock().unwrap() =
            Some(sign(&kp, bed.fake.manifest.to_pretty_json().as_bytes()));
        bed.stage(trusted).await.unwrap();
        assert_eq!(staged(bed.dir(), trusted).len(), 1);
    }

    #[tokio::test]
    async fn unsigned_untrusted_or_tampered_is_refused_before_the_binary() {
        let (kp_a, key_a) = keypair();
        let (kp_b, _) = keypair();
        let mut bed = Bed::new(Serve::Good).await;
        let doc = bed.fake.manifest.to_pretty_json();
        let mut other = bed.fake.manifest.clone();
        other.created_ms += 1;
        let cases = [
            (None, "unsigned"),
            (Some(sign(&kp_b, doc.as_bytes())), "untrusted_key"),
            (
                Some(sign(&kp_a, other.to_pretty_json().as_bytes())),
                "bad_signature",
            ),
            (Some("junk".to_owned()), "bad_signature"),
        ];
        for (sig, code) in cases {
            *bed.fake.signature.lock().unwrap() = sig;
            bed.dir = tempfile::tempdir().unwrap();
            let err = bed.stage(std::slice::from_ref(&key_a)).await.unwrap_err();
            match &err {
                StageError::Signature { source, .. } => assert_eq!(source.code(), code, "{err}"),
                other => panic!("expected a signature refusal, got {other}"),
            }
            assert!(err.to_string().contains("keeps running"), "{err}");
            bed.assert_nothing_left();
            assert!(staged(bed.dir(), NOKEYS).is_empty());
        }
        assert_eq!(bed.fake.binary_gets.load(Ordering::SeqCst), 0);
    }
}
