//! Who may use the operator API: the operator token may do everything, the
//! read-only token (`--read-only-token-file`, for dashboards and status)
//! may only read. Over TLS a client certificate the controller pins
//! (`--operator-cert`, `--read-only-cert`: the certificate files, e.g.
//! `operator.crt` and `read-only.crt` of `handover init`) gives the same
//! roles without a token; a pinned certificate is judged by its role, and a
//! certificate nobody pinned (a node's, say) counts for nothing.
//!
//! One layer, [`require`] (put on a router by [`guard`]), checks every
//! request before any handler runs, so no route can forget it, a route
//! added later included: reading (`GET`, `HEAD`) takes either token, every
//! other method the operator token ([`ApiRole::needed_for`]). Only the node
//! protocol (`/node/…`, whose requests carry node credentials, checked by
//! its handlers) and `/healthz` pass without an operator token
//! ([`is_public`]); any other path, an unknown one included, needs one.
//!
//! | bearer | `GET` / `HEAD` | any other method |
//! | --- | --- | --- |
//! | operator token | served | served |
//! | read-only token | served | 403 `forbidden` |
//! | another token, or none | 401 `unauthorized` | 401 `unauthorized` |

use crate::{ApiError, ApiResult};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use handover_core::api::ErrorCode;
use handover_core::wire::limits;
use handover_net::tls::PeerCertificate;

/// Shortest operator or read-only token: guessing one of 16 random
/// characters is out of reach.
pub const TOKEN_CHARS_MIN: usize = 16;

/// What a token lets its bearer do on the operator API. (Not a node's
/// `handover_core::role::Role`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiRole {
    /// Read everything (status, channels, groups, events, records, the
    /// upgrade, artifacts), change nothing: dashboards and monitoring.
    ReadOnly,
    /// Everything, changes included.
    Operator,
}

impl ApiRole {
    /// What a request of `method` needs: reading takes either token; any
    /// other method changes something and needs the operator token.
    pub fn needed_for(method: &Method) -> ApiRole {
        if method == Method::GET || method == Method::HEAD {
            ApiRole::ReadOnly
        } else {
            ApiRole::Operator
        }
    }

    /// Whether a token of this role may do what `needed` asks.
    pub fn allows(self, needed: ApiRole) -> bool {
        match self {
            ApiRole::Operator => true,
            ApiRole::ReadOnly => needed == ApiRole::ReadOnly,
        }
    }
}

/// Why a token is not acceptable (at start, before anything binds).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the {name} must be {TOKEN_CHARS_MIN} to {max} characters", max = limits::TOKEN_CHARS_MAX)]
    Length { name: &'static str },
    #[error(
        "the read-only token is the operator token: it would give dashboards every \
         right; choose another secret for it"
    )]
    SameAsOperator,
}

/// The operator API's credentials: the operator's token and, if
/// configured, the read-only one (never equal), and the client
/// certificates pinned to either role (by SHA-256). `Debug` shows no token.
#[derive(Clone)]
pub struct OperatorCredentials {
    operator: String,
    read_only: Option<String>,
    certificates: std::collections::HashMap<String, ApiRole>,
}

impl std::fmt::Debug for OperatorCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorCredentials")
            .field("read_only", &self.read_only.is_some())
            .finish_non_exhaustive()
    }
}

impl OperatorCredentials {
    /// Both tokens checked: each [`TOKEN_CHARS_MIN`] to
    /// [`limits::TOKEN_CHARS_MAX`] characters, and not the same.
    pub fn new(
        operator: String,
        read_only: Option<String>,
    ) -> Result<OperatorCredentials, TokenError> {
        let fits = |t: &str| (TOKEN_CHARS_MIN..=limits::TOKEN_CHARS_MAX).contains(&t.len());
        if !fits(&operator) {
            return Err(TokenError::Length {
                name: "operator token",
            });
        }
        if let Some(r) = &read_only {
            if !fits(r) {
                return Err(TokenError::Length {
                    name: "read-only token",
                });
            }
            if same_token(r, &operator) {
                return Err(TokenError::SameAsOperator);
            }
        }
        Ok(OperatorCredentials {
            operator,
            read_only,
            certificates: Default::default(),
        })
    }

    /// These credentials, with `certificate` (SHA-256 of its DER, hex)
    /// pinned to `role`; a certificate pinned to both roles keeps the lesser.
    pub fn pin(mut self, certificate: &str, role: ApiRole) -> OperatorCredentials {
        let role = match self.certificates.get(certificate) {
            Some(ApiRole::ReadOnly) => ApiRole::ReadOnly,
            _ => role,
        };
        self.certificates.insert(certificate.to_owned(), role);
        self
    }

