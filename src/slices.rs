//! Slices of a shared rate limit: a node takes several of a key's (or an
//! account's) admissions from the database in one round trip, while they
//! fit its burst, and spends them one per request with no round trip.
//! Near the limit it takes one at a time, so that the nodes together still
//! admit what the plan allows. A slice's admissions are the last places
//! before the key's new theoretical arrival time (its horizon): one is
//! spent only until its place is a little past (at most a second, and at
//! most half the burst's span), so the nodes together exceed the plan by
//! at most what their slices held of that last moment, a few admissions.
//! What a node leaves unused for a second goes back; what is past is
//! dropped, not given back.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::store::limits::Remote;
use crate::store::sql::StoreError;

/// Most admissions one round trip takes.
const MOST: i64 = 16;
/// Unused admissions held this long go back to the database.
const IDLE_MS: i64 = 1_000;
/// After the database refused a slice, one at a time for this long.
const NARROW_MS: i64 = 1_000;
/// Longest an admission is spent after its place.
const GRACE_NS: i64 = 1_000_000_000;
/// Longest a request waits behind another's round trip for the same key.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// This process's monotonic clock, in nanoseconds.
fn mono_ns() -> i64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(Instant::now);
    i64::try_from(origin.elapsed().as_nanos()).unwrap_or(i64::MAX)
}

fn mono_ms() -> i64 {
    mono_ns() / 1_000_000
}

/// One subject's admissions taken ahead, on this node.
pub struct Slice {
    left: AtomicI64,
    /// The interval they were taken at.
    interval_ns: AtomicI64,
    /// The subject's theoretical arrival time after them, on [`mono_ns`]'s
    /// clock (from when the round trip was sent, so never later than the
    /// database's): the `n` left are the `n` places before it.
    horizon_ns: AtomicI64,
    /// How long past its place an admission may still be spent.
    grace_ns: AtomicI64,
    /// Until then (the database's retry-after) a request is refused here.
    refused_until_ns: AtomicI64,
    used_at_ms: AtomicI64,
    narrow_until_ms: AtomicI64,
    /// One round trip per subject at a time: the requests behind it spend
    /// what it brings.
    taking: tokio::sync::Mutex<()>,
}

impl Slice {
    fn new() -> Self {
        Self {
            left: AtomicI64::new(0),
            interval_ns: AtomicI64::new(0),
            horizon_ns: AtomicI64::new(0),
            grace_ns: AtomicI64::new(0),
            refused_until_ns: AtomicI64::new(0),
            used_at_ms: AtomicI64::new(mono_ms()),
            narrow_until_ms: AtomicI64::new(0),
            taking: tokio::sync::Mutex::new(()),
        }
    }

    /// Admissions left whose places are not past by more than the grace.
    fn usable(&self, left: i64) -> i64 {
        self.within(left, self.grace_ns.load(Ordering::Acquire))
    }

    /// Admissions left whose places are not yet past: the only ones the
    /// database can take back (it has forgotten the others already).
    fn returnable(&self, left: i64) -> i64 {
        self.within(left, 0)
    }

    fn within(&self, left: i64, grace: i64) -> i64 {
        let interval = self.interval_ns.load(Ordering::Acquire).max(1);
        let ahead = self.horizon_ns.load(Ordering::Acquire) + grace - mono_ns();
        left.min(ahead.max(0) / interval)
    }

