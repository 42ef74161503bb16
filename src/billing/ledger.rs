//! Reserve, then settle. A [`Hold`] is credits set aside on an account for
//! one piece of work, settled exactly once: charged or released, in memory,
//! in the journal and on the writer's queue in one synchronous step. Within
//! one request it lives in a [`Reservation`], whose `Drop` settles it if the
//! request's future is dropped: released before fal answered, charged its
//! hold after. A queued job takes the hold over ([`Reservation::detach`])
//! and settles it when the job ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::journal::{HoldRecord, Journal};
use super::lease::Leaser;
use super::pricing::Quote;
use super::receipt::FalReceipt;
use crate::error::ApiError;
use crate::keys::{Account, ApiKey};
use crate::metrics::Metrics;
use crate::store::jobs::JobRecord;
use crate::store::ledger::{ChargeRecord, Outcome};
use crate::store::now_ms;
use crate::store::writer::{StoreWriter, WriteOp};

pub struct Ledger {
    writer: StoreWriter,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    /// On a shared database: where more credit comes from.
    leaser: Option<Arc<Leaser>>,
    /// Past the shutdown deadline: see [`Ledger::abandon`].
    abandoned: AtomicBool,
}

/// What a settlement left: shown to the client as `_billing`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub credits_used: u64,
    pub balance_remaining: i64,
}

/// Credits held on an account, not yet settled. Settling takes it by
/// value, so a hold ends once. It has no `Drop` of its own: a queued job's
/// hold outlives the process in the jobs table, and a request's is released
/// by its [`Reservation`].
pub struct Hold {
    pub account: Arc<Account>,
    pub record: HoldRecord,
    /// What was held, and the units it stands for.
    pub estimate: Quote,
    /// On a shared database, the node's epoch when it was taken: if a peer
    /// has taken the node over since, the lease it came from is gone, and
    /// what it did not cost goes back to no lease.
    epoch: i64,
    /// What fal said of the call, recorded with its charge.
    pub fal: FalReceipt,
}

const NOTHING: Quote = Quote {
    units_milli: 0,
    credits: 0,
};

impl Ledger {
    pub fn new(
        writer: StoreWriter,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        leaser: Option<Arc<Leaser>>,
    ) -> Self {
        Self {
            writer,
            journal,
            metrics,
            leaser,
            abandoned: AtomicBool::new(false),
        }
    }

    /// Shutdown's deadline passed with calls still in flight: from now on a
    /// reservation dropped with its call (cut off, not answered) leaves its
    /// hold unsettled in the journal, for the next start to charge at its
    /// held amount as fal may have served it, instead of releasing it.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    /// Holds `estimate.credits` on the key's account (402 if they are not
    /// available) and journals the hold before returning, so that fal is
    /// never called for a hold a crash could forget. The first wait, for room
    /// in the writer's queue, comes before anything changes: a client that
    /// leaves during it leaves nothing behind. The second, with `[store]
    /// fsync`, for the hold to reach the disk, comes after it is journalled
    /// and owned by the returned reservation's guard.
    pub async fn reserve(
        self: &Arc<Self>,
        key: &ApiKey,
        model: &str,
        request_id: &str,
        estimate: Quote,
    ) -> Result<Reservation, ApiError> {
        let tolerance = self
            .leaser
            .as_ref()
            .map_or(Duration::ZERO, |l| l.tolerance());
        let permit = self.writer.permit(tolerance).await?;
        let account = Arc::clone(&key.account);
        let credits = i64::try_from(estimate.credits).unwrap_or(i64::MAX);
        let epoch = self.hold(&account, credits).await?;
        let record = HoldRecord {
            id: request_id.to_owned(),
            account_id: account.id,
            key_id: key.id,
            credits: estimate.credits,
            created_at_ms: now_ms(),
            model: model.to_owned(),
        };
        let segment = match self.journal.append(&record) {
            Ok(segment) => segment,
            Err(e) => {
                account.settle(credits, 0);
                tracing::error!(error = %e, "cannot journal a hold: refusing the request");
                return Err(ApiError::LedgerUnavailable);
            }
        };
        self.metrics.hold_opened();
        permit.send(WriteOp::Hold {
            hold: record.clone(),
            segment,
        });
        let reservation = Reservation {
            ledger: Arc::clone(self),
            hold: Some(Hold {
                account,
                record,
                estimate,
                epoch,
                fal: FalReceipt::default(),
            }),
            answered: false,
        };
        // With `[store] fsync`, fal is not asked before the hold is on disk.
        // A client that leaves during the wait drops the reservation, which
        // releases the hold.
        if let Err(e) = self.journal.flushed().await {
            tracing::error!(error = %e, "cannot put a hold on disk: refusing the request");
            return Err(ApiError::LedgerUnavailable);
        }
        Ok(reservation)
    }

