//! What a webhook answer means for retrying: which statuses are retried, and how long a
//! `Retry-After` header asks to wait.
//!
//! Standard Webhooks and the services it grew from (Svix, Hasura event triggers, Sequin)
//! treat any answer but 2xx as a failed attempt and retry it; none gives up on an event
//! because the endpoint is misconfigured. pgpipe follows them, and splits the failures by
//! whom they are about:
//! - a verdict on the event (400, 413, 415, 422): the receiver read this body and refuses
//!   it; the same body would be refused again, so the event is dead-lettered at once (in a
//!   batch, the driver finds the refused event one at a time). 410 Gone is the Standard
//!   Webhooks way to say "stop sending": the events are dead-lettered (kept for `pgpipe
//!   dlq replay`) instead of piling up in the queue;
//! - the endpoint is not ready for anything (401, 403, 404, 405, 407, 421, a redirect that
//!   is not followed): a wrong URL, token or secret, which says nothing about the event.
//!   These are retried without an attempt limit, health shows the endpoint down with the
//!   status, and nothing is dead-lettered, so a receiver deployed with a wrong secret does
//!   not drain the queue into the dead letters;
//! - transient (network errors, timeouts, 408, 425, 429, 5xx and any other status): retried
//!   with backoff up to `webhook.max_retries` attempts, then dead-lettered (an event that
//!   keeps crashing the receiver must not block its key for ever).

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
    /// The endpoint answers nothing until it is fixed (401, 403, 404, ...): try again,
    /// without an attempt limit.
    Hold {
        /// What went wrong, and what to check.
        error: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The receiver refuses this event (400, 413, 415, 422): dead-letter it at once.
    Refuse {
        /// What went wrong.
        error: String,
    },
    /// The endpoint is gone for good (410): dead-letter the whole batch.
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
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    match status {
        200..=299 => Attempt::Delivered,
        400 | 413 | 415 | 422 => Attempt::Refuse { error },
        410 => Attempt::Reject {
            error: format!("{error} (the endpoint is gone)"),
        },
        401 | 403 | 407 => Attempt::Hold {
            error: format!("{error} (check the receiver's credentials: webhook.headers, webhook.signing_key)"),
            retry_after,
        },
        300..=399 | 404 | 405 | 421 => Attempt::Hold {
            error: format!("{error} (check webhook.url)"),
            retry_after,
        },
        _ => Attempt::Retry { error, retry_after },
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
            Attempt::Refuse {
                error: "HTTP 400: bad".into()
            }
        );
        for verdict in [413, 415, 422] {
            assert!(matches!(classify(verdict, None, "", now()), Attempt::Refuse { .. }));
        }
        assert!(matches!(classify(410, None, "", now()), Attempt::Reject { .. }));
        // Misconfiguration is never a verdict on the event.
        for held in [401, 403, 404, 405, 407, 421, 301, 308] {
            assert!(
                matches!(classify(held, None, "", now()), Attempt::Hold { .. }),
                "{held}"
            );
        }
        assert!(matches!(classify(404, None, "", now()),
            Attempt::Hold { error, .. } if error.contains("webhook.url")));
        assert!(matches!(classify(401, Some("5"), "", now()),
            Attempt::Hold { error, retry_after: Some(d) } if error.contains("credentials") && d == Duration::from_secs(5)));
        for transient in [408, 409, 425, 429, 418, 500, 502, 503, 504] {
            assert!(
                matches!(classify(transient, None, "", now()), Attempt::Retry { .. }),
                "{transient}"
            );
        }
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
