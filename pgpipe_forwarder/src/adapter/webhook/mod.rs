//! webhook: POSTs each event (or a batch of events, as a JSON array) to an HTTP endpoint.
//!
//! Delivery is at-least-once and in order per lane (`webhook.ordering`: a channel and key
//! by default, with up to `webhook.concurrency` requests in flight, one per lane): an event
//! is acknowledged after a 2xx answer, or after it was recorded as a dead letter (a verdict
//! on the event such as 400 or 422, or `max_retries` transient failures). Which status
//! means what, and why, is in [`retry`]. Retries wait with exponential backoff and full
//! jitter (never less than 100 ms), or the server's `Retry-After`.
//! The event id is the idempotency key (`Idempotency-Key`, `webhook-id`,
//! `X-PGPipe-Event-ID`), the same on every retry and redelivery.

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};

use super::dead_letter::DeadLetters;
use super::durable::{Durable, Failure, Policy, Sink};
use crate::config::redact_url;
use crate::error::Error;
use crate::format::Renderer;
use crate::event::Delivery;

mod config;
pub mod retry;
pub mod sign;

pub use config::{Flags, WebhookConfig, KIND};

use retry::Attempt;
use sign::Signer;

/// Most 307/308 redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Most characters of an error answer's body quoted in the error message.
const BODY_EXCERPT: usize = 200;
/// Most bytes of an error answer's body read at all: a receiver answering with a huge
/// body must not fill the forwarder's memory (the rest is never read).
const BODY_READ_LIMIT: usize = 4096;

/// The webhook sink (run by the delivery driver, see [`Webhook::adapter`]). Its lanes are
/// clones sharing one HTTP client (one connection pool).
#[derive(Clone)]
pub struct Webhook {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL with any password masked, for logs and dead letters.
    shown_url: String,
    headers: HeaderMap,
    signer: Option<Signer>,
    max_attempts: u32,
    timeout: Duration,
    batch_size: usize,
    renderer: Renderer,
}

impl Webhook {
    /// The adapter named `name` (`webhook`, or `webhook:<name>` for a listed one), run by
    /// the delivery driver; dead letters go to the database at `database_url`.
    pub fn adapter(
        name: &str,
        config: &WebhookConfig,
        database_url: &str,
    ) -> Result<Durable<Webhook>, Error> {
        let policy = Policy::new(
            config.batch_size,
            config.backoff_base,
            config.backoff_cap,
            Some(config.max_retries),
        )
        .parallel(config.concurrency, config.ordering);
        let dead_letters =
            DeadLetters::new(database_url, name, config.backoff_base, config.backoff_cap);
        Ok(Durable::new(
            name,
            Webhook::new(name, config, database_url)?,
            policy,
            Some(dead_letters),
        ))
    }

