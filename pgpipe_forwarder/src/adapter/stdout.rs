//! stdout: one JSON line per event. Durable: an event is acknowledged once its line is
//! written and flushed, so `pgpipe listen | consumer` loses nothing when either side stops.

use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::durable::{next_batch, Report};
use super::Adapter;
use crate::ack::Acker;
use crate::error::Error;
use crate::event::Delivery;

/// Writes events as JSON lines to a writer (the process's stdout in the CLI).
pub struct Stdout<W> {
    out: W,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Stdout<W> {
    /// An adapter writing to `out`.
    pub fn new(out: W) -> Self {
        Stdout { out }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Adapter for Stdout<W> {
    fn name(&self) -> &str {
        "stdout"
    }

    fn durable(&self) -> bool {
        true
    }

    fn run(
        self: Box<Self>,
        mut input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            let mut out = BufWriter::new(self.out);
            let mut line = Vec::with_capacity(1024);
            let report = Report::new("stdout");
            // Write whatever is queued, then flush and acknowledge once.
            while let Some(batch) = next_batch(&mut input, usize::MAX).await {
                let started = Instant::now();
                for delivery in &batch {
                    if let Err(e) = write_line(&mut out, &mut line, delivery).await {
                        report.failed(&e.to_string());
                        return Err(e);
                    }
                }
                if let Err(e) = out.flush().await {
                    report.failed(&e.to_string());
                    return Err(Error::io("write to stdout")(e));
                }
                report.delivered(&batch, started);
                if let (Some(acker), Some(last)) = (&acker, batch.last()) {
                    acker.finished(last.seq);
                }
            }
            Ok(())
        })
    }
}

async fn write_line<W: AsyncWrite + Unpin>(
    out: &mut W,
    buf: &mut Vec<u8>,
    delivery: &Delivery,
) -> Result<(), Error> {
    buf.clear();
    serde_json::to_writer(&mut *buf, &*delivery.event).expect("an Event always serializes");
    buf.push(b'\n');
    out.write_all(buf)
        .await
        .map_err(Error::io("write to stdout"))
}
