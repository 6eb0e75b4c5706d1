//! pgpipe forwarder: reads change events from Postgres (the pgpipe queue, LISTEN/NOTIFY or
//! logical replication) and delivers them to adapters.
//!
//! The library is a [`Pipeline`] (detector → bus → adapters, acknowledgements flowing back);
//! the `pgpipe` binary adds the CLI on top.

pub(crate) mod ack;
pub(crate) mod adapter;
pub(crate) mod backoff;
pub(crate) mod bus;
pub mod cli;
pub(crate) mod config;
pub(crate) mod db;
pub(crate) mod detector;
pub(crate) mod error;
pub(crate) mod event;
pub(crate) mod format;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub(crate) mod route;
pub(crate) mod server;

// The library's API; everything else is crate-private, so unused code shows.
pub use ack::{AckTracker, Acker, InFlight};
pub use adapter::durable::{Durable, Failure, Ordering, Policy, Sink};
pub use adapter::Adapter;
pub use backoff::Backoff;
pub use bus::Bus;
pub use config::Config;
pub use detector::{sleep_until_opt, Detector, DetectorIo, Reconnect};
pub use error::{Error, Fate};
pub use event::{Delivery, Event, Payload, Transaction};
pub use health::{Component, Health, Status};
pub use pipeline::{run, Pipeline};
pub use route::Route;
