//! Text timestamps of release 1 (RFC 3339, UTC, milliseconds) to and from
//! Unix milliseconds. Pure: the caller supplies the instant.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeError {
    #[error("timestamp {0:?} is not RFC 3339 (expected e.g. 2026-11-25T23:16:12.123Z)")]
    Unparsable(String),
    #[error("instant {0} ms is outside the representable range")]
    OutOfRange(i64),
}

pub fn rfc3339_from_ms(ms: i64) -> Result<String, TimeError> {
    let nanos = i128::from(ms) * 1_000_000;
    let at =
        OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| TimeError::OutOfRange(ms))?;
    at.format(&Rfc3339).map_err(|_| TimeError::OutOfRange(ms))
}

pub fn ms_from_rfc3339(text: &str) -> Result<i64, TimeError> {
    let at = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| TimeError::Unparsable(text.to_owned()))?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| TimeError::Unparsable(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for ms in [0, 1, 1_764_112_572_123, 4_102_444_800_000] {
            let text = rfc3339_from_ms(ms).unwrap();
            assert_eq!(ms_from_rfc3339(&text), Ok(ms), "{text}");
        }
        assert_eq!(
            rfc3339_from_ms(1_764_112_572_123).unwrap(),
            "2025-11-25T23:16:12.123Z"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(ms_from_rfc3339("yesterday").is_err());
        assert!(ms_from_rfc3339("").is_err());
        assert!(rfc3339_from_ms(i64::MAX).is_err());
    }
}
