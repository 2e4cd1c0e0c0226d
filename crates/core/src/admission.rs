//! The controller's admission of node requests, and the codes it refuses
//! them with: one decision for the controller's handlers, the simulation's
//! controller and the node that reads the answers.
//!
//! A request is admitted only under the cluster's epoch (the fencing token)
//! and only as the node's grant allows: `full` reads parameters and writes
//! on the main channel, `deliver` writes on the redundant channel, `fenced`
//! does nothing. The schema a batch claims must be one the channel takes
//! from that node.

use crate::grant::{decide_grant, Grant};
use crate::release::{ReleaseInfo, Schema};
use crate::wire::{check_epoch, WireError};
use std::fmt;

/// Every error code of the node protocol (`{"error": code, ...}`), with
/// the HTTP status it is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The message is not JSON of the expected shape.
    Malformed,
    /// The message's `v` is one this release does not speak.
    UnsupportedVersion,
    /// A field is out of its bounds.
    InvalidField,
    /// No or an unknown credential, or the wrong token at hello.
    Unauthorized,
    /// Made under another epoch than the cluster's: hello again.
    StaleEpoch,
    /// The node's and the controller's protocol ranges do not overlap.
    NoCommonProtocol,
    /// The grant does not allow reading parameters.
    GrantForbidsRead,
    /// The grant does not allow writing on this channel.
    GrantForbidsWrite,
    /// The batch's schema is not one this channel takes from this node.
    SchemaMismatch,
    /// No group names the node id a hello claims.
    UnknownNode,
    /// The hello's role or group differs from the controller's groups.
    IdentityMismatch,
}

impl WireError {
    /// The code of the answer that refuses the message.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            WireError::Malformed(_) => ErrorCode::Malformed,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::Invalid { .. } => ErrorCode::InvalidField,
        }
    }

    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidField,
        ErrorCode::Unauthorized,
        ErrorCode::StaleEpoch,
        ErrorCode::NoCommonProtocol,
        ErrorCode::GrantForbidsRead,
        ErrorCode::GrantForbidsWrite,
        ErrorCode::SchemaMismatch,
        ErrorCode::UnknownNode,
        ErrorCode::IdentityMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::NoCommonProtocol => "no_common_protocol",
            ErrorCode::GrantForbidsRead => "grant_forbids_read",
            ErrorCode::GrantForbidsWrite => "grant_forbids_write",
            ErrorCode::SchemaMismatch => "schema_mismatch",
            ErrorCode::UnknownNode => "unknown_node",
            ErrorCode::IdentityMismatch => "identity_mismatch",
        }
    }

    /// The code a peer sent, if it is one of ours.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Malformed
            | ErrorCode::UnsupportedVersion
            | ErrorCode::InvalidField
            | ErrorCode::NoCommonProtocol
            | ErrorCode::SchemaMismatch => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::GrantForbidsRead
            | ErrorCode::GrantForbidsWrite
            | ErrorCode::UnknownNode
            | ErrorCode::IdentityMismatch => 403,
            ErrorCode::StaleEpoch => 409,
        }
    }

    /// Refusals a new hello heals: a stale epoch, an unknown credential, or
    /// a registration of another schema (a late hello of this node's
    /// previous release overtook the current one; found by the simulation).
    pub fn needs_handshake(self) -> bool {
        matches!(
            self,
            ErrorCode::StaleEpoch | ErrorCode::Unauthorized | ErrorCode::SchemaMismatch
        )
    }

    /// Refusals that say the node's idea of its grant is out of date.
    pub fn grant_outdated(self) -> bool {
        matches!(
            self,
            ErrorCode::GrantForbidsRead | ErrorCode::GrantForbidsWrite
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a node reads a refusal (status and code as they arrived): whether a
/// new hello heals it. A code from a newer peer that this release does not
/// know is judged by its status alone.
pub fn refusal_needs_handshake(status: u16, code: &str) -> bool {
    status == 409 || status == 401 || ErrorCode::parse(code).is_some_and(ErrorCode::needs_handshake)
}

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// What the controller knows when it admits a request.
#[derive(Clone, Copy, Debug)]
pub struct Admission<'a> {
    pub controller: &'a ReleaseInfo,
    pub epoch: u64,
    pub fenced: bool,
}

/// The two channels records arrive on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// `full`: records of the database's schema (or leftovers a node
    /// queued under its previous release, still inside the window).
    Main,
    /// `deliver`: records of the node's own, older schema, translated.
    Redundant,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Main => "main",
            Channel::Redundant => "redundant",
        }
    }

    /// The node-protocol path a batch of this channel is posted to.
    pub fn path(self) -> &'static str {
        match self {
            Channel::Main => "/node/v1/records",
            Channel::Redundant => "/node/v1/deliver",
        }
    }

    /// The grant that may write on this channel.
    pub fn grant(self) -> Grant {
        match self {
            Channel::Main => Grant::Full,
            Channel::Redundant => Grant::Deliver,
        }
    }
}

