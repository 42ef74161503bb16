//! Carries CLI edits into a running server: a thread polls the change feed
//! and applies what it finds to the registry (and says when fal's synced
//! prices moved).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Registry;
use crate::config::StoreConfig;
use crate::error::Error;
use crate::store::sql::Conn;
use crate::store::{self, snapshot};

/// Longest wait for a notification before the thread looks at its stop flag.
const NOTIFY_SLICE: Duration = Duration::from_millis(500);

/// The longest one read of the change feed may take: past it the
/// connection is made again, and the next poll reads on.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Refresher {
    stop: Arc<AtomicBool>,
    /// The newest change applied to the registry.
    applied: Arc<AtomicI64>,
    handle: JoinHandle<()>,
}

impl Refresher {
    /// Starts polling after change `seq` (the snapshot's) every `interval`;
    /// `prices_moved` is notified when a change says fal's synced prices moved.
    pub fn spawn(
        db: &StoreConfig,
        registry: Arc<Registry>,
        seq: i64,
        interval: Duration,
        prices_moved: Arc<Notify>,
    ) -> Result<Self, Error> {
        let mut conn = store::open(db)?;
        conn.statement_timeout(READ_TIMEOUT)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let applied = Arc::new(AtomicI64::new(seq));
        let applying = Arc::clone(&applied);
        let handle = std::thread::Builder::new()
            .name("key-refresh".into())
            .spawn(move || {
                if let Conn::Postgres(pg) = &mut conn {
                    // Listening before the first read: no change falls between.
                    let _ = pg.notified(snapshot::CHANGES, Duration::ZERO);
                }
                let mut seq = seq;
                let mut poll_at = Instant::now();
                while !stopping.load(Ordering::Acquire) {
                    if Instant::now() >= poll_at {
                        match snapshot::changes_since(&mut conn, seq) {
                            Ok((next, changes)) => {
                                registry.apply(&changes);
                                if changes.iter().any(|c| c.prices) {
                                    prices_moved.notify_one();
                                }
                                seq = next;
                                applying.store(seq, Ordering::Release);
                            }
                            Err(e) => tracing::warn!(error = %e, "reading the change feed failed"),
                        }
                        poll_at = Instant::now() + interval;
                    }
                    let until_poll = poll_at.saturating_duration_since(Instant::now());
                    let changed = match &mut conn {
                        // Every node's edits notify: the feed is read when
                        // one does, and polled every `interval` besides.
                        Conn::Postgres(pg) => {
                            pg.notified(snapshot::CHANGES, until_poll.min(NOTIFY_SLICE))
                        }
                        // SQLite has no notifications: this server's own
                        // edits wake the thread, the CLI's wait for the poll.
                        Conn::Sqlite(_) => {
                            std::thread::park_timeout(until_poll);
                            Ok(true)
                        }
                    };
                    match changed {
                        Ok(true) => poll_at = Instant::now(),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "waiting for the change feed failed");
                            std::thread::park_timeout(until_poll.min(NOTIFY_SLICE));
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            applied,
            handle,
        })
    }

    /// Wakes the thread to read the change feed now, not at its next tick.
    pub fn waker(&self) -> RefreshWaker {
        RefreshWaker {
            thread: self.handle.thread().clone(),
            applied: Arc::clone(&self.applied),
        }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

/// Asks the refresher to look at the change feed at once (after an edit made by this server).
#[derive(Clone)]
pub struct RefreshWaker {
    thread: std::thread::Thread,
    applied: Arc<AtomicI64>,
}

impl RefreshWaker {
    pub fn wake(&self) {
        self.thread.unpark();
    }

    /// Wakes the thread and waits, at most `within`, until change `seq` is
    /// in memory: an answer about a balance is then true when it arrives.
    pub async fn applied(&self, seq: i64, within: Duration) -> bool {
        self.wake();
        let deadline = tokio::time::Instant::now() + within;
        while self.applied.load(Ordering::Acquire) < seq {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}
