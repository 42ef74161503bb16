//! Queued jobs in memory: who owns each one, and its hold until it ends.
//! A job ends exactly once (charged when its result is first obtained,
//! released when it fails or is cancelled); every later look at it sees the
//! same figures. Every pending job is in memory; of the ended ones only the
//! most recent, the rest are read back from the store when asked for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::billing::facts::RequestFacts;
use crate::billing::ledger::{Hold, Ledger, Settled};
use crate::billing::pricing::{Quote, Tariff};
use crate::billing::receipt::FalReceipt;
use crate::config::QueueConfig;
use crate::error::{ApiError, Error};
use crate::keys::Registry;
use crate::store::jobs::{self, JobEnd, JobRecord, StoredEnd, StoredJob};
use crate::store::now_ms;
use crate::store::writer::{StoreWriter, WriteOp};

enum JobState {
    Pending(Hold),
    Ended {
        settled: Settled,
        at_ms: i64,
    },
    /// Pending on another node of a shared database, which holds its
    /// credits and settles it: here it is only passed through to fal.
    Foreign,
}

/// What `std::mem::take` leaves for the moment a pending hold is taken out to be settled.
impl Default for JobState {
    fn default() -> Self {
        JobState::Ended {
            settled: Settled::default(),
            at_ms: 0,
        }
    }
}

/// How long ended jobs stay readable by their owners, and how many of them
/// memory keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub keep_ms: i64,
    pub max_ended_in_memory: usize,
}

impl Retention {
    pub fn of(queue: &QueueConfig) -> Self {
        Self {
            keep_ms: i64::try_from(queue.keep_ended_jobs_days)
                .unwrap_or(i64::MAX)
                .saturating_mul(86_400_000),
            max_ended_in_memory: queue.max_ended_jobs_in_memory,
        }
    }

    /// Jobs submitted before this are no longer readable once ended.
    pub fn readable_since(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.keep_ms)
    }
}

pub struct Job {
    /// fal's request id.
    pub request_id: String,
    pub account_id: i64,
    /// `{owner}/{alias}`, as in fal's queue URLs.
    pub app: String,
    /// The full model path submitted to: what prices the job.
    pub model: String,
    pub request: RequestFacts,
    /// What prices the job, as it was admitted; `None` for a job stored
    /// before jobs kept their tariff.
    pub tariff: Option<Tariff>,
    pub created_at_ms: i64,
    /// Ending a job is synchronous under this lock: the hold's settlement and
    /// the job's end are queued together, and a second look sees the end.
    state: Mutex<JobState>,
    /// fal has reported the job COMPLETED: it did the work and bills it, so
    /// the job is never released for want of a result fal no longer gives.
    completed: AtomicBool,
    /// Its end is committed to the store, which from then on answers for
    /// it as memory did; until then an ended job stays in memory.
    end_stored: Arc<AtomicBool>,
}

impl Job {
    pub fn is_pending(&self) -> bool {
        matches!(*self.state.lock(), JobState::Pending(_))
    }

    /// Another node's pending job: passed through, never settled here.
    pub fn is_foreign(&self) -> bool {
        matches!(*self.state.lock(), JobState::Foreign)
    }

    /// When it ended; `None` while pending.
    fn ended_at_ms(&self) -> Option<i64> {
        match *self.state.lock() {
            JobState::Pending(_) | JobState::Foreign => None,
            JobState::Ended { at_ms, .. } => Some(at_ms),
        }
    }

    fn is_end_stored(&self) -> bool {
        self.end_stored.load(Ordering::Acquire)
    }

    /// Notes that fal reported the job COMPLETED; true the first time.
    fn saw_completed(&self) -> bool {
        !self.completed.swap(true, Ordering::AcqRel)
    }

    pub fn was_completed(&self) -> bool {
        self.completed.load(Ordering::Acquire)
    }
}

pub struct Jobs {
    by_id: DashMap<String, Arc<Job>>,
    ledger: Arc<Ledger>,
    writer: StoreWriter,
    retention: Retention,
    /// The database is shared with other nodes, whose jobs may be asked for here.
    shared: bool,
}

