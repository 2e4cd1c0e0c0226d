//! Who a node is. The controller's groups say which node ids exist and in
//! which role; a node proves its id with the credential the controller
//! issued it, or once with a bootstrap token bound to that id (`handover
//! node add`, after Kubernetes' bootstrap tokens). A hello can therefore
//! never claim another node's id, nor a role or group the operator did not
//! configure.
//!
//! Secrets are kept only as SHA-256 digests ([`SecretDigest`]): they are
//! 256 random bits, so a digest is as good as a slow hash against guessing,
//! and it is an exact key a database indexes, so an unknown credential is
//! refused with one index lookup.
//!
//! Over TLS a node's credential is its client certificate, pinned (the way
//! SSH and WireGuard pin keys): the node makes a key and a self-signed
//! certificate at its first start, the TLS handshake proves it holds the
//! key, and the controller stores the certificate's SHA-256
//! ([`SecretDigest::of_certificate`]) where a bearer credential's digest
//! would be. So no secret crosses the wire after the bootstrap token,
//! revocation (`handover node remove`) takes effect at the next request
//! with no revocation list, and nothing expires that needs renewing.

use crate::admission::{ErrorCode, Refusal};
use crate::role::Role;
use crate::wire::Hello;
use sha2::{Digest as _, Sha256};

/// How long a bootstrap token is valid unless the operator says otherwise:
/// long enough to provision a host in a working day, short enough that a
/// token left in a shell history is soon useless.
pub const BOOTSTRAP_TTL_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// The longest a bootstrap token may be valid (a week).
pub const BOOTSTRAP_TTL_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;
/// The shortest (a minute): anything shorter expires before a node starts.
pub const BOOTSTRAP_TTL_MS_MIN: u64 = 60 * 1000;
/// Bootstrap tokens one `node add` may issue at once.
pub const NODE_ADD_BATCH_MAX: usize = 1_000;
/// Groups one controller registers, so node registrations are bounded too
/// (two nodes per group): 20,000 nodes, twice the fleet `handover bench`
/// measures.
pub const GROUPS_MAX: usize = 10_000;
/// Prefix of a bootstrap token, so one found in a log or a file says what it is.
pub const BOOTSTRAP_TOKEN_PREFIX: &str = "hob_";

/// The SHA-256 (64 lowercase hex digits) of a secret: what is stored of
/// credentials and bootstrap tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretDigest(String);

impl SecretDigest {
    pub fn of(secret: &str) -> SecretDigest {
        SecretDigest(crate::artifact::to_hex(&Sha256::digest(secret.as_bytes())))
    }

    /// A TLS client certificate's credential, from the SHA-256 (hex) of its
    /// DER bytes. The prefix keeps it apart from every bearer digest (plain
    /// hex): a certificate is public, so a bearer whose digest equalled it
    /// would let anyone who saw the certificate pass as its node.
    pub fn of_certificate(der_sha256_hex: &str) -> SecretDigest {
        SecretDigest(format!("{CERTIFICATE_DIGEST_PREFIX}{der_sha256_hex}"))
    }

    /// Whether this is a certificate's credential, not a bearer's.
    pub fn is_certificate(&self) -> bool {
        self.0.starts_with(CERTIFICATE_DIGEST_PREFIX)
    }

