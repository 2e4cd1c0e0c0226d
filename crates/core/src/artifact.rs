//! Upgrade artifacts: the manifest that names a release binary, and the
//! incremental digest check every receiver runs while the bytes arrive.
//!
//! An artifact on disk is a directory `<id>/` holding [`MANIFEST_FILE`],
//! [`BINARY_FILE`] and, once signed, [`SIGNATURE_FILE`]: a standard minisign
//! (Ed25519) signature over the exact bytes of the manifest. The manifest
//! carries the binary's SHA-256, so the signature covers the binary too:
//! [`verify_manifest`] checks the signature against the trusted keys, and the
//! binary is trusted only after its size and SHA-256 match the manifest
//! ([`DigestCheck`]). This module is pure: the shells (CLI, controller, node)
//! do the reading and writing.

use crate::release::{Contracts, ProtocolRange, Release, ReleaseFacts, ReleaseInfo, Schema};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Largest binary an artifact may carry.
pub const ARTIFACT_BYTES_MAX: u64 = 512 << 20;
/// The only manifest version this release reads and writes. Version 2
/// carries the release's facts and contract versions, so a process that does
/// not carry the release can still judge it.
pub const MANIFEST_VERSION: u32 = 2;
/// Schemas a release may name in `migrates_from`.
pub const MIGRATES_FROM_MAX: usize = 16;
/// Largest manifest document accepted (a real one is about 500 bytes).
pub const MANIFEST_BYTES_MAX: usize = 4096;
/// Longest `semver` accepted.
pub const SEMVER_CHARS_MAX: usize = 64;
/// Hex digits of the SHA-256 that go into the artifact id.
pub const ID_HEX_DIGITS: usize = 12;
/// Name of the manifest file inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the binary inside an artifact directory.
pub const BINARY_FILE: &str = "handover";
/// Name of the minisign signature of [`MANIFEST_FILE`] inside an artifact
/// directory (what `minisign -Sm manifest.json` writes).
pub const SIGNATURE_FILE: &str = "manifest.json.minisig";
/// Largest signature document accepted (a real one is about 330 bytes).
pub const SIGNATURE_BYTES_MAX: usize = 4096;
/// Largest public key document accepted (a `.pub` file is about 110 bytes).
pub const PUBLIC_KEY_BYTES_MAX: usize = 1024;

