//! How slowly a client may send a body we read: a body that stalls, or
//! trickles, holds its connection and its buffer for as long as it is
//! allowed to, so it is allowed a bounded time for the bytes it sends.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::ServerConfig;

/// `[server] body_timeout_secs` and `min_body_bytes_per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    /// The longest pause between two pieces of a body, and the grace
    /// before the minimum rate counts.
    pub timeout: Duration,
    pub min_bytes_per_sec: u64,
}

impl From<&ServerConfig> for BodyPace {
    fn from(c: &ServerConfig) -> Self {
        Self {
            timeout: Duration::from_secs(c.body_timeout_secs),
            min_bytes_per_sec: c.min_body_bytes_per_sec.max(1),
        }
    }
}

/// One body's progress against its [`BodyPace`].
pub struct Progress {
    pace: BodyPace,
    started: Instant,
    last: Instant,
    received: u64,
}

impl Progress {
    pub fn start(pace: BodyPace) -> Self {
        let now = Instant::now();
        Self {
            pace,
            started: now,
            last: now,
            received: 0,
        }
    }

    pub fn received(&mut self, bytes: usize) {
        self.received = self.received.saturating_add(bytes as u64);
        self.last = Instant::now();
    }

    /// When the body is cut off unless more arrives: a pause of `timeout`,
    /// or, counted from the start, `timeout` plus the time the bytes so far
    /// buy at the minimum rate, whichever comes first.
    pub fn deadline(&self) -> Instant {
        let bought =
            Duration::from_millis(self.received.saturating_mul(1000) / self.pace.min_bytes_per_sec);
        let paused = self.last + self.pace.timeout;
        (self.started + self.pace.timeout)
            .checked_add(bought)
            .map_or(paused, |by_rate| paused.min(by_rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_and_a_trickle_each_meet_a_deadline() {
        let pace = BodyPace {
            timeout: Duration::from_secs(10),
            min_bytes_per_sec: 100,
        };
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let at = |last, received| Progress {
            pace,
            started: t0,
            last,
            received,
        };
        // Nothing at all: cut off after the pause allowed.
        assert_eq!(at(t0, 0).deadline(), t0 + secs(10));
        // A byte every 5 s never pauses for 10 s, but a byte buys only
        // 10 ms: the rate catches it just after the grace.
        assert_eq!(
            at(t0 + secs(15), 3).deadline(),
            t0 + Duration::from_millis(10_030)
        );
        // A fast body has credit, but still may not pause past the timeout.
        assert_eq!(at(t0 + secs(1), 1_000_000).deadline(), t0 + secs(11));
    }
}
