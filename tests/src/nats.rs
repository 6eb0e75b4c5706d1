//! A temporary NATS server with JetStream ([`TempNats`]) and a small JetStream reader for
//! assertions, with `async-nats` (a client this project did not write).

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::{lock, send_signal, spawn_tied_to_process, wait_child};

/// Default `nats-server` binary (Debian's `nats-server` package); override with
/// `PGPIPE_NATS_SERVER`.
pub const DEFAULT_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Settings of a [`TempNats`].
#[derive(Clone, Debug, Default)]
pub struct NatsOptions {
    /// Clients must send this token (`--auth`).
    pub token: Option<String>,
    /// Clients must log in with this user and password (`--user`, `--pass`).
    pub user: Option<(String, String)>,
    /// TLS only: a CA and a server certificate for `localhost`/`127.0.0.1` are generated
    /// ([`TempNats::ca_cert_path`]); clients must use TLS.
    pub tls: bool,
    /// Lines of a config file passed with `-c` (e.g. `max_payload: 4096`); flags win.
    pub config: Vec<String>,
}

/// A `nats-server -js` run by the test process: a direct child on 127.0.0.1 and a free
/// port, its store and log in a fresh `/tmp/pgpipe-test-<pid>-nats-XXXXXX` directory
/// (removed on drop; the Postgres harness sweeps those of dead test processes). The server
/// is killed when the `TempNats` is dropped and when the test process dies (parent-death
/// signal). [`TempNats::stop`], [`TempNats::kill9`] and [`TempNats::start`] restart it on
/// the same port with the same store, so the stream survives.
#[derive(Debug)]
pub struct TempNats {
    dir: tempfile::TempDir,
    port: u16,
    options: NatsOptions,
    child: Mutex<Option<Child>>,
}

/// One message read back from a stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// Its subject.
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// Its headers (first value of each).
    pub headers: BTreeMap<String, String>,
    /// Its body.
    pub payload: Vec<u8>,
}

impl StreamMessage {
    /// The body parsed as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "message {} is not JSON ({e}): {}",
                self.sequence,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }

    /// Header `name`, if set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

impl TempNats {
    /// Starts a server with default settings (no auth) and waits until it accepts clients.
    pub async fn start() -> TempNats {
        TempNats::start_with(NatsOptions::default()).await
    }

    /// Starts a server with `options`.
    pub async fn start_with(options: NatsOptions) -> TempNats {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgpipe-test-{}-nats-", std::process::id()))
            .tempdir()
            .expect("create the nats directory");
        if !options.config.is_empty() {
            fs::write(dir.path().join("nats.conf"), options.config.join("\n"))
                .expect("write nats.conf");
        }
        if options.tls {
            crate::tls::generate(dir.path(), dir.path(), None);
        }
        let nats = TempNats {
            dir,
            port: free_port(),
            options,
            child: Mutex::new(None),
        };
        nats.start_again().await;
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port (unchanged across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PEM file of the CA that signed a TLS server's certificate ([`NatsOptions::tls`]).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server log so far (every start appends).
    pub fn log_contents(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Starts the server again after [`TempNats::stop`] or [`TempNats::kill9`] (a no-op
    /// when it runs), on the same port and store, and waits until it accepts clients.
    pub async fn start_again(&self) {
        if let Some(child) = lock(&self.child).as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return;
            }
        }
        let binary =
            std::env::var("PGPIPE_NATS_SERVER").unwrap_or_else(|_| DEFAULT_NATS_SERVER.to_string());
        assert!(
            Path::new(&binary).is_file(),
            "{binary} not found: install Debian's nats-server package (scripts/setup.sh)"
        );
        let mut cmd = Command::new(&binary);
        let port = self.port.to_string();
        let store = self.store_dir();
        let log = self.log_path();
        if !self.options.config.is_empty() {
            cmd.arg("-c").arg(self.dir.path().join("nats.conf"));
        }
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(&log);
        if let Some(token) = &self.options.token {
            cmd.args(["--auth", token]);
        }
        if let Some((user, pass)) = &self.options.user {
            cmd.args(["--user", user, "--pass", pass]);
        }
        if self.options.tls {
            cmd.arg("--tlscert")
                .arg(self.dir.path().join("server.crt"))
                .arg("--tlskey")
                .arg(self.dir.path().join("server.key"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let log_start = fs::metadata(&log).map_or(0, |m| m.len());
        let mut child = spawn_tied_to_process(cmd, libc::SIGKILL)
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let fresh = text.get(log_start as usize..).unwrap_or("");
            if fresh.contains("Server is ready")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nats-server exited at start ({status}):\n{fresh}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("nats-server not ready within {READY_TIMEOUT:?}:\n{fresh}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *lock(&self.child) = Some(child);
    }

    /// Stops the server cleanly (SIGTERM) and waits for it.
    pub async fn stop(&self) {
        self.signal_and_reap(libc::SIGTERM);
    }

    /// Kills the server (SIGKILL), a crash, and reaps it.
    pub async fn kill9(&self) {
        self.signal_and_reap(libc::SIGKILL);
    }

    /// Stops (SIGTERM) and starts the server again.
    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    fn signal_and_reap(&self, signal: libc::c_int) {
        if let Some(mut child) = lock(&self.child).take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id(), signal);
                if wait_child(&mut child, Duration::from_secs(20)).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// A client connected to this server (with its token), the test's own third-party
    /// NATS client.
    pub async fn client(&self) -> async_nats::Client {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(token) = &self.options.token {
            options = options.token(token.clone());
        }
        if let Some((user, pass)) = &self.options.user {
            options = options.user_and_password(user.clone(), pass.clone());
        }
        if self.options.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(self.ca_cert_path());
        }
        options
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// A JetStream context of a fresh client.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Every message of `stream`, in stream order; empty when the stream does not exist.
    pub async fn stream_messages(&self, stream: &str) -> Vec<StreamMessage> {
        let js = self.jetstream().await;
        let Ok(mut handle) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let state = handle.info().await.expect("stream info").state.clone();
        let mut out = Vec::with_capacity(usize::try_from(state.messages).unwrap_or(0));
        if state.messages == 0 {
            return out;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            let Ok(m) = handle.get_raw_message(sequence).await else {
                continue; // deleted
            };
            let headers = m
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
                .collect();
            out.push(StreamMessage {
                subject: m.subject.to_string(),
                sequence: m.sequence,
                headers,
                payload: m.payload.to_vec(),
            });
        }
        out
    }

    /// How many messages `stream` holds (0 when it does not exist).
    pub async fn stream_count(&self, stream: &str) -> u64 {
        let js = self.jetstream().await;
        match js.get_stream(stream).await {
            Ok(mut handle) => handle.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        }
    }
}

impl Drop for TempNats {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if crate::process::env_flag("PGPIPE_TEST_KEEP") {
            let kept = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a placeholder directory"),
            );
            eprintln!("PGPIPE_TEST_KEEP: keeping {}", kept.keep().display());
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
