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
    check_binary, load_id, sweep, write_checked, write_new, BinaryCheck, CacheEntry, HostCache,
    IoError, LoadError, NewDir, PlaceError, StreamError, BINARY_MODE, FILE_MODE,
};
use handover_core::artifact::{
    check_id, verify_manifest, ArtifactError, Manifest, PublicKey, BINARY_FILE, MANIFEST_BYTES_MAX,
    MANIFEST_FILE, SIGNATURE_BYTES_MAX, SIGNATURE_FILE,
};
use handover_core::wire::{decode, ArtifactSources};
use rand::seq::SliceRandom as _;
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
/// Longest wait for a peer to accept a connection: a node on the LAN
/// answers at once; one that does not is skipped for the next source.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Longest wait for a peer's answer to begin (its status and headers).
pub const PEER_ANSWER_TIMEOUT_MS: u64 = 5_000;
/// A peer download that delivers no byte for this long is abandoned for
/// the next source (a LAN peer that stalls is broken or hostile).
pub const PEER_CHUNK_IDLE_TIMEOUT_MS: u64 = 5_000;
/// Longest a whole download from one peer may take: what one hostile
/// peer that trickles bytes can cost at most, and far beyond what a binary
/// of [`ARTIFACT_BYTES_MAX`](handover_core::artifact::ARTIFACT_BYTES_MAX)
/// takes on a LAN.
pub const PEER_BINARY_TIMEOUT_MS: u64 = 5 * 60_000;
/// Sources tried in one round before the controller is asked: a few busy
/// or bad peers cost a few short requests, and the controller still gets
/// its turn.
pub const PEER_TRIES_MAX: usize = 4;
/// Rounds of (sources, then perhaps the controller) while every source
/// and the controller answer `busy`; then the staging fails and the node
/// machine tries again later (its own bounded backoff).
pub const BUSY_ROUNDS_MAX: u32 = 150;
/// Rounds in which every source is busy before the controller is asked
/// too: sources free up within a download's time (a fraction of a second
/// on a LAN), and the controller's few download slots are for the first
/// nodes and for those no source can serve.
pub const PEER_BUSY_ROUNDS_MAX: u32 = 20;
/// The pause between two rounds, drawn between these (jitter, so waiting
/// nodes do not ask in step): short, because nodes that staged begin to
/// serve within a heartbeat.
pub const BUSY_WAIT_MS_MIN: u64 = 100;
pub const BUSY_WAIT_MS_MAX: u64 = 300;
/// Longest wait for the host cache's entry of an artifact while another
/// node of the host downloads it (then this node downloads it too): a
/// download from a peer or the controller takes seconds.
pub const CACHE_WAIT_MS: u64 = 60_000;

/// Where a binary may come from besides the controller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origins<'a> {
    /// Other nodes' peer routes ([`peer_client`]); `None`: not asked.
    pub peers: Option<&'a reqwest::Client>,
    /// This host's cache of checked binaries (`--artifact-cache`).
    pub cache: Option<&'a HostCache>,
}

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

/// Downloads artifact `id` (manifest and, with `trusted` keys, its
/// signature from the controller; then the binary, streamed and checked,
/// from a node that staged it when `peers` is given and one serves it, else
/// from the controller: see [`fetch_binary`]), and stages it as
/// `DATA_DIR/releases/<id>/`.
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
    origins: Origins<'_>,
    data_dir: &Path,
    id: &str,
    trusted: &[PublicKey],
) -> Result<Staged, StageError> {
    let Origins { peers, cache } = origins;
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

    let new = NewDir::create(&target)?;
    let controller = Controller {
        http,
        base,
        credential,
    };
    let binary = new.path().join(BINARY_FILE);
    match cache {
        Some(cache) => via_cache(cache, &controller, peers, id, &manifest, &binary).await?,
        None => fetch_binary(&controller, peers, id, &manifest, &binary).await?,
    }

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

/// Where a node serving its staged artifacts ([`crate::peer`]) answers
/// artifact `id`'s binary, below its base URL.
pub fn peer_binary_path(id: &str) -> String {
    format!("/peer/v1/artifacts/{id}/binary")
}

/// The controller as staging asks it.
struct Controller<'a> {
    http: &'a reqwest::Client,
    /// Its base URL, without a trailing `/`.
    base: &'a str,
    credential: &'a str,
}

