//! The in-memory accounts and keys. Lookups never touch SQLite; edits made
//! with the CLI arrive through [`Registry::apply`] and change the shared
//! entries in place, so a request that already holds a key sees them too.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;

use super::secret::{self, KeyHash};
use crate::error::ApiError;
use crate::store::snapshot::{AccountRow, Change, KeyRow, Snapshot};

/// A paying customer; every key of an account spends its one balance.
pub struct Account {
    pub id: i64,
    pub name: String,
    /// Name of the plan whose limits apply; changed by the operator at run time.
    pub plan: ArcSwap<String>,
    /// Set by `accounts suspend`: every key of the account is refused with 403.
    suspended: AtomicBool,
    /// Credits not held by a request in flight: a hold is one compare-exchange
    /// here, so concurrent requests can never together overdraw the account.
    available: AtomicI64,
    /// Credits held by requests in flight.
    held: AtomicI64,
    /// GCRA state of the plan's account-wide cap, if it has one.
    pub rate_tat: AtomicU64,
    /// GCRA state of `[limits] key_creations_per_minute`.
    pub key_creation_tat: AtomicU64,
    /// GCRA state of the dashboard's calls signed in by session (a key's
    /// calls count against the key's own poll allowance).
    pub session_poll_tat: AtomicU64,
    /// Bytes of billable request bodies read into memory and not yet sent
    /// on: capped, so that one account's stalled bodies cannot fill RAM.
    buffered: AtomicUsize,
    /// On a shared database: when this node last leased for the account
    /// (unix ms), and whether the account had too little free credit to
    /// lease more than a request needed (then what is unused goes back at
    /// once, not after an idle while).
    pub leased_at_ms: AtomicI64,
    pub scarce: AtomicBool,
    /// On a shared database, where memory holds this node's lease: the
    /// account's balance as this node last read it, less its own charges
    /// since (what `_billing` and the account API show), and its charges
    /// not yet written.
    leasing: bool,
    booked: AtomicI64,
    unflushed: AtomicI64,
}

impl Account {
    /// `balance` as stored; nothing is held when a server starts (recovery
    /// settles every old hold). A leasing node starts with nothing to spend.
    fn from_row(row: &AccountRow, balance: i64, leasing: bool) -> Self {
        Self {
            leasing,
            booked: AtomicI64::new(balance),
            unflushed: AtomicI64::new(0),
            id: row.id,
            name: row.name.clone(),
            plan: ArcSwap::from_pointee(row.plan.clone()),
            suspended: AtomicBool::new(row.suspended),
            available: AtomicI64::new(if leasing { 0 } else { balance }),
            held: AtomicI64::new(0),
            rate_tat: AtomicU64::new(0),
            key_creation_tat: AtomicU64::new(0),
            session_poll_tat: AtomicU64::new(0),
            buffered: AtomicUsize::new(0),
            leased_at_ms: AtomicI64::new(0),
            scarce: AtomicBool::new(false),
        }
    }

    /// Credits owned: available plus held; on a shared database, the
    /// account's balance as this node knows it.
    pub fn balance(&self) -> i64 {
        if self.leasing {
            return self.booked.load(Ordering::Acquire);
        }
        self.available() + self.held()
    }

    /// The balance the database has for the account (its charges from
    /// this node written up to now): this node's own not yet written ones
    /// are taken off it.
    pub fn rebook(&self, stored: i64) {
        self.booked.store(
            stored - self.unflushed.load(Ordering::Acquire),
            Ordering::Release,
        );
    }

    /// `credits` of this node's charges were written to the database.
    pub fn flushed(&self, credits: i64) {
        self.unflushed.fetch_sub(credits, Ordering::AcqRel);
    }

    pub fn available(&self) -> i64 {
        self.available.load(Ordering::Acquire)
    }

    pub fn held(&self) -> i64 {
        self.held.load(Ordering::Acquire)
    }

