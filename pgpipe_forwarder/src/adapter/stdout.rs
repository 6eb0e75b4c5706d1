//! stdout: one JSON line per event. Durable: an event is acknowledged once its line is
//! written and flushed, so `pgpipe listen | consumer` loses nothing when either side stops.

use futures_util::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
            crate::metrics::register_adapter("stdout");
            let mut created = Vec::new();
            while let Some(first) = input.recv().await {
                // Write whatever is already queued, then flush and acknowledge once.
                let started = std::time::Instant::now();
                let mut last = first.seq;
                created.clear();
                created.push(first.event.created_at);
                write_line(&mut out, &mut line, &first).await?;
                while let Ok(next) = input.try_recv() {
                    last = next.seq;
                    created.push(next.event.created_at);
                    write_line(&mut out, &mut line, &next).await?;
                }
                if let Err(e) = out.flush().await {
                    crate::metrics::delivery_error("stdout");
                    return Err(Error::io("write to stdout")(e));
                }
                crate::metrics::delivered("stdout", created.len() as u64);
                crate::metrics::delivery_duration("stdout", started.elapsed());
                for at in &created {
                    crate::metrics::end_to_end(*at);
                }
                if let Some(acker) = &acker {
                    acker.finished(last);
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
