//! The one thread that writes what the server learns while it runs. It owns
//! its connection and commits whatever has queued up in one transaction:
//! holds, charges and balance deltas, and last-use times. It cannot wedge:
//! an entry SQLite refuses is set aside, and while SQLite refuses
//! everything the server stops taking billable work until it can write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::jobs::{self, JobEnd, JobRecord};
use super::ledger::{self, ChargeRecord};
use super::now_ms;
use super::sql::{Conn, Mode, Sql, StoreError};
use crate::args;
use crate::billing::journal::{HoldRecord, Journal, Sealed};
use crate::error::ApiError;
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

#[derive(Debug)]
pub enum WriteOp {
    /// A key was used at `at` (unix seconds); feeds `keys list`.
    KeyUsed { key_id: i64, at: i64 },
    /// A hold taken in memory and journalled in `segment`.
    Hold { hold: HoldRecord, segment: u64 },
    /// A hold settled: charged or released; journalled in `segment`
    /// (`None` if the journal could not take it).
    Settle {
        charge: ChargeRecord,
        segment: Option<u64>,
        /// On a shared database, the node's epoch when the hold was taken:
        /// its lease pays only while the node is still in it.
        epoch: i64,
    },
    /// A job accepted by fal's queue, carrying its hold; journalled in
    /// `segment` (`None` if the journal could not take it).
    JobSubmitted {
        job: JobRecord,
        segment: Option<u64>,
    },
    /// fal reported a pending job COMPLETED: from then on it is never
    /// released; journalled in `segment` (`None` if the journal could not take it).
    JobCompleted {
        request_id: String,
        segment: Option<u64>,
    },
    /// A job ended; its charge (or release) is a `Settle` of its hold.
    JobEnded {
        request_id: String,
        end: JobEnd,
        credits_used: u64,
        balance_remaining: i64,
        at_ms: i64,
        /// Set once this end is committed (or set aside): from then on the
        /// store answers for the job, and memory may let it go.
        stored: Arc<AtomicBool>,
    },
    /// Commit what came before and stop, even if senders remain.
    Close,
}

impl WriteOp {
    /// The journal segment this entry is in, if any.
    fn segment(&self) -> Option<u64> {
        match self {
            WriteOp::Hold { segment, .. } => Some(*segment),
            WriteOp::Settle { segment, .. }
            | WriteOp::JobSubmitted { segment, .. }
            | WriteOp::JobCompleted { segment, .. } => *segment,
            _ => None,
        }
    }

    /// The request or job id the entry is about, for the set-aside table.
    fn subject(&self) -> Option<&str> {
        match self {
            WriteOp::Hold { hold, .. } => Some(&hold.id),
            WriteOp::Settle { charge, .. } => Some(&charge.id),
            WriteOp::JobSubmitted { job, .. } => Some(&job.request_id),
            WriteOp::JobEnded { request_id, .. } | WriteOp::JobCompleted { request_id, .. } => {
                Some(request_id)
            }
            WriteOp::KeyUsed { .. } | WriteOp::Close => None,
        }
    }
}

/// What the server and the writer thread share besides the queue.
struct Shared {
    /// Since when (milliseconds after `origin`, plus one) the store has
    /// refused every write (disk full, locked, read-only, PostgreSQL
    /// unreachable); 0 while it takes them. Billable requests are refused
    /// once it has been down longer than their tolerance (see
    /// [`StoreWriter::permit`]).
    down_since_ms: AtomicI64,
    /// Since when (as above) the commit in progress has run; 0 between
    /// commits. A commit that never returns (a database that hangs) is as
    /// down as one that fails.
    committing_since_ms: AtomicI64,
    origin: Instant,
    /// Set by [`StoreWriter::close`]: past it, a writer that still cannot
    /// commit stops and leaves its entries to the journal.
    give_up_at: Mutex<Option<Instant>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            down_since_ms: AtomicI64::new(0),
            committing_since_ms: AtomicI64::new(0),
            origin: Instant::now(),
            give_up_at: Mutex::new(None),
        }
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// The server's side of the writer; cheap to clone.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<WriteOp>,
    shared: Arc<Shared>,
}

