//! Routes: which events an adapter gets. Each adapter section may list its own
//! `channels` and `operations` (empty: all), so one forwarder sends orders to one webhook
//! and payments to another. The bus applies the route; the acknowledgement tracker counts
//! an event an adapter does not get as finished by that adapter.

use crate::adapter::registry::Place;
use crate::config::{valid_channel, ConfigError};
use crate::event::Event;

/// The events one adapter gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// Channels the adapter gets; empty: every channel.
    channels: Vec<String>,
    /// Operations the adapter gets (upper case); empty: every operation.
    operations: Vec<String>,
}

impl Route {
    /// Every event.
    pub fn all() -> Route {
        Route::default()
    }

    /// The events of `channels` (empty: all) whose operation is one of `operations`
    /// (empty: all; compared without regard to case).
    pub fn new(channels: &[String], operations: &[String]) -> Route {
        Route {
            channels: channels.iter().map(|c| c.trim().to_string()).collect(),
            operations: operations
                .iter()
                .map(|o| o.trim().to_ascii_uppercase())
                .collect(),
        }
    }

    /// Whether the adapter gets every event.
    pub fn is_all(&self) -> bool {
        self.channels.is_empty() && self.operations.is_empty()
    }

    /// Whether the adapter gets `event`.
    pub fn matches(&self, event: &Event) -> bool {
        (self.channels.is_empty() || self.channels.contains(&event.channel))
            && (self.operations.is_empty()
                || self
                    .operations
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(&event.operation)))
    }
}

/// Checks the route of the section at `at` against the forwarder's `listened` channels:
/// a route naming a channel the forwarder does not read would deliver nothing, silently.
/// With the wal detector (no channel list) any valid channel name is accepted.
pub fn check(
    at: Place,
    channels: &[String],
    operations: &[String],
    listened: &[String],
) -> Result<(), ConfigError> {
    for channel in channels {
        let channel = channel.trim();
        if !valid_channel(channel) {
            return Err(ConfigError::InvalidRoute {
                key: at.key("channels"),
                message: format!("{channel:?} is not a valid channel name"),
            });
        }
        if !listened.is_empty() && !listened.iter().any(|l| l == channel) {
            return Err(ConfigError::InvalidRoute {
                key: at.key("channels"),
                message: format!(
                    "channel {channel:?} is not one this forwarder reads (channels: {}); \
                     add it to channels / --channel, or remove it from the route",
                    listened.join(", ")
                ),
            });
        }
    }
    for operation in operations {
        let op = operation.trim();
        if op.is_empty() || !op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::InvalidRoute {
                key: at.key("operations"),
                message: format!(
                    "{operation:?} is not an operation name (INSERT, UPDATE, DELETE, \
                     TRUNCATE, an emit's operation, ...)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(channel: &str, operation: &str) -> Event {
        Event {
            id: uuid::Uuid::nil(),
            channel: channel.into(),
            operation: operation.into(),
            payload: serde_json::json!({}).into(),
            key: None,
            source: "trigger".into(),
            created_at: Utc::now(),
            transaction: None,
        }
    }

    #[test]
    fn routes_pick_channels_and_operations() {
        let all = Route::all();
        assert!(all.is_all() && all.matches(&event("orders", "INSERT")));
        let orders = Route::new(&["orders".into()], &[]);
        assert!(orders.matches(&event("orders", "DELETE")));
        assert!(!orders.matches(&event("payments", "INSERT")));
        let writes = Route::new(&[], &["insert".into(), " Update".into()]);
        assert!(writes.matches(&event("payments", "INSERT")));
        assert!(writes.matches(&event("payments", "update")));
        assert!(!writes.matches(&event("payments", "DELETE")));
    }

    #[test]
    fn a_route_to_a_channel_nobody_reads_is_refused() {
        let at = Place::listed("webhook", "webhooks", 1);
        let listened = ["orders".to_string(), "payments".to_string()];
        assert!(check(at, &["orders".into()], &["INSERT".into()], &listened).is_ok());
        let err = check(at, &["refunds".into()], &[], &listened).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("webhooks[1].channels: channel \"refunds\""),
            "{text}"
        );
        assert!(text.contains("orders, payments"), "{text}");
        assert!(check(at, &["no spaces".into()], &[], &[]).is_err());
        let err = check(at, &[], &["IN SERT".into()], &listened).unwrap_err();
        assert!(
            err.to_string().starts_with("webhooks[1].operations:"),
            "{err}"
        );
    }
}
