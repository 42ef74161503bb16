//! Start-up: the time and memory to hydrate the key map from SQLite, as
//! `serve` does (read the snapshot, build the registry). Memory is the
//! process's resident set after hydration minus before it, with the
//! snapshot's rows already freed.
//!
//! `cargo bench --bench hydrate` (1,000,000 keys); under `cargo test` a
//! 1,000-key run checks that it works.

use std::time::Instant;

use abhiapi::keys::Registry;
use abhiapi::store::{self, snapshot};

#[path = "common/keys.rs"]
mod keys;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let keys: usize = if full { 1_000_000 } else { 1_000 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hydrate.db");
    drop(keys::populated(&path, keys));

    let before = rss_bytes();
    let start = Instant::now();
    let mut conn = store::open(&abhiapi::config::StoreConfig::at(&path)).unwrap();
    let snap = snapshot::load(&mut conn).unwrap();
    let registry = Registry::from_snapshot(&snap);
    drop(snap);
    let took = start.elapsed();
    let after = rss_bytes();
    drop(conn);
    assert!(registry.account(1).is_some());
    let per_key = after.saturating_sub(before) as f64 / keys as f64;
    println!(
        "hydrate/{keys}_keys: {:.3} s, {:.1} MiB resident added, {per_key:.0} bytes per key",
        took.as_secs_f64(),
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
    );
}
