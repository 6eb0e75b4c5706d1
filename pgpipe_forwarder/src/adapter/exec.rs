//! exec: a long-lived `sh -c COMMAND` fed one JSON line per event on its stdin.
//!
//! An event is acknowledged once its line is written and flushed to the child's stdin
//! (what the child does with it after that is the child's business: lines still in the
//! pipe when it crashes are lost, so a consumer that needs more should be idempotent and
//! acknowledge differently, e.g. through pg_table). When the child exits, or a write fails,
//! it is restarted after a backoff and the events whose write failed are written again to
//! the new child. Its stderr (and stdout) go to the log, `component=exec`.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::durable::{next_batch, park, sleep_or_cancel, Report};
use super::Adapter;
use crate::ack::Acker;
use crate::backoff::Backoff;
use crate::config::ExecConfig;
use crate::error::Error;
use crate::event::Delivery;

/// Most events written per flush.
const MAX_BATCH: usize = 1000;

/// The exec adapter.
pub struct Exec {
    name: String,
    command: String,
    backoff: Backoff,
    report: Report,
    exit_grace: Duration,
}

/// A running child.
struct Running {
    child: Child,
    stdin: ChildStdin,
}

impl Exec {
    /// An exec adapter named `name` running `config.command`; on shutdown the command gets
    /// `exit_grace` to exit after its stdin closes.
    pub fn new(name: &str, config: &ExecConfig, exit_grace: Duration) -> Exec {
        Exec {
            name: name.to_string(),
            command: config.command.clone(),
            report: Report::new(name),
            exit_grace,
            backoff: Backoff::new(config.backoff_base, config.backoff_cap)
                .with_floor(Duration::from_millis(100)),
        }
    }

    fn spawn(&self) -> Result<Running, Error> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("start `sh -c {}`", self.command)))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(log_lines(out, self.name.clone(), "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(log_lines(err, self.name.clone(), "stderr"));
        }
        tracing::info!(component = "exec", adapter = %self.name, pid = child.id(),
            command = %self.command, "command started");
        Ok(Running { child, stdin })
    }

    async fn run_loop(
        mut self,
        mut input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let mut running: Option<Running> = None;
        // A batch whose write failed, written again to the next child.
        let mut pending: Option<(Vec<u8>, u64, usize, std::time::Instant)> = None;
        loop {
            if running.is_none() {
                match self.spawn() {
                    Ok(r) => running = Some(r),
                    Err(e) => {
                        let delay = self.backoff.next_delay();
                        tracing::error!(component = "exec", adapter = %self.name, error = %e,
                            retry_in = ?delay, "cannot start the command");
                        if !sleep_or_cancel(delay, &cancel).await {
                            park(&mut input).await;
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let child = running.as_mut().expect("started above");
            let (bytes, last, count, started) = match pending.take() {
                Some(p) => p,
                None => {
                    let batch = tokio::select! {
                        batch = next_batch(&mut input, MAX_BATCH) => batch,
                        status = child.child.wait() => {
                            if !self.exited(status, &mut running, &cancel, &mut input).await {
                                return Ok(());
                            }
                            continue;
                        }
                    };
                    let Some(batch) = batch else { break };
                    let mut bytes = Vec::new();
                    for d in &batch {
                        serde_json::to_writer(&mut bytes, &*d.event)
                            .expect("an Event always serializes");
                        bytes.push(b'\n');
                    }
                    let last = batch.last().map_or(0, |d| d.seq);
                    (bytes, last, batch.len(), std::time::Instant::now())
                }
            };
            let written = async {
                child.stdin.write_all(&bytes).await?;
                child.stdin.flush().await
            }
            .await;
            match written {
                Ok(()) => {
                    self.backoff.reset();
                    self.report.delivered_count(count, started);
                    if let Some(acker) = &acker {
                        acker.finished(last);
                    }
                }
                Err(e) => {
                    self.report.failed(&format!("write to the command: {e}"));
                    tracing::warn!(component = "exec", adapter = %self.name, error = %e,
                        "write to the command failed; restarting it and writing again");
                    pending = Some((bytes, last, count, started));
                    let status = child.child.wait().await;
                    if !self.exited(status, &mut running, &cancel, &mut input).await {
                        return Ok(());
                    }
                }
            }
        }
        // Input closed: close stdin so the command sees EOF, let it finish, kill it if it
        // does not within the grace period.
        if let Some(mut r) = running {
            drop(r.stdin);
            match tokio::time::timeout(self.exit_grace, r.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(component = "exec", adapter = %self.name, grace = ?self.exit_grace,
                        "command did not exit after its stdin closed; killing it");
                    let _ = r.child.kill().await;
                }
            }
        }
        Ok(())
    }

    /// The child exited: log it and wait the backoff before the next start. On shutdown,
    /// parks the input instead (nothing more is acknowledged) and returns `false`.
    async fn exited(
        &mut self,
        status: std::io::Result<ExitStatus>,
        running: &mut Option<Running>,
        cancel: &CancellationToken,
        input: &mut mpsc::Receiver<Delivery>,
    ) -> bool {
        *running = None;
        crate::metrics::exec_restart();
        let delay = self.backoff.next_delay();
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(component = "exec", adapter = %self.name, command = %self.command,
            status, restart_in = ?delay, "command exited; restarting it");
        if sleep_or_cancel(delay, cancel).await {
            return true;
        }
        park(input).await;
        false
    }
}

/// Forwards a child's output to the log, one record per line.
async fn log_lines(pipe: impl AsyncRead + Unpin, adapter: String, stream: &'static str) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if stream == "stderr" {
            tracing::warn!(component = "exec", adapter = %adapter, stream, "{line}");
        } else {
            tracing::info!(component = "exec", adapter = %adapter, stream, "{line}");
        }
    }
}

impl Adapter for Exec {
    fn name(&self) -> &str {
        &self.name
    }

    fn durable(&self) -> bool {
        true
    }

    fn set_health(&mut self, health: crate::health::Component) {
        self.report.set_health(health);
    }

    fn run(
        self: Box<Self>,
        input: mpsc::Receiver<Delivery>,
        acker: Option<Acker>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.run_loop(input, acker, cancel))
    }
}
