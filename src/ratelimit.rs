//! GCRA, the token bucket's exact twin, on one `AtomicU64` per key: the
//! theoretical arrival time (TAT) of the next request. A limit of `rate` per
//! period with a `burst` admits a request at `now` when
//! `TAT − now ≤ (burst − 1) × interval`, and then moves TAT to
//! `max(TAT, now) + interval`. Allowing is one compare-exchange; denying
//! writes nothing; nothing allocates. (governor's design, `src/gcra.rs`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Config, DEFAULT_PLAN};
use crate::keys::{Account, ApiKey};
use crate::shared_limits::SharedLimits;
use std::sync::Arc;

/// One limit: `burst` requests at once, then one every `interval_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    interval_ns: u64,
    burst: u64,
}

/// The answer, with what the response headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// Requests that would pass right now, after this one.
        remaining: u64,
        /// Nanoseconds until the whole burst is available again.
        reset_ns: u64,
    },
    Deny {
        /// Nanoseconds until the next request would pass.
        retry_after_ns: u64,
        reset_ns: u64,
    },
}

const NANOS_PER_MINUTE: u64 = 60_000_000_000;

impl Gcra {
    /// `per_minute` requests a minute, up to `burst` at once.
    pub fn per_minute(per_minute: u64, burst: u64) -> Self {
        Self::new(NANOS_PER_MINUTE / per_minute.max(1), burst)
    }

    /// One request per `interval`, up to `burst` at once.
    pub fn every(interval: std::time::Duration, burst: u64) -> Self {
        Self::new(
            u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            burst,
        )
    }

    pub fn per_second(per_second: u64, burst: u64) -> Self {
        Self::new(1_000_000_000 / per_second.max(1), burst)
    }

    fn new(interval_ns: u64, burst: u64) -> Self {
        Self {
            interval_ns: interval_ns.max(1),
            burst: burst.max(1),
        }
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// One node's share of this limit when `nodes` decide it apart: each
    /// admits a `nodes`-th of the rate and of the burst (at least one), so
    /// that together they admit no more than the limit.
    pub fn share(&self, nodes: u64) -> Self {
        let nodes = nodes.max(1);
        Self::new(
            self.interval_ns.saturating_mul(nodes),
            (self.burst / nodes).max(1),
        )
    }

    /// Moves TAT to at least `lead` ahead of `now`: what a limit decided
    /// elsewhere (the database) last reported, so that deciding here next
    /// starts from it rather than from a fresh burst.
    pub fn follow(tat: &AtomicU64, now: u64, lead: u64) {
        tat.fetch_max(now.saturating_add(lead), Ordering::AcqRel);
    }

    /// Largest lead TAT may have over `now` for a request to pass.
    pub fn tolerance(&self) -> u64 {
        (self.burst - 1) * self.interval_ns
    }

    /// A request allowed, TAT now `lead` ahead.
    pub fn allowed(&self, lead: u64) -> Decision {
        Decision::Allow {
            remaining: (self.burst * self.interval_ns).saturating_sub(lead) / self.interval_ns,
            reset_ns: lead,
        }
    }

    /// A request refused, TAT `lead` ahead.
    pub fn denied(&self, lead: u64) -> Decision {
        Decision::Deny {
            retry_after_ns: lead.saturating_sub(self.tolerance()),
            reset_ns: lead,
        }
    }

    /// Decides one request at `now` against the state in `tat`.
    pub fn check(&self, tat: &AtomicU64, now: u64) -> Decision {
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let start = current.max(now);
            let lead = start - now;
            if lead > self.tolerance() {
                return self.denied(lead);
            }
            let next = start + self.interval_ns;
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return self.allowed(next - now),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back one allowed request (one that another limit then refused).
    pub fn refund(&self, tat: &AtomicU64) {
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            Some(t.saturating_sub(self.interval_ns))
        });
    }
}

/// A limit per name (a client's address, an email), for requests that come
/// before any account: one GCRA state per name seen, dropped once it no
/// longer holds anything back.
pub struct Throttle {
    gcra: Gcra,
    tats: dashmap::DashMap<String, AtomicU64>,
}

/// Names kept before the ones that hold nothing back are dropped.
const THROTTLE_NAMES: usize = 10_000;

impl Throttle {
    pub fn new(gcra: Gcra) -> Self {
        Self {
            gcra,
            tats: dashmap::DashMap::new(),
        }
    }

    pub fn check(&self, name: &str, now: u64) -> Decision {
        if let Some(tat) = self.tats.get(name) {
            return self.gcra.check(&tat, now);
        }
        if self.tats.len() >= THROTTLE_NAMES {
            self.tats.retain(|_, tat| tat.load(Ordering::Acquire) > now);
            // Every name kept still holds something back: a new one waits
            // until one of them lets go, so that a flood of names (from
            // clients without number) cannot grow the map without bound.
            if self.tats.len() >= THROTTLE_NAMES {
                return Decision::Deny {
                    retry_after_ns: self.gcra.interval_ns,
                    reset_ns: self.gcra.interval_ns,
                };
            }
        }
        let tat = self.tats.entry(name.to_owned()).or_default();
        self.gcra.check(&tat, now)
    }
}

