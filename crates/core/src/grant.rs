//! Grants: what a node may do against the controller it talks to.

use crate::release::{ReleaseInfo, Schema};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The outcome of a handshake (DESIGN.md "Grants").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// Read parameters and write records over the main channel.
    Full,
    /// No reads; push queued records over the redundant channel for translation.
    Deliver,
    /// Nothing: queue locally, keep serving from the parameter cache.
    Fenced,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Full => "full",
            Grant::Deliver => "deliver",
            Grant::Fenced => "fenced",
        }
    }

    pub fn may_read_params(self) -> bool {
        self == Grant::Full
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a grant was given; shown to operators next to the grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantReason {
    SameSchema,
    OlderSchemaInWindow,
    FenceInForce,
    NodeNewerThanDatabase,
    NodeOutsideWindow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDecision {
    pub grant: Grant,
    pub reason: GrantReason,
}

/// The compatibility rule of DESIGN.md, as one function: a fence wins, then
/// the node's schema against the database's and the controller's window.
pub fn decide_grant(controller: &ReleaseInfo, node_schema: Schema, fenced: bool) -> GrantDecision {
    let (grant, reason) = if fenced {
        (Grant::Fenced, GrantReason::FenceInForce)
    } else if node_schema == controller.schema {
        (Grant::Full, GrantReason::SameSchema)
    } else if node_schema > controller.schema {
        (Grant::Fenced, GrantReason::NodeNewerThanDatabase)
    } else if controller.in_window(node_schema) {
        (Grant::Deliver, GrantReason::OlderSchemaInWindow)
    } else {
        (Grant::Fenced, GrantReason::NodeOutsideWindow)
    };
    GrantDecision { grant, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::Release;

    fn check(controller: u32, node_schema: u32, fenced: bool, grant: Grant, reason: GrantReason) {
        let info = ReleaseInfo::of(Release(controller)).unwrap();
        let got = decide_grant(info, Schema(node_schema), fenced);
        assert_eq!(
            got,
            GrantDecision { grant, reason },
            "controller r{controller}, node schema {node_schema}, fenced {fenced}"
        );
    }

    #[test]
    fn compatibility_table() {
        use Grant::*;
        use GrantReason::*;
        check(1, 1, false, Full, SameSchema);
        check(1, 2, false, Fenced, NodeNewerThanDatabase);
        check(1, 0, false, Fenced, NodeOutsideWindow);
        check(2, 2, false, Full, SameSchema);
        check(2, 1, false, Deliver, OlderSchemaInWindow);
        check(2, 3, false, Fenced, NodeNewerThanDatabase);
        check(2, 0, false, Fenced, NodeOutsideWindow);
        for (c, s) in [(1, 1), (2, 1), (2, 2), (1, 2)] {
            check(c, s, true, Fenced, FenceInForce);
        }
    }

    #[test]
    fn only_full_reads_parameters() {
        assert!(Grant::Full.may_read_params());
        assert!(!Grant::Deliver.may_read_params());
        assert!(!Grant::Fenced.may_read_params());
    }
}
