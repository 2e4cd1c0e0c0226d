//! Every error answer is JSON `{"error": code, "message": ...}` with the
//! status that fits; this is the one place that decides both.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use handover_core::admission::{ErrorCode, Refusal};
use handover_core::wire::{ErrorBody, StaleEpoch, WireError};
use handover_store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::node(ErrorCode::Unauthorized, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
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
        let status =
            StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, code.as_str(), message)
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
        let (status, code) = match &e {
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_field"),
            StoreError::Exists { .. } => (StatusCode::CONFLICT, "exists"),
            StoreError::Missing { .. } => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Untranslatable { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "untranslatable")
            }
            StoreError::Db(_) | StoreError::Open { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            StoreError::SchemaAhead { .. }
            | StoreError::SchemaBehind { .. }
            | StoreError::UnknownSchema(_)
            | StoreError::Migration { .. }
            | StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store error");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> ApiError {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "malformed"
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", r.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> ApiError {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "malformed"
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