    /// The role a client certificate gives, if it is pinned.
    pub fn role_of_certificate(&self, certificate: &PeerCertificate) -> Option<ApiRole> {
        self.certificates.get(&*certificate.sha256_hex).copied()
    }

    /// The role `token` gives, if any; compared with both tokens in
    /// constant time (both comparisons always run).
    pub fn role_of(&self, token: &str) -> Option<ApiRole> {
        let operator = same_token(token, &self.operator);
        let read_only = self
            .read_only
            .as_deref()
            .is_some_and(|r| same_token(token, r));
        match (operator, read_only) {
            (true, _) => Some(ApiRole::Operator),
            (false, true) => Some(ApiRole::ReadOnly),
            (false, false) => None,
        }
    }
}

/// Constant-time comparison so a token cannot be guessed byte by byte.
pub(crate) use handover_core::identity::same_secret as same_token;

/// `Authorization: Bearer <token>`, if the request carries one.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The one check of the operator API: the role of the client's pinned
/// certificate, else of its bearer token, if it allows `needed` (401
/// `unauthorized` for no or an unknown token, 403 `forbidden` for the
/// read-only role on a change).
pub fn check(
    headers: &HeaderMap,
    certificate: Option<&PeerCertificate>,
    tokens: &OperatorCredentials,
    needed: ApiRole,
) -> ApiResult<ApiRole> {
    if let Some(role) = certificate.and_then(|c| tokens.role_of_certificate(c)) {
        if role.allows(needed) {
            return Ok(role);
        }
        return Err(ApiError::operator(
            ErrorCode::Forbidden,
            "this client certificate is pinned read-only (--read-only-cert): it may only \
             read (GET); this request changes something and needs the operator's",
        ));
    }
    let Some(token) = bearer(headers) else {
        return Err(ApiError::operator(
            ErrorCode::Unauthorized,
            "missing `Authorization: Bearer <operator token>` (the controller's operator \
             or read-only token)",
        ));
    };
    match tokens.role_of(token) {
        Some(role) if role.allows(needed) => Ok(role),
        Some(_) => Err(ApiError::operator(
            ErrorCode::Forbidden,
            "the read-only token may only read (GET); this request changes something and \
             needs the operator token",
        )),
        None => Err(ApiError::operator(
            ErrorCode::Unauthorized,
            "wrong operator token",
        )),
    }
}

/// Whether `path` is served without an operator token: the node protocol
/// (its handlers check node credentials) and the health check. Everything
/// else needs one, unknown paths included.
pub fn is_public(path: &str) -> bool {
    path == "/healthz" || path.starts_with("/node/")
}

/// What the router's state gives [`require`].
pub trait OperatorAuth: Clone + Send + Sync + 'static {
    fn operator_credentials(&self) -> &OperatorCredentials;
}

