//! exec: a long-lived `sh -c COMMAND` fed one JSON line per event on its stdin.
//!
//! An event is acknowledged once the command has read its line from the pipe and then kept
//! running for `exec.read_grace` (or read 64 KiB more), see [`window`]. When the command
//! exits, or a write fails, it is restarted after a backoff and every line not yet
//! acknowledged (unread, or read just before it died) is written again to the new command,
//! so a crashing command loses nothing; it may see a line twice. A line in hand at
//! `exec.max_attempts` crashes in a row is dead-lettered; a command the shell cannot run
//! (exit status 126 or 127: not executable, not found) is a configuration error that
//! blames no event: it is retried with the backoff, its events wait. Its stderr (and
//! stdout) go to the log, `component=exec`.

use crate::format::Renderer;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetters;
use super::durable::{next_batch, park, sleep_or_cancel, Report};
use super::Adapter;
use crate::ack::Acker;
use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::{Delivery, Event};

mod config;
pub mod window;

pub use config::{ExecConfig, Flags, KIND};

use window::{unread_bytes, Window};

/// Most events written per flush.
const MAX_BATCH: usize = 1000;

/// How often the pipe is checked for what the command has read.
const POLL: Duration = Duration::from_millis(20);

/// How often, while lines are sent one at a time, the pipe is checked for the line's read.
const CAREFUL_POLL: Duration = Duration::from_millis(2);

/// Bytes a command may read past a line before the line counts as handled without waiting
/// for `exec.read_grace`: Linux's default pipe capacity, the most one read can take.
const PIPE_SLACK: u64 = 64 * 1024;

/// The exec adapter.
pub struct Exec {
    name: String,
    command: String,
    backoff: Backoff,
    report: Report,
    exit_grace: Duration,
    read_grace: Duration,
    max_attempts: u32,
    dead_letters: DeadLetters,
    renderer: Renderer,
}

/// A running child.
struct Running {
    child: Child,
    stdin: ChildStdin,
}