/// What an artifact is: a release binary, its size and digest, and the
/// facts of the release it runs as, written from that binary itself
/// (`BINARY releases --json`). Everything an older process needs to judge a
/// release it has never seen is here, under the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest version, [`MANIFEST_VERSION`].
    pub v: u32,
    pub release: Release,
    pub semver: String,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    /// Oldest node schema the release's controller serves.
    pub window_min_schema: Schema,
    /// Database schemas the release's controller migrates from.
    pub migrates_from: Vec<Schema>,
    /// Contract versions the binary speaks.
    pub contracts: Contracts,
    /// Lowercase hex SHA-256 of the binary.
    pub sha256: String,
    /// Size of the binary in bytes.
    pub size: u64,
    /// When the artifact was built, Unix milliseconds (set by the CLI).
    pub created_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    #[error("the manifest is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("the manifest is {size} bytes; at most {MANIFEST_BYTES_MAX} are accepted")]
    ManifestTooLarge { size: usize },
    #[error(
        "manifest version {found} is not supported (this binary reads version {MANIFEST_VERSION}); \
         build the artifact with a matching `handover artifact create`"
    )]
    UnsupportedVersion { found: u32 },
    #[error(
        "the binary does not carry release {release} (it carries {carried}); \
         build the artifact for one of those"
    )]
    UnknownRelease { release: u32, carried: String },
    #[error("the manifest's release facts are inconsistent: {0}")]
    BadFacts(String),
    #[error(
        "the manifest says {field} {found} for release {release}, but release {release} has \
         {field} {expected}; the manifest was edited or built by an incompatible version"
    )]
    ReleaseMismatch {
        release: u32,
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error(
        "semver {0:?} must be 1 to {SEMVER_CHARS_MAX} characters of letters, digits, '.', '-' and '+'"
    )]
    BadSemver(String),
    #[error("sha256 {0:?} must be exactly 64 lowercase hex digits")]
    BadSha256(String),
    #[error("size {0} is out of range: an artifact binary is 1 to {ARTIFACT_BYTES_MAX} bytes")]
    BadSize(u64),
    #[error("created_ms {0} must not be negative")]
    BadCreated(i64),
    #[error(
        "artifact id {0:?} is not of the form r<release>-<{ID_HEX_DIGITS} lowercase hex digits>"
    )]
    BadId(String),
    #[error(
        "size mismatch: the manifest says {expected} bytes but {actual} bytes arrived; \
         the binary is truncated, padded or not the one the manifest names"
    )]
    SizeMismatch { expected: u64, actual: u64 },
    #[error(
        "digest mismatch: the manifest says sha256 {expected} but the bytes hash to {actual}; \
         the binary is corrupt or was tampered with: rebuild or re-upload the artifact"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "the artifact is not signed, and only artifacts signed by a trusted key are accepted here: \
         sign it with `handover artifact sign DIR --key KEY` and upload it again"
    )]
    Unsigned,
    #[error(
        "the artifact is signed by key {key_id}, which is not trusted here (trusted: {trusted}); \
         sign it with a trusted key, or trust its public key with --trusted-key"
    )]
    UntrustedKey { key_id: String, trusted: String },
    #[error("the artifact's signature is refused: {0}")]
    BadSignature(String),
    #[error("not a minisign public key: {0}")]
    BadPublicKey(String),
}

