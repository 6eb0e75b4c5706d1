//! file: appends events as JSON lines to a file, rotating it by size.
//!
//! - Acknowledgement waits for durability as configured by `file.fsync`: `always` fsyncs
//!   each written batch before acknowledging it (the original fsynced every event);
//!   `interval` acknowledges what the last fsync covered, fsyncing at least every
//!   `file.fsync_interval`; `never` acknowledges once the lines are written to the OS.
//! - Rotation: before a line would take the file past `max_size`, the file is renamed to
//!   `path.1` (`path.1` to `path.2`, ... the oldest beyond `path.N` is overwritten).
//! - Failure (unwritable path, full disk, I/O error) is loud and loses nothing: the error is
//!   logged, nothing is acknowledged, and the batch is written again after a backoff. A line
//!   cut short by a failed write or a crash is trimmed when the file is reopened, so the
//!   file always holds whole lines.

use crate::format::Renderer;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::adapter::durable::{Durable, Failure, Policy, Sink};

mod config;

use crate::error::Error;
use crate::event::Delivery;
pub use config::{FileConfig, Flags, FsyncPolicy, KIND};

/// Most events written per batch (one write, one fsync).
const MAX_BATCH: usize = 1000;

/// The file sink (run by the delivery driver, see [`FileAdapter::adapter`]).
pub struct FileAdapter {
    name: String,
    path: String,
    writer: Option<Writer>,
    fsync: FsyncPolicy,
    fsync_interval: Duration,
    renderer: Renderer,
}

impl FileAdapter {
    /// The adapter named `name` writing as `config` says. A failed write is retried with
    /// backoff until it works (nothing is acknowledged meanwhile); nothing is refused, so
    /// there are no dead letters.
    /// Lines are in `config.format`, which may name the database at `database_url`.
    pub fn adapter(
        name: &str,
        config: &FileConfig,
        database_url: &str,
    ) -> Result<Durable<FileAdapter>, Error> {
        let sink = FileAdapter {
            name: name.to_string(),
            path: config.path.display().to_string(),
            writer: Some(Writer {
                path: config.path.clone(),
                max_size: config.max_size.max(1),
                max_files: config.max_files.max(1),
                file: None,
                size: 0,
            }),
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
            renderer: Renderer::new(config.format, database_url),
        };
        let policy = Policy::new(MAX_BATCH, config.backoff_base, config.backoff_cap, None);
        Ok(Durable::new(name, sink, policy, None))
    }

    /// Writes `batch` as whole lines (and fsyncs it with `fsync: always`).
    async fn write(&mut self, batch: &[Delivery]) -> Result<(), Failure> {
        let mut buf = Vec::new();
        let lines: Vec<(usize, usize)> = batch
            .iter()
            .map(|d| {
                let start = buf.len();
                buf.extend_from_slice(&self.renderer.body(&d.event));
                buf.push(b'\n');
                (start, buf.len())
            })
            .collect();
        let sync_now = self.fsync == FsyncPolicy::Always;
        blocking(&mut self.writer, move |w| {
            w.write_lines(&buf, &lines, sync_now)
        })
        .await
        .map_err(|e| Failure::retry(e.to_string()))
    }
}

impl Sink for FileAdapter {
    fn deliver<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.write(batch))
    }

    fn retrying(&mut self, error: &str, _attempt: u32, delay: Duration) {
        tracing::error!(component = "file", adapter = %self.name, path = %self.path, error,
            retry_in = ?delay, "cannot write events; nothing acknowledged, retrying");
    }

    fn flush_interval(&self) -> Option<Duration> {
        (self.fsync == FsyncPolicy::Interval).then_some(self.fsync_interval)
    }

    fn flush(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { blocking(&mut self.writer, |w| w.sync()).await.is_ok() })
    }

    fn started(&self) {
        tracing::info!(component = "file", adapter = %self.name, path = %self.path,
            fsync = ?self.fsync, "file adapter started");
    }
}

