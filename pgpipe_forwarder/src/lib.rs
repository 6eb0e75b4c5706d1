//! pgpipe forwarder: reads change events from Postgres (the pgpipe queue, LISTEN/NOTIFY or
//! logical replication) and delivers them to adapters.
//!
//! The library is a [`Pipeline`] (detector → bus → adapters, acknowledgements flowing back);
//! the `pgpipe` binary adds the CLI on top.

pub mod ack;
pub mod adapter;
pub mod backoff;
pub mod bus;
pub mod cli;
pub mod config;
pub mod db;
pub mod detector;
pub mod error;
pub mod event;
pub mod health;
pub mod metrics;
pub mod pipeline;
pub mod server;

pub use config::Config;
pub use error::Error;
pub use event::Event;
pub use pipeline::{run, Pipeline};