/// A plan's limits, ready to decide with.
#[derive(Debug, Clone, Copy)]
struct Plan {
    requests_per_minute: u64,
    key: Gcra,
    account: Option<Gcra>,
}

/// What was decided for one request, for its headers and its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The limit the headers report (requests per minute, or per second for polls).
    pub limit: u64,
    pub decision: Decision,
    /// The account-wide cap refused, not the key's own limit.
    pub by_account: bool,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self.decision, Decision::Allow { .. })
    }
}

/// Every plan's limits, and the poll limit.
pub struct RateLimits {
    plans: HashMap<String, Plan>,
    poll: Gcra,
    poll_per_second: u64,
    /// Keys an account may create through the dashboard.
    key_creation: Gcra,
}

impl RateLimits {
    pub fn new(config: &Config) -> Self {
        let plans = config
            .plans
            .iter()
            .map(|(name, p)| {
                let plan = Plan {
                    requests_per_minute: p.requests_per_minute,
                    key: Gcra::per_minute(
                        p.requests_per_minute,
                        p.burst.unwrap_or(p.requests_per_minute),
                    ),
                    account: p
                        .account_requests_per_minute
                        .map(|n| Gcra::per_minute(n, n)),
                };
                (name.clone(), plan)
            })
            .collect();
        let per_second = config.limits.poll_requests_per_second;
        Self {
            plans,
            poll: Gcra::per_second(per_second, per_second),
            poll_per_second: per_second,
            key_creation: {
                let n = config.limits.key_creations_per_minute;
                Gcra::per_minute(n, n)
            },
        }
    }

    /// An account whose plan the config no longer has gets the default plan.
    fn plan(&self, key: &ApiKey) -> &Plan {
        let name = key.account.plan.load();
        self.plans
            .get(name.as_str())
            .or_else(|| self.plans.get(DEFAULT_PLAN))
            .expect("config validation guarantees the default plan")
    }

    /// The key's plan: its requests per minute, the key's limit and the account's cap.
    pub fn generation_limits(&self, key: &ApiKey) -> (u64, Gcra, Option<Gcra>) {
        let plan = self.plan(key);
        (plan.requests_per_minute, plan.key, plan.account)
    }

    /// A request that starts work at fal: the key's limit, then the
    /// account's cap, or this node's share of them when `nodes` decide them
    /// apart (1 on a node alone).
    pub fn generation(&self, key: &ApiKey, now: u64, nodes: u64) -> Verdict {
        let plan = self.plan(key);
        let own = plan.key.share(nodes);
        let decision = own.check(&key.generation_tat, now);
        let mut verdict = Verdict {
            limit: plan.requests_per_minute,
            decision,
            by_account: false,
        };
        if let (Decision::Allow { .. }, Some(cap)) = (decision, plan.account) {
            if let denied @ Decision::Deny { .. } =
                cap.share(nodes).check(&key.account.rate_tat, now)
            {
                own.refund(&key.generation_tat);
                verdict.decision = denied;
                verdict.by_account = true;
            }
        }
        verdict
    }

    /// Gives back an allowed generation request that did not reach fal
    /// after all, to the share it was taken from.
    fn refund_generation(&self, key: &ApiKey, nodes: u64) {
        let plan = self.plan(key);
        plan.key.share(nodes).refund(&key.generation_tat);
        if let Some(cap) = plan.account {
            cap.share(nodes).refund(&key.account.rate_tat);
        }
    }

    /// A poll of a job: its own, larger allowance.
    pub fn poll(&self, key: &ApiKey, now: u64) -> Verdict {
        Verdict {
            limit: self.poll_per_second,
            decision: self.poll.check(&key.poll_tat, now),
            by_account: false,
        }
    }

    /// A dashboard call signed in by session: the poll allowance, per account.
    pub fn session_poll(&self, account: &Account, now: u64) -> Verdict {
        Verdict {
            limit: self.poll_per_second,
            decision: self.poll.check(&account.session_poll_tat, now),
            by_account: true,
        }
    }

    /// A key created through the dashboard, counted against its account.
    pub fn key_creation(&self, account: &Account, now: u64) -> Decision {
        self.key_creation.check(&account.key_creation_tat, now)
    }
}

/// A generation request the limits allowed. Dropped before it is
/// [`spent`](Allowance::spent) (the request was refused after all, or its
/// client left), it is given back: only requests that reach fal count.
pub struct Allowance<'a> {
    limits: &'a RateLimits,
    key: &'a ApiKey,
    taken: Taken,
    spent: bool,
}

/// Where an allowed request took its place, for it to go back there.
pub enum Taken {
    /// This node's limits, or its share of limits `n` nodes decide apart
    /// ([`RateLimits::generation`]).
    Here { nodes: u64 },
    /// The limits the nodes share, in the database
    /// ([`SharedLimits::generation`]).
    Shared(Arc<SharedLimits>),
}

