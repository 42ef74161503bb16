//! A connection for the server's own low-rate reads and edits (the
//! dashboard's endpoints, the admin API), used off the async threads. The
//! hot path never touches it.

use std::sync::Arc;

use parking_lot::Mutex;

use super::sql::Conn;
use crate::config::StoreConfig;
use crate::error::Error;

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Conn>>,
}

impl Db {
    pub fn open(config: &StoreConfig) -> Result<Self, Error> {
        Ok(Self {
            conn: Arc::new(Mutex::new(super::open(config)?)),
        })
    }

    /// Runs `f` on a blocking thread with the connection.
    pub async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, Error> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| Error::Usage(format!("database task failed: {e}")))?
    }
}