    /// A digest as stored (trusted to be one).
    pub fn from_stored(hex: String) -> SecretDigest {
        SecretDigest(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compared in constant time, so a digest cannot be learnt byte by byte.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        same_secret(&self.0, &other.0)
    }
}

/// Two secrets compared in constant time (for equal lengths), so a secret
/// cannot be guessed byte by byte from how long a refusal takes.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a certificate credential starts with (see [`SecretDigest::of_certificate`]).
pub const CERTIFICATE_DIGEST_PREFIX: &str = "cert-sha256:";

/// Whether a node's credential is a bearer secret it sends (not a
/// certificate's digest, which its TLS connection proves instead).
pub fn is_bearer_secret(credential: &str) -> bool {
    !credential.starts_with(CERTIFICATE_DIGEST_PREFIX)
}

/// What a hello proves, as opposed to what it says about itself.
#[derive(Clone, Debug)]
pub struct Presented {
    /// The node's credential: its TLS client certificate when the
    /// connection presented one, else the hello's token.
    pub credential: SecretDigest,
    /// The hello's token, taken as a bootstrap token.
    pub token: SecretDigest,
    /// What a bootstrap token would be traded for: the certificate, or the
    /// bearer credential the hello names in `new_credential`.
    pub new_credential: Option<SecretDigest>,
}

impl Presented {
    /// A hello on a connection without a client certificate: its token is
    /// its credential (plain HTTP on loopback, nodes of earlier builds).
    pub fn bearer(hello: &Hello) -> Presented {
        let token = SecretDigest::of(&hello.token);
        Presented {
            credential: token.clone(),
            token,
            new_credential: hello.new_credential.as_deref().map(SecretDigest::of),
        }
    }

    /// A hello on a connection whose client proved it holds `certificate`:
    /// that is its credential, whatever the hello's token says.
    pub fn certificate(hello: &Hello, certificate: SecretDigest) -> Presented {
        Presented {
            credential: certificate.clone(),
            token: SecretDigest::of(&hello.token),
            new_credential: Some(certificate),
        }
    }
}

/// A node's place in the controller's groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub group: String,
    pub role: Role,
}

/// A bootstrap token as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapToken {
    pub digest: SecretDigest,
    pub expires_ms: i64,
    /// When a node traded it for its credential; a token is good once.
    pub used_ms: Option<i64>,
}

/// What the controller knows of the node id a hello names.
#[derive(Clone, Copy, Debug, Default)]
pub struct Known<'a> {
    pub membership: Option<&'a Membership>,
    pub credential: Option<&'a SecretDigest>,
    pub bootstrap: Option<&'a BootstrapToken>,
}

/// What the hello's token proved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The node's own credential: the session goes on with it.
    Credential,
    /// The node's unused bootstrap token: it is traded for a new credential.
    Bootstrap,
}

