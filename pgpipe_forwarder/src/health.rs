//! Health: every part of the pipeline (detector, bus, each adapter) reports whether it is
//! up through a cheap clonable [`Component`] handle; `/healthz` shows them all and answers
//! 503 when any is down, `/readyz` answers 200 once the pipeline is running and its
//! detector is connected (a hot standby is healthy but not ready).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

/// A component's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Working.
    Up,
    /// Not working, and why.
    Down(String),
    /// Healthy but deliberately idle: a hot standby waiting for another forwarder's
    /// consumer lease. Counts as up for `/healthz`, not ready for `/readyz`.
    Standby(String),
}

#[derive(Debug, Default)]
struct State {
    components: BTreeMap<String, Status>,
    /// The pipeline is running (set at start, cleared on shutdown).
    running: bool,
}

/// The health of the whole forwarder.
#[derive(Debug, Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

/// One component's handle: clone it freely, report with [`Component::up`] and
/// [`Component::down`].
#[derive(Debug, Clone)]
pub struct Component {
    name: Arc<str>,
    state: Arc<Mutex<State>>,
}

impl Health {
    /// An empty checker: healthy, not ready.
    pub fn new() -> Self {
        Health::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `name` with an initial status and returns its handle. Registering a name
    /// again returns a handle to the same entry and resets its status.
    pub fn component(&self, name: &str, initial: Status) -> Component {
        self.lock().components.insert(name.to_string(), initial);
        Component {
            name: name.into(),
            state: self.state.clone(),
        }
    }

    /// Marks the pipeline running (ready once the detector is up) or stopped.
    pub fn set_running(&self, running: bool) {
        self.lock().running = running;
    }

    /// Whether every component is up.
    pub fn healthy(&self) -> bool {
        self.lock()
            .components
            .values()
            .all(|s| !matches!(s, Status::Down(_)))
    }

    /// Whether the pipeline runs and its detector is up.
    pub fn ready(&self) -> bool {
        let state = self.lock();
        state.running && matches!(state.components.get("detector"), Some(Status::Up))
    }

    /// The `/healthz` body: `{"status":"up","components":{"detector":"up",...}}`, plus
    /// `"errors":{component: reason}` for components that are down.
    pub fn report(&self) -> Value {
        let state = self.lock();
        let mut components = serde_json::Map::new();
        let mut errors = serde_json::Map::new();
        for (name, status) in &state.components {
            match status {
                Status::Up => {
                    components.insert(name.clone(), json!("up"));
                }
                Status::Down(reason) => {
                    components.insert(name.clone(), json!("down"));
                    errors.insert(name.clone(), json!(reason));
                }
                Status::Standby(_) => {
                    components.insert(name.clone(), json!("standby"));
                }
            }
        }
        let up = errors.is_empty();
        let mut body = json!({
            "status": if up { "up" } else { "down" },
            "components": components,
        });
        if !up {
            body["errors"] = Value::Object(errors);
        }
        body
    }
}

impl Component {
    fn set(&self, status: Status) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let previous = state
            .components
            .insert(self.name.to_string(), status.clone());
        let running = state.running;
        drop(state);
        if previous.as_ref() != Some(&status) {
            match &status {
                Status::Up => tracing::info!(component = "health", part = %self.name, "up"),
                // A clean stop is no warning: every part goes down with "stopped" once the
                // pipeline no longer runs.
                Status::Down(reason) if !running && reason == "stopped" => {
                    tracing::info!(component = "health", part = %self.name, "stopped")
                }
                Status::Down(reason) => {
                    tracing::warn!(component = "health", part = %self.name, reason = %reason, "down")
                }
                Status::Standby(reason) => {
                    tracing::info!(component = "health", part = %self.name, reason = %reason, "standby")
                }
            }
        }
    }

    /// The component works.
    pub fn up(&self) {
        self.set(Status::Up);
    }

    /// The component does not work, because of `reason`.
    pub fn down(&self, reason: impl Into<String>) {
        self.set(Status::Down(reason.into()));
    }

    /// The component is healthy but waits (a hot standby), because of `reason`.
    pub fn standby(&self, reason: impl Into<String>) {
        self.set(Status::Standby(reason.into()));
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_component_down_makes_the_whole_down() {
        let health = Health::new();
        let detector = health.component("detector", Status::Down("starting".into()));
        let bus = health.component("bus", Status::Up);
        assert!(!health.healthy() && !health.ready());
        detector.up();
        health.set_running(true);
        assert!(health.healthy() && health.ready());
        assert_eq!(
            health.report(),
            json!({"status": "up", "components": {"bus": "up", "detector": "up"}})
        );
        detector.standby("another forwarder holds the consumer");
        assert!(health.healthy() && !health.ready());
        assert_eq!(health.report()["components"]["detector"], "standby");
        detector.up();
        bus.clone().down("closed");
        assert!(!health.healthy());
        assert_eq!(health.report()["components"]["bus"], "down");
        assert_eq!(health.report()["errors"]["bus"], "closed");
    }
}
