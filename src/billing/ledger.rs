//! Reserve, then settle. A [`Reservation`] is a hold on an account's credits
//! for one request; it ends exactly once, charged or released, and if the
//! request's future is dropped (the client went away) its `Drop` settles it:
//! released before fal answered, charged its hold after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::journal::{HoldRecord, Journal};
use super::pricing::Quote;
use crate::error::ApiError;
use crate::keys::{Account, ApiKey};
use crate::store::ledger::{ChargeRecord, Outcome};
use crate::store::now_ms;
use crate::store::writer::{StoreWriter, WriteOp};

pub struct Ledger {
    writer: StoreWriter,
    journal: Arc<Journal>,
    /// Credits owed beyond what balances could cover (a model returned more than was asked).
    shortfall_credits: AtomicU64,
}

/// What a settlement left: shown to the client as `_billing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub credits_used: u64,
    pub balance_remaining: i64,
}

pub struct Reservation {
    ledger: Arc<Ledger>,
    account: Arc<Account>,
    hold: HoldRecord,
    estimate: Quote,
    /// fal has answered with success: from here on, fal did the work.
    answered: bool,
    settled: bool,
}

impl Ledger {
    pub fn new(writer: StoreWriter, journal: Arc<Journal>) -> Self {
        Self {
            writer,
            journal,
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
        let hold = HoldRecord {
            id: request_id.to_owned(),
            account_id: account.id,
            key_id: key.id,
            credits: estimate.credits,
            created_at_ms: now_ms(),
            model: model.to_owned(),
        };
        let segment = match self.journal.append(&hold) {
            Ok(segment) => segment,
            Err(e) => {
                account.settle(credits, 0);
                tracing::error!(error = %e, "cannot journal a hold: refusing the request");
                return Err(ApiError::LedgerUnavailable);
            }
        };
        // The guard exists before the first await: if the client leaves
        // while the hold is being queued, its `Drop` still releases it.
        let reservation = Reservation {
            ledger: Arc::clone(self),
            account,
            hold: hold.clone(),
            estimate,
            answered: false,
            settled: false,
        };
        self.writer.send(WriteOp::Hold { hold, segment }).await;
        Ok(reservation)
    }
}

impl Reservation {
    pub fn held(&self) -> u64 {
        self.hold.credits
    }

    /// fal answered with success; a drop from now on charges the hold.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// Charges the actual cost of a successful answer.
    pub async fn charge(mut self, actual: Quote, fal_status: u16) -> Settled {
        let (record, settled) = self.finish(actual, Some(fal_status), Outcome::Charged);
        self.ledger.writer.send(WriteOp::Settle(record)).await;
        settled
    }

    /// Releases the hold: fal failed or never answered. Nothing is charged.
    pub async fn release(mut self, fal_status: Option<u16>) -> Settled {
        let nothing = Quote {
            units_milli: 0,
            credits: 0,
        };
        let (record, settled) = self.finish(nothing, fal_status, Outcome::Released);
        self.ledger.writer.send(WriteOp::Settle(record)).await;
        settled
    }

    fn finish(
        &mut self,
        quote: Quote,
        fal_status: Option<u16>,
        outcome: Outcome,
    ) -> (ChargeRecord, Settled) {
        self.settled = true;
        let held = self.hold.credits as i64;
        let cost = i64::try_from(quote.credits).unwrap_or(i64::MAX);
        let (charged, shortfall) = self.account.settle(held, cost);
        if shortfall > 0 {
            self.ledger
                .shortfall_credits
                .fetch_add(shortfall as u64, Ordering::Relaxed);
            tracing::warn!(
                request_id = %self.hold.id,
                account_id = self.account.id,
                shortfall,
                "actual cost exceeded hold and balance"
            );
        }
        let record = ChargeRecord {
            id: self.hold.id.clone(),
            account_id: self.hold.account_id,
            key_id: self.hold.key_id,
            model: self.hold.model.clone(),
            units_milli: quote.units_milli,
            credits: charged as u64,
            held: self.hold.credits,
            shortfall: shortfall as u64,
            fal_status,
            outcome,
            started_at_ms: self.hold.created_at_ms,
            settled_at_ms: now_ms(),
        };
        let settled = Settled {
            credits_used: charged as u64,
            balance_remaining: self.account.balance(),
        };
        (record, settled)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (quote, outcome) = if self.answered {
            (self.estimate, Outcome::Charged)
        } else {
            let nothing = Quote {
                units_milli: 0,
                credits: 0,
            };
            (nothing, Outcome::Released)
        };
        let (record, _) = self.finish(quote, None, outcome);
        self.ledger.writer.send_now(WriteOp::Settle(record));
    }
}