    /// Holds `credits` on the account: from its balance, or on a shared
    /// database from this node's lease, leasing more when it runs short.
    /// Returns the node's epoch the hold was taken in (0 on a single node).
    async fn hold(&self, account: &Arc<Account>, credits: i64) -> Result<i64, ApiError> {
        let insufficient = |available| ApiError::InsufficientCredits {
            needed: credits as u64,
            available,
        };
        let Some(leaser) = &self.leaser else {
            return account.try_hold(credits).map(|()| 0).map_err(insufficient);
        };
        // Another request on this node may spend what was just leased: a
        // few rounds, each leasing what is still missing.
        for _ in 0..4 {
            if leaser.fenced() {
                return Err(ApiError::LedgerUnavailable);
            }
            match leaser.in_epoch(|epoch| account.try_hold(credits).map(|()| epoch)) {
                Ok(epoch) => {
                    leaser.used(account);
                    return Ok(epoch);
                }
                Err(available) => {
                    if !leaser.lease(account, credits - available.max(0)).await? {
                        return Err(insufficient(available));
                    }
                }
            }
        }
        Err(insufficient(account.available()))
    }

    /// Resolves once every entry journalled so far is on disk: at once
    /// without `[store] fsync`. Awaited after a settlement and before its
    /// answer goes out, so that a power cut after the client has its answer
    /// cannot recover the hold as unsettled. A failed flush is logged (by
    /// the flusher) and not the client's: the settlement stands in memory
    /// and reaches SQLite with the writer.
    pub async fn on_disk(&self) {
        if let Err(e) = self.journal.flushed().await {
            tracing::warn!(error = %e, "a settlement answered before it reached the disk");
        }
    }

    /// A job fal accepted, owning `hold` from now on: journalled and queued
    /// in one step, so that a crash never leaves the hold without its job.
    pub fn record_job(&self, job: JobRecord) {
        let segment = self
            .journal
            .append_job(&job)
            .inspect_err(|e| tracing::error!(error = %e, "cannot journal a job"))
            .ok();
        self.writer.send_now(WriteOp::JobSubmitted { job, segment });
    }

    /// fal reported a job COMPLETED: from then on its hold is charged, never
    /// released, across a crash too.
    pub fn record_completed(&self, request_id: &str) {
        let segment = self
            .journal
            .append_completed(request_id)
            .inspect_err(|e| tracing::error!(error = %e, "cannot journal a completion"))
            .ok();
        self.writer.send_now(WriteOp::JobCompleted {
            request_id: request_id.to_owned(),
            segment,
        });
    }

    /// A hold that outlived its process (a queued job's), taken again in memory at start-up.
    pub fn restore(&self, account: Arc<Account>, record: HoldRecord, estimate: Quote) -> Hold {
        account.restore_hold(record.credits as i64, self.leaser.is_some());
        self.metrics.hold_opened();
        Hold {
            account,
            record,
            estimate,
            epoch: self.epoch(),
            fal: FalReceipt::default(),
        }
    }

    /// This node's epoch on a shared database (0 on a single node).
    fn epoch(&self) -> i64 {
        self.leaser.as_ref().map_or(0, |l| l.epoch())
    }

    /// Charges `actual` for a hold whose work fal did.
    pub fn charge(&self, hold: Hold, actual: Quote, fal_status: Option<u16>) -> Settled {
        self.settle(hold, actual, fal_status, Outcome::Charged)
    }

    /// Releases a hold whose work fal did not do: nothing is charged.
    pub fn release(&self, hold: Hold, fal_status: Option<u16>) -> Settled {
        self.settle(hold, NOTHING, fal_status, Outcome::Released)
    }

    /// Memory, the journal and the writer's queue in one synchronous step:
    /// nothing can stop a settlement half done.
    fn settle(
        &self,
        hold: Hold,
        quote: Quote,
        fal_status: Option<u16>,
        outcome: Outcome,
    ) -> Settled {
        let held = hold.record.credits as i64;
        let cost = i64::try_from(quote.credits).unwrap_or(i64::MAX);
        let shortfall = match &self.leaser {
            Some(leaser) => {
                leaser.in_epoch(|epoch| hold.account.settle_leased(held, cost, epoch == hold.epoch))
            }
            None => hold.account.settle(held, cost),
        };
        self.metrics.hold_closed();
        self.metrics.charged(quote.credits, shortfall as u64);
        if shortfall > 0 {
            tracing::warn!(
                request_id = %hold.record.id,
                account_id = hold.account.id,
                shortfall,
                "actual cost exceeded hold and balance: the account is in debt"
            );
        }
        let HoldRecord {
            id,
            account_id,
            key_id,
            credits: held,
            created_at_ms,
            model,
        } = hold.record;
        let record = ChargeRecord {
            id,
            account_id,
            key_id,
            model,
            units_milli: quote.units_milli,
            credits: quote.credits,
            held,
            shortfall: shortfall as u64,
            fal_status,
            outcome,
            started_at_ms: created_at_ms,
            settled_at_ms: now_ms(),
            fal: hold.fal,
        };
        let segment = self
            .journal
            .append_settle(&record)
            .inspect_err(|e| tracing::error!(error = %e, "cannot journal a settlement"))
            .ok();
        self.writer.send_now(WriteOp::Settle {
            charge: record,
            segment,
            epoch: hold.epoch,
        });
        Settled {
            credits_used: quote.credits,
            balance_remaining: hold.account.balance(),
        }
    }
}

