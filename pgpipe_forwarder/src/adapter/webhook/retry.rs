//! What a webhook answer means for retrying: which statuses are retried, and how long a
//! `Retry-After` header asks to wait.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Longest `Retry-After` honoured; a larger value (or a date further away) waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The fate of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx: delivered.
    Delivered,
    /// Network error, timeout, 429 or 5xx: try again, after `retry_after` when given.
    Retry {
        /// What went wrong.
        error: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Any other status: retrying cannot help; dead-letter at once.
    Reject {
        /// What went wrong.
        error: String,
    },
}

/// Classifies an HTTP status (with the answer's `Retry-After` header and a short excerpt of
/// its body for the error message).
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body_excerpt: &str,
    now: DateTime<Utc>,
) -> Attempt {
    let error = if body_excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body_excerpt}")
    };
    match status {
        200..=299 => Attempt::Delivered,
        429 | 500..=599 => Attempt::Retry {
            error,
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        _ => Attempt::Reject { error },
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date in any of the three forms RFC 9110
/// says a recipient must accept (IMF-fixdate, RFC 850, asctime), capped at
/// [`MAX_RETRY_AFTER`]. A date in the past means no wait; garbage means no hint.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when: DateTime<Utc> = httpdate::parse_http_date(value).ok()?.into();
    let wait = (when - now).to_std().unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-27T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(204, None, "", now()), Attempt::Delivered);
        assert!(matches!(
            classify(503, None, "", now()),
            Attempt::Retry {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(classify(429, Some("2"), "", now()),
            Attempt::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(2)));
        assert_eq!(
            classify(400, None, "bad", now()),
            Attempt::Reject {
                error: "HTTP 400: bad".into()
            }
        );
        assert!(matches!(
            classify(404, None, "", now()),
            Attempt::Reject { .. }
        ));
        assert!(matches!(
            classify(308, None, "", now()),
            Attempt::Reject { .. }
        ));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(" 7 ", now()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 03:00:30 GMT", now()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Friday, 27-Nov-26 03:00:30 GMT", now()),
            Some(Duration::from_secs(30)),
            "RFC 850"
        );
        assert_eq!(
            parse_retry_after("Fri Nov 27 03:00:30 2026", now()),
            Some(Duration::from_secs(30)),
            "asctime"
        );
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 02:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now()), None);
        assert_eq!(parse_retry_after("-1", now()), None);
    }
}