impl ArtifactError {
    /// The stable error code shown in `{"error": code, ...}` answers.
    pub fn code(&self) -> &'static str {
        match self {
            ArtifactError::Malformed(_) => "malformed",
            ArtifactError::ManifestTooLarge { .. } => "too_large",
            ArtifactError::UnsupportedVersion { .. } => "unsupported_version",
            ArtifactError::UnknownRelease { .. } => "unknown_release",
            ArtifactError::ReleaseMismatch { .. } => "release_mismatch",
            ArtifactError::BadSemver(_)
            | ArtifactError::BadSha256(_)
            | ArtifactError::BadSize(_)
            | ArtifactError::BadCreated(_)
            | ArtifactError::BadFacts(_) => "invalid_manifest",
            ArtifactError::BadId(_) => "invalid_id",
            ArtifactError::SizeMismatch { .. } => "size_mismatch",
            ArtifactError::DigestMismatch { .. } => "digest_mismatch",
            ArtifactError::Unsigned => "unsigned",
            ArtifactError::UntrustedKey { .. } => "untrusted_key",
            ArtifactError::BadSignature(_) => "bad_signature",
            ArtifactError::BadPublicKey(_) => "bad_public_key",
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// The manifest of a binary that runs as the release `facts` describes
    /// and speaks `contracts`: both read from that binary.
    pub fn for_release(
        facts: &ReleaseFacts,
        contracts: Contracts,
        sha256: String,
        size: u64,
        created_ms: i64,
    ) -> Result<Manifest, ArtifactError> {
        let m = Manifest {
            v: MANIFEST_VERSION,
            release: facts.release,
            semver: facts.semver.clone(),
            schema: facts.schema,
            protocol: facts.protocol,
            window_min_schema: facts.window_min_schema,
            migrates_from: facts.migrates_from.clone(),
            contracts,
            sha256,
            size,
            created_ms,
        };
        m.validate()?;
        Ok(m)
    }

    /// The release this artifact runs as, as the manifest describes it.
    pub fn facts(&self) -> ReleaseFacts {
        ReleaseFacts {
            release: self.release,
            semver: self.semver.clone(),
            schema: self.schema,
            protocol: self.protocol,
            window_min_schema: self.window_min_schema,
            migrates_from: self.migrates_from.clone(),
        }
    }

    /// Checks what any process can know: the version, the shape of every
    /// field, and facts that agree with each other. Only for a release this
    /// binary carries does it also compare them with its own table (an edited
    /// manifest); a release it does not carry is judged later, against the
    /// live cluster, by preflight. `semver` is checked for shape only, so a
    /// patch build of a release (same facts) is accepted.
    pub fn validate(&self) -> Result<(), ArtifactError> {
        if self.v != MANIFEST_VERSION {
            return Err(ArtifactError::UnsupportedVersion { found: self.v });
        }
        if let Ok(info) = ReleaseInfo::of(self.release) {
            let own = info.facts();
            let show = |p: ProtocolRange| format!("{}..={}", p.min, p.max);
            let list = |l: &[Schema]| format!("{l:?}");
            for (field, expected, found) in [
                ("schema", own.schema.to_string(), self.schema.to_string()),
                ("protocol", show(own.protocol), show(self.protocol)),
                (
                    "window_min_schema",
                    own.window_min_schema.to_string(),
                    self.window_min_schema.to_string(),
                ),
                (
                    "migrates_from",
                    list(&own.migrates_from),
                    list(&self.migrates_from),
                ),
            ] {
                if expected != found {
                    return Err(ArtifactError::ReleaseMismatch {
                        release: self.release.0,
                        field,
                        expected,
                        found,
                    });
                }
            }
        }
        check_facts(&self.facts())?;
        let c = self.contracts;
        if [
            c.worker_cli,
            c.supervisor_control,
            c.supervisor_handoff,
            c.upgrade_state,
        ]
        .contains(&0)
        {
            return Err(ArtifactError::BadFacts(
                "contract versions start at 1".into(),
            ));
        }
        if self.semver.is_empty()
            || self.semver.len() > SEMVER_CHARS_MAX
            || !self
                .semver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        {
            return Err(ArtifactError::BadSemver(self.semver.clone()));
        }
        if !is_sha256_hex(&self.sha256) {
            return Err(ArtifactError::BadSha256(self.sha256.clone()));
        }
        if self.size == 0 || self.size > ARTIFACT_BYTES_MAX {
            return Err(ArtifactError::BadSize(self.size));
        }
        if self.created_ms < 0 {
            return Err(ArtifactError::BadCreated(self.created_ms));
        }
        Ok(())
    }

    /// `r{release}-{first 12 hex digits of sha256}`: the artifact's directory
    /// name everywhere (controller store, node releases dir) and its URL id.
    pub fn id(&self) -> String {
        let prefix = self.sha256.get(..ID_HEX_DIGITS).unwrap_or(&self.sha256);
        format!("r{}-{prefix}", self.release.0)
    }

    /// Parses and validates a manifest document (bounded, strict fields).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ArtifactError> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ArtifactError::ManifestTooLarge { size: bytes.len() });
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ArtifactError::Malformed(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// The manifest document as written to disk: pretty JSON and a newline.
    pub fn to_pretty_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Facts that can describe a release at all: levels from 1, a protocol
/// range, a window that ends at the release's own schema, and migrations
/// only from older schemas.
pub fn check_facts(f: &ReleaseFacts) -> Result<(), ArtifactError> {
    let bad = |why: String| Err(ArtifactError::BadFacts(why));
    if f.release.0 == 0 || f.schema.0 == 0 {
        return bad("release and schema levels start at 1".into());
    }
    if f.protocol.min == 0 || f.protocol.min > f.protocol.max {
        return bad(format!(
            "protocol range {}..={} is empty",
            f.protocol.min, f.protocol.max
        ));
    }
    if f.window_min_schema.0 == 0 || f.window_min_schema > f.schema {
        return bad(format!(
            "window_min_schema {} must be 1 to the release's schema {}",
            f.window_min_schema, f.schema
        ));
    }
    if f.migrates_from.len() > MIGRATES_FROM_MAX {
        return bad(format!(
            "migrates_from lists more than {MIGRATES_FROM_MAX} schemas"
        ));
    }
    if f.migrates_from.iter().any(|s| s.0 == 0 || *s >= f.schema) {
        return bad(format!(
            "migrates_from {:?} must hold only schemas older than {}",
            f.migrates_from, f.schema
        ));
    }
    if f.migrates_from.windows(2).any(|w| w[0] >= w[1]) {
        return bad("migrates_from must be sorted without repeats".into());
    }
    Ok(())
}

/// Checks that `id` has the shape [`Manifest::id`] produces, so it can be
/// used as a path component. It says nothing about whether it exists.
pub fn check_id(id: &str) -> Result<(), ArtifactError> {
    let bad = || ArtifactError::BadId(id.chars().take(80).collect());
    let rest = id.strip_prefix('r').ok_or_else(bad)?;
    let (release, hex) = rest.split_once('-').ok_or_else(bad)?;
    let release_ok = !release.is_empty()
        && release.len() <= 10
        && release.bytes().all(|b| b.is_ascii_digit())
        && !release.starts_with('0')
        && release.parse::<u32>().is_ok();
    let hex_ok =
        hex.len() == ID_HEX_DIGITS && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if release_ok && hex_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Bytes of a minisign public key: algorithm (2), key id (8), Ed25519 key (32).
const PUBLIC_KEY_RAW_BYTES: usize = 42;

/// The key id as minisign shows it (`minisign public key: <ID>`): the 8 id
/// bytes as a little-endian number in 16 uppercase hex digits.
fn key_id_of(raw: &[u8]) -> Option<String> {
    let bytes: [u8; 8] = raw.get(2..10)?.try_into().ok()?;
    Some(format!("{:016X}", u64::from_le_bytes(bytes)))
}

/// A trusted minisign (Ed25519) public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    key: minisign_verify::PublicKey,
    id: String,
    base64: String,
}

impl PublicKey {
    /// The key from its base64 line (the second line of a `.pub` file).
    pub fn from_base64(line: &str) -> Result<PublicKey, ArtifactError> {
        let line = line.trim();
        let bad = |why: &str| ArtifactError::BadPublicKey(why.to_owned());
        if line.len() > PUBLIC_KEY_BYTES_MAX {
            return Err(bad("the key line is too long"));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|_| bad("the key line is not base64"))?;
        if raw.len() != PUBLIC_KEY_RAW_BYTES || raw.get(..2) != Some(b"Ed".as_slice()) {
            return Err(bad(
                "the key line does not hold an Ed25519 minisign key (56 base64 characters starting with RW)",
            ));
        }
        let key = minisign_verify::PublicKey::from_base64(line)
            .map_err(|e| ArtifactError::BadPublicKey(e.to_string()))?;
        let id = key_id_of(&raw).ok_or_else(|| bad("no key id"))?;
        Ok(PublicKey {
            key,
            id,
            base64: line.to_owned(),
        })
    }

    /// The key from the text of a `.pub` file (`untrusted comment: ...` then
    /// the base64 line), or from the base64 line alone.
    pub fn decode(text: &str) -> Result<PublicKey, ArtifactError> {
        if text.len() > PUBLIC_KEY_BYTES_MAX {
            return Err(ArtifactError::BadPublicKey(format!(
                "{} bytes; a public key file is at most {PUBLIC_KEY_BYTES_MAX}",
                text.len()
            )));
        }
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("untrusted comment:"));
        let line = lines.next().ok_or_else(|| {
            ArtifactError::BadPublicKey("no key line (expected a minisign .pub file)".into())
        })?;
        if lines.next().is_some() {
            return Err(ArtifactError::BadPublicKey(
                "more than one key line: give one key per file".into(),
            ));
        }
        PublicKey::from_base64(line)
    }

    /// The key id, as minisign shows it (16 uppercase hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The base64 line, as in the `.pub` file.
    pub fn to_base64(&self) -> &str {
        &self.base64
    }
}

/// Parses a minisign signature document and returns the id of the key that
/// made it. Says nothing about whether it verifies.
pub fn signature_key_id(signature_text: &str) -> Result<String, ArtifactError> {
    if signature_text.len() > SIGNATURE_BYTES_MAX {
        return Err(ArtifactError::BadSignature(format!(
            "the signature is {} bytes; at most {SIGNATURE_BYTES_MAX} are accepted",
            signature_text.len()
        )));
    }
    let not_minisign = || {
        ArtifactError::BadSignature(
            "it is not a minisign signature (4 lines: untrusted comment, signature, \
             trusted comment, global signature)"
                .into(),
        )
    };
    minisign_verify::Signature::decode(signature_text).map_err(|_| not_minisign())?;
    let line = signature_text.lines().nth(1).ok_or_else(not_minisign)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .map_err(|_| not_minisign())?;
    key_id_of(&raw).ok_or_else(not_minisign)
}

/// Checks that `signature_text` is a valid minisign signature of exactly
/// `manifest_bytes` by one of the `trusted` keys, then decodes and validates
/// the manifest. Nothing of an artifact is used before this passes.
///
/// `None` (or an empty signature) is [`ArtifactError::Unsigned`]; a key not
/// in `trusted` is [`ArtifactError::UntrustedKey`]; a signature that does not
/// verify (the manifest changed after signing, a corrupt or legacy
/// signature) is [`ArtifactError::BadSignature`].
pub fn verify_manifest(
    manifest_bytes: &[u8],
    signature_text: Option<&str>,
    trusted: &[PublicKey],
) -> Result<Manifest, ArtifactError> {
    if manifest_bytes.len() > MANIFEST_BYTES_MAX {
        return Err(ArtifactError::ManifestTooLarge {
            size: manifest_bytes.len(),
        });
    }
    let text = signature_text
        .filter(|t| !t.trim().is_empty())
        .ok_or(ArtifactError::Unsigned)?;
    let key_id = signature_key_id(text)?;
    let signature = minisign_verify::Signature::decode(text)
        .map_err(|e| ArtifactError::BadSignature(e.to_string()))?;
    let mut candidates = trusted.iter().filter(|k| k.id == key_id).peekable();
    if candidates.peek().is_none() {
        let ids: Vec<&str> = trusted.iter().map(|k| k.id.as_str()).collect();
        return Err(ArtifactError::UntrustedKey {
            key_id,
            trusted: if ids.is_empty() {
                "no key".to_owned()
            } else {
                ids.join(", ")
            },
        });
    }
    let mut refusal = None;
    for key in candidates {
        match key.key.verify(manifest_bytes, &signature, false) {
            Ok(()) => return Manifest::decode(manifest_bytes),
            Err(minisign_verify::Error::UnexpectedAlgorithm) => {
                refusal = Some(
                    "it is a legacy (not pre-hashed) minisign signature; \
                     sign again with `handover artifact sign` or minisign 0.8 or later",
                )
            }
            Err(_) => {}
        }
    }
    Err(ArtifactError::BadSignature(
        refusal
            .unwrap_or(
                "it does not match the manifest: the manifest was changed after signing, \
                 or the signature is corrupt; sign the artifact again",
            )
            .to_owned(),
    ))
}

/// A running SHA-256 and byte count, for whoever builds a manifest.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.len = self.len.saturating_add(chunk.len() as u64);
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Lowercase hex SHA-256 and the byte count.
    pub fn finish(self) -> (String, u64) {
        (to_hex(&self.sha.finalize()), self.len)
    }
}

/// Lowercase hex, the way digests are written everywhere.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Lowercase hex SHA-256 of `bytes` (small inputs; stream large ones
/// through [`Hasher`]).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Hasher::new();
    h.update(bytes);
    h.finish().0
}

