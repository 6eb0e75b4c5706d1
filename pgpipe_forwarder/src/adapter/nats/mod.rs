//! nats: publishes each event to NATS JetStream.
//!
//! The subject comes from a template (`pgpipe.{channel}` by default), the body is the
//! event's JSON (as the webhook sends it), and the header `Nats-Msg-Id` is the event id,
//! so JetStream drops a redelivery (after a crash or a lost ack) that arrives within the
//! stream's `duplicate_window`. The stream (`PGPIPE`, subjects `pgpipe.>`) is created when
//! missing. A batch of up to `nats.max_pending` events is published at once and the
//! batch is acknowledged to pgpipe only after JetStream acknowledged every one of them
//! (stored). A missing ack (a timeout, a lost connection, no stream for the subject) is
//! retried with backoff, forever: the whole batch goes again and JetStream deduplicates
//! what it already had. The client reconnects by itself with backoff.
//!
//! An event JetStream can never store (bigger than the server's `max_payload` or the
//! stream's `max_msg_size`) is dead-lettered, the others of its batch go on: only a
//! server setting could let it in, and holding it would stop every channel behind one
//! row (`pgpipe dlq replay` once the limit is raised). A subject no stream holds is not
//! dead-lettered but retried: that is a configuration mistake every event shares (the
//! stream deleted, a template outside `stream_subjects`), which the operator fixes; the
//! events wait in the queue meanwhile, as with pg_table's missing table.
//!
//! Order: events are published in order on one connection, so the stream holds them in
//! order; only after a lost connection can a retried event land behind later ones.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectOptions, HeaderMap};
use futures_util::future::{join_all, BoxFuture};

use super::dead_letter::DeadLetters;
use super::durable::{Durable, Failure, Policy, Sink, BACKOFF_FLOOR};
use crate::backoff::Backoff;
use crate::config::redact_url;
use crate::error::Error;
use crate::event::Delivery;

mod config;
pub mod subject;

pub use config::{Flags, NatsConfig, Storage, KIND};
use subject::Template;

use crate::format::Renderer;

/// The nats sink (run by the delivery driver, see [`Nats::adapter`]).
pub struct Nats {
    name: String,
    config: Arc<NatsConfig>,
    /// The server URLs without their userinfo (the client's debug log prints them).
    servers: Vec<String>,
    /// `user:password` or a token from a URL's userinfo, used when no other auth is set.
    url_auth: Option<UrlAuth>,
    /// The servers as logs, health and dead letters may show them.
    shown: String,
    template: Template,
    /// Writes the message bodies (and CloudEvents binary mode's headers).
    renderer: Renderer,
    /// Connected, with the stream checked.
    js: Option<Context>,
    /// The stream must be looked up (created) again before the next publish.
    stream_unchecked: bool,
}

impl Nats {
    /// The adapter named `name` (`nats`, or `nats:<name>` for a listed one), run by the
    /// delivery driver; dead letters go to the database at `database_url`. Retries never
    /// give up: a server or stream that is away comes back, and nothing is dropped.
    pub fn adapter(
        name: &str,
        config: &NatsConfig,
        database_url: &str,
    ) -> Result<Durable<Nats>, Error> {
        let template = Template::parse(&config.subject)
            .map_err(|e| Error::Config(format!("{name}: nats.subject: {e}")))?;
        let servers = config.servers();
        if servers.is_empty() {
            return Err(Error::Config(format!(
                "{name}: the nats adapter needs a server URL (nats.url, --nats-url)"
            )));
        }
        let shown = redact_url_list(&servers);
        let url_auth = servers.iter().find_map(|s| split_userinfo(s).1);
        let servers = servers.iter().map(|s| split_userinfo(s).0).collect();
        let sink = Nats {
            name: name.to_string(),
            config: Arc::new(config.clone()),
            servers,
            url_auth,
            shown,
            template,
            renderer: Renderer::new(config.format, database_url),
            js: None,
            stream_unchecked: true,
        };
        let policy = Policy::new(
            config.max_pending,
            config.backoff_base,
            config.backoff_cap,
            None,
        );
        let dead_letters =
            DeadLetters::new(database_url, name, config.backoff_base, config.backoff_cap);
        Ok(Durable::new(name, sink, policy, Some(dead_letters)))
    }