impl Admission<'_> {
    fn epoch(&self, held: u64) -> Result<(), Refusal> {
        check_epoch(held, self.epoch)
            .map_err(|e| Refusal::new(ErrorCode::StaleEpoch, e.to_string()))
    }

    /// A heartbeat: only under the cluster's epoch.
    pub fn heartbeat(&self, held_epoch: u64) -> Result<(), Refusal> {
        self.epoch(held_epoch)
    }

    /// A parameters read by a node of `node_schema`: the epoch, then a
    /// grant that reads.
    pub fn params(&self, node_schema: Schema, held_epoch: u64) -> Result<(), Refusal> {
        self.epoch(held_epoch)?;
        let d = decide_grant(self.controller, node_schema, self.fenced);
        if !d.grant.may_read_params() {
            return Err(Refusal::new(
                ErrorCode::GrantForbidsRead,
                format!(
                    "grant `{}` ({:?}) does not allow reading parameters: keep serving from the cached parameters",
                    d.grant, d.reason
                ),
            ));
        }
        Ok(())
    }

    /// A batch of records of `batch_schema` on `channel` from a node of
    /// `node_schema`: the epoch, the grant of the channel, then a schema the
    /// channel takes from that node.
    pub fn batch(
        &self,
        channel: Channel,
        node_schema: Schema,
        held_epoch: u64,
        batch_schema: Schema,
    ) -> Result<(), Refusal> {
        self.epoch(held_epoch)?;
        let grant = decide_grant(self.controller, node_schema, self.fenced).grant;
        let needed = channel.grant();
        let name = channel.as_str();
        if grant != needed {
            return Err(Refusal::new(
                ErrorCode::GrantForbidsWrite,
                format!("the {name} channel needs grant `{needed}`, this node holds `{grant}`"),
            ));
        }
        let info = self.controller;
        let (schema_ok, takes) = match channel {
            Channel::Main => (
                info.in_window(batch_schema),
                format!("schemas {} to {}", info.window_min_schema, info.schema),
            ),
            Channel::Redundant => (batch_schema == node_schema, format!("schema {node_schema}")),
        };
        if !schema_ok {
            return Err(Refusal::new(
                ErrorCode::SchemaMismatch,
                format!(
                    "batch says schema {batch_schema}, but the {name} channel takes {takes} from this node"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::Release;

    fn at(release: u32, fenced: bool) -> Admission<'static> {
        Admission {
            controller: ReleaseInfo::of(Release(release)).unwrap(),
            epoch: 5,
            fenced,
        }
    }

    #[test]
    fn codes_round_trip_and_carry_their_status() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!(matches!(c.status(), 400 | 401 | 403 | 409), "{c}");
        }
        assert_eq!(ErrorCode::parse("reboot"), None);
    }

    #[test]
    fn which_refusals_a_new_hello_heals() {
        assert!(refusal_needs_handshake(409, "stale_epoch"));
        assert!(refusal_needs_handshake(401, "unauthorized"));
        assert!(refusal_needs_handshake(400, "schema_mismatch"));
        assert!(refusal_needs_handshake(409, "a_code_from_the_future"));
        assert!(!refusal_needs_handshake(403, "grant_forbids_write"));
        assert!(!refusal_needs_handshake(400, "malformed"));
    }

    /// Every grant × channel × schema × epoch a release-2 controller meets.
    #[test]
    fn batch_admission_table() {
        use Channel::*;
        use ErrorCode::*;
        /// fenced, channel, node schema, held epoch, batch schema, refusal
        type Case = (bool, Channel, u32, u64, u32, Option<ErrorCode>);
        let cases: &[Case] = &[
            (false, Main, 2, 5, 2, None),
            (false, Main, 2, 5, 1, None), // leftovers of the previous release
            (false, Main, 2, 4, 2, Some(StaleEpoch)),
            (false, Main, 1, 5, 1, Some(GrantForbidsWrite)),
            (false, Main, 3, 5, 3, Some(GrantForbidsWrite)),
            (false, Redundant, 1, 5, 1, None),
            (false, Redundant, 1, 5, 2, Some(SchemaMismatch)),
            (false, Redundant, 2, 5, 2, Some(GrantForbidsWrite)),
            (false, Redundant, 1, 6, 1, Some(StaleEpoch)),
            (true, Main, 2, 5, 2, Some(GrantForbidsWrite)),
            (true, Redundant, 1, 5, 1, Some(GrantForbidsWrite)),
            (true, Main, 2, 4, 2, Some(StaleEpoch)),
        ];
        for &(fenced, channel, node, held, batch, want) in cases {
            let got = at(2, fenced)
                .batch(channel, Schema(node), held, Schema(batch))
                .err()
                .map(|r| r.code);
            assert_eq!(
                got, want,
                "fenced {fenced}, {channel:?}, node schema {node}, epoch {held}, batch schema {batch}"
            );
        }
    }

    #[test]
    fn only_full_reads_parameters_under_the_current_epoch() {
        assert_eq!(at(2, false).params(Schema(2), 5), Ok(()));
        let code = |r: Result<(), Refusal>| r.err().map(|r| r.code);
        assert_eq!(
            code(at(2, false).params(Schema(2), 4)),
            Some(ErrorCode::StaleEpoch)
        );
        assert_eq!(
            code(at(2, false).params(Schema(1), 5)),
            Some(ErrorCode::GrantForbidsRead)
        );
        assert_eq!(
            code(at(2, true).params(Schema(2), 5)),
            Some(ErrorCode::GrantForbidsRead)
        );
        assert_eq!(code(at(1, false).heartbeat(5)), None);
        assert_eq!(code(at(1, false).heartbeat(7)), Some(ErrorCode::StaleEpoch));
    }
}
