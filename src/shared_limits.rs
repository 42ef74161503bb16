//! The generation allowance of a key (and its account's cap) when several
//! nodes share one PostgreSQL: decided in the database, so that the nodes
//! together admit exactly what the plan allows, a slice of admissions per
//! round trip while they fit (see `slices`), one near the limit.
//!
//! While the database cannot decide, each node decides alone on its share
//! (the rate and burst divided by the nodes alive at its last heartbeat),
//! starting from what the database last told it of each key, so that the
//! nodes together still admit no more than the plan; one probe at a time
//! finds out when the database is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::billing::lease::Leaser;
use crate::keys::ApiKey;
use crate::ratelimit::{Gcra, RateLimits, Taken, Verdict};
use crate::slices::Slices;
use crate::store::limits::Remote;
use crate::store::sql::StoreError;

/// How often the database is tried again while it cannot decide.
const PROBE: Duration = Duration::from_secs(1);

pub struct SharedLimits {
    remote: Arc<Remote>,
    slices: Arc<Slices>,
    /// Who counts the nodes alive.
    leaser: Arc<Leaser>,
    /// Set while the database cannot decide; its probe clears it.
    alone: AtomicBool,
}

fn key_subject(key: &ApiKey) -> String {
    format!("k{}", key.id)
}

fn account_subject(key: &ApiKey) -> String {
    format!("a{}", key.account.id)
}

fn ns(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SharedLimits {
    pub fn new(remote: Remote, leaser: Arc<Leaser>) -> Arc<Self> {
        let (remote, slices) = (Arc::new(remote), Arc::new(Slices::default()));
        slices.spawn_sweeper(Arc::clone(&remote));
        let connecting = Arc::clone(&remote);
        remote.runtime().spawn(async move {
            if let Err(e) = connecting.ping().await {
                tracing::warn!(error = %e, "rate limits: cannot reach the database yet");
            }
        });
        Arc::new(Self {
            remote,
            slices,
            leaser,
            alone: AtomicBool::new(false),
        })
    }

    /// The key's limit, then the account's cap, as [`RateLimits::generation`]
    /// decides them on one node: in the database, or on this node's share
    /// while the database cannot decide. `now` is this node's clock.
    pub async fn generation(
        self: &Arc<Self>,
        limits: &RateLimits,
        key: &ApiKey,
        now: u64,
    ) -> (Verdict, Taken) {
        if !self.alone.load(Ordering::Acquire) {
            match self.in_database(limits, key, now).await {
                Ok(verdict) => return (verdict, Taken::Shared(Arc::clone(self))),
                Err(e) => self.go_alone(e),
            }
        }
        let nodes = self.leaser.live_nodes();
        (limits.generation(key, now, nodes), Taken::Here { nodes })
    }

    /// From now on decides alone, until a probe finds the database again.
    fn go_alone(self: &Arc<Self>, e: StoreError) {
        if self.alone.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(error = %e, nodes = self.leaser.live_nodes(), "cannot decide rate limits in the database: deciding this node's share alone until it can");
        let this = Arc::clone(self);
        self.remote.runtime().spawn(async move {
            loop {
                if this.remote.ping().await.is_ok() {
                    this.alone.store(false, Ordering::Release);
                    tracing::warn!("rate limits are decided in the database again");
                    return;
                }
                tokio::time::sleep(PROBE).await;
            }
        });
    }

    async fn in_database(
        self: &Arc<Self>,
        limits: &RateLimits,
        key: &ApiKey,
        now: u64,
    ) -> Result<Verdict, StoreError> {
        let (per_minute, own, cap) = limits.generation_limits(key);
        let nodes = self.leaser.live_nodes();
        let take = |subject: String, limit: Gcra| async move {
            let slice = self.slices.get(subject.clone());
            let taken = self
                .slices
                .take(
                    &self.remote,
                    &slice,
                    &subject,
                    ns(limit.interval_ns()),
                    ns(limit.tolerance()),
                    nodes,
                    &self.alone,
                )
                .await?;
            Ok::<_, StoreError>((taken, slice))
        };
        let (taken, key_slice) = take(key_subject(key), own).await?;
        let (Ok(lead) | Err(lead)) = taken;
        Gcra::follow(&key.generation_tat, now, lead.max(0) as u64);
        let verdict = |decision, by_account| Verdict {
            limit: per_minute,
            decision,
            by_account,
        };
        let lead = match taken {
            Err(lead) => return Ok(verdict(own.denied(lead as u64), false)),
            Ok(lead) => lead,
        };
        if let Some(cap) = cap {
            // The key's admission goes back to its slice whether the cap
            // refused or failed.
            let capped = take(account_subject(key), cap).await;
            if !matches!(capped, Ok((Ok(_), _))) {
                key_slice.give_back();
            }
            let (capped, _) = capped?;
            let (Ok(cap_lead) | Err(cap_lead)) = capped;
            Gcra::follow(&key.account.rate_tat, now, cap_lead.max(0) as u64);
            if let Err(cap_lead) = capped {
                return Ok(verdict(cap.denied(cap_lead as u64), true));
            }
        }
        Ok(verdict(own.allowed(lead.max(0) as u64), false))
    }

    /// Gives back an allowed request that did not reach fal: to this
    /// node's slices, for its next requests (what they leave unused goes
    /// back to the database within a second or two).
    pub fn refund(&self, limits: &RateLimits, key: &ApiKey) {
        let (_, _, cap) = limits.generation_limits(key);
        self.slices.get(key_subject(key)).give_back();
        if cap.is_some() {
            self.slices.get(account_subject(key)).give_back();
        }
    }
}