/// The client for other nodes' peer routes: plain HTTP (a peer's viewer
/// port), no secret and no TLS identity (the bytes are checked against
/// the controller's manifest), no compression (CPU is what a LAN lacks),
/// and a short connect timeout ([`PEER_CONNECT_TIMEOUT_MS`]).
pub fn peer_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .no_zstd()
        .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
        .build()
        .map_err(|e| error_chain(&e))
}

/// Brings the binary into the new file `path`, checked against `manifest`
/// as it arrives. Round after round, with `peers`: the controller's
/// sources of it (`GET /node/v1/artifacts/{id}/sources`), at most
/// [`PEER_TRIES_MAX`] of them in random order, each until one serves the
/// right bytes. The controller is asked for the binary only when no
/// source could serve: none named, one failed (unreachable, slow, other
/// bytes: each costs only its attempt), or every one busy for
/// [`PEER_BUSY_ROUNDS_MAX`] rounds; so once a few nodes staged, the fleet
/// takes the binary from itself and the controller's copies stay a few.
/// A busy round (sources or controller answering 503 `busy`) costs a
/// pause ([`BUSY_WAIT_MS_MIN`] to [`BUSY_WAIT_MS_MAX`]), at most
/// [`BUSY_ROUNDS_MAX`] rounds. An older controller without the sources
/// route (404) is asked for the binary itself, as before. Any other
/// refusal of the controller, or other bytes from it, ends the staging.
async fn fetch_binary(
    controller: &Controller<'_>,
    peers: Option<&reqwest::Client>,
    id: &str,
    manifest: &Manifest,
    path: &Path,
) -> Result<(), StageError> {
    let mut ask_sources = peers.is_some();
    let mut peers_busy_rounds = 0;
    for round in 0..BUSY_ROUNDS_MAX {
        let mut ask_controller = true;
        if let Some(peers) = peers.filter(|_| ask_sources) {
            match fetch_sources(controller, id).await {
                Ok(sources) if sources.is_empty() => {}
                Ok(sources) => match from_peers(peers, sources, id, manifest, path).await {
                    FromPeers::Served(source) => {
                        tracing::info!(id, source, round, "artifact binary taken from a peer");
                        return Ok(());
                    }
                    FromPeers::Busy => {
                        peers_busy_rounds += 1;
                        ask_controller = peers_busy_rounds > PEER_BUSY_ROUNDS_MAX;
                    }
                    FromPeers::Failed => {}
                },
                Err(StageError::Refused { status: 404, .. }) => {
                    tracing::info!(
                        id,
                        "the controller names no sources (an older release): \
                         downloading from the controller"
                    );
                    ask_sources = false;
                }
                Err(e) => tracing::debug!(id, error = %e, "no sources this round"),
            }
        }
        if ask_controller {
            match from_controller(controller, id, manifest, path).await {
                Ok(()) => {
                    tracing::info!(id, round, "artifact binary taken from the controller");
                    return Ok(());
                }
                Err(StageError::Refused { status: 503, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let wait_ms = rand::random_range(BUSY_WAIT_MS_MIN..=BUSY_WAIT_MS_MAX);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
    Err(StageError::Unreachable {
        id: id.to_owned(),
        reason: format!(
            "for {BUSY_ROUNDS_MAX} rounds neither the controller nor a node that staged \
             it had a free download slot"
        ),
    })
}

/// The binary into `path` by way of the host's cache ([`HostCache`]): linked
/// from it and checked against `manifest` if it holds the binary, else
/// fetched ([`fetch_binary`]) while holding its entry (so the host's other
/// nodes wait for this download rather than make their own) and published
/// there. The entry is held only to link: the check (reading the whole
/// binary) runs after, so the host's nodes check in parallel. A linked
/// copy that fails its check is removed, with the entry, and the binary
/// fetched. A cache that cannot be used (held by another process for
/// [`CACHE_WAIT_MS`], or failing) is left aside, with a warning.
async fn via_cache(
    cache: &HostCache,
    controller: &Controller<'_>,
    peers: Option<&reqwest::Client>,
    id: &str,
    manifest: &Manifest,
    path: &Path,
) -> Result<(), StageError> {
    let Some(entry) = cache_entry(cache, id, manifest).await? else {
        return fetch_binary(controller, peers, id, manifest, path).await;
    };
    let p = path.to_owned();
    let (linked, entry) = blocking("cache", move || {
        let linked = entry.link_to(&p);
        Ok((linked, entry))
    })
    .await?;
    let entry = match linked {
        Ok(true) => {
            drop(entry);
            let (p, m) = (path.to_owned(), manifest.clone());
            let manifest_path = path.with_file_name(MANIFEST_FILE);
            let checked = blocking("check", move || {
                Ok(check_binary(&p, &manifest_path, &m, BinaryCheck::Digest))
            })
            .await?;
            let Err(error) = checked else {
                tracing::info!(id, cache = %cache.dir().display(), "artifact binary taken from the host's cache");
                return Ok(());
            };
            tracing::warn!(
                id,
                error = %error,
                "the host's cached copy is not the manifest's binary; removing it and downloading"
            );
            tokio::fs::remove_file(path)
                .await
                .map_err(io_err("remove", path))?;
            let Some(entry) = cache_entry(cache, id, manifest).await? else {
                return fetch_binary(controller, peers, id, manifest, path).await;
            };
            let (removed, entry) = blocking("cache", move || {
                let removed = entry.remove();
                Ok((removed, entry))
            })
            .await?;
            if let Err(error) = removed {
                tracing::warn!(id, error = %error, "the host's bad cached copy could not be removed");
            }
            entry
        }
        Ok(false) => entry,
        Err(error) => {
            tracing::warn!(id, error = %error, "the artifact cache cannot be used; downloading without it");
            drop(entry);
            return fetch_binary(controller, peers, id, manifest, path).await;
        }
    };
    fetch_binary(controller, peers, id, manifest, path).await?;
    let p = path.to_owned();
    let published = blocking("cache", move || Ok(entry.publish(&p))).await?;
    if let Err(error) = published {
        tracing::warn!(id, error = %error, "the artifact could not be cached for the host's other nodes");
    }
    Ok(())
}

/// The host cache's entry of `manifest`'s binary, once no other process
/// holds it; `None` (with a warning) if one still does after
/// [`CACHE_WAIT_MS`] or the cache fails: then the node goes without it.
async fn cache_entry(
    cache: &HostCache,
    id: &str,
    manifest: &Manifest,
) -> Result<Option<CacheEntry>, StageError> {
    let (c, sha256) = (cache.clone(), manifest.sha256.clone());
    let wait = Duration::from_millis(CACHE_WAIT_MS);
    match blocking("cache", move || Ok(c.entry(&sha256, wait))).await? {
        Ok(Some(entry)) => Ok(Some(entry)),
        Ok(None) => {
            tracing::warn!(
                id,
                cache = %cache.dir().display(),
                wait_ms = CACHE_WAIT_MS,
                "another process holds the artifact's cache entry; downloading without it"
            );
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(id, error = %e, "the artifact cache cannot be used; downloading without it");
            Ok(None)
        }
    }
}

/// The binary from the controller into `path`.
async fn from_controller(
    controller: &Controller<'_>,
    id: &str,
    manifest: &Manifest,
    path: &Path,
) -> Result<(), StageError> {
    let resp = fetch(
        controller.http,
        format!("{}/node/v1/artifacts/{id}/binary", controller.base),
        controller.credential,
        BINARY_TIMEOUT_MS,
        id,
    )
    .await?;
    receive(resp, path, manifest, CHUNK_IDLE_TIMEOUT_MS, id).await
}

/// The controller's sources of artifact `id` ([`ArtifactSources`]).
async fn fetch_sources(controller: &Controller<'_>, id: &str) -> Result<Vec<String>, StageError> {
    let mut resp = fetch(
        controller.http,
        format!("{}/node/v1/artifacts/{id}/sources", controller.base),
        controller.credential,
        MANIFEST_TIMEOUT_MS,
        id,
    )
    .await?;
    let body = read_answer(&mut resp, ERROR_BODY_BYTES_MAX, id).await?;
    let answer: ArtifactSources = decode(&body).map_err(|e| StageError::Unreachable {
        id: id.to_owned(),
        reason: format!("the controller's sources do not read: {e}"),
    })?;
    Ok(answer.sources)
}

/// What asking the sources gave.
enum FromPeers {
    /// This source served the binary.
    Served(String),
    /// Every source asked was busy.
    Busy,
    /// A source could not serve (unreachable, slow, refused, other bytes).
    Failed,
}

/// Tries at most [`PEER_TRIES_MAX`] of `sources`, in random order, until
/// one serves the binary `manifest` names into `path`.
async fn from_peers(
    peers: &reqwest::Client,
    mut sources: Vec<String>,
    id: &str,
    manifest: &Manifest,
    path: &Path,
) -> FromPeers {
    sources.shuffle(&mut rand::rng());
    let mut outcome = FromPeers::Busy;
    for source in sources.iter().take(PEER_TRIES_MAX) {
        let url = format!("{}{}", source.trim_end_matches('/'), peer_binary_path(id));
        let result = match from_peer(peers, &url, id).await {
            Ok(resp) => receive(resp, path, manifest, PEER_CHUNK_IDLE_TIMEOUT_MS, id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return FromPeers::Served(source.clone()),
            Err(StageError::Refused { status: 503, .. }) => {}
            Err(e @ StageError::Digest { .. }) => {
                tracing::warn!(id, source, error = %e, "a peer served other bytes; trying another source");
                outcome = FromPeers::Failed;
            }
            Err(e) => {
                tracing::debug!(id, source, error = %e, "peer did not serve; trying another source");
                outcome = FromPeers::Failed;
            }
        }
    }
    outcome
}

/// A peer's answer for `url`, begun within [`PEER_ANSWER_TIMEOUT_MS`].
async fn from_peer(
    peers: &reqwest::Client,
    url: &str,
    id: &str,
) -> Result<reqwest::Response, StageError> {
    let unreachable = |reason: String| StageError::Unreachable {
        id: id.to_owned(),
        reason,
    };
    let send = peers
        .get(url)
        .timeout(Duration::from_millis(PEER_BINARY_TIMEOUT_MS))
        .send();
    let resp = tokio::time::timeout(Duration::from_millis(PEER_ANSWER_TIMEOUT_MS), send)
        .await
        .map_err(|_| unreachable(format!("no answer in {PEER_ANSWER_TIMEOUT_MS} ms")))?
        .map_err(|e| unreachable(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(StageError::Refused {
            id: id.to_owned(),
            status: resp.status().as_u16(),
            code: format!("http_{}", resp.status().as_u16()),
            message: format!("{url} refused"),
        });
    }
    Ok(resp)
}

/// Streams the binary of `resp` into the new file `path` through the
/// manifest's checks (a chunk at least every `idle_ms`); on any failure
/// nothing is left at `path`.
async fn receive(
    resp: reqwest::Response,
    path: &Path,
    manifest: &Manifest,
    idle_ms: u64,
    id: &str,
) -> Result<(), StageError> {
    let digest = |source| StageError::Digest {
        id: id.to_owned(),
        source,
    };
    if let Some(len) = resp.content_length() {
        if len != manifest.size {
            return Err(digest(ArtifactError::SizeMismatch {
                expected: manifest.size,
                actual: len,
            }));
        }
    }
    let chunks = futures_util::stream::unfold(resp, move |mut resp| async move {
        let next = tokio::time::timeout(
            Duration::from_millis(idle_ms),
            resp.chunk().map(|r| r.map_err(|e| error_chain(&e))),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no byte for {idle_ms} ms")));
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
    write_checked(path, manifest, chunks)
        .await
        .map_err(|e| match e {
            StreamError::Interrupted { received, reason } => StageError::Unreachable {
                id: id.to_owned(),
                reason: format!("download cut off after {received} of {size} bytes: {reason}"),
            },
            StreamError::Check(source) => digest(source),
            StreamError::Io(e) => e.into(),
        })
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
        /// 503 `busy` for the binary.
        Busy,
    }

    struct Fake {
        manifest: Manifest,
        bytes: Vec<u8>,
        serve: Mutex<Serve>,
        /// The signature served (`None`: 404 `unsigned`).
        signature: Mutex<Option<String>>,
        binary_gets: AtomicUsize,
        /// The sources answered (`None`: 404, as a controller older than
        /// the route answers).
        sources: Mutex<Option<Vec<String>>>,
        sources_gets: AtomicUsize,
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
        let serve = *f.serve.lock().unwrap();
        binary_answer(serve, f.bytes.clone())
    }

    /// The binary `bytes` as `serve` says, from the controller or a peer.
    fn binary_answer(serve: Serve, mut bytes: Vec<u8>) -> Response {
        match serve {
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
            Serve::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                axum::Json(serde_json::json!({"error": "busy", "message": "busy"})),
            )
                .into_response(),
        }
    }

    async fn serve_sources(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
        if !authorized(&h) {
            return refuse();
        }
        f.sources_gets.fetch_add(1, Ordering::SeqCst);
        match f.sources.lock().unwrap().clone() {
            Some(sources) => axum::Json(ArtifactSources { v: 1, sources }).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(
                    serde_json::json!({"error": "not_found", "message": "no such endpoint"}),
                ),
            )
                .into_response(),
        }
    }

    /// A node serving the fake's binary at its peer route as `serve` says.
    struct FakePeer {
        url: String,
        gets: Arc<AtomicUsize>,
        serve: Arc<Mutex<Serve>>,
    }

    async fn fake_peer(serve: Serve, bytes: Vec<u8>) -> FakePeer {
        let gets = Arc::new(AtomicUsize::new(0));
        let serve = Arc::new(Mutex::new(serve));
        let (counted, mode) = (gets.clone(), serve.clone());
        let app = Router::new().route(
            "/peer/v1/artifacts/{id}/binary",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let answer = binary_answer(*mode.lock().unwrap(), bytes.clone());
                async move { answer }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakePeer {
            url: format!("http://{addr}"),
            gets,
            serve,
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
            sources: Mutex::new(Some(Vec::new())),
            sources_gets: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/node/v1/artifacts/{id}/manifest", get(serve_manifest))
            .route("/node/v1/artifacts/{id}/binary", get(serve_binary))
            .route("/node/v1/artifacts/{id}/signature", get(serve_signature))
            .route("/node/v1/artifacts/{id}/sources", get(serve_sources))
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

        /// Stages the fake's artifact, trusting `trusted`, from the
        /// controller only.
        async fn stage(&self, trusted: &[PublicKey]) -> Result<Staged, StageError> {
            stage(
                &self.http,
                &self.url,
                CRED,
                Origins::default(),
                self.dir(),
                &self.id,
                trusted,
            )
            .await
        }

        /// Stages the fake's artifact (no keys) into `data_dir`, from the
        /// controller by way of the host cache `cache`.
        async fn stage_cached(
            &self,
            cache: &HostCache,
            data_dir: &Path,
        ) -> Result<Staged, StageError> {
            stage(
                &self.http,
                &self.url,
                CRED,
                Origins {
                    peers: None,
                    cache: Some(cache),
                },
                data_dir,
                &self.id,
                NOKEYS,
            )
            .await
        }

        /// Stages the fake's artifact (no keys), asking for sources.
        async fn stage_with_peers(&self) -> Result<Staged, StageError> {
            let peers = peer_client().unwrap();
            let dir = self.dir();
            stage(
                &self.http,
                &self.url,
                CRED,
                Origins {
                    peers: Some(&peers),
                    cache: None,
                },
                dir,
                &self.id,
                NOKEYS,
            )
            .await
        }

        fn set_sources(&self, sources: Option<Vec<String>>) {
            *self.fake.sources.lock().unwrap() = sources;
        }

        fn binary_gets(&self) -> usize {
            self.fake.binary_gets.load(Ordering::SeqCst)
        }

        /// A peer serving the fake's binary as `serve` says.
        async fn peer(&self, serve: Serve) -> FakePeer {
            fake_peer(serve, self.fake.bytes.clone()).await
        }

        /// Staged, and what is staged is the fake's binary.
        fn assert_staged_good(&self) {
            let binary = binary_path(self.dir(), &self.id);
            assert_eq!(std::fs::read(binary).unwrap(), self.fake.bytes);
            assert_eq!(staged(self.dir(), NOKEYS), vec![self.fake.manifest.clone()]);
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

    /// Two nodes of one host: the first downloads the binary and caches
    /// it, the second links it (one file on disk) and downloads nothing.
    #[tokio::test]
    async fn nodes_of_one_host_download_the_binary_once() {
        use std::os::unix::fs::MetadataExt as _;
        let bed = Bed::new(Serve::Good).await;
        let host = tempfile::tempdir().unwrap();
        let cache = HostCache::open(&host.path().join("cache")).unwrap();
        let first = bed.stage_cached(&cache, bed.dir()).await.unwrap();
        let other = tempfile::tempdir().unwrap();
        let second = bed.stage_cached(&cache, other.path()).await.unwrap();
        assert_eq!(bed.binary_gets(), 1);
        bed.assert_staged_good();
        assert_eq!(std::fs::read(&second.binary).unwrap(), bed.fake.bytes);
        assert_eq!(
            staged(other.path(), NOKEYS),
            vec![bed.fake.manifest.clone()]
        );
        let (a, b) = (
            std::fs::metadata(&first.binary).unwrap(),
            std::fs::metadata(&second.binary).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "one file on disk");
        assert_eq!(b.nlink(), 3, "both nodes and the cache");
    }

    /// A cached copy that is not the manifest's binary is refused: the
    /// node downloads the binary, stages what it checked, and the cache
    /// holds that from then on.
    #[tokio::test]
    async fn a_damaged_cached_copy_costs_one_download() {
        let bed = Bed::new(Serve::Good).await;
        let host = tempfile::tempdir().unwrap();
        let cache = HostCache::open(&host.path().join("cache")).unwrap();
        let entry = cache.dir().join(&bed.fake.manifest.sha256);
        let mut bad = bed.fake.bytes.clone();
        bad[0] ^= 1;
        std::fs::write(&entry, &bad).unwrap();
        bed.stage_cached(&cache, bed.dir()).await.unwrap();
        assert_eq!(bed.binary_gets(), 1);
        bed.assert_staged_good();
        assert_eq!(std::fs::read(&entry).unwrap(), bed.fake.bytes);
        let other = tempfile::tempdir().unwrap();
        bed.stage_cached(&cache, other.path()).await.unwrap();
        assert_eq!(bed.binary_gets(), 1, "the replaced copy is linked");
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
        let err = stage(
            &bed.http,
            &bed.url,
            "wrong",
            Origins::default(),
            bed.dir(),
            &bed.id,
            NOKEYS,
        )
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
            Origins::default(),
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
        let err = stage(
            &bed.http,
            &bed.url,
            CRED,
            Origins::default(),
            bed.dir(),
            "../../etc",
            NOKEYS,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StageError::BadId(_)), "{err}");
        let err = stage(
            &bed.http,
            "http://127.0.0.1:9",
            CRED,
            Origins::default(),
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
            Origins::default(),
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

    // ---- peers ----

    #[tokio::test]
    async fn the_binary_comes_from_a_peer_first() {
        let bed = Bed::new(Serve::Good).await;
        let peer = bed.peer(Serve::Good).await;
        bed.set_sources(Some(vec![peer.url.clone()]));
        bed.stage_with_peers().await.unwrap();
        bed.assert_staged_good();
        assert_eq!(peer.gets.load(Ordering::SeqCst), 1);
        assert_eq!(
            bed.binary_gets(),
            0,
            "nothing downloaded from the controller"
        );
    }

    /// A peer serving other bytes (or too many, or too few), or none at
    /// all, costs only its attempt: the node goes on to the controller and
    /// stages the good binary.
    #[tokio::test]
    async fn a_hostile_or_dead_peer_only_wastes_an_attempt() {
        for serve in [Serve::FlippedByte, Serve::TooLongChunked, Serve::TooShort] {
            let bed = Bed::new(Serve::Good).await;
            let bad = bed.peer(serve).await;
            let dead = "http://127.0.0.1:9".to_owned();
            bed.set_sources(Some(vec![bad.url.clone(), dead]));
            bed.stage_with_peers().await.unwrap();
            bed.assert_staged_good();
            assert_eq!(bad.gets.load(Ordering::SeqCst), 1);
            assert_eq!(bed.binary_gets(), 1);
            assert_eq!(leftovers(bed.dir()), vec![bed.id.clone()]);
        }
    }

    /// A bad peer and a controller serving other bytes too: refused, and
    /// nothing staged.
    #[tokio::test]
    async fn a_bad_peer_and_a_bad_controller_stage_nothing() {
        let bed = Bed::new(Serve::FlippedByte).await;
        let bad = bed.peer(Serve::FlippedByte).await;
        bed.set_sources(Some(vec![bad.url.clone()]));
        let err = bed.stage_with_peers().await.unwrap_err();
        assert!(matches!(err, StageError::Digest { .. }), "{err}");
        bed.assert_nothing_left();
        assert!(staged(bed.dir(), NOKEYS).is_empty());
    }

    #[tokio::test]
    async fn a_busy_peer_is_passed_for_the_next() {
        let bed = Bed::new(Serve::Good).await;
        let busy = bed.peer(Serve::Busy).await;
        let good = bed.peer(Serve::Good).await;
        bed.set_sources(Some(vec![busy.url.clone(), good.url.clone()]));
        bed.stage_with_peers().await.unwrap();
        bed.assert_staged_good();
        assert_eq!(good.gets.load(Ordering::SeqCst), 1);
        assert!(busy.gets.load(Ordering::SeqCst) <= 1);
        assert_eq!(bed.binary_gets(), 0);
    }

    /// While the sources are only busy, the controller is not asked: the
    /// node waits for a source (here, until the peer frees up).
    #[tokio::test]
    async fn busy_sources_are_waited_for_not_the_controller() {
        let bed = Bed::new(Serve::Good).await;
        let peer = bed.peer(Serve::Busy).await;
        bed.set_sources(Some(vec![peer.url.clone()]));
        let (gets, serve) = (peer.gets.clone(), peer.serve.clone());
        tokio::spawn(async move {
            while gets.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *serve.lock().unwrap() = Serve::Good;
        });
        bed.stage_with_peers().await.unwrap();
        bed.assert_staged_good();
        assert!(peer.gets.load(Ordering::SeqCst) >= 4);
        assert_eq!(bed.binary_gets(), 0, "the controller was not asked");
    }

    /// A controller older than the sources route answers 404: the node
    /// downloads from the controller, and asks no more sources.
    #[tokio::test]
    async fn no_sources_route_falls_back_to_the_controller() {
        let bed = Bed::new(Serve::Good).await;
        bed.set_sources(None);
        bed.stage_with_peers().await.unwrap();
        bed.assert_staged_good();
        assert_eq!(bed.binary_gets(), 1);
        assert_eq!(bed.fake.sources_gets.load(Ordering::SeqCst), 1);
    }

    /// A busy controller and no source yet: the node asks again, round
    /// after round, until a node that staged it serves it.
    #[tokio::test]
    async fn a_busy_controller_waits_for_a_source() {
        let bed = Bed::new(Serve::Busy).await;
        let good = bed.peer(Serve::Good).await;
        let fake = bed.fake.clone();
        let url = good.url.clone();
        tokio::spawn(async move {
            while fake.binary_gets.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *fake.sources.lock().unwrap() = Some(vec![url]);
        });
        bed.stage_with_peers().await.unwrap();
        bed.assert_staged_good();
        assert_eq!(good.gets.load(Ordering::SeqCst), 1);
        assert!(bed.binary_gets() >= 3);
    }
}