    /// Holds `credits` if they are available; else says how many are.
    pub fn try_hold(&self, credits: i64) -> Result<(), i64> {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a >= credits).then_some(a - credits)
            })?;
        self.held.fetch_add(credits, Ordering::AcqRel);
        Ok(())
    }

    /// Takes again a hold that was already covered before a restart: out
    /// of the balance, or on a shared database out of the node's lease,
    /// which recovery set to the holds it took up again.
    pub fn restore_hold(&self, credits: i64, leasing: bool) {
        if !leasing {
            self.available.fetch_sub(credits, Ordering::AcqRel);
        }
        self.held.fetch_add(credits, Ordering::AcqRel);
    }

    /// Credits this node leased for the account, to spend.
    pub fn add_leased(&self, credits: i64) {
        self.available.fetch_add(credits, Ordering::AcqRel);
    }

    /// Takes every available credit (none if the account is in debt), to give back.
    pub fn take_unused(&self) -> i64 {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a > 0).then_some(0)
            })
            .unwrap_or(0)
    }

    /// Ends a hold of `held` credits with a charge of `cost`. A cost above
    /// the hold is charged whole: fal did the work, so the excess comes from
    /// available credits even below zero, and the account then gets 402
    /// until it is topped up. Returns the part of the cost that took the
    /// balance below zero (the shortfall), for usage and metrics.
    pub fn settle(&self, held: i64, cost: i64) -> i64 {
        if self.leasing {
            return self.settle_leased(held, cost, true);
        }
        self.held.fetch_sub(held, Ordering::AcqRel);
        let delta = held - cost;
        let after = self.available.fetch_add(delta, Ordering::AcqRel) + delta;
        if delta >= 0 || after >= 0 {
            return 0;
        }
        (-delta).min(-after)
    }

    /// On a shared database: what the hold did not cost goes back to the
    /// node's lease (unless `to_lease` is false: the lease it came from is
    /// gone), and a cost beyond the hold comes out of the account's free
    /// credit, as the database debits it, not out of the lease. The
    /// shortfall is measured against the balance this node knows.
    pub fn settle_leased(&self, held: i64, cost: i64, to_lease: bool) -> i64 {
        self.held.fetch_sub(held, Ordering::AcqRel);
        if to_lease {
            self.available
                .fetch_add((held - cost).max(0), Ordering::AcqRel);
        }
        self.unflushed.fetch_add(cost, Ordering::AcqRel);
        let after = self.booked.fetch_sub(cost, Ordering::AcqRel) - cost;
        if cost <= held || after >= 0 {
            return 0;
        }
        (cost - held).min(-after)
    }

    /// Counts `bytes` more as buffered if that keeps the account within `cap`.
    pub fn try_buffer(&self, bytes: usize, cap: usize) -> bool {
        self.buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(bytes).filter(|total| *total <= cap)
            })
            .is_ok()
    }

    pub fn unbuffer(&self, bytes: usize) {
        self.buffered.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }
}

/// One client key, known by its hash.
pub struct ApiKey {
    /// The id operators use in `keys disable ID`; logged instead of the secret.
    pub id: i64,
    pub account: Arc<Account>,
    disabled: AtomicBool,
    /// Unix minute of the last use recorded, so the store is told at most once a minute.
    last_used_minute: AtomicI64,
    /// GCRA state of the generation allowance (sync runs, queue submissions).
    pub generation_tat: AtomicU64,
    /// GCRA state of the poll allowance (status, result, cancel).
    pub poll_tat: AtomicU64,
}

impl ApiKey {
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Notes a use at `now` (unix seconds); true when the store should hear of it.
    pub fn touch(&self, now: i64) -> bool {
        let minute = now / 60;
        self.last_used_minute.swap(minute, Ordering::Relaxed) != minute
    }
}

#[derive(Default)]
pub struct Registry {
    keys: DashMap<KeyHash, Arc<ApiKey>>,
    accounts: DashMap<i64, Arc<Account>>,
    /// On a shared database an account's memory holds what this node has
    /// leased, not its balance: balances and top-ups stay in the database.
    leasing: bool,
}

