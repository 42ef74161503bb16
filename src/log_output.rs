//! Where log lines go: stderr, in batches, never in a worker's way. A worker
//! formats its line and appends it to a shared buffer; a thread takes the
//! buffer every [`INTERVAL`] (sooner once it passes [`HIGH_WATER`]) and
//! writes it out. A `write(2)` per request on the workers cost about 5% of
//! the proxy's CPU under load, and a writer thread woken per line cost as
//! much again (BENCHMARKS.md).
//!
//! Only that thread writes, and it writes with the buffer's lock released:
//! a stderr nobody reads (a full pipe, a stopped terminal) stalls the
//! thread, not the requests. Lines that would take the buffer past
//! [`CAPACITY`] meanwhile are dropped and counted ([`dropped`], in
//! `/metrics`): a log is worth less than an answer. Lines reach stderr at
//! most `INTERVAL` late; [`Flush`] writes the rest when the process ends
//! normally, waiting at most [`FINAL_WAIT`] for a stalled stderr.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::Thread;
use std::time::Duration;

use parking_lot::Mutex;
use tracing_subscriber::fmt::MakeWriter;

const INTERVAL: Duration = Duration::from_millis(50);
const HIGH_WATER: usize = 64 * 1024;
/// What may wait for a stalled stderr: a thousand request lines and more.
const CAPACITY: usize = 256 * 1024;
const FINAL_WAIT: Duration = Duration::from_secs(1);

/// Lines dropped since the process started because stderr did not keep up.
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

pub struct Buffer {
    /// Lines not yet taken by the writer. Held only to append or to swap.
    pending: Mutex<Vec<u8>>,
    /// The batch being written, held while writing so that batches leave in
    /// the order they were taken; swapped with `pending`, so neither
    /// allocation is lost.
    out: Mutex<Vec<u8>>,
    /// The writer thread, woken early at [`HIGH_WATER`].
    writer: std::sync::OnceLock<Thread>,
}

impl Buffer {
    fn new() -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            out: Mutex::new(Vec::new()),
            writer: std::sync::OnceLock::new(),
        }
    }

    /// Takes what is pending and writes it; blocks only the calling thread.
    fn write_out(&self) {
        let mut batch = self.out.lock();
        std::mem::swap(&mut *batch, &mut *self.pending.lock());
        if !batch.is_empty() {
            let _ = io::stderr().lock().write_all(&batch);
            batch.clear();
        }
    }
}

impl Write for &Buffer {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.pending.lock();
        if pending.len() + line.len() > CAPACITY {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        let was = pending.len();
        pending.extend_from_slice(line);
        if was < HIGH_WATER && pending.len() >= HIGH_WATER {
            if let Some(writer) = self.writer.get() {
                writer.unpark();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `tracing` writer: every event appends to one [`Buffer`].
#[derive(Clone)]
pub struct BatchedStderr(Arc<Buffer>);

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = &'a Buffer;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

/// Writes what is still buffered when dropped, unless stderr stays stalled
/// for [`FINAL_WAIT`]: the process must be able to end.
pub struct Flush(Arc<Buffer>);

impl Drop for Flush {
    fn drop(&mut self) {
        let buffer = Arc::clone(&self.0);
        let (done, written) = mpsc::channel();
        let flushing = std::thread::Builder::new().spawn(move || {
            buffer.write_out();
            let _ = done.send(());
        });
        if flushing.is_ok() {
            let _ = written.recv_timeout(FINAL_WAIT);
        }
    }
}

/// The writer, and the guard to keep until the process ends. Starts the
/// thread that writes every [`INTERVAL`].
pub fn batched_stderr() -> io::Result<(BatchedStderr, Flush)> {
    let buffer = Arc::new(Buffer::new());
    let ticking = Arc::clone(&buffer);
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || loop {
            std::thread::park_timeout(INTERVAL);
            ticking.write_out();
        })?;
    let _ = buffer.writer.set(writer.thread().clone());
    Ok((BatchedStderr(Arc::clone(&buffer)), Flush(buffer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With nothing taking lines out, the buffer fills to its capacity and
    /// then drops, counting, instead of blocking the caller.
    #[test]
    fn a_full_buffer_drops_and_counts() {
        let buffer = Buffer::new();
        let line = [b'x'; 1000];
        let before = dropped();
        for _ in 0..(CAPACITY / line.len() + 10) {
            assert_eq!((&buffer).write(&line).unwrap(), line.len());
        }
        assert!(buffer.pending.lock().len() <= CAPACITY);
        assert!(dropped() - before >= 10);
    }
}
