//! The one thread that writes what the server learns while it runs. It owns
//! its connection and commits whatever has queued up in one transaction:
//! holds, charges and balance deltas, and last-use times.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::jobs::{self, JobEnd, JobRecord};
use super::ledger::{self, ChargeRecord};
use crate::billing::journal::{HoldRecord, Journal, Sealed};
use crate::metrics::Metrics;

/// Largest batch committed in one transaction.
const BATCH: usize = 1024;
/// How long the writer gathers after the first entry before committing:
/// each commit has a fixed cost (WAL frames, page writes), so under load one
/// commit per many requests. The hold journal covers the wait. 20 ms rather
/// than 5 took this thread from 10.2% to 6.7% of the proxy's CPU under the
/// closed-loop benchmark (BENCHMARKS.md).
const GATHER: Duration = Duration::from_millis(20);
const QUEUE: usize = 16 * 1024;

pub enum WriteOp {
    /// A key was used at `at` (unix seconds); feeds `keys list`.
    KeyUsed { key_id: i64, at: i64 },
    /// A hold taken in memory and journalled in `segment`.
    Hold { hold: HoldRecord, segment: u64 },
    /// A hold settled: charged or released.
    Settle(ChargeRecord),
    /// A job accepted by fal's queue, carrying its hold.
    JobSubmitted(JobRecord),
    /// A job ended; its charge (or release) is a `Settle` of its hold.
    JobEnded {
        request_id: String,
        end: JobEnd,
        credits_used: u64,
        balance_remaining: i64,
        at_ms: i64,
    },
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
    pub fn spawn(
        conn: Connection,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || Writer::new(conn, journal, metrics).run(rx))
            .expect("spawn store writer");
        (Self { tx }, handle)
    }

    /// Entries waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues money: waits for room (back-pressure), never drops it.
    pub async fn send(&self, op: WriteOp) {
        if self.tx.send(op).await.is_err() {
            tracing::error!("store writer has stopped: a ledger entry was not queued (the journal still has its hold)");
        }
    }

    /// Queues money from code that cannot wait (a `Drop`): right away if
    /// there is room, else from a task that waits for room.
    /// Without a runtime (a drop during shutdown) or once the writer has
    /// stopped, the entry is not queued; the hold journal still has the
    /// request and the next start settles it.
    pub fn send_now(&self, op: WriteOp) {
        if let Err(mpsc::error::TrySendError::Full(op)) = self.tx.try_send(op) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::error!("ledger queue full at shutdown: left to recovery");
                return;
            };
            let tx = self.tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(op).await;
            });
        }
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

struct Writer {
    conn: Connection,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    /// Holds committed per journal segment.
    committed: HashMap<u64, u64>,
    /// Segments that take no more appends, waiting for their holds to be committed.
    sealed: Vec<Sealed>,
}

impl Writer {
    fn new(conn: Connection, journal: Arc<Journal>, metrics: Arc<Metrics>) -> Self {
        Self {
            conn,
            journal,
            metrics,
            committed: HashMap::new(),
            sealed: Vec::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            gather(&mut rx, &mut batch);
            let closing = batch.iter().position(|op| matches!(op, WriteOp::Close));
            if let Some(at) = closing {
                batch.truncate(at);
            }
            self.commit_until_done(&batch);
            batch.clear();
            self.drop_committed_segments();
            if closing.is_some() {
                return;
            }
        }
    }

    /// A failed batch is money not yet on disk: retry it, never skip it.
    fn commit_until_done(&mut self, batch: &[WriteOp]) {
        let mut delay = Duration::from_millis(10);
        let started = std::time::Instant::now();
        while let Err(e) = commit(&mut self.conn, batch) {
            tracing::error!(error = %e, ops = batch.len(), "ledger batch failed; retrying");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
        self.metrics.ledger_flush.observe(started.elapsed());
        for op in batch {
            if let WriteOp::Hold { segment, .. } = op {
                *self.committed.entry(*segment).or_default() += 1;
            }
        }
    }

    fn drop_committed_segments(&mut self) {
        self.sealed.extend(self.journal.take_sealed());
        let (journal, committed) = (&self.journal, &mut self.committed);
        self.sealed.retain(|s| {
            let done = committed.get(&s.number).copied().unwrap_or(0) >= s.holds;
            if done {
                journal.remove(s.number);
                committed.remove(&s.number);
            }
            !done
        });
    }
}

/// Adds what arrives within [`GATHER`] of the first entry, up to a full
/// batch: one sleep, then whatever has queued. A batch already full (the
/// writer is behind) or closing commits at once. (A loop of short sleeps,
/// to notice a full batch sooner, cost more wake-ups than it saved.)
fn gather(rx: &mut mpsc::Receiver<WriteOp>, batch: &mut Vec<WriteOp>) {
    if batch.len() >= BATCH || batch.iter().any(|op| matches!(op, WriteOp::Close)) {
        return;
    }
    std::thread::sleep(GATHER);
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(op) => {
                let closing = matches!(op, WriteOp::Close);
                batch.push(op);
                if closing {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// One transaction for the batch. A hold settled within the same batch is
/// never written as a hold (the journal covers it until the commit), and
/// balances move by one summed delta per account.
fn commit(conn: &mut Connection, batch: &[WriteOp]) -> rusqlite::Result<()> {
    let held_here: HashSet<&str> = batch
        .iter()
        .filter_map(|op| match op {
            WriteOp::Hold { hold, .. } => Some(hold.id.as_str()),
            _ => None,
        })
        .collect();
    let settled_here: HashSet<&str> = batch
        .iter()
        .filter_map(|op| match op {
            WriteOp::Settle(charge) => Some(charge.id.as_str()),
            _ => None,
        })
        .collect();
    let mut debits: HashMap<i64, u64> = HashMap::new();
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
                WriteOp::Hold { hold, .. } if settled_here.contains(hold.id.as_str()) => {}
                WriteOp::Hold { hold, .. } => ledger::insert_hold(&tx, hold)?,
                WriteOp::Settle(charge) => {
                    if ledger::record_charge(&tx, charge)? {
                        *debits.entry(charge.account_id).or_default() += charge.credits;
                    }
                    if !held_here.contains(charge.id.as_str()) {
                        ledger::delete_hold(&tx, &charge.id)?;
                    }
                }
                WriteOp::JobSubmitted(job) => jobs::insert(&tx, job)?,
                WriteOp::JobEnded {
                    request_id,
                    end,
                    credits_used,
                    balance_remaining,
                    at_ms,
                } => jobs::settle(
                    &tx,
                    request_id,
                    *end,
                    *credits_used,
                    *balance_remaining,
                    *at_ms,
                )?,
                WriteOp::Close => {}
            }
        }
    }
    for (account_id, credits) in debits {
        ledger::debit(&tx, account_id, credits)?;
    }
    tx.commit()
}