    /// Connects (once; the client reconnects by itself later) and checks the stream.
    async fn context(&mut self) -> Result<Context, Failure> {
        let js = match &self.js {
            Some(js) => js.clone(),
            None => {
                let client = self.connect().await?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(self.config.ack_timeout)
                    .max_ack_inflight(self.config.max_pending)
                    .backpressure_on_inflight(true)
                    .build(client);
                self.js = Some(js.clone());
                js
            }
        };
        if self.stream_unchecked {
            self.check_stream(&js).await?;
            self.stream_unchecked = false;
        }
        Ok(js)
    }

    /// A new client with the configured authentication, TLS and reconnect backoff.
    async fn connect(&self) -> Result<async_nats::Client, Failure> {
        let c = &self.config;
        let backoff = Backoff::new(c.backoff_base, c.backoff_cap).with_floor(BACKOFF_FLOOR);
        let (events_of, shown) = (self.name.clone(), self.shown.clone());
        let mut options = ConnectOptions::new()
            .name(format!("pgpipe {}", self.name))
            .connection_timeout(c.connect_timeout)
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                let ceiling = backoff.ceiling(u32::try_from(attempts).unwrap_or(u32::MAX));
                ceiling.mul_f64(fastrand::f64()).max(BACKOFF_FLOOR.min(ceiling))
            })
            .event_callback(move |event| {
                let (adapter, servers) = (events_of.clone(), shown.clone());
                async move { log_event(&adapter, &servers, event) }
            });
        if !c.token.is_empty() {
            options = options.token(c.token.expose().to_string());
        } else if !c.user.is_empty() {
            options = options.user_and_password(c.user.clone(), c.password.expose().to_string());
        } else if !c.nkey.is_empty() {
            options = options.nkey(c.nkey.expose().trim().to_string());
        } else if !c.creds_file.is_empty() {
            // The file's contents (a JWT and a seed) never appear in an error.
            options = options.credentials_file(&c.creds_file).await.map_err(|e| {
                Failure::retry(format!(
                    "nats.creds_file {}: cannot read the credentials: {}",
                    c.creds_file,
                    e.kind()
                ))
            })?;
        } else if let Some(auth) = &self.url_auth {
            options = match auth {
                UrlAuth::UserPassword(user, password) => {
                    options.user_and_password(user.clone(), password.clone())
                }
                UrlAuth::Token(token) => options.token(token.clone()),
            };
        }
        if c.tls_required {
            options = options.require_tls(true);
        }
        if !c.tls_ca_file.is_empty() {
            options = options.add_root_certificates(PathBuf::from(&c.tls_ca_file));
        }
        if !c.tls_cert_file.is_empty() {
            options = options.add_client_certificate(
                PathBuf::from(&c.tls_cert_file),
                PathBuf::from(&c.tls_key_file),
            );
        }
        match options.connect(self.servers.as_slice()).await {
            Ok(client) => {
                tracing::info!(component = "nats", adapter = %self.name, servers = %self.shown,
                    "connected");
                Ok(client)
            }
            Err(e) => Err(Failure::retry(format!(
                "connect to {}: {}",
                self.shown,
                self.hide_urls(&error_chain(&e))
            ))),
        }
    }

    /// Looks the stream up; creates it when missing (with `create_stream`).
    async fn check_stream(&self, js: &Context) -> Result<(), Failure> {
        let c = &self.config;
        let found = if c.create_stream {
            js.get_or_create_stream(stream::Config {
                name: c.stream.clone(),
                subjects: c.subjects_of_stream(),
                storage: match c.storage {
                    Storage::File => StorageType::File,
                    Storage::Memory => StorageType::Memory,
                },
                num_replicas: c.replicas,
                duplicate_window: c.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
        } else {
            js.get_stream(&c.stream).await.map_err(|e| e.to_string())
        };
        match found {
            Ok(stream) => {
                let info = stream.cached_info();
                tracing::info!(component = "nats", adapter = %self.name, stream = %c.stream,
                    subjects = ?info.config.subjects, duplicate_window = ?info.config.duplicate_window,
                    messages = info.state.messages, "stream ready");
                Ok(())
            }
            Err(e) => Err(Failure::retry(format!(
                "stream {} (nats.stream): {}",
                c.stream,
                self.hide_urls(&e)
            ))),
        }
    }

    /// Publishes `batch` (all at once, up to `max_pending`) and waits for every ack.
    async fn publish(&mut self, batch: &[Delivery]) -> Result<(), Failure> {
        let js = self.context().await?;
        let started = Instant::now();
        let mut pending = Vec::with_capacity(batch.len());
        let mut refused: Option<Refusal> = None;
        for d in batch {
            let event = &d.event;
            let subject = self.template.render(event);
            let body = self.renderer.body(event);
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.to_string().as_str());
            headers.insert("Content-Type", self.renderer.content_type(false));
            for (name, value) in self.renderer.headers(event) {
                headers.insert(name.as_str(), value.as_str());
            }
            headers.insert("Pgpipe-Channel", event.channel.as_str());
            headers.insert("Pgpipe-Operation", event.operation.as_str());
            match js
                .publish_with_headers(subject.clone(), headers, body.into())
                .await
            {
                Ok(ack) => pending.push((subject, ack.into_future())),
                Err(e) => {
                    refused = Some(self.classify(&subject, &e));
                    break;
                }
            }
        }
        let (subjects, futures): (Vec<String>, Vec<_>) = pending.into_iter().unzip();
        let mut duplicates = 0;
        for (subject, ack) in subjects.iter().zip(join_all(futures).await) {
            match ack {
                Ok(ack) => duplicates += usize::from(ack.duplicate),
                Err(e) => {
                    let why = self.classify(subject, &e);
                    // A retryable failure outranks a refusal: the batch goes again whole.
                    if !matches!(refused, Some(Refusal::Retry(_))) {
                        refused = Some(why);
                    }
                }
            }
        }
        if duplicates > 0 {
            tracing::info!(component = "nats", adapter = %self.name, duplicates,
                events = batch.len(), "JetStream already had some events (a redelivery): deduplicated by Nats-Msg-Id");
        }
        match refused {
            None => {
                tracing::debug!(component = "nats", adapter = %self.name, events = batch.len(),
                    took = ?started.elapsed(), "published");
                Ok(())
            }
            Some(Refusal::Retry(error)) => Err(Failure::retry(error)),
            Some(Refusal::Bad(error)) => Err(Failure::BadEvent { error }),
        }
    }

    /// What a failed publish to `subject` means.
    fn classify(&mut self, subject: &str, e: &jetstream::context::PublishError) -> Refusal {
        let text = self.hide_urls(&error_chain(e));
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => {
                Refusal::Bad(format!("publish to {subject}: {text} (the server's max_payload)"))
            }
            PublishErrorKind::StreamNotFound => {
                // Deleted meanwhile, or the subject is outside the stream: look again.
                self.stream_unchecked = true;
                Refusal::Retry(format!(
                    "publish to {subject}: no JetStream stream holds this subject: check \
                     nats.stream ({}), nats.subject and nats.stream_subjects",
                    self.config.stream
                ))
            }
            _ if jetstream_code(e) == Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => {
                Refusal::Bad(format!("publish to {subject}: {text} (the stream's max_msg_size)"))
            }
            _ => Refusal::Retry(format!("publish to {subject}: {text}")),
        }
    }

    /// `text` with every server URL as [`redact_url`] shows it.
    fn hide_urls(&self, text: &str) -> String {
        self.servers
            .iter()
            .fold(text.to_string(), |t, url| t.replace(url.as_str(), &redact_url(url)))
    }
}