/// The layer's check of one request: public paths pass; any other needs a
/// token whose role allows the request's method. The role is left in the
/// request's extensions.
pub async fn require<H: OperatorAuth>(
    State(host): State<H>,
    mut req: Request,
    next: Next,
) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let needed = ApiRole::needed_for(req.method());
    let certificate = req.extensions().get::<PeerCertificate>();
    match check(
        req.headers(),
        certificate,
        host.operator_credentials(),
        needed,
    ) {
        Ok(role) => {
            req.extensions_mut().insert(role);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// `router` with [`require`] in front of every route and fallback it has
/// (call it after the last route is added).
pub fn guard<S, H>(router: Router<S>, host: H) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    H: OperatorAuth,
{
    router.layer(axum::middleware::from_fn_with_state(host, require::<H>))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "operator-token-0123456789";
    const RO: &str = "read-only-token-0123456789";

    #[test]
    fn reading_takes_either_token_and_changing_only_the_operators() {
        for (method, needed) in [
            (Method::GET, ApiRole::ReadOnly),
            (Method::HEAD, ApiRole::ReadOnly),
            (Method::POST, ApiRole::Operator),
            (Method::PUT, ApiRole::Operator),
            (Method::DELETE, ApiRole::Operator),
            (Method::PATCH, ApiRole::Operator),
            (Method::OPTIONS, ApiRole::Operator),
        ] {
            assert_eq!(ApiRole::needed_for(&method), needed, "{method}");
        }
        assert!(ApiRole::Operator.allows(ApiRole::Operator));
        assert!(ApiRole::Operator.allows(ApiRole::ReadOnly));
        assert!(ApiRole::ReadOnly.allows(ApiRole::ReadOnly));
        assert!(!ApiRole::ReadOnly.allows(ApiRole::Operator));
    }

    #[test]
    fn tokens_are_checked_at_start() {
        let t = OperatorCredentials::new(OP.into(), Some(RO.into())).unwrap();
        assert_eq!(t.role_of(OP), Some(ApiRole::Operator));
        assert_eq!(t.role_of(RO), Some(ApiRole::ReadOnly));
        assert_eq!(t.role_of("operator-token-012345678"), None);
        assert_eq!(t.role_of(""), None);
        let only_operator = OperatorCredentials::new(OP.into(), None).unwrap();
        assert_eq!(only_operator.role_of(RO), None);
        assert!(!format!("{t:?}").contains(OP) && !format!("{t:?}").contains(RO));

        let short = "x".repeat(TOKEN_CHARS_MIN - 1);
        let long = "x".repeat(limits::TOKEN_CHARS_MAX + 1);
        for bad in [&short, &long] {
            assert_eq!(
                OperatorCredentials::new(bad.clone(), None).unwrap_err(),
                TokenError::Length {
                    name: "operator token"
                }
            );
            assert_eq!(
                OperatorCredentials::new(OP.into(), Some(bad.clone())).unwrap_err(),
                TokenError::Length {
                    name: "read-only token"
                }
            );
        }
        assert_eq!(
            OperatorCredentials::new(OP.into(), Some(OP.into())).unwrap_err(),
            TokenError::SameAsOperator
        );
    }

    #[test]
    fn the_check_answers_401_or_403_with_its_code() {
        let cert = |c: &str| PeerCertificate {
            sha256_hex: c.repeat(32).into(),
        };
        let (op_cert, ro_cert, node_cert) = (cert("0a"), cert("0b"), cert("0c"));
        let t = OperatorCredentials::new(OP.into(), Some(RO.into()))
            .unwrap()
            .pin(&op_cert.sha256_hex, ApiRole::Operator)
            .pin(&ro_cert.sha256_hex, ApiRole::ReadOnly)
            // Pinned to both: the lesser role.
            .pin(&node_cert.sha256_hex, ApiRole::ReadOnly)
            .pin(&node_cert.sha256_hex, ApiRole::Operator);
        let with = |token: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(token) = token {
                h.insert(
                    axum::http::header::AUTHORIZATION,
                    format!("Bearer {token}").parse().unwrap(),
                );
            }
            h
        };
        let cases = [
            (Some(OP), ApiRole::Operator, Ok(ApiRole::Operator)),
            (Some(OP), ApiRole::ReadOnly, Ok(ApiRole::Operator)),
            (Some(RO), ApiRole::ReadOnly, Ok(ApiRole::ReadOnly)),
            (Some(RO), ApiRole::Operator, Err((403, "forbidden"))),
            (
                Some("wrong-token-0123456789"),
                ApiRole::ReadOnly,
                Err((401, "unauthorized")),
            ),
            (None, ApiRole::ReadOnly, Err((401, "unauthorized"))),
        ];
        for (token, needed, want) in cases {
            let got =
                check(&with(token), None, &t, needed).map_err(|e| (e.status.as_u16(), e.code));
            assert_eq!(got, want, "{token:?} {needed:?}");
        }
        // A pinned certificate is judged by its role, whatever the token;
        // one nobody pinned counts for nothing.
        let stranger = cert("0d");
        let cert_cases = [
            (&op_cert, None, ApiRole::Operator, Ok(ApiRole::Operator)),
            (&ro_cert, None, ApiRole::ReadOnly, Ok(ApiRole::ReadOnly)),
            (
                &ro_cert,
                Some(OP),
                ApiRole::Operator,
                Err((403, "forbidden")),
            ),
            (&node_cert, None, ApiRole::Operator, Err((403, "forbidden"))),
            (
                &stranger,
                None,
                ApiRole::ReadOnly,
                Err((401, "unauthorized")),
            ),
            (
                &stranger,
                Some(RO),
                ApiRole::ReadOnly,
                Ok(ApiRole::ReadOnly),
            ),
        ];
        for (c, token, needed, want) in cert_cases {
            let got =
                check(&with(token), Some(c), &t, needed).map_err(|e| (e.status.as_u16(), e.code));
            assert_eq!(got, want, "{c:?} {token:?} {needed:?}");
        }
    }

    #[test]
    fn only_the_node_protocol_and_the_health_check_are_public() {
        for path in ["/healthz", "/node/v1/hello", "/node/v1/artifacts/x/binary"] {
            assert!(is_public(path), "{path}");
        }
        for path in [
            "/",
            "/api/v1/status",
            "/api/v1/artifacts",
            "/healthz/x",
            "/nodes",
            "/%6eode/v1/hello",
            "/API/v1/status",
        ] {
            assert!(!is_public(path), "{path}");
        }
    }
}
