//! A few store connections for async callers on the request threads (a
//! lease, a rate-limit decision shared by the nodes): each call runs on a
//! blocking thread with a connection taken from here, or a new one while
//! these are busy.

use std::sync::Arc;

use parking_lot::Mutex;

use super::sql::Conn;
use crate::config::StoreConfig;
use crate::error::Error;

/// Connections kept between calls.
const KEEP: usize = 4;

pub struct Pool {
    store: StoreConfig,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub fn new(store: &StoreConfig) -> Arc<Self> {
        Arc::new(Self {
            store: store.clone(),
            idle: Mutex::new(Vec::new()),
        })
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
        tokio::task::spawn_blocking(move || this.blocking(f))
            .await
            .map_err(|e| Error::Usage(format!("store task failed: {e}")))?
    }

    /// Runs `f` here, on a thread that may block.
    pub fn blocking<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, Error>) -> Result<T, Error> {
        let taken = self.idle.lock().pop();
        let mut conn = match taken {
            Some(conn) => conn,
            None => super::open(&self.store)?,
        };
        let result = f(&mut conn);
        let mut idle = self.idle.lock();
        if idle.len() < KEEP {
            idle.push(conn);
        }
        result
    }
}
