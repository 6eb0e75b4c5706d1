//! Which lines written to the command may be acknowledged.
//!
//! A line counts as handled once the command has read it from the pipe (the pipe's unread
//! byte count tells how far it got) and then either kept running for `grace` or read
//! `slack` more bytes: a command that reads a buffer-full of lines and dies before handling
//! them (Python, `head`, anything with buffered input) gets those lines again from its
//! successor. Everything not yet acknowledged is re-sent after a crash, one line at a time
//! (so a command that exits after N lines, or dies on one bad line, still makes progress:
//! a line counts as handled once the command reads into the next one), and a line that
//! has been in hand at `max_attempts` crashes is given up on (dead-lettered).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One event's line.
#[derive(Debug)]
struct Line {
    /// Offset just past the line in the bytes written to the current command.
    end: u64,
    seq: u64,
    bytes: Vec<u8>,
    /// When the command was first seen past the line.
    read_at: Option<Instant>,
    /// Bytes read past the line that make it handled without waiting for the grace.
    slack: u64,
}

/// Lines written to the current command and not yet acknowledged, oldest first, and the
/// lines of crashed commands waiting to be sent again one at a time.
#[derive(Debug)]
pub struct Window {
    /// To send again, one at a time, before anything new: (seq, line).
    pub careful: VecDeque<(u64, Vec<u8>)>,
    crash_front: Option<u64>,
    crashes: u32,
    lines: VecDeque<Line>,
    written: u64,
    grace: Duration,
    slack: u64,
}

impl Window {
    /// A window acknowledging lines read `grace` ago or followed by `slack` read bytes.
    pub fn new(grace: Duration, slack: u64) -> Window {
        Window {
            careful: VecDeque::new(),
            crash_front: None,
            crashes: 0,
            lines: VecDeque::new(),
            written: 0,
            grace,
            slack,
        }
    }

    /// Records event `seq`'s line as written.
    pub fn push(&mut self, seq: u64, bytes: Vec<u8>) {
        self.push_with_slack(seq, bytes, self.slack);
    }

    /// Records a line sent again after a crash, alone: it is handled once the command
    /// reads into the next line.
    pub fn push_careful(&mut self, seq: u64, bytes: Vec<u8>) {
        self.push_with_slack(seq, bytes, 1);
    }

    fn push_with_slack(&mut self, seq: u64, bytes: Vec<u8>, slack: u64) {
        self.written += bytes.len() as u64;
        self.lines.push_back(Line {
            end: self.written,
            seq,
            bytes,
            read_at: None,
            slack,
        });
    }

    /// Whether every written line is acknowledged.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The pipe holds `unread` bytes at `now`: returns the highest seq now acknowledged.
    pub fn observe(&mut self, unread: u64, now: Instant) -> Option<u64> {
        let consumed = self.written.saturating_sub(unread);
        for line in self.lines.iter_mut() {
            if line.end > consumed {
                break;
            }
            line.read_at.get_or_insert(now);
        }
        let mut acked = None;
        while let Some(front) = self.lines.front() {
            let settled = front.read_at.is_some_and(|t| {
                now.duration_since(t) >= self.grace || consumed >= front.end + front.slack
            });
            if !settled {
                break;
            }
            acked = Some(front.seq);
            self.lines.pop_front();
        }
        acked
    }

    /// The command exited successfully after reading everything: all lines are handled.
    pub fn settle_all(&mut self) -> Option<u64> {
        let last = self.lines.back().map(|l| l.seq);
        self.lines.clear();
        last
    }

    /// The command could not run at all (the shell's exit status 126 or 127: not found,
    /// not executable): every unacknowledged line, then `unwritten`, goes back to be sent
    /// one at a time, and the failure counts against none of them; no event is to blame.
    pub fn command_did_not_run(&mut self, unwritten: Vec<(u64, Vec<u8>)>) {
        self.written = 0;
        let mut again: VecDeque<(u64, Vec<u8>)> =
            self.lines.drain(..).map(|l| (l.seq, l.bytes)).collect();
        again.extend(self.careful.drain(..));
        again.extend(unwritten);
        self.careful = again;
    }

