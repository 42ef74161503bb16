//! A connection for the server's own low-rate reads and edits (the
//! dashboard's endpoints, the admin API), used off the async threads. The
//! hot path never touches it.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::sql::{Conn, StoreError};
use crate::config::StoreConfig;
use crate::error::Error;

/// The longest one statement runs, and one call waits for the connection.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Conn>>,
}

impl Db {
    pub fn open(config: &StoreConfig) -> Result<Self, Error> {
        let mut conn = super::open(config)?;
        conn.statement_timeout(WAIT)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on a blocking thread with the connection.
    pub async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, Error> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.try_lock_for(WAIT).ok_or_else(|| {
                StoreError::Unanswered("the database connection stayed busy".into())
            })?;
            f(&mut conn)
        })
        .await
        .map_err(|e| Error::Usage(format!("database task failed: {e}")))?
    }
}
