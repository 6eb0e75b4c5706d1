//! stdout: one JSON line per event. Durable: an event is acknowledged once its line is
//! written and flushed, so `pgpipe listen | consumer` loses nothing when either side stops.

use futures_util::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use crate::adapter::durable::{Durable, Failure, Policy, Sink};
use crate::adapter::registry::{self, Build, Kind};
use crate::error::Error;
use crate::event::Delivery;

/// The stdout kind: no settings.
pub const KIND: Kind = Kind {
    name: "stdout",
    list: None,
    entries: registry::no_entries,
    validate: registry::nothing_to_check,
    redact: registry::no_secrets,
    build: |_: &Build<'_>, _, _| Ok(Box::new(Stdout::adapter(tokio::io::stdout()))),
    route: registry::every_event,
    init: None,
};

/// Writes events as JSON lines to a writer (the process's stdout in the CLI).
pub struct Stdout<W> {
    out: BufWriter<W>,
    line: Vec<u8>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Stdout<W> {
    /// The adapter writing to `out`: whatever is queued is written, then flushed and
    /// acknowledged once. A failed write stops the pipeline (the reader is gone).
    pub fn adapter(out: W) -> Durable<Stdout<W>> {
        let sink = Stdout {
            out: BufWriter::new(out),
            line: Vec::with_capacity(1024),
        };
        // No retries: a closed stdout does not come back.
        let policy = Policy::new(usize::MAX, Default::default(), Default::default(), None);
        Durable::new("stdout", sink, policy, None)
    }

    async fn write(&mut self, batch: &[Delivery]) -> Result<(), Failure> {
        let failed = |e| Failure::Fatal(Error::io("write to stdout")(e));
        for delivery in batch {
            self.line.clear();
            serde_json::to_writer(&mut self.line, &*delivery.event)
                .expect("an Event always serializes");
            self.line.push(b'\n');
            self.out.write_all(&self.line).await.map_err(failed)?;
        }
        self.out.flush().await.map_err(failed)
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Sink for Stdout<W> {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.write(batch))
    }
}