/// Longest a billable request waits for room in a full queue before it is
/// refused: a writer that far behind is as good as down.
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// Longest one commit may run before the store counts as down (a commit
/// of a full batch is thousands of statements; each has its own deadline).
const STUCK: Duration = Duration::from_secs(30);

impl StoreWriter {
    /// Starts the thread; it stops after [`StoreWriter::close`] (or once every
    /// `StoreWriter` is dropped). It returns true if everything queued was
    /// committed (or set aside), false if it gave up with entries left to
    /// the journal.
    pub fn spawn(
        conn: Conn,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        node: Option<Node>,
    ) -> (Self, JoinHandle<bool>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared::new());
        let writer = Writer::new(conn, journal, metrics, Arc::clone(&shared), node);
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawn store writer");
        (Self { tx, shared }, handle)
    }

    /// Entries waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Room for one entry, for a hold about to be taken: refused (503) once
    /// the store has refused writes for `tolerance`, or while the queue
    /// stays full. One node owns its SQLite file and tolerates nothing; a
    /// node of several spends from its lease meanwhile, every hold in its
    /// journal, until the lease is fenced (see `billing::lease`).
    pub async fn permit(&self, tolerance: Duration) -> Result<mpsc::Permit<'_, WriteOp>, ApiError> {
        let now = self.shared.elapsed_ms() + 1;
        let past = |since: i64, tolerance: Duration| {
            let tolerance = i64::try_from(tolerance.as_millis()).unwrap_or(i64::MAX);
            since != 0 && now - since >= tolerance
        };
        let down = self.shared.down_since_ms.load(Ordering::Acquire);
        let committing = self.shared.committing_since_ms.load(Ordering::Acquire);
        if past(down, tolerance) || past(committing, tolerance.max(STUCK)) {
            return Err(ApiError::LedgerUnavailable);
        }
        // A full queue waits for room only while the store takes writes.
        if self.tx.capacity() == 0 && down != 0 {
            return Err(ApiError::LedgerUnavailable);
        }
        match tokio::time::timeout(ROOM_WAIT, self.tx.reserve()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::LedgerUnavailable),
        }
    }

    /// Queues money from code that must not wait (a settlement, a `Drop`):
    /// right away if there is room, else from a task that waits for room.
    /// Without a runtime (a drop during shutdown) or once the writer has
    /// stopped, the entry is not queued; the journal still has it and the
    /// next start records it.
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

    /// Asks the thread to finish what was queued before, and to give up
    /// after `within` if SQLite still cannot be written.
    pub async fn close(&self, within: Duration) {
        *self.shared.give_up_at.lock() = Some(Instant::now() + within);
        let _ = tokio::time::timeout(within, self.tx.send(WriteOp::Close)).await;
    }
}

/// A node of several on a shared database: its name (its holds and its
/// lease) and who to tell, per account, of settlements the store now has
/// (committed, or set aside), so that the node stops counting them as its
/// own unwritten charges.
pub struct Node {
    pub name: String,
    pub written: Box<dyn Fn(i64, u64) + Send>,
}

struct Writer {
    conn: Conn,
    node: Option<Node>,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// Entries committed (or set aside) per journal segment.
    committed: HashMap<u64, u64>,
    /// Segments that take no more appends, waiting for their entries to be committed.
    sealed: Vec<Sealed>,
}

