//! Releases, schemas and protocol ranges, and the rules that relate them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A product release level (1, 2, …). Fixes a schema and a protocol range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Release(pub u32);

/// A database schema version; also the version of the record format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schema(pub u32);

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Inclusive range of node-protocol versions a process speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolRange {
    pub min: u32,
    pub max: u32,
}

impl ProtocolRange {
    /// The highest version both sides speak, if any.
    pub fn negotiate(self, other: ProtocolRange) -> Option<u32> {
        let low = self.min.max(other.min);
        let high = self.max.min(other.max);
        (low <= high && self.min <= self.max && other.min <= other.max).then_some(high)
    }
}

/// What one release is: its schema, protocol range, the oldest schema
/// whose nodes its controller still accepts (the support window) and the
/// database schemas its controller migrates from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReleaseInfo {
    pub release: Release,
    pub semver: &'static str,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    /// Oldest node schema this release's controller serves with `deliver`.
    pub window_min_schema: Schema,
    /// Database schemas this release's controller migrates forward on start
    /// (one transaction for all steps); any other older schema is refused.
    pub migrates_from: &'static [Schema],
}

/// Release 1: channels with whole-second segments and one output size;
/// records name their channel and carry RFC 3339 text times.
const RELEASE_1: ReleaseInfo = ReleaseInfo {
    release: Release(1),
    semver: "1.0.0",
    schema: Schema(1),
    protocol: ProtocolRange { min: 1, max: 1 },
    window_min_schema: Schema(1),
    migrates_from: &[],
};

/// Release 2: `segment_ms` and a bitrate ladder, channels keyed by id,
/// records with node and Unix-ms fields.
const RELEASE_2: ReleaseInfo = ReleaseInfo {
    release: Release(2),
    semver: "2.0.0",
    schema: Schema(2),
    protocol: ProtocolRange { min: 1, max: 2 },
    window_min_schema: Schema(1),
    migrates_from: &[Schema(1)],
};

/// Release 3 (built only with `--features next-release` until it ships):
/// per-channel DVR window and alerts with a severity. Its window starts at
/// schema 2: a release-1 fleet goes through release 2 first.
#[cfg(feature = "next-release")]
const RELEASE_3: ReleaseInfo = ReleaseInfo {
    release: Release(3),
    semver: "3.0.0",
    schema: Schema(3),
    protocol: ProtocolRange { min: 2, max: 3 },
    window_min_schema: Schema(2),
    migrates_from: &[Schema(2)],
};

/// Every release this binary can run as (`--release N`), oldest first.
#[cfg(not(feature = "next-release"))]
pub const RELEASES: &[ReleaseInfo] = &[RELEASE_1, RELEASE_2];
#[cfg(feature = "next-release")]
pub const RELEASES: &[ReleaseInfo] = &[RELEASE_1, RELEASE_2, RELEASE_3];

/// The newest release this binary carries; the default for `--release`.
#[cfg(not(feature = "next-release"))]
pub const NEWEST: Release = Release(2);
#[cfg(feature = "next-release")]
pub const NEWEST: Release = Release(3);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("release {0} is not carried by this binary (it runs releases 1 to {newest})", newest = NEWEST.0)]
pub struct UnknownRelease(pub u32);

impl ReleaseInfo {
    pub fn of(release: Release) -> Result<&'static ReleaseInfo, UnknownRelease> {
        RELEASES
            .iter()
            .find(|r| r.release == release)
            .ok_or(UnknownRelease(release.0))
    }

    /// Whether a node of `schema` may talk to this release's controller at all.
    pub fn in_window(&self, schema: Schema) -> bool {
        schema >= self.window_min_schema && schema <= self.schema
    }

    /// The facts of this release as they travel in a manifest.
    pub fn facts(&self) -> ReleaseFacts {
        ReleaseFacts {
            release: self.release,
            semver: self.semver.to_owned(),
            schema: self.schema,
            protocol: self.protocol,
            window_min_schema: self.window_min_schema,
            migrates_from: self.migrates_from.to_vec(),
        }
    }
}

