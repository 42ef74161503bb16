//! Where log lines go: stderr, in batches. A worker formats its line and
//! appends it to a shared buffer; a thread writes the buffer out every
//! [`INTERVAL`], and a line that takes it past [`HIGH_WATER`] writes it at
//! once. A `write(2)` per request on the workers cost about 5% of the
//! proxy's CPU under load, and a writer thread woken per line cost as much
//! again (BENCHMARKS.md). Lines reach stderr at most `INTERVAL` late;
//! [`Flush`] writes the rest when the process ends normally.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing_subscriber::fmt::MakeWriter;

const INTERVAL: Duration = Duration::from_millis(50);
const HIGH_WATER: usize = 64 * 1024;

#[derive(Default)]
pub struct Buffer(Mutex<Vec<u8>>);

impl Buffer {
    /// Written under the lock, so lines leave in the order they came.
    fn write_out(&self) {
        let mut buf = self.0.lock();
        write_out(&mut buf);
    }
}

fn write_out(buf: &mut Vec<u8>) {
    if !buf.is_empty() {
        let _ = io::stderr().lock().write_all(buf);
        buf.clear();
    }
}

impl Write for &Buffer {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buf = self.0.lock();
        buf.extend_from_slice(line);
        if buf.len() >= HIGH_WATER {
            write_out(&mut buf);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out();
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

/// Writes what is still buffered when dropped.
pub struct Flush(Arc<Buffer>);

impl Drop for Flush {
    fn drop(&mut self) {
        self.0.write_out();
    }
}

/// The writer, and the guard to keep until the process ends. Starts the
/// thread that writes every [`INTERVAL`].
pub fn batched_stderr() -> io::Result<(BatchedStderr, Flush)> {
    let buffer = Arc::new(Buffer::default());
    let ticking = Arc::clone(&buffer);
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || loop {
            std::thread::sleep(INTERVAL);
            ticking.write_out();
        })?;
    Ok((BatchedStderr(Arc::clone(&buffer)), Flush(buffer)))
}
