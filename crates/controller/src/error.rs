//! Every error answer is JSON `{"error": code, "message": ...}` with the
//! status that fits; this is the one place that decides both. A code is
//! either the node protocol's ([`ErrorCode`], from `core::admission`) or the
//! operator API's ([`api::ErrorCode`], from `core::api`): no literal strings.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use handover_core::admission::{ErrorCode, Refusal};
use handover_core::api;
use handover_core::artifact::ArtifactError;
use handover_core::wire::{ErrorBody, StaleEpoch, WireError};
use handover_store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The node protocol's refusal of an unknown or missing credential.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::node(ErrorCode::Unauthorized, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::operator(api::ErrorCode::NotFound, message)
    }

    /// An operator-API answer: its code and that code's status.
    pub fn operator(code: api::ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status_of(code.status()), code.as_str(), message)
    }

    /// An operator-API code answered with another status than its own: an
    /// extractor's rejection keeps axum's status (`malformed` may be 415 or
    /// 422 there), the signature of an unsigned artifact is 404.
    pub fn operator_with_status(
        code: api::ErrorCode,
        status: StatusCode,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::new(status, code.as_str(), message)
    }

    /// An artifact refused: 400 with the refusal's code, whatever that
    /// code's own status (`too_large` of a manifest header too).
    pub fn artifact(e: &ArtifactError) -> ApiError {
        ApiError::operator_with_status(
            api::ErrorCode::of_artifact(e),
            StatusCode::BAD_REQUEST,
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    /// The answer of a node-protocol refusal: its code and that code's status.
    pub fn node(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status_of(code.status()), code.as_str(), message)
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> ApiError {
        ApiError::node(e.error_code(), e.to_string())
    }
}

impl From<StaleEpoch> for ApiError {
    fn from(e: StaleEpoch) -> ApiError {
        ApiError::node(ErrorCode::StaleEpoch, e.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        ApiError::node(r.code, r.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if let StoreError::StaleEpoch { .. } = e {
            // The node's answer to a stale epoch: hello again.
            return ApiError::node(ErrorCode::StaleEpoch, e.to_string());
        }
        let code = match &e {
            StoreError::NotLeader { .. } => api::ErrorCode::NotLeader,
            StoreError::StaleEpoch { .. } => api::ErrorCode::StoreError,
            StoreError::Invalid(_) => api::ErrorCode::InvalidField,
            StoreError::Exists { .. } => api::ErrorCode::Exists,
            StoreError::Missing { .. } => api::ErrorCode::NotFound,
            StoreError::Untranslatable { .. } => api::ErrorCode::Untranslatable,
            StoreError::Db(_) | StoreError::Open { .. } => api::ErrorCode::StoreUnavailable,
            StoreError::SchemaAhead { .. }
            | StoreError::SchemaBehind { .. }
            | StoreError::UnknownSchema(_)
            | StoreError::Migration { .. }
            | StoreError::Corrupt(_) => api::ErrorCode::StoreError,
        };
        let answer = ApiError::operator(code, e.to_string());
        if answer.status.is_server_error() {
            tracing::error!(error = %e, "store error");
        }
        answer
    }
}

/// A body extractor's rejection: `body_timeout` (408) for a body that
/// stalled past the listener's body read timeout, else axum's status with
/// `too_large` for a body over its limit or `malformed`.
fn body_rejection(
    r: &(dyn std::error::Error + 'static),
    status: StatusCode,
    message: String,
) -> ApiError {
    if handover_net::is_body_timeout(r) {
        return ApiError::operator(
            api::ErrorCode::BodyTimeout,
            format!("{message}: the request body stopped arriving; send the request again"),
        );
    }
    rejection(status, message)
}

/// An extractor's rejection with axum's status: `too_large` for a body over
/// its limit, else `malformed`.
fn rejection(status: StatusCode, message: String) -> ApiError {
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        api::ErrorCode::TooLarge
    } else {
        api::ErrorCode::Malformed
    };
    ApiError::operator_with_status(code, status, message)
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> ApiError {
        body_rejection(&r, r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::operator(api::ErrorCode::Malformed, r.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> ApiError {
        body_rejection(&r, r.status(), r.body_text())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