/// Versions of the contracts between two binaries: what an old process and a
/// new binary must agree on for one to hand over to the other. Each is bumped
/// only by a change the other side cannot live with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contracts {
    /// How a supervisor starts a worker: argv (`--release N` and the role's
    /// flags), `HANDOVER_WORKER=1`, the socket as `LISTEN_FDS`.
    pub worker_cli: u32,
    /// The JSON-lines control protocol on the supervisor's control socket.
    pub supervisor_control: u32,
    /// How a supervisor hands its socket and worker to a new binary when it
    /// re-executes itself.
    pub supervisor_handoff: u32,
    /// The persisted upgrade state: a binary reads every version up to its
    /// own, so it is the new binary's number that must not be older.
    pub upgrade_state: u32,
}

/// The contract versions this binary speaks.
pub const CONTRACTS: Contracts = Contracts {
    worker_cli: 1,
    supervisor_control: 1,
    supervisor_handoff: 1,
    // 2: targets carry their manifest's facts, digest and contracts; the
    // upgrade stores the path preflight chose.
    upgrade_state: 2,
};

/// One release as an artifact's manifest describes it: everything an older
/// process needs to judge a release it does not carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFacts {
    pub release: Release,
    pub semver: String,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    pub window_min_schema: Schema,
    pub migrates_from: Vec<Schema>,
}

impl ReleaseFacts {
    /// Whether a node of `schema` may talk to this release's controller at all.
    pub fn in_window(&self, schema: Schema) -> bool {
        schema >= self.window_min_schema && schema <= self.schema
    }

    /// Whether this release's controller opens a database of `schema`
    /// (its own, or one it migrates from).
    pub fn opens_database(&self, schema: Schema) -> bool {
        schema == self.schema || self.migrates_from.contains(&schema)
    }
}

/// The only [`BinaryFacts::format`] this binary writes and reads.
pub const BINARY_FACTS_FORMAT: u32 = 1;

/// What `handover releases --json` prints: the facts `artifact create` puts
/// into a manifest, read from the binary being packaged, never from the
/// packaging CLI's own table. Its shape is itself a contract (`format`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryFacts {
    pub format: u32,
    pub contracts: Contracts,
    pub releases: Vec<ReleaseFacts>,
}

impl BinaryFacts {
    /// This binary's facts.
    pub fn of_this_binary() -> BinaryFacts {
        BinaryFacts {
            format: BINARY_FACTS_FORMAT,
            contracts: CONTRACTS,
            releases: RELEASES.iter().map(ReleaseInfo::facts).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: (u32, u32), b: (u32, u32), expected: Option<u32>) {
        let a = ProtocolRange { min: a.0, max: a.1 };
        let b = ProtocolRange { min: b.0, max: b.1 };
        assert_eq!(a.negotiate(b), expected, "{a:?} vs {b:?}");
        assert_eq!(b.negotiate(a), expected, "{b:?} vs {a:?}");
    }

    #[test]
    fn protocol_negotiation() {
        check((1, 1), (1, 2), Some(1));
        check((1, 2), (1, 2), Some(2));
        check((1, 1), (2, 3), None);
        check((2, 1), (1, 2), None);
        check((3, 5), (4, 9), Some(5));
    }

    #[test]
    fn releases_are_ordered_and_known() {
        for pair in RELEASES.windows(2) {
            assert!(pair[0].release < pair[1].release);
            assert!(pair[0].schema < pair[1].schema);
        }
        assert_eq!(ReleaseInfo::of(NEWEST).map(|r| r.release), Ok(NEWEST));
        assert_eq!(ReleaseInfo::of(Release(9)), Err(UnknownRelease(9)));
    }

    #[test]
    fn support_window() {
        let r2 = ReleaseInfo::of(Release(2)).unwrap();
        assert!(r2.in_window(Schema(1)));
        assert!(r2.in_window(Schema(2)));
        assert!(!r2.in_window(Schema(3)));
        let r1 = ReleaseInfo::of(Release(1)).unwrap();
        assert!(!r1.in_window(Schema(2)));
        assert!(!r1.in_window(Schema(0)));
    }
}