/// Incremental digest check: feed the binary in chunks as it arrives, then
/// [`finish`](DigestCheck::finish) compares size and SHA-256 with the
/// manifest. [`update`](DigestCheck::update) fails as soon as more bytes
/// arrive than the manifest announces, so a receiver never stores more.
pub struct DigestCheck {
    expected_sha256: String,
    expected_size: u64,
    hasher: Hasher,
}

impl DigestCheck {
    pub fn new(m: &Manifest) -> DigestCheck {
        DigestCheck {
            expected_sha256: m.sha256.clone(),
            expected_size: m.size,
            hasher: Hasher::new(),
        }
    }

    pub fn update(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        let total = self.hasher.len().saturating_add(chunk.len() as u64);
        if total > self.expected_size {
            return Err(ArtifactError::SizeMismatch {
                expected: self.expected_size,
                actual: total,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.hasher.len()
    }

    pub fn finish(self) -> Result<(), ArtifactError> {
        let (actual, size) = self.hasher.finish();
        if size != self.expected_size {
            return Err(ArtifactError::SizeMismatch {
                expected: self.expected_size,
                actual: size,
            });
        }
        if actual != self.expected_sha256 {
            return Err(ArtifactError::DigestMismatch {
                expected: self.expected_sha256,
                actual,
            });
        }
        Ok(())
    }
}

/// Whether a controller or node checks artifact signatures, decided once
/// at start by [`SignaturePolicy::decide`]: signatures are required unless
/// the operator opted out explicitly, and the opt-out is refused on any
/// address other hosts can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignaturePolicy {
    /// Every artifact must be signed by one of the trusted keys.
    Required,
    /// Artifacts are used without a signature check
    /// (`--allow-unsigned-artifacts`, on a loopback address only): local
    /// tests and demos.
    UnsignedAllowed,
}

/// Why a process refuses to start with its artifact-signature settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignaturePolicyError {
    #[error(
        "artifact signatures are required and no key is trusted: start with \
         --trusted-key FILE (a minisign public key, e.g. handover.pub from \
         `handover artifact keygen`; repeatable, or HANDOVER_TRUSTED_KEYS=a.pub,b.pub). \
         For a local test on a loopback address only, --allow-unsigned-artifacts \
         (HANDOVER_ALLOW_UNSIGNED_ARTIFACTS=true) runs without signature checks"
    )]
    NoTrustedKey,
    #[error(
        "--allow-unsigned-artifacts is refused on {listen}: it is allowed only on a \
         loopback address (127.0.0.0/8 or ::1), where no other host can reach this \
         process; give --trusted-key FILE instead, or listen on 127.0.0.1"
    )]
    UnsignedNotLoopback { listen: std::net::IpAddr },
    #[error(
        "--allow-unsigned-artifacts and --trusted-key are both given: with a trusted key \
         every artifact must be signed; drop one (HANDOVER_ALLOW_UNSIGNED_ARTIFACTS or \
         HANDOVER_TRUSTED_KEYS may be set in the environment)"
    )]
    UnsignedWithKeys,
}

impl SignaturePolicy {
    /// The policy of a process that trusts `trusted_keys` keys, was or was
    /// not given the opt-in, and listens on `listen`. Called before the
    /// process binds its socket, so a refusal leaves nothing listening.
    pub fn decide(
        trusted_keys: usize,
        allow_unsigned: bool,
        listen: std::net::IpAddr,
    ) -> Result<SignaturePolicy, SignaturePolicyError> {
        match (trusted_keys, allow_unsigned) {
            (0, false) => Err(SignaturePolicyError::NoTrustedKey),
            (_, false) => Ok(SignaturePolicy::Required),
            (0, true) if listen.to_canonical().is_loopback() => {
                Ok(SignaturePolicy::UnsignedAllowed)
            }
            (0, true) => Err(SignaturePolicyError::UnsignedNotLoopback { listen }),
            (_, true) => Err(SignaturePolicyError::UnsignedWithKeys),
        }
    }
}

#[cfg(test)]
mod tests;