    /// The webhook sink named `name`, for events read from `database_url` (which the
    /// CloudEvents and Debezium formats name).
    pub fn new(name: &str, config: &WebhookConfig, database_url: &str) -> Result<Webhook, Error> {
        let shown_url = redact_url(&config.url);
        let url = reqwest::Url::parse(config.url.trim()).map_err(|e| {
            Error::Config(format!("{name}: invalid webhook URL {shown_url:?}: {e}"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "{name}: webhook URL {shown_url:?} is not http:// or https://"
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (key, value) in &config.headers {
            let name_ = HeaderName::from_bytes(key.as_bytes())
                .map_err(|e| Error::Config(format!("{name}: invalid header name {key:?}: {e}")))?;
            let mut value = HeaderValue::from_str(value).map_err(|e| {
                Error::Config(format!("{name}: invalid value for header {key:?}: {e}"))
            })?;
            value.set_sensitive(true);
            headers.insert(name_, value);
        }
        let signer = match config.signing_key.expose() {
            "" => None,
            key => Some(Signer::new(key)?),
        };
        // Only redirects that keep the method and body (307, 308) are followed; a 301/302/303
        // would turn the POST into a GET, so it is reported (and dead-lettered) instead.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let keeps_body = matches!(attempt.status().as_u16(), 307 | 308);
            if keeps_body && attempt.previous().len() < MAX_REDIRECTS {
                attempt.follow()
            } else {
                attempt.stop()
            }
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .timeout(config.timeout)
            .user_agent(concat!("pgpipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Adapter {
                adapter: name.to_string(),
                reason: format!("build HTTP client: {e}"),
            })?;
        Ok(Webhook {
            name: name.to_string(),
            client,
            url,
            shown_url,
            headers,
            signer,
            max_attempts: config.max_retries.max(1),
            timeout: config.timeout,
            batch_size: config.batch_size.max(1),
            renderer: Renderer::new(config.format, database_url),
        })
    }

    /// POSTs one batch once.
    async fn post(&self, batch: &[Delivery]) -> Result<(), Failure> {
        let as_array = self.batch_size > 1;
        let body = if as_array {
            let events: Vec<_> = batch.iter().map(|d| &*d.event).collect();
            self.renderer.batch_body(&events)
        } else {
            self.renderer.body(&batch[0].event)
        };
        let first = &batch[0].event;
        let message_id = match batch {
            [one] => one.event.id.to_string(),
            [.., last] => format!("{}_{}", first.id, last.event.id),
            [] => return Ok(()),
        };
        let mut headers = self.headers.clone();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(self.renderer.content_type(as_array)),
        );
        if !as_array {
            for (name, value) in self.renderer.headers(first) {
                if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                    headers.insert(name, value);
                }
            }
        }
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        put("idempotency-key", &message_id);
        put("webhook-id", &message_id);
        if as_array {
            put("x-pgpipe-batch-size", &batch.len().to_string());
        }
        if !as_array {
            put("x-pgpipe-event-id", &message_id);
        }
        if batch.iter().all(|d| d.event.channel == first.channel) {
            put("x-pgpipe-channel", &first.channel);
        }
        if let Some(signer) = &self.signer {
            put("x-pgpipe-signature", &signer.pgpipe(&body));
        }

        match self.attempt(&headers, &message_id, body).await {
            Attempt::Delivered => {
                tracing::debug!(component = "webhook", adapter = %self.name,
                    id = %message_id, events = batch.len(), "delivered");
                Ok(())
            }
            Attempt::Refuse { error } => {
                tracing::warn!(component = "webhook", adapter = %self.name, id = %message_id,
                    url = %self.shown_url, error, "refused by the endpoint; not retrying");
                Err(Failure::BadEvent { error })
            }
            Attempt::Reject { error } => {
                tracing::warn!(component = "webhook", adapter = %self.name, id = %message_id,
                    url = %self.shown_url, error, "rejected by the endpoint; not retrying");
                Err(Failure::Reject { error })
            }
            Attempt::Hold { error, retry_after } => Err(Failure::Hold { error, retry_after }),
            Attempt::Retry { error, retry_after } => Err(Failure::Retry { error, retry_after }),
        }
    }

    /// One POST.
    async fn attempt(&self, headers: &HeaderMap, message_id: &str, body: Vec<u8>) -> Attempt {
        let mut headers = headers.clone();
        if let Some(signer) = &self.signer {
            let timestamp = chrono::Utc::now().timestamp();
            headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
            if let Ok(v) = HeaderValue::from_str(&signer.standard(message_id, timestamp, &body)) {
                headers.insert("webhook-signature", v);
            }
        }
        let sent = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let excerpt = if response.status().is_success() {
                    String::new()
                } else {
                    let head = read_at_most(response, BODY_READ_LIMIT).await;
                    let text = String::from_utf8_lossy(&head);
                    let text = text.trim();
                    text.char_indices()
                        .nth(BODY_EXCERPT)
                        .map_or(text, |(i, _)| &text[..i])
                        .to_string()
                };
                retry::classify(status, retry_after.as_deref(), &excerpt, chrono::Utc::now())
            }
            Err(e) => Attempt::Retry {
                error: self.describe(&e),
                retry_after: None,
            },
        }
    }

    /// A request error in words: unreachable endpoint, timeout, or the cause chain; the
    /// URL only as [`redact_url`] shows it (reqwest's text quotes it whole).
    fn describe(&self, e: &reqwest::Error) -> String {
        let mut root = String::new();
        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(c) = cause {
            root = c.to_string();
            cause = c.source();
        }
        let raw = self.url.as_str();
        let root = root.replace(raw, &self.shown_url);
        let text = e.to_string().replace(raw, &self.shown_url);
        let url = &self.shown_url;
        if e.is_timeout() {
            format!(
                "POST {url}: no answer within {:?} (webhook.timeout)",
                self.timeout
            )
        } else if e.is_connect() {
            format!("POST {url}: endpoint unreachable: {root}")
        } else if root.is_empty() {
            format!("POST {url}: {text}")
        } else {
            format!("POST {url}: {text}: {root}")
        }
    }
}

/// The first `limit` bytes of `response`'s body (fewer if it is shorter or fails); the
/// rest is left unread and the connection dropped.
async fn read_at_most(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - head.len());
                head.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    head
}

impl Sink for Webhook {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.post(batch))
    }

    fn retrying(&mut self, error: &str, attempt: u32, delay: Duration) {
        tracing::warn!(component = "webhook", adapter = %self.name, url = %self.shown_url,
            error, attempt, max_attempts = self.max_attempts, retry_in = ?delay,
            "delivery failed; retrying");
        crate::metrics::webhook_retry();
    }

    fn started(&self) {
        tracing::info!(component = "webhook", adapter = %self.name, url = %self.shown_url,
            signed = self.signer.is_some(), batch_size = self.batch_size, "webhook adapter started");
    }

    fn fork(&self) -> Option<Webhook> {
        Some(self.clone())
    }
}
