//! The generation allowance of a key (and its account's cap) when several
//! nodes share one PostgreSQL: decided in the database, one round trip per
//! request, so that the nodes together admit exactly what the plan allows.

use std::sync::Arc;

use crate::error::ApiError;
use crate::keys::ApiKey;
use crate::ratelimit::{Decision, RateLimits, Verdict};
use crate::store::limits::Remote;
use crate::store::sql::StoreError;

pub struct SharedLimits {
    remote: Remote,
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
    pub fn new(remote: Remote) -> Arc<Self> {
        Arc::new(Self { remote })
    }

    /// The key's limit, then the account's cap, as [`RateLimits::generation`]
    /// decides them on one node. 503 while the database cannot be reached:
    /// a node never admits what it cannot count.
    pub async fn generation(
        self: &Arc<Self>,
        limits: &RateLimits,
        key: &ApiKey,
    ) -> Result<Verdict, ApiError> {
        let (per_minute, own, cap) = limits.generation_limits(key);
        let decided: Result<(Decision, bool), StoreError> = async {
            let k = key_subject(key);
            let lead = match self
                .remote
                .take(&k, ns(own.interval_ns()), ns(own.tolerance()))
                .await?
            {
                Err(lead) => return Ok((own.denied(lead as u64), false)),
                Ok(lead) => lead,
            };
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
                if let Err(lead) = capped? {
                    return Ok((cap.denied(lead as u64), true));
                }
            }
            Ok((own.allowed(lead.max(0) as u64), false))
        }
        .await;
        let (decision, by_account) = decided.map_err(|e| {
            tracing::error!(error = %e, "cannot decide a shared rate limit: refusing the request");
            ApiError::LedgerUnavailable
        })?;
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