impl Exec {
    /// An exec adapter named `name` running `config.command`; on shutdown the command gets
    /// `exit_grace` to exit after its stdin closes.
    /// Dead letters go to the database at `database_url`.
    pub fn new(name: &str, config: &ExecConfig, database_url: &str, exit_grace: Duration) -> Exec {
        Exec {
            name: name.to_string(),
            command: config.command.clone(),
            report: Report::new(name),
            exit_grace,
            read_grace: config.read_grace,
            max_attempts: config.max_attempts.max(1),
            dead_letters: DeadLetters::new(
                database_url,
                name,
                config.backoff_base,
                config.backoff_cap,
            ),
            backoff: Backoff::new(config.backoff_base, config.backoff_cap)
                .with_floor(Duration::from_millis(100)),
            renderer: Renderer::new(config.format, database_url),
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
        acker: Acker,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let ack = |seq: Option<u64>| {
            if let Some(seq) = seq {
                acker.finished(seq);
            }
        };
        let mut running: Option<Running> = None;
        let mut window = Window::new(self.read_grace, PIPE_SLACK);
        'outer: loop {
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

            // Lines of a crashed command: one at a time, each written once the command has
            // read the one before.
            if let Some((seq, line)) = window.careful.front().cloned() {
                if let Err(e) = write(&mut child.stdin, &line).await {
                    self.write_failed(&e);
                    ack(observe(&mut window, child));
                    let status = child.child.wait().await;
                    if !self
                        .died(
                            status,
                            &mut running,
                            &mut window,
                            Vec::new(),
                            &ack,
                            &cancel,
                            &mut input,
                        )
                        .await
                    {
                        return Ok(());
                    }
                    continue;
                }
                window.careful.pop_front();
                window.push_careful(seq, line);
                loop {
                    ack(observe(&mut window, child));
                    if matches!(unread_bytes(&child.stdin), Ok(0) | Err(_)) {
                        break;
                    }
                    tokio::select! {
                        status = child.child.wait() => {
                            ack(observe(&mut window, child));
                            if !self.died(status, &mut running, &mut window, Vec::new(), &ack, &cancel, &mut input).await {
                                return Ok(());
                            }
                            continue 'outer;
                        }
                        _ = tokio::time::sleep(CAREFUL_POLL) => {}
                    }
                }
                // The command is alive and reading: progress, so restarts start fast again.
                self.backoff.reset();
                continue;
            }

            let batch = tokio::select! {
                batch = next_batch(&mut input, MAX_BATCH) => batch,
                status = child.child.wait() => {
                    ack(observe(&mut window, child));
                    if !self.died(status, &mut running, &mut window, Vec::new(), &ack, &cancel, &mut input).await {
                        return Ok(());
                    }
                    continue;
                }
                _ = tokio::time::sleep(POLL), if !window.is_empty() => {
                    ack(observe(&mut window, child));
                    continue;
                }
            };
            let Some(batch) = batch else { break };
            let lines: Vec<(u64, Vec<u8>)> = batch
                .iter()
                .map(|d| {
                    let mut line = self.renderer.body(&d.event);
                    line.push(b'\n');
                    (d.seq, line)
                })
                .collect();
            let started = std::time::Instant::now();
            let bytes: Vec<u8> = lines.iter().flat_map(|(_, l)| l.iter().copied()).collect();
            match write(&mut child.stdin, &bytes).await {
                Ok(()) => {
                    self.backoff.reset();
                    self.report.delivered_count(lines.len(), started);
                    for (seq, line) in lines {
                        window.push(seq, line);
                    }
                    ack(observe(&mut window, child));
                }
                Err(e) => {
                    self.write_failed(&e);
                    ack(observe(&mut window, child));
                    let status = child.child.wait().await;
                    if !self
                        .died(
                            status,
                            &mut running,
                            &mut window,
                            lines,
                            &ack,
                            &cancel,
                            &mut input,
                        )
                        .await
                    {
                        return Ok(());
                    }
                }
            }
        }
        // Input closed: wait (within the grace period) for the command to read what it
        // was given, close its stdin so it sees EOF, and let it finish; a command that
        // exits 0 after EOF has handled everything.
        if let Some(mut r) = running {
            let deadline = tokio::time::Instant::now() + self.exit_grace;
            while !window.is_empty() && tokio::time::Instant::now() < deadline {
                ack(observe(&mut window, &r));
                if matches!(r.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            drop(r.stdin);
            match tokio::time::timeout_at(deadline, r.child.wait()).await {
                Ok(Ok(status)) if status.success() => ack(window.settle_all()),
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

    fn write_failed(&self, e: &std::io::Error) {
        self.report.failed(&format!("write to the command: {e}"));
        tracing::warn!(component = "exec", adapter = %self.name, error = %e,
            "write to the command failed; restarting it and writing again");
    }

    /// The command died: its unacknowledged lines (and `unwritten`) go to the next one; a
    /// line that was in hand at `max_attempts` crashes is dead-lettered. Then waits the
    /// restart backoff. Returns `false` on shutdown (the input is parked).
    #[allow(clippy::too_many_arguments)]
    async fn died(
        &mut self,
        status: std::io::Result<ExitStatus>,
        running: &mut Option<Running>,
        window: &mut Window,
        unwritten: Vec<(u64, Vec<u8>)>,
        ack: &impl Fn(Option<u64>),
        cancel: &CancellationToken,
        input: &mut mpsc::Receiver<Delivery>,
    ) -> bool {
        if let Some(code) = status.as_ref().ok().and_then(cannot_run) {
            // A missing or non-executable program is a configuration problem: the events
            // wait (unacknowledged) until the command runs, none is dead-lettered.
            window.command_did_not_run(unwritten);
            let reason = format!(
                "the command cannot run (sh exit status {code}: {}); fix exec.command \
                 (--exec-command); events wait and are not dead-lettered",
                if code == 127 { "command not found" } else { "not executable" }
            );
            self.report.failed(&reason);
            tracing::error!(component = "exec", adapter = %self.name, command = %self.command,
                "{reason}");
            return self.exited(status, running, cancel, input).await;
        }
        if let Some((seq, line, crashes)) = window.command_died(unwritten, self.max_attempts) {
            match serde_json::from_slice::<Event>(&line) {
                Ok(event) => {
                    let error = format!(
                        "the command exited while handling this event, {crashes} times in a row"
                    );
                    if !self
                        .dead_letters
                        .record(&event, &error, crashes, cancel)
                        .await
                    {
                        park(input).await;
                        return false;
                    }
                }
                Err(e) => tracing::error!(component = "exec", adapter = %self.name, error = %e,
                    "cannot read back a line to dead-letter it"),
            }
            ack(Some(seq));
        }
        self.exited(status, running, cancel, input).await
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

/// The shell's exit status when it could not run the command at all: 127 (not found)
/// or 126 (found, not executable), as POSIX sh reports them.
fn cannot_run(status: &ExitStatus) -> Option<i32> {
    status.code().filter(|code| matches!(code, 126 | 127))
}

/// Writes and flushes `bytes` to the command.
async fn write(stdin: &mut ChildStdin, bytes: &[u8]) -> std::io::Result<()> {
    stdin.write_all(bytes).await?;
    stdin.flush().await
}

/// Acknowledgeable progress of the command: what it has read according to the pipe.
fn observe(window: &mut Window, running: &Running) -> Option<u64> {
    match unread_bytes(&running.stdin) {
        Ok(unread) => window.observe(unread, std::time::Instant::now()),
        Err(e) => {
            tracing::debug!(component = "exec", error = %e, "cannot read the pipe's fill level");
            None
        }
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
        acker: Acker,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(self.run_loop(input, acker, cancel))
    }
}
