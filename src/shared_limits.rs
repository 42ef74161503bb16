//! The generation allowance of a key (and its account's cap) when several
//! nodes share one PostgreSQL: decided in the database, one round trip per
//! request, so that the nodes together admit exactly what the plan allows.
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
use crate::ratelimit::{Decision, Gcra, RateLimits, Taken, Verdict};
use crate::store::limits::Remote;
use crate::store::sql::StoreError;

/// How often the database is tried again while it cannot decide.
const PROBE: Duration = Duration::from_secs(1);

pub struct SharedLimits {
    remote: Remote,
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
        Arc::new(Self {
            remote,
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
                tokio::time::sleep(PROBE).await;
                if this.remote.ping().await.is_ok() {
                    this.alone.store(false, Ordering::Release);
                    tracing::warn!("rate limits are decided in the database again");
                    return;
                }
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
        let decided: Result<(Decision, bool), StoreError> = async {
            let k = key_subject(key);
            let lead = match self
                .remote
                .take(&k, ns(own.interval_ns()), ns(own.tolerance()))
                .await?
            {
                Err(lead) => {
                    Gcra::follow(&key.generation_tat, now, lead as u64);
                    return Ok((own.denied(lead as u64), false));
                }
                Ok(lead) => lead,
            };
            Gcra::follow(&key.generation_tat, now, lead.max(0) as u64);
            if let Some(cap) = cap {
                let capped = self
                    .remote
                    .take(
                        &account_subject(key),
                        ns(cap.interval_ns()),
                        ns(cap.tolerance()),
                    )
                    .await;
                // The key's place goes back whether the cap refused or failed.
                if !matches!(capped, Ok(Ok(_))) {
                    self.remote.refund(&k, ns(own.interval_ns())).await?;
                }
                let capped = capped?;
                let (Ok(lead) | Err(lead)) = capped;
                Gcra::follow(&key.account.rate_tat, now, lead.max(0) as u64);
                if let Err(lead) = capped {
                    return Ok((cap.denied(lead as u64), true));
                }
            }
            Ok((own.allowed(lead.max(0) as u64), false))
        }
        .await;
        let (decision, by_account) = decided?;
        Ok(Verdict {
            limit: per_minute,
            decision,
            by_account: by_account && matches!(decision, Decision::Deny { .. }),
        })
    }

    /// Gives back an allowed request that did not reach fal, on a task of
    /// its own (a drop cannot wait).
    pub fn refund(self: &Arc<Self>, limits: &RateLimits, key: &ApiKey) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (_, own, cap) = limits.generation_limits(key);
        let (k, a) = (key_subject(key), account_subject(key));
        let this = Arc::clone(self);
        runtime.spawn(async move {
            let mut refunded = this.remote.refund(&k, ns(own.interval_ns())).await;
            if let (Ok(()), Some(cap)) = (&refunded, cap) {
                refunded = this.remote.refund(&a, ns(cap.interval_ns())).await;
            }
            if let Err(e) = refunded {
                tracing::warn!(error = %e, "cannot give a shared rate-limit place back");
            }
        });
    }
}
