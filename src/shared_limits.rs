//! The generation allowance of a key (and its account's cap) when several
//! nodes share one PostgreSQL: decided in the database, one round trip per
//! request, so that the nodes together admit exactly what the plan allows.

use std::sync::Arc;

use crate::error::ApiError;
use crate::keys::ApiKey;
use crate::ratelimit::{Decision, Gcra, RateLimits, Verdict};
use crate::store::limits;
use crate::store::pool::Pool;

pub struct SharedLimits {
    pool: Arc<Pool>,
}

fn key_subject(key: &ApiKey) -> String {
    format!("k{}", key.id)
}

fn account_subject(key: &ApiKey) -> String {
    format!("a{}", key.account.id)
}

fn take(
    conn: &mut dyn crate::store::sql::Sql,
    subject: &str,
    g: Gcra,
) -> Result<Result<i64, i64>, crate::store::sql::StoreError> {
    limits::take(conn, subject, ns(g.interval_ns()), ns(g.tolerance()))
}

fn ns(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SharedLimits {
    pub fn new(pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Self { pool })
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
        let (k, a) = (key_subject(key), account_subject(key));
        let decided = self
            .pool
            .run(move |conn| {
                let lead = match take(&mut *conn, &k, own)? {
                    Err(lead) => return Ok((own.denied(lead as u64), false)),
                    Ok(lead) => lead,
                };
                if let Some(cap) = cap {
                    // The key's place goes back whether the cap refused or failed.
                    let capped = take(&mut *conn, &a, cap);
                    if !matches!(capped, Ok(Ok(_))) {
                        limits::refund(&mut *conn, &k, ns(own.interval_ns()))?;
                    }
                    if let Err(lead) = capped? {
                        return Ok((cap.denied(lead as u64), true));
                    }
                }
                Ok((own.allowed(lead.max(0) as u64), false))
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot decide a shared rate limit: refusing the request");
                ApiError::LedgerUnavailable
            })?;
        let (decision, by_account) = decided;
        Ok(Verdict {
            limit: per_minute,
            decision,
            by_account: by_account && matches!(decision, Decision::Deny { .. }),
        })
    }

    /// Gives back an allowed request that did not reach fal, off the
    /// caller's thread (a drop cannot wait).
    pub fn refund(self: &Arc<Self>, limits: &RateLimits, key: &ApiKey) {
        let (_, own, cap) = limits.generation_limits(key);
        let (k, a) = (key_subject(key), account_subject(key));
        let pool = Arc::clone(&self.pool);
        let give_back = move || {
            let refunded = pool.blocking(|conn| {
                limits::refund(conn, &k, ns(own.interval_ns()))?;
                if let Some(cap) = cap {
                    limits::refund(conn, &a, ns(cap.interval_ns()))?;
                }
                Ok(())
            });
            if let Err(e) = refunded {
                tracing::warn!(error = %e, "cannot give a shared rate-limit place back");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(give_back)),
            Err(_) => give_back(),
        }
    }
}
