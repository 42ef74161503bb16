//! The one thread that writes what the server learns while it runs. It owns
//! its connection and commits whatever has queued up in one transaction.

use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::mpsc;

/// Largest batch committed in one transaction.
const BATCH: usize = 1024;
const QUEUE: usize = 16 * 1024;

pub enum WriteOp {
    /// A key was used at `at` (unix seconds); feeds `keys list`.
    KeyUsed { key_id: i64, at: i64 },
    /// Commit what came before and stop, even if senders remain.
    Close,
}

/// The server's side of the writer; cheap to clone.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<WriteOp>,
}

impl StoreWriter {
    /// Starts the thread; it stops after [`StoreWriter::close`] (or once every
    /// `StoreWriter` is dropped), having committed everything queued before.
    pub fn spawn(conn: Connection) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(conn, rx))
            .expect("spawn store writer");
        (Self { tx }, handle)
    }

    /// Last-use times are a convenience: when the queue is full they are dropped, never waited for.
    pub fn key_used(&self, key_id: i64, at: i64) {
        let _ = self.tx.try_send(WriteOp::KeyUsed { key_id, at });
    }

    /// Asks the thread to finish: what was queued before is committed.
    pub async fn close(&self) {
        let _ = self.tx.send(WriteOp::Close).await;
    }
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<WriteOp>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.blocking_recv_many(&mut batch, BATCH) > 0 {
        let closing = batch.iter().position(|op| matches!(op, WriteOp::Close));
        if let Some(at) = closing {
            batch.truncate(at);
        }
        if let Err(e) = commit(&mut conn, &batch) {
            tracing::error!(error = %e, ops = batch.len(), "store writer: batch failed");
        }
        batch.clear();
        if closing.is_some() {
            return;
        }
    }
}

fn commit(conn: &mut Connection, batch: &[WriteOp]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut used = tx.prepare_cached(
            "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE id = ?1",
        )?;
        for op in batch {
            match op {
                WriteOp::KeyUsed { key_id, at } => {
                    used.execute([key_id, at])?;
                }
                WriteOp::Close => {}
            }
        }
    }
    tx.commit()
}
