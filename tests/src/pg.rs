//! Temporary Postgres clusters ([`TempPg`]) and per-test databases ([`TestDb`]).

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use crate::process::{
    self, as_postgres_user, env_flag, lock, lock_for, run_as, send_signal, spawn_tied_to_process,
    wait_child,
};
use crate::tls::{self, TlsMaterial};

/// Default directory of the Postgres 15 binaries; override with `PGPIPE_PG_BIN`.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long a starting cluster may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of the temporary directories, `/tmp/pgpipe-test-<pid>-XXXXXX`.
const DIR_PREFIX: &str = "pgpipe-test-";

/// Settings for a dedicated cluster ([`TempPg::start_dedicated`]).
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Lines appended to `postgresql.conf` after the harness's own settings, so they win:
    /// e.g. `"wal_level = replica"` or `"pgpipe.poll_interval = '50ms'"`.
    pub extra_conf: Vec<String>,
    /// Generate a CA and a server certificate, set `ssl = on`, and allow TCP connections
    /// only through `hostssl` lines: a plain-text TCP connection is rejected.
    pub tls: bool,
}

impl PgOptions {
    /// The defaults: no TLS, no extra settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`PgOptions::tls`].
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Appends one `postgresql.conf` line (see [`PgOptions::extra_conf`]).
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }
}

/// How to stop a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGQUIT: like `pg_ctl -m immediate`, a crash; the next start runs recovery.
    Immediate,
    /// SIGINT: like `pg_ctl -m fast`, a clean shutdown with a checkpoint.
    Fast,
}

/// A temporary Postgres cluster run by the test process.
///
/// [`TempPg::shared`] is the one cluster every test in the process uses, each with its
/// own database ([`TempPg::database`]). A test that restarts Postgres or needs special
/// settings starts its own with [`TempPg::start_dedicated`]; that cluster is stopped and
/// its directory removed when the last handle (including every [`TestDb`] made from it)
/// is dropped.
///
/// Each cluster lives in a fresh `/tmp/pgpipe-test-<pid>-XXXXXX` directory (`data/`,
/// `sock/`, `postgres.log`, and `ca.crt` with TLS) and listens on 127.0.0.1 on a free
/// port with `trust` authentication for the `postgres` role. `postgres` is a direct child
/// of the test process, run as the `postgres` OS user when the tests run as root. At
/// process exit an `atexit` hook stops every cluster and removes its directory; if the
/// test process is killed instead, the postmaster gets SIGQUIT (parent-death signal) and
/// the next run removes the directories of dead test processes.
///
/// Environment:
/// - `PGPIPE_PG_BIN`: directory of `initdb`, `postgres`, `pg_config`
///   (default `/usr/lib/postgresql/15/bin`).
/// - `PGPIPE_TEST_NO_PRELOAD=1`: start clusters without
///   `shared_preload_libraries = 'pgpipe'`, skip `CREATE EXTENSION pgpipe` in
///   [`TempPg::database`] and skip the check that the extension is installed. For
///   checking the harness itself, or scenarios that must run without the extension.
/// - `PGPIPE_TEST_KEEP=1`: keep the cluster directories at exit (Postgres is still
///   stopped), to read logs after a failure.
#[derive(Clone, Debug)]
pub struct TempPg {
    inner: Arc<Cluster>,
}

#[derive(Debug)]
struct Cluster {
    root: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: AtomicU16,
    bin_dir: PathBuf,
    tls: Option<TlsMaterial>,
    preload: bool,
    dedicated: bool,
    postmaster: Mutex<Option<Child>>,
    /// Pid of the running postmaster, 0 when stopped; read at exit without the lock.
    pid: AtomicU32,
    torn_down: AtomicBool,
}