impl Registry {
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        Self::hydrate(snapshot, false)
    }

    /// For a node of several: accounts start with nothing leased.
    pub fn leasing(snapshot: &Snapshot) -> Self {
        Self::hydrate(snapshot, true)
    }

    fn hydrate(snapshot: &Snapshot, leasing: bool) -> Self {
        let registry = Self {
            leasing,
            ..Self::default()
        };
        for row in &snapshot.accounts {
            registry.accounts.insert(
                row.id,
                Arc::new(Account::from_row(row, row.balance, leasing)),
            );
        }
        for row in &snapshot.keys {
            registry.upsert_key(row);
        }
        registry
    }

    /// Checks a presented secret: 401 unless it is one of ours, 403 if it or its account is switched off.
    pub fn authenticate(&self, presented: &str) -> Result<Arc<ApiKey>, ApiError> {
        if !secret::well_formed(presented) {
            return Err(ApiError::MalformedKey);
        }
        let key = self
            .keys
            .get(&secret::hash(presented))
            .map(|k| Arc::clone(k.value()))
            .ok_or(ApiError::UnknownKey)?;
        if key.is_disabled() {
            return Err(ApiError::KeyDisabled);
        }
        if key.account.is_suspended() {
            return Err(ApiError::AccountSuspended);
        }
        Ok(key)
    }

    /// Credits held across all accounts, for metrics.
    pub fn credits_held(&self) -> i64 {
        self.accounts.iter().map(|a| a.held()).sum()
    }

    /// Every account, as of now.
    pub fn accounts(&self) -> Vec<Arc<Account>> {
        self.accounts
            .iter()
            .map(|a| Arc::clone(a.value()))
            .collect()
    }

    pub fn is_leasing(&self) -> bool {
        self.leasing
    }

    pub fn account(&self, id: i64) -> Option<Arc<Account>> {
        self.accounts.get(&id).map(|a| Arc::clone(a.value()))
    }

    /// Applies edits read from the change feed, oldest first.
    pub fn apply(&self, changes: &[Change]) {
        for change in changes {
            if let Some(row) = &change.account {
                // An account new to this server starts at 0: its opening
                // balance arrives as this change's delta, like a top-up.
                let account = self
                    .accounts
                    .entry(row.id)
                    .or_insert_with(|| Arc::new(Account::from_row(row, 0, self.leasing)))
                    .clone();
                account.suspended.store(row.suspended, Ordering::Release);
                if **account.plan.load() != row.plan {
                    account.plan.store(Arc::new(row.plan.clone()));
                }
                let credited = match self.leasing {
                    true => &account.booked,
                    false => &account.available,
                };
                credited.fetch_add(change.balance_delta, Ordering::AcqRel);
            }
            if let Some(row) = &change.key {
                self.upsert_key(row);
            }
        }
    }

    /// An account's state or plan changed by this server itself: applied
    /// now. Balances are left to the change feed, which carries them as deltas.
    pub fn account_changed(&self, row: &AccountRow) {
        self.apply(&[Change {
            account: Some(AccountRow {
                id: row.id,
                name: row.name.clone(),
                plan: row.plan.clone(),
                balance: 0,
                suspended: row.suspended,
            }),
            key: None,
            balance_delta: 0,
            prices: false,
        }]);
    }

    /// A key created or switched off by this server itself: applied now,
    /// not a refresh later (the change feed will apply it again, harmlessly).
    pub fn key_changed(&self, row: &KeyRow) {
        self.upsert_key(row);
    }

    fn upsert_key(&self, row: &KeyRow) {
        if let Some(existing) = self.keys.get(&row.hash) {
            existing.disabled.store(row.disabled, Ordering::Release);
            return;
        }
        let Some(account) = self.account(row.account_id) else {
            tracing::error!(key_id = row.id, "key without an account; ignored");
            return;
        };
        self.keys.insert(
            row.hash,
            Arc::new(ApiKey {
                id: row.id,
                account,
                disabled: AtomicBool::new(row.disabled),
                last_used_minute: AtomicI64::new(0),
                generation_tat: AtomicU64::new(0),
                poll_tat: AtomicU64::new(0),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(balance: i64) -> Account {
        let row = AccountRow {
            id: 1,
            name: "a".into(),
            plan: "free".into(),
            balance,
            suspended: false,
        };
        Account::from_row(&row, balance, false)
    }

    #[test]
    fn holds_never_overdraw_even_when_raced() {
        let a = Arc::new(account(37 * 3));
        let admitted: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..25).filter(|_| a.try_hold(3).is_ok()).count()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(admitted, 37);
        assert_eq!((a.available(), a.held(), a.balance()), (0, 111, 111));
        assert_eq!(a.try_hold(1), Err(0));
    }

    #[test]
    fn settling_charges_the_whole_cost_and_reports_what_went_below_zero() {
        let a = account(100);
        a.try_hold(30).unwrap();
        assert_eq!(a.settle(30, 12), 0);
        assert_eq!((a.available(), a.held()), (88, 0));
        a.try_hold(10).unwrap();
        // The model returned more than was asked: 50 over the hold, 78 available.
        assert_eq!(a.settle(10, 60), 0);
        assert_eq!(a.balance(), 28);
        a.try_hold(8).unwrap();
        // 92 over the hold with 20 available: 72 of it below zero.
        assert_eq!(a.settle(8, 100), 72);
        assert_eq!((a.balance(), a.available()), (-72, -72));
        // In debt, nothing more is held, not even a free request.
        assert_eq!(a.try_hold(0), Err(-72));
    }
}
