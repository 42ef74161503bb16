//! The in-memory accounts and keys. Lookups never touch SQLite; edits made
//! with the CLI arrive through [`Registry::apply`] and change the shared
//! entries in place, so a request that already holds a key sees them too.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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
    /// Credits, in memory; SQLite follows by deltas.
    balance: AtomicI64,
}

impl Account {
    fn from_row(row: &AccountRow, balance: i64) -> Self {
        Self {
            id: row.id,
            name: row.name.clone(),
            plan: ArcSwap::from_pointee(row.plan.clone()),
            suspended: AtomicBool::new(row.suspended),
            balance: AtomicI64::new(balance),
        }
    }

    pub fn balance(&self) -> i64 {
        self.balance.load(Ordering::Acquire)
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
}

impl Registry {
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        let registry = Self::default();
        for row in &snapshot.accounts {
            registry
                .accounts
                .insert(row.id, Arc::new(Account::from_row(row, row.balance)));
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
                    .or_insert_with(|| Arc::new(Account::from_row(row, 0)))
                    .clone();
                account.suspended.store(row.suspended, Ordering::Release);
                if **account.plan.load() != row.plan {
                    account.plan.store(Arc::new(row.plan.clone()));
                }
                account
                    .balance
                    .fetch_add(change.balance_delta, Ordering::AcqRel);
            }
            if let Some(row) = &change.key {
                self.upsert_key(row);
            }
        }
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
            }),
        );
    }
}