impl TempPg {
    /// The cluster shared by all tests of this process, started on first use.
    ///
    /// Blocks for the start (initdb + startup, a few seconds). Panics with the reason if
    /// the cluster cannot start, and again with the same reason on every later call.
    pub fn shared() -> &'static TempPg {
        static SHARED: OnceLock<Result<TempPg, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            Cluster::create(&PgOptions::default(), false).map(|inner| TempPg { inner })
        });
        match shared {
            Ok(pg) => pg,
            Err(message) => panic!("{message}"),
        }
    }

    /// Starts a cluster of its own for a test that restarts Postgres or needs special
    /// settings (TLS, `wal_level = replica`, GUCs that need a restart).
    pub async fn start_dedicated(options: PgOptions) -> TempPg {
        let inner = run_blocking(move || Cluster::create(&options, true))
            .await
            .unwrap_or_else(|message| panic!("{message}"));
        TempPg { inner }
    }

    /// A fresh database named after `name_hint` (plus a counter and the pid), with
    /// `CREATE EXTENSION pgpipe` already run (skipped under `PGPIPE_TEST_NO_PRELOAD`).
    pub async fn database(&self, name_hint: &str) -> TestDb {
        self.create_database(name_hint, true).await
    }

    /// A fresh database without the pgpipe extension.
    pub async fn database_without_extension(&self, name_hint: &str) -> TestDb {
        self.create_database(name_hint, false).await
    }

    async fn create_database(&self, name_hint: &str, extension: bool) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}_{n}_{}", sanitize_db_name(name_hint), std::process::id());
        let admin = self.inner.client_or_panic("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {}", describe(&e)));
        drop(admin);
        let mut db = TestDb {
            cluster: self.clone(),
            name,
            forwarder_role: None,
        };
        if extension && self.inner.preload {
            db.execute("CREATE EXTENSION pgpipe").await;
            db.execute(FORWARDER_ROLE_SQL).await;
            db.forwarder_role = Some(FORWARDER_ROLE);
        }
        db
    }

    /// A new connection to database `dbname` of this cluster (TLS on a TLS cluster); the
    /// connection task is spawned on the current tokio runtime. Panics with the server
    /// log's tail when it cannot connect.
    pub async fn client(&self, dbname: &str) -> Client {
        self.inner.client_or_panic(dbname).await
    }

    /// `postgres://postgres@127.0.0.1:PORT/<dbname>`.
    pub fn url(&self, dbname: &str) -> String {
        self.inner.url(dbname)
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TCP port (unchanged across restarts).
    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// The data directory (owned by the `postgres` OS user).
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The server log (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// The whole server log so far.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.inner.log_path).unwrap_or_default()
    }

    /// Whether the cluster was started with [`PgOptions::tls`].
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// The PEM file of the CA that signed the server certificate, for `sslrootcert=`.
    /// Panics if the cluster has no TLS.
    pub fn ca_cert_path(&self) -> &Path {
        &self.inner.tls_or_panic().ca_cert_path
    }

    /// The CA certificate (DER), for building a rustls root store.
    /// Panics if the cluster has no TLS.
    pub fn ca_cert_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        &self.inner.tls_or_panic().ca_der
    }

    /// Whether `shared_preload_libraries = 'pgpipe'` is set (false under
    /// `PGPIPE_TEST_NO_PRELOAD`).
    pub fn preloads_pgpipe(&self) -> bool {
        self.inner.preload
    }

    /// Whether the postmaster is running (it may have crashed on its own).
    pub fn is_running(&self) -> bool {
        let mut guard = lock(&self.inner.postmaster);
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the cluster (a no-op when stopped). Dedicated clusters only.
    pub async fn stop(&self, mode: StopMode) {
        self.assert_dedicated("stop");
        let inner = self.inner.clone();
        run_blocking(move || inner.stop_blocking(mode)).await;
    }

    /// Starts a stopped cluster on the same port and waits until it accepts
    /// connections (a no-op when running). Dedicated clusters only.
    pub async fn start(&self) {
        self.assert_dedicated("start");
        let inner = self.inner.clone();
        run_blocking(move || inner.start_or_panic()).await;
    }

    /// Stops (SIGQUIT when `immediate`, a crash; SIGINT otherwise, a fast shutdown) and
    /// starts again on the same port. Dedicated clusters only.
    pub async fn restart(&self, immediate: bool) {
        self.assert_dedicated("restart");
        let inner = self.inner.clone();
        let mode = if immediate {
            StopMode::Immediate
        } else {
            StopMode::Fast
        };
        run_blocking(move || {
            inner.stop_blocking(mode);
            inner.start_or_panic();
        })
        .await;
    }

    fn assert_dedicated(&self, what: &str) {
        assert!(
            self.inner.dedicated,
            "refusing to {what} the shared cluster: other tests use it; \
             use TempPg::start_dedicated(..) for a test that stops or restarts Postgres"
        );
    }
}