    /// The command died (after `observe` took what it handled): every unacknowledged
    /// line, then `unwritten` (lines whose write failed), goes back to be sent one at a
    /// time. Returns the oldest line when it has now been in hand at `max_attempts`
    /// crashes: the caller gives up on it (it is removed).
    pub fn command_died(
        &mut self,
        unwritten: Vec<(u64, Vec<u8>)>,
        max_attempts: u32,
    ) -> Option<(u64, Vec<u8>, u32)> {
        self.command_did_not_run(unwritten);
        let front = self.careful.front()?.0;
        if self.crash_front == Some(front) {
            self.crashes += 1;
        } else {
            self.crash_front = Some(front);
            self.crashes = 1;
        }
        if self.crashes < max_attempts {
            return None;
        }
        let crashes = self.crashes;
        self.crash_front = None;
        self.crashes = 0;
        self.careful
            .pop_front()
            .map(|(seq, line)| (seq, line, crashes))
    }
}

/// Bytes written to the pipe behind `fd` that its reader has not read yet (Linux:
/// `FIONREAD` works on a pipe's write end). Elsewhere: 0, every written byte counts as read.
#[cfg(target_os = "linux")]
pub fn unread_bytes(fd: impl std::os::fd::AsFd) -> std::io::Result<u64> {
    Ok(rustix::io::ioctl_fionread(fd)?)
}

/// Bytes written to the pipe behind `fd` that its reader has not read yet (not knowable
/// here: every written byte counts as read).
#[cfg(not(target_os = "linux"))]
pub fn unread_bytes(_fd: impl std::os::fd::AsFd) -> std::io::Result<u64> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_acknowledged_after_read_plus_grace_or_slack() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = Window::new(Duration::from_millis(100), 5);
        w.push(1, b"aaaa\n".to_vec());
        w.push(2, b"bbbb\n".to_vec());
        w.push(3, b"cccc\n".to_vec());
        // Nothing read yet.
        assert_eq!(w.observe(15, ms(0)), None);
        // Line 1 read; not yet settled.
        assert_eq!(w.observe(10, ms(10)), None);
        // Grace passed for line 1.
        assert_eq!(w.observe(10, ms(120)), Some(1));
        // Everything read: line 2 is 5 bytes behind the read point (the slack), 3 is not.
        assert_eq!(w.observe(0, ms(130)), Some(2));
        assert!(!w.is_empty());
        // A crash: line 3 goes to the next command, one line at a time.
        assert_eq!(w.command_died(vec![(4, b"dd\n".to_vec())], 2), None);
        assert!(w.is_empty());
        assert_eq!(w.careful.len(), 2);
        let (seq, line) = w.careful.pop_front().unwrap();
        w.push_careful(seq, line);
        // Read, but the next line is not: not handled yet.
        assert_eq!(w.observe(0, ms(140)), None);
        let (seq, line) = w.careful.pop_front().unwrap();
        w.push_careful(seq, line);
        // Reading into line 4 settles 3.
        assert_eq!(w.observe(2, ms(150)), Some(3));
        // Line 4 is at the front of two crashes in a row: given up at the second.
        assert_eq!(w.command_died(Vec::new(), 2), None);
        assert_eq!(
            w.command_died(Vec::new(), 2),
            Some((4, b"dd\n".to_vec(), 2))
        );
        assert!(w.careful.is_empty() && w.is_empty());
        w.push(5, b"e\n".to_vec());
        assert_eq!(w.settle_all(), Some(5));
    }

    #[test]
    fn a_command_that_cannot_run_never_gives_up_on_a_line() {
        let mut w = Window::new(Duration::from_millis(100), 0);
        w.push(1, b"a\n".to_vec());
        for _ in 0..10 {
            w.command_did_not_run(Vec::new());
            let (seq, line) = w.careful.pop_front().unwrap();
            assert_eq!(seq, 1);
            w.push_careful(seq, line);
        }
        // The first real crash with the line in hand is its first attempt, not its 11th.
        assert_eq!(w.command_died(Vec::new(), 2), None);
        assert_eq!(w.command_died(Vec::new(), 2).map(|(s, _, n)| (s, n)), Some((1, 2)));
    }

    #[test]
    fn unread_bytes_of_a_real_pipe() {
        use std::io::Write;
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"hello\n").unwrap();
        let expected = if cfg!(target_os = "linux") { 6 } else { 0 };
        assert_eq!(unread_bytes(&writer).unwrap(), expected);
        drop(reader);
    }
}
