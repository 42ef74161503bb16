//! A few store connections for async callers on the request threads (a
//! lease, a rate-limit decision shared by the nodes): each call runs on a
//! blocking thread with a connection from here. There are at most `SIZE`:
//! past that a call waits for one, rather than exhausting the database's
//! connections under load.
//!
//! A database that hangs (it, or something between, takes the bytes and
//! never answers) is met by no TCP timeout and no server-side one: each
//! statement has a deadline of its own (see `postgres::Pg`), and a caller
//! waits at most `WAIT` for a connection and `CALL` for its answer, so
//! that a request gets its 503 while the call itself runs on, to its end,
//! on its blocking thread. At most `SIZE` such threads wait.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::sql::{Conn, StoreError};
use crate::config::StoreConfig;
use crate::error::Error;

const SIZE: usize = 8;
/// The longest one statement of a pooled call may take.
const STATEMENT: Duration = Duration::from_secs(5);
/// The longest a call waits for a connection.
const WAIT: Duration = Duration::from_secs(5);
/// The longest a caller waits for a call's answer.
const CALL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Slots {
    idle: Vec<Conn>,
    open: usize,
}

pub struct Pool {
    store: StoreConfig,
    slots: Mutex<Slots>,
    freed: Condvar,
}

impl Pool {
    pub fn new(store: &StoreConfig) -> Arc<Self> {
        Arc::new(Self {
            store: store.clone(),
            slots: Mutex::new(Slots::default()),
            freed: Condvar::new(),
        })
    }

    /// An idle connection, a new one while there are fewer than `SIZE`, or
    /// the next one given back.
    fn take(&self) -> Result<Conn, Error> {
        let mut slots = self.slots.lock();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(conn) = slots.idle.pop() {
                return Ok(conn);
            }
            if slots.open < SIZE {
                slots.open += 1;
                drop(slots);
                let opened = super::connect(&self.store).and_then(|mut conn| {
                    conn.statement_timeout(STATEMENT)?;
                    Ok(conn)
                });
                if opened.is_err() {
                    self.slots.lock().open -= 1;
                    self.freed.notify_one();
                }
                return opened;
            }
            if self.freed.wait_until(&mut slots, deadline).timed_out() {
                return Err(StoreError::Unanswered(
                    "every store connection is busy: the database may be hanging".into(),
                )
                .into());
            }
        }
    }

    /// Runs `f` on a blocking thread. It runs to the end even if the caller
    /// stops waiting (a client that left): what it changes in the database
    /// and in memory is done whole.
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, Error> + Send + 'static,
    {
        let this = Arc::clone(self);
        let call = tokio::task::spawn_blocking(move || this.blocking(f));
        tokio::time::timeout(CALL, call)
            .await
            .map_err(|_| StoreError::Unanswered("the database did not answer in time".into()))?
            .map_err(|e| Error::Usage(format!("store task failed: {e}")))?
    }

    /// Runs `f` here, on a thread that may block. The connection comes
    /// back to the pool however `f` ends, a panic included.
    pub fn blocking<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, Error>) -> Result<T, Error> {
        let mut lent = Lent {
            pool: self,
            conn: Some(self.take()?),
        };
        f(lent.conn.as_mut().expect("lent until dropped"))
    }
}

/// A connection out of the pool, given back when dropped.
struct Lent<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.slots.lock().idle.push(conn);
            self.pool.freed.notify_one();
        }
    }
}