/// Runs `work` on the writer on the blocking pool, logging an fsync failure.
async fn blocking(
    slot: &mut Option<Writer>,
    work: impl FnOnce(&mut Writer) -> io::Result<()> + Send + 'static,
) -> io::Result<()> {
    let mut writer = slot.take().expect("writer is always put back");
    let (writer, result) = tokio::task::spawn_blocking(move || {
        let result = work(&mut writer);
        if result.is_err() {
            // Reopen (and trim a torn line) before the next attempt.
            writer.file = None;
        }
        (writer, result)
    })
    .await
    .expect("file writer task panicked");
    if let Err(e) = &result {
        tracing::error!(component = "file", path = %writer.path.display(), error = %e, "file I/O failed");
    }
    *slot = Some(writer);
    result
}

/// The open file and its rotation state (used on the blocking pool).
struct Writer {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    file: Option<File>,
    size: u64,
}

impl Writer {
    /// Appends whole lines (`ranges` into `buf`), rotating before a line that would not fit.
    fn write_lines(&mut self, buf: &[u8], ranges: &[(usize, usize)], sync: bool) -> io::Result<()> {
        self.ensure_open()?;
        let mut chunk_start = 0;
        let mut chunk_end = 0;
        for &(start, end) in ranges {
            let len = (end - start) as u64;
            let pending = (chunk_end - chunk_start) as u64;
            if self.size + pending > 0 && self.size + pending + len > self.max_size {
                self.append(&buf[chunk_start..chunk_end])?;
                self.rotate()?;
                chunk_start = start;
            }
            chunk_end = end;
        }
        self.append(&buf[chunk_start..chunk_end])?;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let file = self.ensure_open()?;
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.ensure_open()?.sync_data()
    }

    fn ensure_open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let (file, size) = open_trimmed(&self.path).map_err(|e| {
                io::Error::new(e.kind(), format!("open {}: {e}", self.path.display()))
            })?;
            self.file = Some(file);
            self.size = size;
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// `path.(N-1)` → `path.N`, ..., `path` → `path.1`, then a fresh `path`.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_data()?;
        }
        for i in (1..self.max_files).rev() {
            let from = numbered(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1)).map_err(|e| {
            io::Error::new(e.kind(), format!("rotate {}: {e}", self.path.display()))
        })?;
        crate::metrics::file_rotation();
        tracing::info!(component = "file", path = %self.path.display(), "file rotated");
        self.ensure_open().map(|_| ())
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Opens `path` for appending; a last line without its newline (a torn write) is cut off.
fn open_trimmed(path: &Path) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((file, 0));
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok((file, len));
    }
    // Find the last newline, reading backwards in blocks.
    let mut end = len;
    let mut keep = 0;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block[..n])?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(component = "file", path = %path.display(), cut = len - keep, "trimming a torn last line");
    file.set_len(keep)?;
    Ok((file, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &Path, max_size: u64, max_files: u32) -> Writer {
        Writer {
            path: dir.join("e.jsonl"),
            max_size,
            max_files,
            file: None,
            size: 0,
        }
    }

    fn lines(items: &[&str]) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut buf = Vec::new();
        let ranges = items
            .iter()
            .map(|s| {
                let start = buf.len();
                buf.extend_from_slice(s.as_bytes());
                buf.push(b'\n');
                (start, buf.len())
            })
            .collect();
        (buf, ranges)
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgpipe-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rotates_by_size_keeping_n_files() {
        let dir = tempdir("rotate");
        let mut w = writer(&dir, 10, 2);
        for batch in [["aaaa", "bbbb"], ["cccc", "dddd"], ["eeee", "ffff"]] {
            let (buf, ranges) = lines(&batch);
            w.write_lines(&buf, &ranges, true).unwrap();
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(dir.join("e.jsonl")), "eeee\nffff\n");
        assert_eq!(read(dir.join("e.jsonl.1")), "cccc\ndddd\n");
        assert_eq!(read(dir.join("e.jsonl.2")), "aaaa\nbbbb\n");
        assert!(!dir.join("e.jsonl.3").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_line_is_trimmed_on_open() {
        let dir = tempdir("torn");
        let path = dir.join("e.jsonl");
        std::fs::write(&path, "one\ntw").unwrap();
        let mut w = writer(&dir, 1000, 2);
        let (buf, ranges) = lines(&["two"]);
        w.write_lines(&buf, &ranges, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
