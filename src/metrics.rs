//! Counters and histograms for `GET /metrics` (Prometheus text format), on
//! atomics: recording is a few relaxed adds, reading happens at scrape time.
//! The `model` label is the price rule that matched (from the config),
//! never the raw path, so clients cannot grow the label set.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

/// Upper bounds, in seconds: from 100 µs (our own work) to 5 min (a long sync run).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0, 60.0, 300.0,
];

pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy)]
pub enum Denial {
    Key,
    Account,
    Poll,
    /// `POST /v1/keys` beyond the account's `key_creations_per_minute`.
    KeyCreation,
}

#[derive(Default)]
pub struct Metrics {
    /// (route, price rule, status) → answers. The rule is the config's
    /// shared name, so counting a request allocates nothing.
    requests: DashMap<(&'static str, Option<Arc<str>>, u16), AtomicU64>,
    pub upstream_latency: Histogram,
    /// Our own time per request: total minus the time waiting for fal.
    pub added_latency: Histogram,
    pub ledger_flush: Histogram,
    credits_charged: AtomicU64,
    /// Credits charged beyond what balances held: owed by accounts now in debt.
    credits_shortfall: AtomicU64,
    holds_open: AtomicU64,
    denials: [AtomicU64; 4],
}

/// What a scrape reads from elsewhere in the server at that moment.
pub struct Gauges {
    pub credits_held: i64,
    pub ledger_queue_depth: usize,
    /// Queue jobs in memory: (pending, ended).
    pub jobs_in_memory: (usize, usize),
    /// fal's cost we did not charge, in nano-dollars, as the latest
    /// reconciliation found it (by the CLI or the admin API); `None` before the first.
    pub reconcile_unbilled_nano_usd: Option<u64>,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, route: &'static str, model: Option<&Arc<str>>, status: u16) {
        let key = (route, model.cloned(), status);
        if let Some(c) = self.requests.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests
            .entry(key)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A settlement: what it charged, and how much of that took a balance below zero.
    pub fn charged(&self, credits: u64, shortfall: u64) {
        self.credits_charged.fetch_add(credits, Ordering::Relaxed);
        if shortfall > 0 {
            self.credits_shortfall
                .fetch_add(shortfall, Ordering::Relaxed);
        }
    }

    pub fn hold_opened(&self) {
        self.holds_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn hold_closed(&self) {
        self.holds_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn denied(&self, by: Denial) {
        self.denials[by as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP abhiapi_requests_total Requests answered, by route, price rule and status.\n# TYPE abhiapi_requests_total counter\n");
        let mut rows: Vec<_> = self
            .requests
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((route, model, status), n) in rows {
            let model = escape(model.as_deref().unwrap_or(""));
            let _ = writeln!(
                out,
                "abhiapi_requests_total{{route=\"{route}\",model=\"{model}\",status=\"{status}\"}} {n}"
            );
        }
        self.upstream_latency.render(
            &mut out,
            "abhiapi_upstream_latency_seconds",
            "Time from sending to fal to fal's response headers.",
        );
        self.added_latency.render(
            &mut out,
            "abhiapi_added_latency_seconds",
            "Time the proxy itself adds to a request (total minus upstream).",
        );
        self.ledger_flush.render(
            &mut out,
            "abhiapi_ledger_flush_seconds",
            "Time to commit one ledger batch to SQLite.",
        );
        let counters = [
            (
                "abhiapi_credits_charged_total",
                "counter",
                "Credits charged.",
                self.credits_charged.load(Ordering::Relaxed) as i64,
            ),
            (
                "abhiapi_credits_shortfall_total",
                "counter",
                "Credits charged beyond an account's balance (a model returned more than was held).",
                self.credits_shortfall.load(Ordering::Relaxed) as i64,
            ),
            (
                "abhiapi_holds_outstanding",
                "gauge",
                "Holds not yet settled (requests in flight and pending queue jobs).",
                self.holds_open.load(Ordering::Relaxed) as i64,
            ),
            (
                "abhiapi_credits_held",
                "gauge",
                "Credits held by unsettled holds.",
                gauges.credits_held,
            ),
            (
                "abhiapi_ledger_queue_depth",
                "gauge",
                "Ledger entries waiting for the writer.",
                gauges.ledger_queue_depth as i64,
            ),
            (
                "abhiapi_log_lines_dropped_total",
                "counter",
                "Log lines dropped because stderr did not keep up (the requests were not held up).",
                crate::log_output::dropped() as i64,
            ),
        ];
        for (name, kind, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let (pending, ended) = gauges.jobs_in_memory;
        let _ = writeln!(
            out,
            "# HELP abhiapi_jobs_in_memory Queue jobs held in memory, by state (ended ones beyond [queue] max_ended_jobs_in_memory are read from the store).\n# TYPE abhiapi_jobs_in_memory gauge\nabhiapi_jobs_in_memory{{state=\"pending\"}} {pending}\nabhiapi_jobs_in_memory{{state=\"ended\"}} {ended}"
        );
        if let Some(nano) = gauges.reconcile_unbilled_nano_usd {
            let _ = writeln!(
                out,
                "# HELP abhiapi_reconcile_unbilled_usd fal's cost of calls we did not charge, as the latest reconciliation found it.\n# TYPE abhiapi_reconcile_unbilled_usd gauge\nabhiapi_reconcile_unbilled_usd {}",
                crate::billing::decimal::format_scaled(u128::from(nano), 9)
            );
        }
        out.push_str("# HELP abhiapi_rate_limit_denials_total Requests refused with 429, by limit.\n# TYPE abhiapi_rate_limit_denials_total counter\n");
        for (scope, n) in ["key", "account", "poll", "key_creation"]
            .iter()
            .zip(&self.denials)
        {
            let _ = writeln!(
                out,
                "abhiapi_rate_limit_denials_total{{scope=\"{scope}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        let rule: Arc<str> = Arc::from("fal-ai/\"x\"");
        m.request("sync", Some(&rule), 200);
        m.request("sync", Some(&rule), 200);
        m.added_latency.observe(Duration::from_micros(200));
        m.added_latency.observe(Duration::from_millis(20));
        m.denied(Denial::Poll);
        let text = m.render(Gauges {
            credits_held: 7,
            ledger_queue_depth: 0,
            jobs_in_memory: (2, 3),
            reconcile_unbilled_nano_usd: Some(45_000_000),
        });
        assert!(
            text.contains(
                r#"abhiapi_requests_total{route="sync",model="fal-ai/\"x\"",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"abhiapi_added_latency_seconds_bucket{le="0.00025"} 1"#));
        assert!(text.contains(r#"abhiapi_added_latency_seconds_bucket{le="0.05"} 2"#));
        assert!(text.contains("abhiapi_added_latency_seconds_count 2"));
        assert!(text.contains("abhiapi_credits_held 7"));
        assert!(text.contains("abhiapi_reconcile_unbilled_usd 0.045"));
        assert!(text.contains(r#"abhiapi_rate_limit_denials_total{scope="poll"} 1"#));
    }
}
