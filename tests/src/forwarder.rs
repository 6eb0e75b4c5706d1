//! The forwarder binary (`pgpipe`) as a child process with captured output.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::process::{env_flag, lock, send_signal, spawn_tied_to_process};

/// How often the `wait_*` methods look at the captured output.
const POLL: Duration = Duration::from_millis(20);

/// A running forwarder process.
///
/// stdout is captured line by line (the JSON events of the stdout adapter); stderr is
/// captured as text and echoed to the test's stderr as `[pgpipe] <line>` (set
/// `PGPIPE_TEST_QUIET=1` to silence the echo). The process is killed (SIGKILL) when the
/// `Forwarder` is dropped, and also when the test process dies (parent-death signal).
#[derive(Debug)]
pub struct Forwarder {
    child: Mutex<Child>,
    pid: u32,
    stdout: Arc<Captured<Vec<String>>>,
    stderr: Arc<Captured<String>>,
}

#[derive(Debug, Default)]
struct Captured<T> {
    data: Mutex<T>,
    /// The pipe reached end of file: no more output will come.
    closed: AtomicBool,
}

impl Forwarder {
    /// Where the binary is: `$PGPIPE_BIN`, else `$CARGO_TARGET_DIR/debug/pgpipe`, else
    /// `<workspace>/target/debug/pgpipe`.
    pub fn binary_path() -> PathBuf {
        if let Some(path) = std::env::var_os("PGPIPE_BIN") {
            return PathBuf::from(path);
        }
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            return PathBuf::from(dir).join("debug/pgpipe");
        }
        if let Some(dir) = option_env!("CARGO_TARGET_DIR") {
            return PathBuf::from(dir).join("debug/pgpipe");
        }
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/debug/pgpipe"
        ))
    }

    /// Runs `pgpipe <args>` with `env` added to the test process's environment.
    /// Panics if the binary is missing or cannot be started.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Forwarder {
        let binary = Self::binary_path();
        assert!(
            binary.is_file(),
            "{} not found: build the forwarder first: cargo build -p pgpipe_forwarder",
            binary.display()
        );
        let mut cmd = Command::new(&binary);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_tied_to_process(cmd, libc::SIGKILL)
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", binary.display()));
        let pid = child.id();

        let stdout = Arc::new(Captured::<Vec<String>>::default());
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let sink = stdout.clone();
        std::thread::Builder::new()
            .name(format!("pgpipe-{pid}-stdout"))
            .spawn(move || {
                read_lines(stdout_pipe, |line| lock(&sink.data).push(line));
                sink.closed.store(true, Ordering::SeqCst);
            })
            .expect("start the stdout reader");

        let stderr = Arc::new(Captured::<String>::default());
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        let echo = !env_flag("PGPIPE_TEST_QUIET");
        std::thread::Builder::new()
            .name(format!("pgpipe-{pid}-stderr"))
            .spawn(move || {
                read_lines(stderr_pipe, |line| {
                    if echo {
                        eprintln!("[pgpipe] {line}");
                    }
                    let mut text = lock(&sink.data);
                    text.push_str(&line);
                    text.push('\n');
                });
                sink.closed.store(true, Ordering::SeqCst);
            })
            .expect("start the stderr reader");

        Forwarder {
            child: Mutex::new(child),
            pid,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdout lines captured so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        lock(&self.stdout.data).clone()
    }

    /// The stdout lines captured so far, each parsed as JSON; panics on a line that is
    /// not JSON.
    pub fn stdout_json(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .map(|line| parse_json(line, self))
            .collect()
    }

    /// The stderr captured so far.
    pub fn stderr_text(&self) -> String {
        lock(&self.stderr.data).clone()
    }

    /// Waits until at least `n` stdout lines have arrived and returns all lines so far.
    /// Panics (with stdout and stderr) on timeout, or as soon as stdout is closed with
    /// fewer lines.
    pub async fn wait_for_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.stdout_lines();
            if lines.len() >= n {
                return lines;
            }
            let closed = self.stdout.closed.load(Ordering::SeqCst);
            if closed || Instant::now() >= deadline {
                // Reading after the check: a line may have arrived just before the close.
                let lines = self.stdout_lines();
                if lines.len() >= n {
                    return lines;
                }
                let why = if closed {
                    format!("stdout closed ({})", self.status_text())
                } else {
                    format!("timed out after {timeout:?}")
                };
                panic!(
                    "waiting for {n} stdout lines from pgpipe: {why}, got {}\n{}",
                    lines.len(),
                    self.report()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`Forwarder::wait_for_lines`], each line parsed as JSON.
    pub async fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        self.wait_for_lines(n, timeout)
            .await
            .iter()
            .map(|line| parse_json(line, self))
            .collect()
    }

    /// Waits until stderr contains `needle` and returns all of stderr. Panics on timeout
    /// or when stderr is closed without it.
    pub async fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let closed = self.stderr.closed.load(Ordering::SeqCst);
            let text = self.stderr_text();
            if text.contains(needle) {
                return text;
            }
            if closed || Instant::now() >= deadline {
                let why = if closed {
                    format!("stderr closed ({})", self.status_text())
                } else {
                    format!("timed out after {timeout:?}")
                };
                panic!(
                    "waiting for {needle:?} on pgpipe's stderr: {why}\n{}",
                    self.report()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM (graceful shutdown); does not wait. Use [`Forwarder::wait_exit`].
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGINT; does not wait.
    pub fn sigint(&self) {
        self.signal(libc::SIGINT);
    }

    fn signal(&self, signal: libc::c_int) {
        let mut child = lock(&self.child);
        // Never signal a reaped pid: it may belong to another process by now.
        if matches!(child.try_wait(), Ok(None)) {
            send_signal(self.pid, signal);
        }
    }

    /// SIGKILL, then reaps the process: a crash.
    pub fn kill9(&self) {
        let mut child = lock(&self.child);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Waits for the process to exit; panics (with stdout and stderr) on timeout.
    pub async fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                // Let the reader threads drain the pipes, so callers see all output.
                let drained = Instant::now() + Duration::from_secs(2);
                while !(self.stdout.closed.load(Ordering::SeqCst)
                    && self.stderr.closed.load(Ordering::SeqCst))
                    && Instant::now() < drained
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pgpipe (pid {}) did not exit within {timeout:?}\n{}",
                    self.pid,
                    self.report()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn status_text(&self) -> String {
        match self.try_exit_status() {
            Some(status) => format!("pgpipe {status}"),
            None => "pgpipe still running".to_string(),
        }
    }

    fn report(&self) -> String {
        format!(
            "--- pgpipe stdout ---\n{}\n--- pgpipe stderr ---\n{}",
            self.stdout_lines().join("\n"),
            self.stderr_text()
        )
    }
}

/// A `pgpipe listen` command line, built flag by flag, so a scenario says what it wants
/// (`.channel("t").adapter("file")`) instead of spelling out an argument array.
///
/// ```no_run
/// # fn f(url: &str) {
/// use pgpipe_tests::Forwarder;
/// let fwd = Forwarder::listen(url)
///     .channel("t")
///     .adapter("file")
///     .flag("--file-path", "/tmp/events.jsonl")
///     .env("PGPIPE_DETECTOR_BACKOFF_BASE", "200ms")
///     .spawn();
/// # }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "spawn() runs the forwarder"]
pub struct Listen {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Listen {
    /// Adds `--channel NAME` (repeatable).
    pub fn channel(self, name: impl Into<String>) -> Listen {
        self.flag("--channel", name)
    }

    /// Adds `--adapter NAME` (repeatable).
    pub fn adapter(self, name: impl Into<String>) -> Listen {
        self.flag("--adapter", name)
    }

    /// Adds `--detector NAME`.
    pub fn detector(self, name: impl Into<String>) -> Listen {
        self.flag("--detector", name)
    }

    /// Adds `FLAG VALUE`, e.g. `.flag("--file-path", path)`.
    pub fn flag(mut self, flag: &str, value: impl Into<String>) -> Listen {
        self.args.push(flag.to_string());
        self.args.push(value.into());
        self
    }

    /// Adds one argument as it is: a flag without a value (`.arg("--all-tables")`).
    pub fn arg(mut self, arg: &str) -> Listen {
        self.args.push(arg.to_string());
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Listen {
        self.env.push((name.to_string(), value.into()));
        self
    }

    /// Sets every `(name, value)` of `vars` for the process.
    pub fn envs(mut self, vars: &[(&str, &str)]) -> Listen {
        self.env
            .extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The full argument list (`listen --db URL ...`).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Starts the forwarder with this command line (see [`Forwarder::spawn`]).
    pub fn spawn(&self) -> Forwarder {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Forwarder::spawn(&args, &env)
    }
}

impl Forwarder {
    /// A `pgpipe listen --db DB_URL` command line to add flags to; see [`Listen`].
    pub fn listen(db_url: &str) -> Listen {
        Listen {
            args: vec!["listen".into(), "--db".into(), db_url.into()],
            env: Vec::new(),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_json(line: &str, forwarder: &Forwarder) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "pgpipe stdout line is not JSON ({e}): {line}\n{}",
            forwarder.report()
        )
    })
}

/// Calls `each` for every line (without the newline; invalid UTF-8 replaced).
fn read_lines(pipe: impl Read, mut each: impl FnMut(String)) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                each(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}