impl Writer {
    fn new(
        conn: Conn,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        node: Option<Node>,
    ) -> Self {
        Self {
            conn,
            node,
            journal,
            metrics,
            shared,
            committed: HashMap::new(),
            sealed: Vec::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) -> bool {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.blocking_recv_many(&mut batch, BATCH) > 0 {
            gather(&mut rx, &mut batch);
            let closing = batch.iter().position(|op| matches!(op, WriteOp::Close));
            if let Some(at) = closing {
                batch.truncate(at);
            }
            let started = Instant::now();
            let done = self.commit_or_set_aside(&batch);
            self.metrics.ledger_flush.observe(started.elapsed());
            batch.clear();
            self.drop_committed_segments();
            self.journal.prepare_next();
            if !done {
                tracing::error!(
                    "shutting down with the ledger unwritable: the hold journal keeps what was not committed, for the next start"
                );
                return false;
            }
            if closing.is_some() {
                return true;
            }
        }
        true
    }

    /// Commits `batch`; false only if it gave up at shutdown. While SQLite
    /// refuses every write, it waits and retries. An entry SQLite refuses
    /// on its own is found by halving the batch and set aside, so one bad
    /// entry never holds up the rest.
    fn commit_or_set_aside(&mut self, batch: &[WriteOp]) -> bool {
        if batch.is_empty() {
            return true;
        }
        let mut delay = Duration::from_millis(10);
        loop {
            let name = self.node.as_ref().map(|n| n.name.as_str());
            let started = self.shared.elapsed_ms() + 1;
            self.shared
                .committing_since_ms
                .store(started, Ordering::Release);
            let committed = commit(&mut self.conn, batch, name);
            self.shared.committing_since_ms.store(0, Ordering::Release);
            match committed {
                Ok(()) => {
                    if self.shared.down_since_ms.swap(0, Ordering::AcqRel) != 0 {
                        tracing::warn!("the ledger can be written again");
                    }
                    self.mark_committed(batch);
                    return true;
                }
                Err(e) if e.unavailable() => {
                    let first = self.shared.down_since_ms.compare_exchange(
                        0,
                        self.shared.elapsed_ms() + 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    if first.is_ok() {
                        tracing::error!(error = %e, "the ledger cannot be written: billable requests are refused once that has lasted past their tolerance");
                    }
                    if self.give_up_at().is_some_and(|t| Instant::now() >= t) {
                        return false;
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) if batch.len() == 1 => return self.set_aside(&batch[0], &e),
                Err(_) => {
                    let (a, b) = batch.split_at(batch.len() / 2);
                    return self.commit_or_set_aside(a) && self.commit_or_set_aside(b);
                }
            }
        }
    }

    fn give_up_at(&self) -> Option<Instant> {
        *self.shared.give_up_at.lock()
    }

    /// Records an entry SQLite refused, with the reason, where an operator
    /// can read it (`ledger_rejects`), and in the log. A refused settlement's
    /// hold row goes too, so no later start charges it again.
    fn set_aside(&mut self, op: &WriteOp, reason: &StoreError) -> bool {
        let entry = format!("{op:?}");
        tracing::error!(%entry, error = %reason, "ledger entry refused by SQLite: set aside in ledger_rejects");
        let mut delay = Duration::from_millis(10);
        loop {
            let name = self.node.as_ref().map(|n| n.name.as_str());
            match set_aside(&mut self.conn, op, &entry, &reason.to_string(), name) {
                Ok(()) => {
                    self.mark_committed(std::slice::from_ref(op));
                    return true;
                }
                Err(e) if e.unavailable() => {
                    if self.give_up_at().is_some_and(|t| Instant::now() >= t) {
                        return false;
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    // Left in the journal: the next start tries it again.
                    tracing::error!(error = %e, "could not set a refused ledger entry aside");
                    return true;
                }
            }
        }
    }

    fn mark_committed(&mut self, batch: &[WriteOp]) {
        for op in batch {
            match op {
                WriteOp::JobEnded { stored, .. } => stored.store(true, Ordering::Release),
                WriteOp::Settle { charge, .. } => {
                    if let Some(node) = &self.node {
                        (node.written)(charge.account_id, charge.credits);
                    }
                }
                _ => {}
            }
        }
        for segment in batch.iter().filter_map(WriteOp::segment) {
            *self.committed.entry(segment).or_default() += 1;
        }
    }

    fn drop_committed_segments(&mut self) {
        self.sealed.extend(self.journal.take_sealed());
        let (journal, committed) = (&self.journal, &mut self.committed);
        self.sealed.retain(|s| {
            let done = committed.get(&s.number).copied().unwrap_or(0) >= s.entries;
            if done {
                journal.remove(s.number);
                committed.remove(&s.number);
            }
            !done
        });
    }
}

fn set_aside(
    conn: &mut Conn,
    op: &WriteOp,
    entry: &str,
    reason: &str,
    node: Option<&str>,
) -> Result<(), StoreError> {
    let mut tx = conn.transaction(Mode::Plain)?;
    tx.exec(
        "INSERT INTO ledger_rejects (subject, entry, reason, at_ms) VALUES (?1, ?2, ?3, ?4)",
        args![op.subject(), entry, reason, now_ms()],
    )?;
    if let WriteOp::Settle { charge, .. } = op {
        ledger::Writes::new(&mut tx, node).unhold(&charge.id)?;
    }
    tx.commit()
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
/// balances move by one summed delta per account. Public for the bench.
pub fn commit(conn: &mut Conn, batch: &[WriteOp], node: Option<&str>) -> Result<(), StoreError> {
    // ahash, not SipHash: these two sets were a twentieth of the writer's time.
    let held_here: HashSet<&str, ahash::RandomState> = batch
        .iter()
        .filter_map(|op| match op {
            WriteOp::Hold { hold, .. } => Some(hold.id.as_str()),
            _ => None,
        })
        .collect();
    let settled_here: HashSet<&str, ahash::RandomState> = batch
        .iter()
        .filter_map(|op| match op {
            WriteOp::Settle { charge, .. } => Some(charge.id.as_str()),
            _ => None,
        })
        .collect();
    // Per account and epoch: credits charged, and what of them holds covered.
    let mut debits: HashMap<(i64, i64), (u64, u64)> = HashMap::new();
    let mut tx = conn.transaction(Mode::Plain)?;
    {
        for op in batch {
            match op {
                WriteOp::KeyUsed { key_id, at } => {
                    tx.exec(
                        "UPDATE api_keys SET last_used_at = ?2
                         WHERE id = ?1 AND COALESCE(last_used_at, 0) < ?2",
                        args![key_id, at],
                    )?;
                }
                WriteOp::Hold { hold, .. } if settled_here.contains(hold.id.as_str()) => {}
                WriteOp::Hold { hold, .. } => ledger::Writes::new(&mut tx, node).hold(hold)?,
                WriteOp::Settle { charge, epoch, .. } => {
                    let mut writes = ledger::Writes::new(&mut tx, node);
                    if writes.charge(charge)? {
                        let debit = debits.entry((charge.account_id, *epoch)).or_default();
                        debit.0 += charge.credits;
                        debit.1 += charge.from_lease();
                    } else {
                        writes.correct(charge)?;
                    }
                    if !held_here.contains(charge.id.as_str()) {
                        writes.unhold(&charge.id)?;
                    }
                }
                WriteOp::JobSubmitted { job, .. } => jobs::insert(&mut tx, job)?,
                WriteOp::JobCompleted { request_id, .. } => jobs::completed(&mut tx, request_id)?,
                WriteOp::JobEnded {
                    request_id,
                    end,
                    credits_used,
                    balance_remaining,
                    at_ms,
                    ..
                } => jobs::settle(
                    &mut tx,
                    request_id,
                    *end,
                    *credits_used,
                    *balance_remaining,
                    *at_ms,
                )?,
                WriteOp::Close => {}
            }
        }
        for (&(account_id, epoch), &(credits, leased)) in &debits {
            ledger::Writes::new(&mut tx, node).debit(account_id, credits, leased, Some(epoch))?;
        }
    }
    tx.commit()
}