/// The identity half of hello: the node id must be one a group names, in
/// that group and role, and what it presents must be that node's credential
/// or its unused, unexpired bootstrap token.
pub fn admit_hello(
    hello: &Hello,
    presented: &Presented,
    known: Known<'_>,
    now_ms: i64,
) -> Result<Proof, Refusal> {
    let id = &hello.node_id;
    let Some(m) = known.membership else {
        return Err(Refusal::new(
            ErrorCode::UnknownNode,
            format!(
                "no group names node {id:?}: create a group with it (`handover group create`), \
                 then `handover node add {id}`"
            ),
        ));
    };
    if m.group != hello.group || m.role != hello.role {
        return Err(Refusal::new(
            ErrorCode::IdentityMismatch,
            format!(
                "node {id:?} is the {} of group {:?}, but says it is the {} of group {:?}: \
                 start it with --role {} --group {}",
                m.role.as_str(),
                m.group,
                hello.role.as_str(),
                hello.group,
                m.role.as_str(),
                m.group
            ),
        ));
    }
    if known
        .credential
        .is_some_and(|c| c.matches(&presented.credential))
    {
        return Ok(Proof::Credential);
    }
    match known.bootstrap {
        Some(t) if t.digest.matches(&presented.token) => match t.used_ms {
            Some(used) => Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "the bootstrap token of node {id:?} was already used (at {used} ms): a token \
                     is good once; if the node lost its credential, issue a new one with \
                     `handover node add {id} --replace`"
                ),
            )),
            None if now_ms >= t.expires_ms => Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "the bootstrap token of node {id:?} expired (at {} ms): issue a new one \
                     with `handover node add {id}`",
                    t.expires_ms
                ),
            )),
            None if presented.new_credential.is_none() => Err(Refusal::new(
                ErrorCode::InvalidField,
                "a hello with a bootstrap token carries the node's new_credential",
            )),
            None => Ok(Proof::Bootstrap),
        },
        _ if presented.credential.is_certificate() => Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "this client certificate is not node {id:?}'s: a node keeps the one it made \
                 at its first start (in its data dir); to give {id:?} a new one, issue \
                 `handover node add {id} --replace` and start it with an empty data dir"
            ),
        )),
        _ => Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "wrong token for node {id:?}: present this node's own credential, or the \
                 bootstrap token `handover node add {id}` issued"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{Release, ReleaseInfo};

    fn hello(id: &str, role: Role, group: &str, token: &str) -> Hello {
        let info = ReleaseInfo::of(Release(2)).unwrap();
        Hello {
            new_credential: Some("c".repeat(32)),
            ..Hello::new(id, token, info, role, group, "http://127.0.0.1:1")
        }
    }

    const NOW: i64 = 1_000_000;

    /// Every way a hello's identity is judged.
    #[test]
    fn hello_identity_table() {
        let member = Membership {
            group: "g1".into(),
            role: Role::Backup,
        };
        let cred = SecretDigest::of("cred-of-b");
        let fresh = BootstrapToken {
            digest: SecretDigest::of("hob_boot"),
            expires_ms: NOW + 1,
            used_ms: None,
        };
        let used = BootstrapToken {
            used_ms: Some(NOW - 5),
            ..fresh.clone()
        };
        let expired = BootstrapToken {
            expires_ms: NOW,
            ..fresh.clone()
        };
        use ErrorCode::*;
        /// id, role, group, token, membership, credential, bootstrap token, outcome
        type Case<'a> = (
            &'a str,
            Role,
            &'a str,
            &'a str,
            Option<&'a Membership>,
            Option<&'a SecretDigest>,
            Option<&'a BootstrapToken>,
            Result<Proof, ErrorCode>,
        );
        let (m, c) = (Some(&member), Some(&cred));
        let cases: Vec<Case> = vec![
            // The node's own credential, as configured.
            (
                "g1-b",
                Role::Backup,
                "g1",
                "cred-of-b",
                m,
                c,
                Some(&used),
                Ok(Proof::Credential),
            ),
            // Its unused, unexpired bootstrap token.
            (
                "g1-b",
                Role::Backup,
                "g1",
                "hob_boot",
                m,
                None,
                Some(&fresh),
                Ok(Proof::Bootstrap),
            ),
            // A token that was traded already, or expired.
            (
                "g1-b",
                Role::Backup,
                "g1",
                "hob_boot",
                m,
                c,
                Some(&used),
                Err(Unauthorized),
            ),
            (
                "g1-b",
                Role::Backup,
                "g1",
                "hob_boot",
                m,
                None,
                Some(&expired),
                Err(Unauthorized),
            ),
            // Another node's credential or token, or none.
            (
                "g1-b",
                Role::Backup,
                "g1",
                "cred-of-a",
                m,
                c,
                None,
                Err(Unauthorized),
            ),
            (
                "g1-b",
                Role::Backup,
                "g1",
                "cred-of-b",
                m,
                None,
                None,
                Err(Unauthorized),
            ),
            // A role or group the operator did not configure, whatever the token.
            (
                "g1-b",
                Role::Primary,
                "g1",
                "cred-of-b",
                m,
                c,
                None,
                Err(IdentityMismatch),
            ),
            (
                "g1-b",
                Role::Backup,
                "g2",
                "cred-of-b",
                m,
                c,
                None,
                Err(IdentityMismatch),
            ),
            // An id no group names.
            (
                "zz",
                Role::Primary,
                "g1",
                "hob_boot",
                None,
                None,
                Some(&fresh),
                Err(UnknownNode),
            ),
        ];
        for (i, (id, role, group, token, membership, credential, bootstrap, want)) in
            cases.into_iter().enumerate()
        {
            let known = Known {
                membership,
                credential,
                bootstrap,
            };
            let h = hello(id, role, group, token);
            let got = admit_hello(&h, &Presented::bearer(&h), known, NOW).map_err(|r| r.code);
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn a_bootstrap_hello_names_the_credential_it_chose() {
        let member = Membership {
            group: "g1".into(),
            role: Role::Primary,
        };
        let token = BootstrapToken {
            digest: SecretDigest::of("hob_t"),
            expires_ms: NOW + 1,
            used_ms: None,
        };
        let known = Known {
            membership: Some(&member),
            credential: None,
            bootstrap: Some(&token),
        };
        let mut h = hello("a", Role::Primary, "g1", "hob_t");
        h.new_credential = None;
        let r = admit_hello(&h, &Presented::bearer(&h), known, NOW).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidField);
    }

    #[test]
    fn digests_are_hex_sha256_and_compare_exactly() {
        let d = SecretDigest::of("abc");
        assert_eq!(
            d.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(d.matches(&SecretDigest::of("abc")));
        assert!(!d.matches(&SecretDigest::of("abd")));
        assert!(!d.matches(&SecretDigest::from_stored(String::new())));
    }

    #[test]
    fn refusals_name_the_fix() {
        let member = Membership {
            group: "g1".into(),
            role: Role::Primary,
        };
        let known = Known {
            membership: Some(&member),
            ..Known::default()
        };
        let h = hello("a", Role::Backup, "g1", "t");
        let r = admit_hello(&h, &Presented::bearer(&h), known, NOW).unwrap_err();
        assert!(r.message.contains("--role primary --group g1"), "{r}");
        let h = hello("zz", Role::Primary, "g1", "t");
        let r = admit_hello(&h, &Presented::bearer(&h), Known::default(), NOW).unwrap_err();
        assert!(r.message.contains("handover node add zz"), "{r}");
    }

    /// A certificate is the credential, whatever the token says; its digest
    /// is public, so no bearer can pass for it; a certificate trades a
    /// bootstrap token for itself.
    #[test]
    fn a_certificate_is_the_credential_and_no_bearer_passes_for_it() {
        let member = Membership {
            group: "g1".into(),
            role: Role::Backup,
        };
        let cert = SecretDigest::of_certificate(&"ab".repeat(32));
        assert!(cert.is_certificate());
        let token = BootstrapToken {
            digest: SecretDigest::of("hob_boot"),
            expires_ms: NOW + 1,
            used_ms: None,
        };
        let registered = Known {
            membership: Some(&member),
            credential: Some(&cert),
            bootstrap: None,
        };
        // The node itself: its certificate on the connection; the token is
        // whatever it sends (here the certificate's digest, which is public).
        let h = hello("g1-b", Role::Backup, "g1", cert.as_str());
        assert_eq!(
            admit_hello(
                &h,
                &Presented::certificate(&h, cert.clone()),
                registered,
                NOW
            ),
            Ok(Proof::Credential)
        );
        // Anyone else: the public digest as a bearer, or another certificate.
        assert_eq!(
            admit_hello(&h, &Presented::bearer(&h), registered, NOW).map_err(|r| r.code),
            Err(ErrorCode::Unauthorized)
        );
        let other = SecretDigest::of_certificate(&"cd".repeat(32));
        let refused = admit_hello(
            &h,
            &Presented::certificate(&h, other.clone()),
            registered,
            NOW,
        )
        .unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthorized);
        assert!(refused.message.contains("--replace"), "{refused}");
        // A first hello: the bootstrap token, traded for the certificate.
        let first = hello("g1-b", Role::Backup, "g1", "hob_boot");
        let fresh = Known {
            membership: Some(&member),
            credential: None,
            bootstrap: Some(&token),
        };
        let p = Presented::certificate(&first, other.clone());
        assert_eq!(admit_hello(&first, &p, fresh, NOW), Ok(Proof::Bootstrap));
        assert_eq!(p.new_credential, Some(other));
    }
}