impl Jobs {
    /// Loads pending jobs (taking their holds again) and the most recent
    /// ended ones (so their owners can still read them).
    pub fn load(
        conn: &mut crate::store::sql::Conn,
        registry: &Registry,
        ledger: Arc<Ledger>,
        writer: StoreWriter,
        retention: Retention,
        node: Option<&str>,
    ) -> Result<Self, Error> {
        let by_id = DashMap::new();
        let since_ms = retention.readable_since(now_ms());
        for stored in jobs::load(conn, since_ms, retention.max_ended_in_memory, node)? {
            let r = &stored.record;
            let Some(account) = registry.account(r.hold.account_id) else {
                continue;
            };
            let state = match stored.ended {
                Some(end) => ended(end),
                None => {
                    let estimate = Quote {
                        units_milli: r.estimate_units,
                        credits: r.hold.credits,
                    };
                    let mut hold = ledger.restore(account, r.hold.clone(), estimate);
                    hold.fal = FalReceipt::job(&r.request_id);
                    JobState::Pending(hold)
                }
            };
            by_id.insert(r.request_id.clone(), Arc::new(job(stored, state)));
        }
        Ok(Self {
            by_id,
            ledger,
            writer,
            retention,
            shared: node.is_some(),
        })
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// A job read back from the store because memory no longer keeps it:
    /// an ended one, seen as it ended. One the store still has pending is,
    /// on a shared database, another node's (every pending job of this
    /// node is in memory); on a single node, an end not yet committed,
    /// refused for now rather than held again.
    pub fn from_store(&self, stored: StoredJob) -> Result<Arc<Job>, ApiError> {
        let state = match stored.ended {
            Some(end) => ended(end),
            None if self.shared => JobState::Foreign,
            None => return Err(ApiError::LedgerUnavailable),
        };
        Ok(Arc::new(job(stored, state)))
    }

    /// Records a job fal accepted; from now on it owns `hold`.
    pub fn submitted(
        &self,
        request_id: &str,
        app: &str,
        request: RequestFacts,
        tariff: Tariff,
        mut hold: Hold,
    ) -> Arc<Job> {
        // The queue's id for the job is fal's id for the call.
        let mut fal = FalReceipt::job(request_id);
        fal.merge(std::mem::take(&mut hold.fal));
        hold.fal = fal;
        let record = JobRecord {
            request_id: request_id.to_owned(),
            app: app.to_owned(),
            hold: hold.record.clone(),
            estimate_units: hold.estimate.units_milli,
            facts: request,
            tariff: Some(tariff.clone()),
        };
        self.ledger.record_job(record);
        let job = Arc::new(Job {
            request_id: request_id.to_owned(),
            account_id: hold.account.id,
            app: app.to_owned(),
            model: hold.record.model.clone(),
            request,
            tariff: Some(tariff),
            created_at_ms: hold.record.created_at_ms,
            state: Mutex::new(JobState::Pending(hold)),
            completed: AtomicBool::new(false),
            end_stored: Arc::default(),
        });
        self.by_id.insert(request_id.to_owned(), Arc::clone(&job));
        job
    }

    /// The job `id` if `account_id` owns it: another account's job is as
    /// unknown as a missing one.
    pub fn owned(&self, id: &str, account_id: i64) -> Option<Arc<Job>> {
        self.by_id
            .get(id)
            .filter(|j| j.account_id == account_id)
            .map(|j| Arc::clone(j.value()))
    }

    /// Drops from memory the ended jobs no longer readable, and the oldest
    /// ended ones beyond the cap. Only jobs whose end the store has
    /// committed go (until then the store would not answer for them as
    /// memory does); pending ones stay, whatever their age.
    pub fn forget_ended(&self, now_ms: i64) {
        let since = self.retention.readable_since(now_ms);
        self.by_id
            .retain(|_, job| job.created_at_ms >= since || !job.is_end_stored());
        let mut ended = 0usize;
        let mut stored: Vec<(i64, String)> = Vec::new();
        for j in self.by_id.iter() {
            if let Some(at_ms) = j.ended_at_ms() {
                ended += 1;
                if j.is_end_stored() {
                    stored.push((at_ms, j.key().clone()));
                }
            }
        }
        let Some(excess) = ended.checked_sub(self.retention.max_ended_in_memory) else {
            return;
        };
        stored.sort_unstable();
        for (_, id) in stored.into_iter().take(excess) {
            self.by_id.remove(&id);
        }
    }

    /// Jobs in memory: (pending, ended).
    pub fn in_memory(&self) -> (usize, usize) {
        let pending = self.by_id.iter().filter(|j| j.is_pending()).count();
        (pending, self.by_id.len() - pending)
    }

    pub fn pending(&self) -> Vec<Arc<Job>> {
        self.by_id
            .iter()
            .filter(|j| j.is_pending())
            .map(|j| Arc::clone(j.value()))
            .collect()
    }

    /// Charges `actual` (the hold, when it cannot be priced) if the job is
    /// still pending; either way returns the job's figures, so a result
    /// fetched again shows the same `_billing`.
    /// `fal_units`: what fal's result said it billed, where it did.
    pub fn charge(
        &self,
        job: &Job,
        actual: Option<Quote>,
        fal_status: u16,
        fal_units: Option<u64>,
    ) -> Settled {
        self.end(job, JobEnd::Charged, actual, Some(fal_status), fal_units)
    }

    /// fal reported the job COMPLETED: remembered, across restarts too.
    pub fn completed(&self, job: &Job) {
        if job.saw_completed() {
            self.ledger.record_completed(&job.request_id);
        }
    }

    /// Releases the job's hold if it is still pending (it failed or was cancelled).
    pub fn release(&self, job: &Job, fal_status: Option<u16>) -> Settled {
        self.end(job, JobEnd::Released, None, fal_status, None)
    }

    fn end(
        &self,
        job: &Job,
        end: JobEnd,
        quote: Option<Quote>,
        fal_status: Option<u16>,
        fal_units: Option<u64>,
    ) -> Settled {
        let mut state = job.state.lock();
        let mut hold = match std::mem::take(&mut *state) {
            JobState::Pending(hold) => hold,
            JobState::Ended { settled, at_ms } => {
                *state = JobState::Ended { settled, at_ms };
                return settled;
            }
            // Its node settles it; the queue passes it through unpriced.
            JobState::Foreign => {
                *state = JobState::Foreign;
                return Settled::default();
            }
        };
        hold.fal.units_milli = fal_units.or(hold.fal.units_milli);
        let settled = match end {
            JobEnd::Charged => {
                let quote = quote.unwrap_or(hold.estimate);
                self.ledger.charge(hold, quote, fal_status)
            }
            JobEnd::Released => self.ledger.release(hold, fal_status),
        };
        let at_ms = now_ms();
        self.writer.send_now(WriteOp::JobEnded {
            request_id: job.request_id.clone(),
            end,
            credits_used: settled.credits_used,
            balance_remaining: settled.balance_remaining,
            at_ms,
            stored: Arc::clone(&job.end_stored),
        });
        *state = JobState::Ended { settled, at_ms };
        settled
    }
}

fn ended(end: StoredEnd) -> JobState {
    JobState::Ended {
        settled: Settled {
            credits_used: end.credits_used,
            balance_remaining: end.balance_remaining,
        },
        at_ms: end.at_ms,
    }
}

fn job(stored: StoredJob, state: JobState) -> Job {
    let r = stored.record;
    Job {
        request_id: r.request_id,
        account_id: r.hold.account_id,
        app: r.app,
        model: r.hold.model,
        request: r.facts,
        tariff: r.tariff,
        created_at_ms: r.hold.created_at_ms,
        state: Mutex::new(state),
        completed: AtomicBool::new(stored.completed),
        end_stored: Arc::new(AtomicBool::new(stored.ended.is_some())),
    }
}