/// Credentials written into a server URL (`nats://user:pass@h`, `nats://token@h`).
#[derive(Clone, PartialEq, Eq)]
enum UrlAuth {
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@`.
    Token(String),
}

/// `url` without its userinfo, and the credentials it held (percent-decoded).
fn split_userinfo(url: &str) -> (String, Option<UrlAuth>) {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_string(), None);
    };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let clean = if scheme.is_empty() {
        host.to_string()
    } else {
        format!("{scheme}://{host}")
    };
    let auth = match userinfo.split_once(':') {
        Some((user, password)) => UrlAuth::UserPassword(percent_decode(user), percent_decode(password)),
        None => UrlAuth::Token(percent_decode(userinfo)),
    };
    (clean, Some(auth))
}

/// `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a publish failed, before it becomes a [`Failure`].
enum Refusal {
    /// Worth publishing again.
    Retry(String),
    /// This event can never be stored.
    Bad(String),
}

/// The JetStream error code behind a publish error, if the server answered with one.
fn jetstream_code(e: &jetstream::context::PublishError) -> Option<ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code)
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The server list as logs show it.
fn redact_url_list(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// Logs a connection event of the client.
fn log_event(adapter: &str, servers: &str, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            tracing::info!(component = "nats", adapter, servers, "reconnected");
        }
        async_nats::Event::Disconnected => {
            tracing::warn!(component = "nats", adapter, servers,
                "disconnected from NATS; reconnecting with backoff (unacknowledged events are published again)");
        }
        other => {
            tracing::warn!(component = "nats", adapter, servers, event = %other, "NATS client event");
        }
    }
}

