//! Reserve, then settle. A [`Hold`] is credits set aside on an account for
//! one piece of work, settled exactly once: charged or released. Within one
//! request it lives in a [`Reservation`], whose `Drop` settles it if the
//! request's future is dropped (the client went away): released before fal
//! answered, charged its hold after. A queued job takes the hold over
//! ([`Reservation::detach`]) and settles it when the job ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::journal::{HoldRecord, Journal};
use super::pricing::Quote;
use crate::error::ApiError;
use crate::keys::{Account, ApiKey};
use crate::metrics::Metrics;
use crate::store::ledger::{ChargeRecord, Outcome};
use crate::store::now_ms;
use crate::store::writer::{StoreWriter, WriteOp};

pub struct Ledger {
    writer: StoreWriter,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    /// Credits owed beyond what balances could cover (a model returned more than was asked).
    shortfall_credits: AtomicU64,
}

/// What a settlement left: shown to the client as `_billing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub credits_used: u64,
    pub balance_remaining: i64,
}

/// Credits held on an account, not yet settled.
pub struct Hold {
    pub account: Arc<Account>,
    pub record: HoldRecord,
    /// What was held, and the units it stands for.
    pub estimate: Quote,
}

const NOTHING: Quote = Quote {
    units_milli: 0,
    credits: 0,
};

impl Ledger {
    pub fn new(writer: StoreWriter, journal: Arc<Journal>, metrics: Arc<Metrics>) -> Self {
        Self {
            writer,
            journal,
            metrics,
            shortfall_credits: AtomicU64::new(0),
        }
    }

    pub fn shortfall_credits(&self) -> u64 {
        self.shortfall_credits.load(Ordering::Relaxed)
    }

    /// Holds `estimate.credits` on the key's account (402 if they are not
    /// available) and journals the hold before returning, so that fal is
    /// never called for a hold a crash could forget.
    pub async fn reserve(
        self: &Arc<Self>,
        key: &ApiKey,
        model: &str,
        request_id: &str,
        estimate: Quote,
    ) -> Result<Reservation, ApiError> {
        let account = Arc::clone(&key.account);
        let credits = i64::try_from(estimate.credits).unwrap_or(i64::MAX);
        account
            .try_hold(credits)
            .map_err(|available| ApiError::InsufficientCredits {
                needed: estimate.credits,
                available,
            })?;
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
        // The guard exists before the first await: if the client leaves
        // while the hold is being queued, its `Drop` still releases it.
        let reservation = Reservation {
            ledger: Arc::clone(self),
            hold: Some(Hold {
                account,
                record: record.clone(),
                estimate,
            }),
            answered: false,
        };
        self.writer
            .send(WriteOp::Hold {
                hold: record,
                segment,
            })
            .await;
        Ok(reservation)
    }

    /// A hold that outlived its process (a queued job's), taken again in memory at start-up.
    pub fn restore(&self, account: Arc<Account>, record: HoldRecord, estimate: Quote) -> Hold {
        account.restore_hold(record.credits as i64);
        self.metrics.hold_opened();
        Hold {
            account,
            record,
            estimate,
        }
    }

    /// Charges `actual` for a hold whose work fal did.
    pub async fn charge(&self, hold: &Hold, actual: Quote, fal_status: Option<u16>) -> Settled {
        self.finish(hold, actual, fal_status, Outcome::Charged)
            .await
    }

    /// Releases a hold whose work fal did not do: nothing is charged.
    pub async fn release(&self, hold: &Hold, fal_status: Option<u16>) -> Settled {
        self.finish(hold, NOTHING, fal_status, Outcome::Released)
            .await
    }

    async fn finish(
        &self,
        hold: &Hold,
        quote: Quote,
        fal_status: Option<u16>,
        outcome: Outcome,
    ) -> Settled {
        let (record, settled) = self.settle_in_memory(hold, quote, fal_status, outcome);
        self.writer.send(WriteOp::Settle(record)).await;
        settled
    }

    /// The in-memory half of a settlement; the caller queues the record.
    fn settle_in_memory(
        &self,
        hold: &Hold,
        quote: Quote,
        fal_status: Option<u16>,
        outcome: Outcome,
    ) -> (ChargeRecord, Settled) {
        let held = hold.record.credits as i64;
        let cost = i64::try_from(quote.credits).unwrap_or(i64::MAX);
        let (charged, shortfall) = hold.account.settle(held, cost);
        self.metrics.hold_closed();
        self.metrics.charged(charged as u64);
        if shortfall > 0 {
            self.shortfall_credits
                .fetch_add(shortfall as u64, Ordering::Relaxed);
            tracing::warn!(
                request_id = %hold.record.id,
                account_id = hold.account.id,
                shortfall,
                "actual cost exceeded hold and balance"
            );
        }
        let record = ChargeRecord {
            id: hold.record.id.clone(),
            account_id: hold.record.account_id,
            key_id: hold.record.key_id,
            model: hold.record.model.clone(),
            units_milli: quote.units_milli,
            credits: charged as u64,
            held: hold.record.credits,
            shortfall: shortfall as u64,
            fal_status,
            outcome,
            started_at_ms: hold.record.created_at_ms,
            settled_at_ms: now_ms(),
        };
        let settled = Settled {
            credits_used: charged as u64,
            balance_remaining: hold.account.balance(),
        };
        (record, settled)
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
    /// fal answered with success; a drop from now on charges the hold.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// Charges the actual cost of a successful answer, or the hold where
    /// the actual cost cannot be worked out.
    pub async fn charge(mut self, actual: Option<Quote>, fal_status: u16) -> Settled {
        let hold = self.hold.take().expect("a reservation settles once");
        let quote = actual.unwrap_or(hold.estimate);
        self.ledger.charge(&hold, quote, Some(fal_status)).await
    }

    /// Releases the hold: fal failed or never answered. Nothing is charged.
    pub async fn release(mut self, fal_status: Option<u16>) -> Settled {
        let hold = self.hold.take().expect("a reservation settles once");
        self.ledger.release(&hold, fal_status).await
    }

    /// Hands the hold to a queued job, which settles it when the job ends.
    pub fn detach(mut self) -> Hold {
        self.hold.take().expect("a reservation settles once")
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let (quote, outcome) = if self.answered {
            (hold.estimate, Outcome::Charged)
        } else {
            (NOTHING, Outcome::Released)
        };
        let (record, _) = self.ledger.settle_in_memory(&hold, quote, None, outcome);
        self.ledger.writer.send_now(WriteOp::Settle(record));
    }
}
