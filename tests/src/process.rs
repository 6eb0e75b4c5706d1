//! Process plumbing shared by the Postgres and forwarder helpers: spawning children that
//! die with the test process, the `postgres` OS user, and waiting with a timeout.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the child receives `death_signal` when the test process ends,
/// however it ends (normal exit, panic=abort, SIGKILL).
///
/// Linux delivers the parent-death signal when the *thread* that forked the child exits,
/// not the process. Test threads end with their test, so every child is forked by one
/// spawner thread that lives as long as the process.
pub(crate) fn spawn_tied_to_process(
    mut cmd: Command,
    death_signal: libc::c_int,
) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls prctl and getppid,
    // which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // The signal is cleared by a uid change, and std runs pre_exec hooks after
            // setuid/setgid, so the order is right.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then we were reparented.
            if libc::getppid() == 1 {
                return Err(io::Error::other("the test process exited while spawning"));
            }
            Ok(())
        });
    }

    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pgpipe-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// The OS user that runs `initdb` and `postgres`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// `Some(postgres user)` when running as root (Postgres refuses to run as root),
/// `None` otherwise: then the clusters run as the current user.
pub(crate) fn run_as() -> Option<RunAs> {
    static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        // SAFETY: the name is a valid C string; the result is read immediately, and this
        // runs once, under the OnceLock, so no other getpw* call races with it here.
        let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
        assert!(
            !pw.is_null(),
            "running as root but there is no `postgres` OS user to run Postgres as \
             (install postgresql-15)"
        );
        // SAFETY: pw is non-null and points to the static passwd entry.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Some(RunAs { uid, gid })
    })
}

/// Applies [`run_as`] to a command.
pub(crate) fn as_postgres_user(cmd: &mut Command) {
    if let Some(user) = run_as() {
        // std clears the supplementary groups when root changes uid.
        cmd.uid(user.uid).gid(user.gid);
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `signal` to `pid`; errors (already gone) are ignored.
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Whether a process with this pid exists (zombies count as existing).
pub(crate) fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Locks a mutex, ignoring poisoning (a panicking test must not break the others).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Like [`lock`] but gives up after `timeout` (used at process exit, where a test thread
/// that never finished may still hold the lock).
pub(crate) fn lock_for<T>(mutex: &Mutex<T>, timeout: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + timeout;
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

/// Whether an environment switch such as `PGPIPE_TEST_NO_PRELOAD` is on: set, non-empty,
/// and not `0`/`false`/`no`/`off`.
pub(crate) fn env_flag(name: &str) -> bool {
    match std::env::var(name) {
        Ok(value) => {
            let value = value.trim().to_ascii_lowercase();
            !(value.is_empty() || ["0", "false", "no", "off"].contains(&value.as_str()))
        }
        Err(_) => false,
    }
}
