//! The serial console: QEMU serves it on `run/console.sock`; a driver task
//! reads it and appends to `console.log`, which it keeps bounded.
//!
//! # Why a socket and not `-chardev file`
//!
//! A file chardev cannot be bounded from outside: QEMU holds its descriptor
//! and writes at its own offset, so truncating the front from another process
//! leaves a sparse file that keeps growing (and `copytruncate` loses lines).
//! A pipe chardev stalls the guest's UART once nobody drains it. With a socket
//! that the driver reads, the driver owns the log file outright and rotates it
//! atomically. The trade-off: while no driver is connected (the agent is down
//! or restarting) QEMU discards console output; the guest never blocks on it.
//! The VM is started paused and only resumed once the driver is attached, so
//! the boot itself is never lost.
//!
//! # Bounding and offsets
//!
//! When `console.log` grows past `max` bytes it is rewritten to hold the newest
//! `max / 2` bytes (temporary file + rename), and `console.offset` records the
//! offset of its first byte. Offsets therefore count every byte the console
//! ever produced: a reader resumes with `next_offset`, and learns from
//! `truncated_before` when it fell behind a rotation. A crash between the two
//! renames of a rotation skews offsets by one rotation; no byte kept is lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use super::layout::write_atomic;
use crate::{ConsoleChunk, DriverError};

/// One VM's bounded console log. Callers serialize access with the VM's
/// console lock.
#[derive(Clone, Debug)]
pub(crate) struct ConsoleLog {
    log: PathBuf,
    offset_file: PathBuf,
    max: u64,
}

impl ConsoleLog {
    pub fn new(log: PathBuf, offset_file: PathBuf, max: u64) -> Self {
        ConsoleLog {
            log,
            offset_file,
            max: max.max(2),
        }
    }

    /// Offset of the first byte of `console.log`.
    fn base(&self) -> u64 {
        std::fs::read_to_string(&self.offset_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Appends console output, rotating when the log outgrows its bound.
    pub fn append(&self, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        f.write_all(data)?;
        let len = f.metadata()?.len();
        drop(f);
        if len > self.max {
            self.rotate(len)?;
        }
        Ok(())
    }

    /// Keeps the newest half.
    fn rotate(&self, len: u64) -> io::Result<()> {
        let keep = self.max / 2;
        let dropped = len.saturating_sub(keep);
        let mut f = File::open(&self.log)?;
        f.seek(SeekFrom::Start(dropped))?;
        let mut tail = Vec::with_capacity(keep as usize);
        f.read_to_end(&mut tail)?;
        drop(f);
        let base = self.base() + dropped;
        write_atomic(&self.log, &tail)?;
        write_atomic(&self.offset_file, base.to_string().as_bytes())
    }

    /// Reads up to `max` bytes from console offset `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Result<ConsoleChunk, DriverError> {
        let base = self.base();
        let mut f = match File::open(&self.log) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(ConsoleChunk {
                    data: Vec::new(),
                    next_offset: base.max(offset),
                    truncated_before: offset < base,
                })
            }
            Err(e) => return Err(DriverError::io("cannot open the console log", &self.log, e)),
        };
        let len = f
            .metadata()
            .map_err(|e| DriverError::io("cannot read the console log", &self.log, e))?
            .len();
        let end = base + len;
        let truncated_before = offset < base;
        let start = offset.clamp(base, end);
        let want = (end - start).min(max as u64);
        let mut data = vec![0; want as usize];
        f.seek(SeekFrom::Start(start - base))
            .and_then(|_| f.read_exact(&mut data))
            .map_err(|e| DriverError::io("cannot read the console log", &self.log, e))?;
        Ok(ConsoleChunk {
            next_offset: start + want,
            data,
            truncated_before,
        })
    }
}

/// Reads the console socket into the log until QEMU closes it. Reports on
/// `attached` whether it connected (within a few seconds).
pub(crate) async fn pump(
    sock: PathBuf,
    log: ConsoleLog,
    lock: Arc<Mutex<()>>,
    attached: oneshot::Sender<bool>,
) {
    let Some(mut stream) = connect(&sock, Duration::from_secs(5)).await else {
        tracing::warn!(socket = %sock.display(), "cannot attach to the serial console; its output is lost");
        let _ = attached.send(false);
        return;
    };
    let _ = attached.send(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = log.append(&buf[..n]) {
                    tracing::warn!(log = %log.log.display(), error = %e, "cannot write console output");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "console socket closed");
                break;
            }
        }
    }
}

async fn connect(sock: &Path, timeout: Duration) -> Option<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(sock).await {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, max: u64) -> ConsoleLog {
        ConsoleLog::new(dir.join("console.log"), dir.join("console.offset"), max)
    }

    #[test]
    fn empty_log_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = log(dir.path(), 100).read(0, 10).expect("read");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, 0);
        assert!(!c.truncated_before);
    }

    #[test]
    fn log_stays_bounded_and_offsets_stay_continuous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = log(dir.path(), 100);
        let mut all = Vec::new();
        for i in 0..50u8 {
            let line = format!("line {i:02}\n").into_bytes(); // 8 bytes
            l.append(&line).expect("append");
            all.extend_from_slice(&line);
            let size = std::fs::metadata(dir.path().join("console.log"))
                .expect("meta")
                .len();
            assert!(size <= 100, "log grew to {size}");
        }
        // The newest bytes are kept at their original offsets.
        let total = all.len() as u64;
        let c = l.read(total - 16, 1000).expect("read");
        assert_eq!(c.data, &all[all.len() - 16..]);
        assert_eq!(c.next_offset, total);
        assert!(!c.truncated_before);
        // An offset older than what is kept starts at the oldest kept byte.
        let c = l.read(0, 1000).expect("read");
        assert!(c.truncated_before);
        assert!(
            c.data.len() >= 50 && c.data.len() <= 100,
            "{}",
            c.data.len()
        );
        assert_eq!(c.data, &all[all.len() - c.data.len()..]);
        // Reading past the end returns nothing at the end.
        let c = l.read(total + 10, 10).expect("read");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, total);
    }

    #[test]
    fn reads_are_chunked_by_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = log(dir.path(), 1000);
        l.append(b"hello world").expect("append");
        let a = l.read(0, 5).expect("read");
        assert_eq!(a.data, b"hello");
        let b = l.read(a.next_offset, 100).expect("read");
        assert_eq!(b.data, b" world");
        assert_eq!(b.next_offset, 11);
    }
}