impl<'a> Allowance<'a> {
    pub fn new(limits: &'a RateLimits, key: &'a ApiKey, taken: Taken) -> Self {
        Self {
            limits,
            key,
            taken,
            spent: false,
        }
    }

    /// The request goes to fal: it keeps its place in the allowance.
    pub fn spent(mut self) {
        self.spent = true;
    }
}

impl Drop for Allowance<'_> {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        match &self.taken {
            Taken::Shared(shared) => shared.refund(self.limits, self.key),
            Taken::Here { nodes } => self.limits.refund_generation(self.key, *nodes),
        }
    }
}

/// Whole seconds, rounded up, as `retry-after` and `x-ratelimit-reset` want them.
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn thirty_a_minute_admits_thirty_then_one_every_two_seconds() {
        let limit = Gcra::per_minute(30, 30);
        let tat = AtomicU64::new(0);
        let now = 1_000 * SEC;
        for i in 0..30 {
            match limit.check(&tat, now) {
                Decision::Allow { remaining, .. } => assert_eq!(remaining, 29 - i),
                d => panic!("request {i} denied: {d:?}"),
            }
        }
        assert_eq!(
            limit.check(&tat, now),
            Decision::Deny {
                retry_after_ns: 2 * SEC,
                reset_ns: 60 * SEC
            }
        );
        // Two seconds later exactly one more passes.
        assert!(matches!(
            limit.check(&tat, now + 2 * SEC),
            Decision::Allow { remaining: 0, .. }
        ));
        assert!(matches!(
            limit.check(&tat, now + 2 * SEC),
            Decision::Deny { .. }
        ));
        // After a minute's pause the whole burst is back.
        let later = now + 200 * SEC;
        let passed = (0..40)
            .filter(|_| matches!(limit.check(&tat, later), Decision::Allow { .. }))
            .count();
        assert_eq!(passed, 30);
    }

    #[test]
    fn a_steady_client_gets_exactly_the_rate() {
        let limit = Gcra::per_minute(600, 10);
        let tat = AtomicU64::new(0);
        let passed = (0..6000u64)
            .filter(|i| {
                matches!(
                    limit.check(&tat, 1_000 * SEC + i * SEC / 100),
                    Decision::Allow { .. }
                )
            })
            .count();
        // 60 s of a client knocking 100 times a second: burst plus 600 a minute.
        assert_eq!(passed, 10 + 600 - 1);
    }

    #[test]
    fn exact_under_contention() {
        let limit = Gcra::per_minute(60, 25);
        let tat = AtomicU64::new(0);
        let passed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter(|_| matches!(limit.check(&tat, SEC), Decision::Allow { .. }))
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 25);
    }

    #[test]
    fn a_throttle_keeps_a_bounded_number_of_names() {
        let throttle = Throttle::new(Gcra::every(std::time::Duration::from_secs(300), 3));
        let now = 1_000 * SEC;
        // Names that each still hold something back: none can be dropped.
        for i in 0..THROTTLE_NAMES + 500 {
            throttle.check(&format!("user{i}@example.com"), now);
        }
        assert!(
            throttle.tats.len() <= THROTTLE_NAMES,
            "{} names kept",
            throttle.tats.len()
        );
        // A name it knows is still decided as before; once the old names
        // hold nothing back, new ones are admitted again.
        assert!(matches!(
            throttle.check("user0@example.com", now),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            throttle.check("new@example.com", now + 301 * SEC),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn refunds_give_one_request_back() {
        let limit = Gcra::per_minute(60, 1);
        let tat = AtomicU64::new(0);
        assert!(matches!(limit.check(&tat, SEC), Decision::Allow { .. }));
        assert!(matches!(limit.check(&tat, SEC), Decision::Deny { .. }));
        limit.refund(&tat);
        assert!(matches!(limit.check(&tat, SEC), Decision::Allow { .. }));
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(2 * SEC), 2);
    }

    /// Three nodes deciding apart on their shares of 30 a minute admit 30
    /// at once between them, and then 30 a minute.
    #[test]
    fn shares_together_admit_the_limit() {
        let share = Gcra::per_minute(30, 30).share(3);
        let tats: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let admitted = |now: u64| {
            tats.iter()
                .map(|tat| {
                    (0..100)
                        .filter(|_| matches!(share.check(tat, now), Decision::Allow { .. }))
                        .count()
                })
                .sum::<usize>()
        };
        assert_eq!(admitted(SEC), 30);
        assert_eq!(admitted(SEC + 60 * SEC), 30);
        // A node that learnt the shared state ten requests in starts there.
        let tat = AtomicU64::new(0);
        Gcra::follow(&tat, SEC, 10 * 2 * SEC);
        let own = Gcra::per_minute(30, 30).share(1);
        let left = (0..100)
            .filter(|_| matches!(own.check(&tat, SEC), Decision::Allow { .. }))
            .count();
        assert_eq!(left, 20);
    }
}