    /// Spends one admission taken ahead; the subject's lead over now.
    fn spend(&self) -> Option<i64> {
        let spent = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                let usable = self.usable(l);
                (usable > 0).then_some(usable - 1)
            })
            .is_ok();
        spent.then(|| {
            self.used_at_ms.store(mono_ms(), Ordering::Release);
            (self.horizon_ns.load(Ordering::Acquire) - mono_ns()).max(0)
        })
    }

    /// An admission allowed here that did not reach fal after all.
    pub fn give_back(&self) {
        self.left.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Slices {
    by_subject: DashMap<String, Arc<Slice>>,
}

impl Slices {
    pub fn get(&self, subject: String) -> Arc<Slice> {
        if let Some(slice) = self.by_subject.get(&subject) {
            return Arc::clone(&slice);
        }
        Arc::clone(
            &self
                .by_subject
                .entry(subject)
                .or_insert_with(|| Arc::new(Slice::new())),
        )
    }

    /// One admission of `subject` (a limit of `interval_ns`, `tolerance_ns`
    /// shared by `nodes`): from its slice, or from the database, taking a
    /// slice while one fits. `Ok(lead)` allowed, `Err(lead)` refused. Once
    /// `alone` is set (the database did not answer the request ahead), the
    /// requests queued behind it do not each try again.
    #[allow(clippy::too_many_arguments)]
    pub async fn take(
        &self,
        remote: &Remote,
        slice: &Slice,
        subject: &str,
        interval_ns: i64,
        tolerance_ns: i64,
        nodes: u64,
        alone: &AtomicBool,
    ) -> Result<Result<i64, i64>, StoreError> {
        if slice.interval_ns.load(Ordering::Acquire) != interval_ns {
            // Taken under another plan: not this one's places, nor its
            // refusals.
            slice.left.store(0, Ordering::Release);
            slice.refused_until_ns.store(0, Ordering::Release);
            slice.narrow_until_ms.store(0, Ordering::Release);
        }
        if let Some(lead) = slice.spend() {
            return Ok(Ok(lead));
        }
        // Refused until the database's retry-after: no round trip, and no
        // queue of them behind one key, nor a wait without end in one.
        let refused = || {
            let refused = slice.refused_until_ns.load(Ordering::Acquire) - mono_ns();
            (refused > 0).then_some(refused + tolerance_ns)
        };
        if let Some(lead) = refused() {
            return Ok(Err(lead));
        }
        // The round trip ahead took as long as a decision may: the
        // database is as good as unreachable.
        let Ok(_taking) = tokio::time::timeout(QUEUE_WAIT, slice.taking.lock()).await else {
            return Err(StoreError::Unanswered(
                "the decision ahead for this key took too long".into(),
            ));
        };
        if let Some(lead) = slice.spend() {
            return Ok(Ok(lead));
        }
        if let Some(lead) = refused() {
            return Ok(Err(lead));
        }
        if alone.load(Ordering::Acquire) {
            return Err(StoreError::Unanswered(
                "the database did not answer the request ahead".into(),
            ));
        }
        // At most half the burst per node, so that slices left on some
        // nodes never starve the others of the plan's burst.
        let burst = tolerance_ns / interval_ns.max(1) + 1;
        let nodes = i64::try_from(nodes.max(1)).unwrap_or(i64::MAX);
        let wide = (burst / (2 * nodes)).clamp(1, MOST);
        let narrow = mono_ms() < slice.narrow_until_ms.load(Ordering::Acquire);
        let mut count = if narrow { 1 } else { wide };
        loop {
            let sent = mono_ns();
            match remote
                .take(subject, interval_ns, tolerance_ns, count)
                .await?
            {
                Ok(lead) => {
                    slice.interval_ns.store(interval_ns, Ordering::Release);
                    slice.horizon_ns.store(sent + lead, Ordering::Release);
                    slice
                        .grace_ns
                        .store((tolerance_ns / 2).min(GRACE_NS), Ordering::Release);
                    slice.used_at_ms.store(mono_ms(), Ordering::Release);
                    slice.left.fetch_add(count - 1, Ordering::AcqRel);
                    return Ok(Ok(lead));
                }
                Err(_) if count > 1 => {
                    slice
                        .narrow_until_ms
                        .store(mono_ms() + NARROW_MS, Ordering::Release);
                    count = 1;
                }
                Err(lead) => {
                    let retry = (lead - tolerance_ns).max(0);
                    slice
                        .refused_until_ns
                        .store(sent + retry, Ordering::Release);
                    return Ok(Err(lead));
                }
            }
        }
    }

    /// Every second, gives back to the database what slices have held
    /// unused for a second, and forgets subjects long idle.
    pub fn spawn_sweeper(self: &Arc<Self>, remote: Arc<Remote>) {
        let this = Arc::downgrade(self);
        remote.runtime().clone().spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(IDLE_MS as u64)).await;
                let Some(slices) = this.upgrade() else { return };
                let now = mono_ms();
                let idle: Vec<(String, Arc<Slice>)> = slices
                    .by_subject
                    .iter()
                    .filter(|e| now - e.used_at_ms.load(Ordering::Acquire) >= IDLE_MS)
                    .map(|e| (e.key().clone(), Arc::clone(e.value())))
                    .collect();
                for (subject, slice) in idle {
                    let left = slice.left.swap(0, Ordering::AcqRel);
                    // Past places are the database's history: not given back.
                    let unused = slice.returnable(left);
                    if unused > 0 {
                        let interval = slice.interval_ns.load(Ordering::Acquire);
                        // Lost, it only holds the key back for `unused` intervals.
                        if let Err(e) = remote.refund(&subject, interval, unused).await {
                            tracing::warn!(error = %e, "cannot give unused rate-limit admissions back");
                        }
                    } else {
                        // Not one a request is using, or just made.
                        slices.by_subject.remove_if(&subject, |_, s| {
                            now - s.used_at_ms.load(Ordering::Acquire) >= 60 * IDLE_MS
                                && s.left.load(Ordering::Acquire) == 0
                                && s.taking.try_lock().is_ok()
                        });
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    /// Five admissions left, but only the places of two are not yet past
    /// (the horizon 2.5 intervals ahead): two are spent, the rest dropped.
    /// One given back is spent while its place is ahead, not once past.
    #[test]
    fn only_places_not_yet_past_are_spent() {
        let slice = Slice::new();
        slice.interval_ns.store(SEC, Ordering::Release);
        slice
            .horizon_ns
            .store(mono_ns() + 5 * SEC / 2, Ordering::Release);
        slice.left.store(5, Ordering::Release);
        assert!(slice.spend().is_some());
        assert!(slice.spend().is_some());
        assert_eq!(slice.spend(), None);
        assert_eq!(slice.left.load(Ordering::Acquire), 0);
        slice.give_back();
        assert!(slice.spend().is_some());
        slice.horizon_ns.store(mono_ns(), Ordering::Release);
        slice.give_back();
        assert_eq!(slice.spend(), None);
        // With a grace of a second, places up to a second past count: two
        // at 0.4 s apart.
        slice.grace_ns.store(SEC, Ordering::Release);
        slice.interval_ns.store(2 * SEC / 5, Ordering::Release);
        slice.horizon_ns.store(mono_ns(), Ordering::Release);
        slice.left.store(3, Ordering::Release);
        // None can go back: the database has forgotten past places.
        assert_eq!(slice.returnable(3), 0);
        assert!(slice.spend().is_some());
        assert!(slice.spend().is_some());
        assert_eq!(slice.spend(), None);
    }
}