/// `TempPg::shared().database(name_hint)`.
pub async fn test_db(name_hint: &str) -> TestDb {
    TempPg::shared().database(name_hint).await
}

impl Cluster {
    fn create(options: &PgOptions, dedicated: bool) -> Result<Arc<Cluster>, String> {
        sweep_stale_dirs();
        let bin_dir = PathBuf::from(
            std::env::var("PGPIPE_PG_BIN").unwrap_or_else(|_| DEFAULT_PG_BIN.to_string()),
        );
        for tool in ["initdb", "postgres"] {
            if !bin_dir.join(tool).is_file() {
                return Err(format!(
                    "{} not found: install postgresql-15 or set PGPIPE_PG_BIN to the \
                     directory of the Postgres binaries",
                    bin_dir.join(tool).display()
                ));
            }
        }
        let preload = !env_flag("PGPIPE_TEST_NO_PRELOAD");
        if preload {
            check_extension_installed(&bin_dir)?;
        }
        let user = run_as();

        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in("/tmp")
            .map_err(|e| format!("create a temporary directory in /tmp: {e}"))?
            .keep();
        set_mode(&root, 0o755)?;
        let data_dir = root.join("data");
        let socket_dir = root.join("sock");
        for (dir, mode) in [(&data_dir, 0o700), (&socket_dir, 0o755)] {
            fs::create_dir(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            set_mode(dir, mode)?;
            if let Some(user) = user {
                std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
                    .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            }
        }
        let log_path = root.join("postgres.log");

        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .current_dir(&root)
            .stdin(Stdio::null());
        clear_pg_env(&mut initdb);
        as_postgres_user(&mut initdb);
        let output = initdb
            .output()
            .map_err(|e| format!("run {}: {e}", bin_dir.join("initdb").display()))?;
        if !output.status.success() {
            let _ = fs::remove_dir_all(&root);
            return Err(format!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }

        let tls = options.tls.then(|| tls::generate(&root, &data_dir, user));
        write_config(&data_dir, &socket_dir, preload, tls.is_some(), options)?;

        let cluster = Arc::new(Cluster {
            root,
            data_dir,
            log_path,
            port: AtomicU16::new(0),
            bin_dir,
            tls,
            preload,
            dedicated,
            postmaster: Mutex::new(None),
            pid: AtomicU32::new(0),
            torn_down: AtomicBool::new(false),
        });
        register_for_exit(&cluster);

        // Another process may take the free port between our probe and the postmaster's
        // bind: then pick another one.
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port()?;
            cluster.port.store(port, Ordering::SeqCst);
            let log_offset = fs::metadata(&cluster.log_path).map_or(0, |m| m.len());
            match cluster.start() {
                Ok(()) => return Ok(cluster),
                Err(error) => {
                    let log = cluster.log_since(log_offset);
                    let bind_failed = log.contains("could not bind")
                        || log.contains("could not create any TCP/IP sockets");
                    if !(bind_failed && attempt < ATTEMPTS) {
                        let message = format!(
                            "{error}\n--- server log ({}) ---\n{}",
                            cluster.log_path.display(),
                            cluster.log_tail()
                        );
                        cluster.teardown();
                        return Err(message);
                    }
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port())
    }

    fn tls_or_panic(&self) -> &TlsMaterial {
        self.tls
            .as_ref()
            .expect("this cluster has no TLS: start it with PgOptions { tls: true, .. }")
    }

    /// Spawns the postmaster and waits until it accepts connections.
    fn start(&self) -> Result<(), String> {
        let mut guard = lock(&self.postmaster);
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        *guard = None;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open {}: {e}", self.log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("dup the log file: {e}"))?;
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port().to_string())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        clear_pg_env(&mut cmd);
        as_postgres_user(&mut cmd);
        // Postgres treats SIGQUIT as an immediate shutdown: it stops its backends and
        // releases its shared memory, so a killed test process leaves nothing running.
        let mut child = spawn_tied_to_process(cmd, libc::SIGQUIT)
            .map_err(|e| format!("spawn {}: {e}", self.bin_dir.join("postgres").display()))?;
        self.pid.store(child.id(), Ordering::SeqCst);
        match self.wait_ready(&mut child) {
            Ok(()) => {
                *guard = Some(child);
                Ok(())
            }
            Err(error) => {
                stop_child(&mut child, StopMode::Immediate);
                self.pid.store(0, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    fn start_or_panic(&self) {
        if let Err(error) = self.start() {
            panic!(
                "{error}\n--- server log ({}) ---\n{}",
                self.log_path.display(),
                self.log_tail()
            );
        }
    }

    /// Polls with a tokio-postgres connection until one succeeds, the postmaster exits, or
    /// [`READY_TIMEOUT`] passes. Runs its own runtime on a helper thread, so it works both
    /// inside and outside a tokio runtime.
    fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("build a tokio runtime: {e}"))?;
                    runtime.block_on(async {
                        let deadline = Instant::now() + READY_TIMEOUT;
                        let mut last_error = "postmaster.pid never said ready".to_string();
                        let mut last_attempt: Option<Instant> = None;
                        loop {
                            if let Ok(Some(status)) = child.try_wait() {
                                return Err(format!("postgres exited during startup ({status})"));
                            }
                            if Instant::now() >= deadline {
                                return Err(format!(
                                    "postgres did not accept connections on port {} within \
                                     {} s (last error: {last_error})",
                                    self.port(),
                                    READY_TIMEOUT.as_secs()
                                ));
                            }
                            // Like pg_ctl: connect once postmaster.pid says "ready", which
                            // keeps "the database system is starting up" out of the log;
                            // try anyway once a second in case the file says otherwise.
                            let attempt = self.pid_file_ready(child.id())
                                || last_attempt
                                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                            if !attempt {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            last_attempt = Some(Instant::now());
                            last_error = match tokio::time::timeout(
                                Duration::from_secs(2),
                                self.connect("postgres"),
                            )
                            .await
                            {
                                Ok(Ok(_client)) => return Ok(()),
                                Ok(Err(e)) => describe(&e),
                                Err(_) => "connection attempt timed out".to_string(),
                            };
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Whether `postmaster.pid` belongs to `pid` and its status line says `ready`.
    fn pid_file_ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
            && lines.get(7).is_some_and(|l| l.trim() == "ready")
    }

    fn stop_blocking(&self, mode: StopMode) {
        let mut guard = lock(&self.postmaster);
        if let Some(mut child) = guard.take() {
            stop_child(&mut child, mode);
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// Connects to `dbname`, over TLS on a TLS cluster; the connection task is spawned
    /// on the current tokio runtime.
    async fn connect(&self, dbname: &str) -> Result<Client, tokio_postgres::Error> {
        self.connect_url(&self.url(dbname)).await
    }

    /// Connects with `url` (a URL of this cluster), as [`Cluster::connect`] does.
    async fn connect_url(&self, url: &str) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let mut config: tokio_postgres::Config = url.parse()?;
                config.ssl_mode(SslMode::Require);
                let (client, connection) = config.connect(tls::connector(&tls.ca_der)).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(client)
            }
            None => {
                let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(client)
            }
        }
    }

    async fn client_or_panic(&self, dbname: &str) -> Client {
        self.connect(dbname).await.unwrap_or_else(|e| {
            panic!(
                "connect to {}: {}\n--- server log tail ---\n{}",
                self.url(dbname),
                describe(&e),
                self.log_tail()
            )
        })
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log_path) {
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = file.read_to_string(&mut text);
            }
        }
        text
    }

    /// The last 16 kB of the server log.
    fn log_tail(&self) -> String {
        const TAIL: u64 = 16 * 1024;
        let len = fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let text = self.log_since(len.saturating_sub(TAIL));
        if len > TAIL {
            format!("[...]\n{text}")
        } else {
            text
        }
    }

    /// Stops the postmaster (immediate) and removes the directory; idempotent. Runs from
    /// Drop (dedicated clusters) and from the atexit hook (all clusters).
    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        match lock_for(&self.postmaster, Duration::from_secs(2)) {
            Some(mut guard) => {
                if let Some(mut child) = guard.take() {
                    stop_child(&mut child, StopMode::Immediate);
                }
            }
            None => {
                // A test thread is stuck holding the lock (e.g. mid-restart): go by pid.
                let pid = self.pid.load(Ordering::SeqCst);
                if pid != 0 {
                    send_signal(pid, libc::SIGQUIT);
                    wait_pid_gone(pid, Duration::from_secs(10));
                }
            }
        }
        self.pid.store(0, Ordering::SeqCst);
        if env_flag("PGPIPE_TEST_KEEP") {
            eprintln!("PGPIPE_TEST_KEEP: keeping {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Signals the postmaster and waits for it; SIGKILL if it does not stop in time.
fn stop_child(child: &mut Child, mode: StopMode) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let (signal, timeout) = match mode {
        StopMode::Immediate => (libc::SIGQUIT, Duration::from_secs(30)),
        StopMode::Fast => (libc::SIGINT, Duration::from_secs(60)),
    };
    send_signal(child.id(), signal);
    if wait_child(child, timeout).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Reaps `pid` (a child of ours) or waits until it disappears.
fn wait_pid_gone(pid: u32, timeout: Duration) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on a pid; status is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid || (rc == -1 && !process::pid_alive(pid)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

static CLUSTERS: Mutex<Vec<Weak<Cluster>>> = Mutex::new(Vec::new());

fn register_for_exit(cluster: &Arc<Cluster>) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function that never unwinds.
        unsafe {
            libc::atexit(teardown_all_at_exit);
        }
    });
    let mut clusters = lock(&CLUSTERS);
    clusters.retain(|weak| weak.strong_count() > 0);
    clusters.push(Arc::downgrade(cluster));
}

extern "C" fn teardown_all_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let clusters: Vec<Arc<Cluster>> = match lock_for(&CLUSTERS, Duration::from_secs(2)) {
            Some(guard) => guard.iter().filter_map(Weak::upgrade).collect(),
            None => return,
        };
        for cluster in &clusters {
            cluster.teardown();
        }
    });
}

/// Removes `/tmp/pgpipe-test-<pid>-*` directories left by test processes that died
/// without running their exit hook. Once per process.
fn sweep_stale_dirs() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
                continue;
            };
            let Some(Ok(owner)) = rest.split('-').next().map(str::parse::<libc::pid_t>) else {
                continue;
            };
            if process::pid_alive(owner) {
                continue;
            }
            // A postmaster that outlived its test process (should not happen, thanks to
            // the parent-death signal): leave its directory alone.
            let postmaster_pid = fs::read_to_string(entry.path().join("data/postmaster.pid"))
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<libc::pid_t>().ok());
            if postmaster_pid.is_some_and(process::pid_alive) {
                continue;
            }
            let _ = fs::remove_dir_all(entry.path());
        }
    });
}

