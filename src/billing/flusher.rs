//! With `[store] fsync`: puts the hold journal's appends on disk from a
//! thread of its own, many appends to one `msync` (a group commit), so that
//! no request thread waits on the disk while holding the journal's lock or
//! its runtime. Appends are numbered; a request that must not go on before
//! its hold is on disk (before fal is asked to do the work) awaits
//! [`Flusher::flushed`], and only that request waits.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use memmap2::MmapRaw;
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// How long a request waits for its hold to reach the disk before it is
/// refused (the hold released): a disk that long in failing is down.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// After a failed flush, the same ranges are tried again this much later.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Written bytes of one segment, not yet known to be on disk.
struct Dirty {
    map: Arc<MmapRaw>,
    start: usize,
    end: usize,
}

#[derive(Default)]
struct Queue {
    dirty: Vec<Dirty>,
    /// The number of the last append noted.
    appended: u64,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Every append numbered up to this is on disk.
    flushed: watch::Sender<u64>,
}

pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    pub fn spawn() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            flushed: watch::Sender::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Notes that `map[start..end]` was written; called under the journal's
    /// lock, so appends are numbered in the order they were made.
    pub fn note(&self, map: &Arc<MmapRaw>, start: usize, end: usize) {
        let mut queue = self.shared.queue.lock();
        queue.appended += 1;
        match queue.dirty.last_mut() {
            Some(last) if Arc::ptr_eq(&last.map, map) && last.end == start => last.end = end,
            _ => queue.dirty.push(Dirty {
                map: Arc::clone(map),
                start,
                end,
            }),
        }
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// Resolves once every append made so far is on disk; fails after
    /// [`FLUSH_WAIT`]. Dropping it leaves nothing behind.
    pub fn flushed(&self) -> impl std::future::Future<Output = std::io::Result<()>> + 'static {
        let target = self.shared.queue.lock().appended;
        let mut flushed = self.shared.flushed.subscribe();
        async move {
            match tokio::time::timeout(FLUSH_WAIT, flushed.wait_for(|&f| f >= target)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(std::io::Error::other("the journal flusher stopped")),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the hold journal did not reach the disk in time",
                )),
            }
        }
    }
}

/// Flushes what was appended, whatever is outstanding at once, until closed
/// with nothing left (or closed while flushes fail).
fn run(shared: &Shared) {
    loop {
        let (dirty, through) = {
            let mut queue = shared.queue.lock();
            while queue.dirty.is_empty() && !queue.closed {
                shared.wake.wait(&mut queue);
            }
            if queue.dirty.is_empty() {
                return;
            }
            (std::mem::take(&mut queue.dirty), queue.appended)
        };
        match flush(&dirty) {
            Ok(()) => {
                shared.flushed.send_replace(through);
            }
            Err(e) => {
                let mut queue = shared.queue.lock();
                if queue.closed {
                    // Stopping: the pages stay with the kernel, as without
                    // `[store] fsync`; a stop must not wait on a failed disk.
                    tracing::error!(error = %e, "cannot flush the hold journal at stop: left to the kernel");
                    return;
                }
                tracing::error!(error = %e, "cannot flush the hold journal: trying again");
                let later = std::mem::replace(&mut queue.dirty, dirty);
                queue.dirty.extend(later);
                drop(queue);
                std::thread::sleep(RETRY_AFTER);
            }
        }
    }
}

fn flush(dirty: &[Dirty]) -> std::io::Result<()> {
    for d in dirty {
        d.map.flush_range(d.start, d.end - d.start)?;
    }
    Ok(())
}

impl Drop for Flusher {
    /// Flushes what is outstanding (one more try if flushing fails), then
    /// stops the thread.
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(dir: &std::path::Path) -> Arc<MmapRaw> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("segment"))
            .unwrap();
        file.set_len(8192).unwrap();
        Arc::new(MmapRaw::map_raw(&file).unwrap())
    }

    #[tokio::test]
    async fn a_wait_ends_once_what_was_appended_before_it_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let map = mapped(dir.path());
        let flusher = Flusher::spawn().unwrap();
        // Nothing appended: nothing to wait for.
        flusher.flushed().await.unwrap();
        flusher.note(&map, 0, 10);
        flusher.note(&map, 10, 20);
        let waiting = flusher.flushed();
        flusher.note(&map, 20, 30);
        waiting.await.unwrap();
        flusher.flushed().await.unwrap();
        assert_eq!(*flusher.shared.flushed.borrow(), 3);
    }

    /// A disk that keeps failing (EIO from `msync`) must not keep the
    /// server from stopping: dropping the flusher at shutdown ends.
    #[test]
    fn a_flusher_whose_flushes_keep_failing_still_stops() {
        let dir = tempfile::tempdir().unwrap();
        let map = mapped(dir.path());
        let flusher = Flusher::spawn().unwrap();
        // A range reaching past the mapping: `msync` fails (ENOMEM) on
        // every try, as it would with EIO on a failing disk.
        flusher.note(&map, 0, 1 << 40);
        std::thread::sleep(Duration::from_millis(50));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(flusher);
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "dropping the flusher hangs while its flushes fail"
        );
    }
}
