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

/// What one release is: its schema, protocol range and the oldest schema
/// whose nodes its controller still accepts (the support window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReleaseInfo {
    pub release: Release,
    pub semver: &'static str,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    /// Oldest node schema this release's controller serves with `deliver`.
    pub window_min_schema: Schema,
}

/// Every release this binary can run as (`--release N`), oldest first.
pub const RELEASES: [ReleaseInfo; 2] = [
    ReleaseInfo {
        release: Release(1),
        semver: "1.0.0",
        schema: Schema(1),
        protocol: ProtocolRange { min: 1, max: 1 },
        window_min_schema: Schema(1),
    },
    ReleaseInfo {
        release: Release(2),
        semver: "2.0.0",
        schema: Schema(2),
        protocol: ProtocolRange { min: 1, max: 2 },
        window_min_schema: Schema(1),
    },
];

/// The newest release this binary carries; the default for `--release`.
pub const NEWEST: Release = Release(2);

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