fn check_extension_installed(bin_dir: &Path) -> Result<(), String> {
    let pg_config = bin_dir.join("pg_config");
    let mut cmd = if pg_config.is_file() {
        Command::new(pg_config)
    } else {
        Command::new("pg_config")
    };
    let output = cmd
        .arg("--sharedir")
        .output()
        .map_err(|e| format!("run pg_config --sharedir: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "pg_config --sharedir failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let sharedir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let control = Path::new(&sharedir).join("extension/pgpipe.control");
    if control.is_file() {
        Ok(())
    } else {
        Err(format!(
            "the pgpipe extension is not installed: run `make install` (cargo pgrx install)\n\
             (looked for {}; set PGPIPE_TEST_NO_PRELOAD=1 to start clusters without it)",
            control.display()
        ))
    }
}

fn write_config(
    data_dir: &Path,
    socket_dir: &Path,
    preload: bool,
    tls: bool,
    options: &PgOptions,
) -> Result<(), String> {
    let mut conf = String::from("\n# --- pgpipe test harness ---\n");
    let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
    let _ = writeln!(conf, "unix_socket_directories = '{}'", socket_dir.display());
    let _ = writeln!(conf, "wal_level = logical");
    if preload {
        let _ = writeln!(conf, "shared_preload_libraries = 'pgpipe'");
    }
    conf.push_str(
        "max_replication_slots = 20\n\
         max_wal_senders = 20\n\
         max_connections = 200\n\
         max_worker_processes = 32\n\
         fsync = on\n\
         synchronous_commit = on\n\
         recovery_init_sync_method = syncfs\n\
         track_commit_timestamp = on\n\
         log_min_messages = warning\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n",
    );
    if tls {
        conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    }
    if !options.extra_conf.is_empty() {
        conf.push_str("# --- PgOptions::extra_conf ---\n");
        for line in &options.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    let conf_path = data_dir.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .map_err(|e| format!("open {}: {e}", conf_path.display()))?;
    std::io::Write::write_all(&mut file, conf.as_bytes())
        .map_err(|e| format!("write {}: {e}", conf_path.display()))?;

    // Unix sockets are always trusted; TCP is trusted on 127.0.0.1, and only over TLS on
    // a TLS cluster (no `host` line, so a plain connection finds no entry and is rejected).
    let host = if tls { "hostssl" } else { "host" };
    let hba = format!(
        "# pgpipe test harness\n\
         local all all trust\n\
         local replication all trust\n\
         {host} all all 127.0.0.1/32 trust\n\
         {host} replication all 127.0.0.1/32 trust\n"
    );
    let hba_path = data_dir.join("pg_hba.conf");
    fs::write(&hba_path, hba).map_err(|e| format!("write {}: {e}", hba_path.display()))
}

fn clear_pg_env(cmd: &mut Command) {
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGSSLMODE",
    ] {
        cmd.env_remove(var);
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {:o} {}: {e}", mode, path.display()))
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Lower-case `[a-z0-9_]`, at most 40 characters, so that the full name stays under
/// Postgres's 63-byte limit.
fn sanitize_db_name(hint: &str) -> String {
    let name: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if name.is_empty() {
        "db".to_string()
    } else {
        name
    }
}

/// A tokio-postgres error with the server's message and detail when there is one.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            let _ = write!(text, "\nDETAIL: {detail}");
        }
        if let Some(hint) = db.hint() {
            let _ = write!(text, "\nHINT: {hint}");
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Runs blocking work on tokio's blocking pool, re-raising its panic with the original
/// message.
async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => panic!("blocking task failed: {error}"),
    }
}

/// The login role scenario forwarders run as in a database with the extension: only
/// what the README says a forwarder needs (`pgpipe_consumer`, SELECT on the captured
/// tables), never a superuser.
pub const FORWARDER_ROLE: &str = "pgpipe_forwarder";

/// Creates [`FORWARDER_ROLE`] (cluster-wide, once; tests create databases concurrently)
/// and lets it SELECT every table the tests create (as postgres) in this database.
const FORWARDER_ROLE_SQL: &str = "
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgpipe_forwarder') THEN
        BEGIN
            CREATE ROLE pgpipe_forwarder LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF NOT pg_has_role('pgpipe_forwarder', 'pgpipe_consumer', 'MEMBER') THEN
        BEGIN
            GRANT pgpipe_consumer TO pgpipe_forwarder;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END $$;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT SELECT ON TABLES TO pgpipe_forwarder;
";

/// A database of its own for one test, in a [`TempPg`] cluster.
#[derive(Clone, Debug)]
pub struct TestDb {
    cluster: TempPg,
    name: String,
    /// Set in a database with the extension: [`TestDb::url`] connects as it.
    forwarder_role: Option<&'static str>,
}

impl TestDb {
    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL a forwarder uses: `postgres://pgpipe_forwarder@127.0.0.1:PORT/<name>` in a
    /// database with the extension (the least-privilege role, [`FORWARDER_ROLE`]),
    /// `postgres://postgres@...` without it.
    pub fn url(&self) -> String {
        match self.forwarder_role {
            Some(role) => self.url_as(role),
            None => self.admin_url(),
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/<name>`: the superuser, for what only an
    /// operator does (dead letters, `pgpipe init` output, retention).
    pub fn admin_url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// `postgres://<role>@127.0.0.1:PORT/<name>`: the URL of another login role (the
    /// harness trusts every role on 127.0.0.1).
    pub fn url_as(&self, role: &str) -> String {
        self.admin_url()
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1)
    }

    /// A new connection as login role `role`; the error when it is refused.
    pub async fn try_client_as(&self, role: &str) -> Result<Client, tokio_postgres::Error> {
        self.cluster.inner.connect_url(&self.url_as(role)).await
    }

    /// A new connection as login role `role`; panics when it is refused.
    pub async fn client_as(&self, role: &str) -> Client {
        self.try_client_as(role)
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {}", describe(&e)))
    }

    /// [`TestDb::url`] with a query string appended: `db.url_with("sslmode=require")`.
    pub fn url_with(&self, query: &str) -> String {
        format!("{}?{query}", self.url())
    }

    /// The URL with `sslmode=verify-full&sslrootcert=<CA file>` (libpq parameters).
    /// Panics if the cluster has no TLS.
    pub fn tls_url(&self) -> String {
        self.url_with(&format!(
            "sslmode=verify-full&sslrootcert={}",
            self.cluster.ca_cert_path().display()
        ))
    }

    /// The cluster, for its port, log and restart controls.
    pub fn cluster(&self) -> &TempPg {
        &self.cluster
    }

    /// A new connection to this database (TLS on a TLS cluster). Must be called inside a
    /// tokio runtime: the connection task is spawned on it.
    pub async fn client(&self) -> Client {
        self.cluster.inner.client_or_panic(&self.name).await
    }

    /// A new TLS connection (`sslmode=require`, the server certificate verified against
    /// the cluster's CA). Panics if the cluster has no TLS.
    pub async fn client_tls(&self) -> Client {
        self.cluster.inner.tls_or_panic();
        self.client().await
    }

    /// Runs one or more statements on a new connection (`batch_execute`); panics with the
    /// SQL and the server's message on error.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)));
    }

    /// Runs a query on a new connection; panics with the SQL and the server's message on
    /// error.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<Row> {
        self.client()
            .await
            .query(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)))
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Row {
        self.client()
            .await
            .query_one(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n-> {}", describe(&e)))
    }
}
