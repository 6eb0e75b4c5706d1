//! The webhook adapter's config section (`webhook:` and the `webhooks:` list), its
//! checks, and its registration.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::registry::{self, Build, Kind, Place};
use crate::config::{self, ConfigError};

use crate::adapter::durable::Ordering;
use crate::config::{redact_url, Secret};

/// The webhook kind: the single `webhook` section and the `webhooks` list.
pub const KIND: Kind = Kind {
    name: "webhook",
    list: Some("webhooks"),
    entries: |c| c.webhooks.iter().map(|w| w.name.clone()).collect(),
    validate: |c, used| {
        registry::check_routes(c, "webhook", "webhooks", &c.webhook, &c.webhooks, |s| (&s.channels, &s.operations))?;
        c.webhook.validate(Place::single("webhook"), used)?;
        registry::check_list(
            "webhook",
            "webhooks",
            &c.webhooks,
            |w| &w.name,
            |w, at| w.validate(at, true),
        )
    },
    redact: |c| {
        c.webhook = c.webhook.redacted();
        c.webhooks = c.webhooks.iter().map(WebhookConfig::redacted).collect();
    },
    build: |b: &Build<'_>, name, entry| {
        let c = b.config;
        let section = registry::section(name, &c.webhook, "webhooks", &c.webhooks, entry, |w| {
            &w.name
        })?;
        Ok(Box::new(super::Webhook::adapter(
            name,
            section,
            &c.database_url,
        )?))
    },
    route: |c, entry| {
        registry::route_of(&c.webhook, &c.webhooks, entry, |s| &s.name, |s| {
            crate::route::Route::new(&s.channels, &s.operations)
        })
    },
    init: None,
};

/// Requests in flight at once by default: enough for a receiver that takes 20 ms to take
/// 5,000 events/s one POST at a time (Hasura's event triggers use a pool of 100 as well).
pub const DEFAULT_CONCURRENCY: usize = 100;

/// Webhook adapter settings (`webhook.*`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Endpoint events are POSTed to (`--url`); required with the webhook adapter.
    pub url: String,
    /// Total delivery attempts per event, the first one included (`--retries`).
    pub max_retries: u32,
    /// HMAC-SHA256 signing key (`--signing-key`); empty: unsigned; a secret.
    pub signing_key: Secret,
    /// Extra HTTP headers sent with every request (values are treated as secrets in logs).
    pub headers: BTreeMap<String, String>,
    /// Timeout of one delivery attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay (full jitter; a `Retry-After` answer takes precedence).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Events per POST: 1 sends each event as a JSON object, more send a JSON array.
    pub batch_size: usize,
    /// Channels this adapter gets (empty: every channel the forwarder reads).
    pub channels: Vec<String>,
    /// Operations this adapter gets (empty: all), e.g. `[INSERT, UPDATE]`.
    pub operations: Vec<String>,
    /// How events are written: pgpipe, cloudevents, cloudevents_binary, debezium.
    pub format: crate::format::Format,
    /// Most requests in flight at once (each to a different lane, see `ordering`).
    pub concurrency: usize,
    /// Which events keep their order: `key` (each channel and key in commit order, one
    /// request in flight per key; keyless events in order per channel), `channel`, `none`.
    pub ordering: Ordering,
    /// Name of a `webhooks` entry (the adapter is `webhook:<name>`); unused in `webhook`.
    pub name: String,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            max_retries: 5,
            signing_key: Secret::default(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(32),
            batch_size: 1,
            channels: Vec::new(),
            operations: Vec::new(),
            format: crate::format::Format::default(),
            concurrency: DEFAULT_CONCURRENCY,
            ordering: Ordering::Key,
            name: String::new(),
        }
    }
}

impl WebhookConfig {
    /// A copy with the signing key, header values and any URL password masked.
    pub fn redacted(&self) -> WebhookConfig {
        let mut w = self.clone();
        w.url = redact_url(&w.url);
        w.signing_key = w.signing_key.redacted();
        for value in w.headers.values_mut() {
            *value = crate::config::REDACTED.into();
        }
        w
    }
}

impl WebhookConfig {
    /// Checks the section at `at`; `used`: it runs, so its URL is required.
    pub fn validate(&self, at: Place, used: bool) -> Result<(), ConfigError> {
        self.format.check(at, true, self.batch_size)?;
        let url = self.url.trim();
        if used && url.is_empty() {
            return Err(at.missing("a url", ConfigError::WebhookWithoutUrl));
        }
        if used || !url.is_empty() {
            let lower = url.to_ascii_lowercase();
            let host = lower
                .strip_prefix("http://")
                .or_else(|| lower.strip_prefix("https://"));
            if host.is_none_or(str::is_empty) {
                return Err(ConfigError::InvalidWebhookUrl {
                    key: at.key("url"),
                    url: redact_url(url),
                });
            }
        }
        for (name, value) in &self.headers {
            config::check_header(&at.key("headers"), name, value)?;
        }
        config::at_least(at.key("max_retries"), u64::from(self.max_retries), 1)?;
        config::at_least(at.key("batch_size"), self.batch_size as u64, 1)?;
        config::at_least(at.key("concurrency"), self.concurrency as u64, 1)?;
        config::nonzero(at.key("timeout"), self.timeout)?;
        config::check_backoff(at.here(), self.backoff_base, self.backoff_cap)
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.redacted();
        f.debug_struct("WebhookConfig")
            .field("url", &w.url)
            .field("max_retries", &w.max_retries)
            .field("signing_key", &w.signing_key)
            .field("headers", &w.headers)
            .field("timeout", &w.timeout)
            .field("backoff_base", &w.backoff_base)
            .field("backoff_cap", &w.backoff_cap)
            .field("batch_size", &w.batch_size)
            .field("channels", &w.channels)
            .field("operations", &w.operations)
            .field("format", &w.format)
            .field("concurrency", &w.concurrency)
            .field("ordering", &w.ordering)
            .field("name", &w.name)
            .finish()
    }
}

/// Webhook flags of `pgpipe listen` (they override `webhook.*`).
#[derive(Debug, Default, clap::Args)]
#[group(skip)]
pub struct Flags {
    /// Webhook URL events are POSTed to (required with -a webhook) [config: webhook.url]
    /// [env: PGPIPE_WEBHOOK_URL]
    #[arg(short = 'u', long, value_name = "URL", help_heading = "Adapters")]
    url: Option<String>,

    /// Webhook delivery attempts per event, the first included [default: 5]
    /// [config: webhook.max_retries] [env: PGPIPE_WEBHOOK_MAX_RETRIES]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Adapters")]
    retries: Option<u32>,

    /// Webhook HMAC-SHA256 signing key; prefer the env variable, flags show in `ps`
    /// [config: webhook.signing_key] [env: PGPIPE_WEBHOOK_SIGNING_KEY]
    #[arg(long, value_name = "KEY", help_heading = "Adapters")]
    signing_key: Option<String>,
}

impl Flags {
    /// The config overrides of the flags that were given.
    pub fn overrides(&self, out: &mut Vec<config::FlagOverride>) {
        config::override_with(out, "webhook.url", "--url", self.url.clone());
        config::override_with(out, "webhook.max_retries", "--retries", self.retries);
        config::override_with(
            out,
            "webhook.signing_key",
            "--signing-key",
            self.signing_key.clone(),
        );
    }
}