/// A hold tied to one request.
pub struct Reservation {
    ledger: Arc<Ledger>,
    /// `None` once settled or detached.
    hold: Option<Hold>,
    /// fal has answered with success: from here on, fal did the work.
    answered: bool,
}

impl Reservation {
    /// fal answered: what its headers say of the call goes with the charge.
    pub fn heard(&mut self, headers: &http::HeaderMap) {
        self.heard_of(FalReceipt::from_headers(headers));
    }

    /// What fal said of the call, however it answered (a 5xx's receipt too).
    pub fn heard_of(&mut self, fal: FalReceipt) {
        if let Some(hold) = &mut self.hold {
            hold.fal = fal;
        }
    }

    /// fal answered with success; a drop from now on charges the hold.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    fn take(&mut self) -> Hold {
        self.hold.take().expect("a reservation settles once")
    }

    /// Charges the actual cost of a successful answer, or the hold where
    /// the actual cost cannot be worked out.
    pub fn charge(mut self, actual: Option<Quote>, fal_status: u16) -> Settled {
        let hold = self.take();
        let quote = actual.unwrap_or(hold.estimate);
        self.ledger.charge(hold, quote, Some(fal_status))
    }

    /// Releases the hold: fal failed or never answered. Nothing is charged.
    pub fn release(mut self, fal_status: Option<u16>) -> Settled {
        let hold = self.take();
        self.ledger.release(hold, fal_status)
    }

    /// Hands the hold to a queued job, which settles it when the job ends.
    pub fn detach(mut self) -> Hold {
        self.take()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        if self.ledger.abandoned.load(Ordering::Acquire) {
            return;
        }
        if self.answered {
            let estimate = hold.estimate;
            self.ledger.charge(hold, estimate, None);
        } else {
            self.ledger.release(hold, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::journal::Entry;
    use crate::keys::Registry;
    use crate::store::{self, admin, snapshot};

    /// A ledger on a fresh database with one key of an account holding `credits`.
    fn ledger(dir: &std::path::Path, credits: i64) -> (Arc<Ledger>, Arc<ApiKey>) {
        let mut conn =
            store::open(&crate::config::StoreConfig::at(dir.join("abhiapi.db"))).unwrap();
        let origin = admin::KeyOrigin {
            created_by: None,
            max_keys: 20,
        };
        let created = admin::create_key(&mut conn, "acme", credits, "free", origin).unwrap();
        let registry = Registry::from_snapshot(&snapshot::load(&mut conn).unwrap());
        let key = registry.authenticate(&created.secret).unwrap();
        let journal = Arc::new(Journal::open(&dir.join("holds"), false).unwrap());
        let metrics = Arc::new(Metrics::default());
        let (writer, _thread) =
            StoreWriter::spawn(conn, Arc::clone(&journal), Arc::clone(&metrics), None);
        (Arc::new(Ledger::new(writer, journal, metrics, None)), key)
    }

    const QUOTE: Quote = Quote {
        units_milli: 1000,
        credits: 28,
    };

    /// The request's future dropped at any point after the hold: memory is
    /// whole again and the journal says how the hold ended, in the same
    /// step, with nothing left to await.
    #[tokio::test]
    async fn a_dropped_reservation_settles_in_memory_and_the_journal_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, key) = ledger(dir.path(), 100);
        let before_fal = ledger.reserve(&key, "m", "req_a", QUOTE).await.unwrap();
        assert_eq!((key.account.available(), key.account.held()), (72, 28));
        drop(before_fal);
        assert_eq!((key.account.available(), key.account.held()), (100, 0));

        let mut answered = ledger.reserve(&key, "m", "req_b", QUOTE).await.unwrap();
        answered.answered();
        drop(answered);
        assert_eq!((key.account.balance(), key.account.held()), (72, 0));

        let settled: Vec<(String, Outcome, u64)> = Journal::read_all(&dir.path().join("holds"))
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Settle(c) => Some((c.id, c.outcome, c.credits)),
                Entry::Hold(_) | Entry::Job(_) | Entry::Completed(_) => None,
            })
            .collect();
        assert_eq!(
            settled,
            [
                ("req_a".to_owned(), Outcome::Released, 0),
                ("req_b".to_owned(), Outcome::Charged, 28)
            ]
        );
    }
}