impl Sink for Nats {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.publish(batch))
    }

    fn retrying(&mut self, error: &str, attempt: u32, delay: Duration) {
        tracing::warn!(component = "nats", adapter = %self.name, servers = %self.shown,
            error, attempt, retry_in = ?delay, "publish failed or not acknowledged; retrying the batch");
    }

    fn started(&self) {
        tracing::info!(component = "nats", adapter = %self.name, servers = %self.shown,
            subject = %self.template, stream = %self.config.stream,
            max_pending = self.config.max_pending, "nats adapter started");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_errors_are_masked() {
        let config = NatsConfig {
            url: "nats://me:hunter2@h:4222".into(),
            ..NatsConfig::default()
        };
        let Ok(adapter) = Nats::adapter("nats", &config, "postgres://x@h/db") else {
            panic!("builds");
        };
        drop(adapter);
        let sink = Nats {
            name: "nats".into(),
            servers: config.servers(),
            url_auth: None,
            shown: redact_url_list(&config.servers()),
            template: Template::parse(&config.subject).unwrap(),
            renderer: Renderer::new(config.format, "postgres://x@h/db"),
            config: Arc::new(config),
            js: None,
            stream_unchecked: true,
        };
        let text = sink.hide_urls("failed: nats://me:hunter2@h:4222 refused");
        assert_eq!(text, "failed: nats://***@h:4222 refused");
        assert_eq!(sink.shown, "nats://***@h:4222");
    }

    #[test]
    fn userinfo_leaves_the_url_and_becomes_credentials() {
        // UrlAuth has no Debug on purpose (it holds secrets): compare with ==.
        let (url, auth) = split_userinfo("nats://me:p%40ss@h:4222");
        assert_eq!(url, "nats://h:4222");
        assert!(auth == Some(UrlAuth::UserPassword("me".into(), "p@ss".into())));
        let (url, auth) = split_userinfo("tls://t0k@h:4222");
        assert_eq!(url, "tls://h:4222");
        assert!(auth == Some(UrlAuth::Token("t0k".into())));
        let (url, auth) = split_userinfo("h:4222");
        assert_eq!(url, "h:4222");
        assert!(auth.is_none());
        assert_eq!(percent_decode("a%2Fb%zz%"), "a/b%zz%");
    }

    #[test]
    fn a_bad_subject_template_fails_the_build() {
        let config = NatsConfig {
            url: "nats://h:4222".into(),
            subject: "x.{nope}".into(),
            ..NatsConfig::default()
        };
        let Err(e) = Nats::adapter("nats", &config, "postgres://x@h/db") else {
            panic!("a bad template must not build");
        };
        assert!(e.to_string().contains("nats.subject"), "{e}");
    }
}
