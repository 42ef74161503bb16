//! The rate-limit decision, alone and contended from every core, beside the
//! cheapest shared write there is (an atomic `fetch_add`) measured the same
//! way in the same run: the ratio is the cost of GCRA's compare-exchange loop.
//!
//! `cargo bench --bench ratelimit`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use abhiapi::ratelimit::Gcra;
use criterion::{criterion_group, criterion_main, Criterion};

/// A limit no bench run can exhaust, so every decision takes the allow path
/// (the one that writes; a denial only reads).
fn limit() -> Gcra {
    Gcra::per_minute(u64::MAX / 2, u64::MAX / 4)
}

/// Runs `op` `iters` times on each of `threads` threads at once; the time is
/// the slowest thread's, per operation of one thread.
fn contended(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn bench(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let now = 1_000_000_000u64;
    let mut group = c.benchmark_group("ratelimit");

    let counter = AtomicU64::new(0);
    group.bench_function("reference_fetch_add/1_thread", |b| {
        b.iter(|| counter.fetch_add(1, Ordering::AcqRel))
    });
    let (gcra, tat) = (limit(), AtomicU64::new(0));
    group.bench_function("gcra_decision/1_thread", |b| {
        b.iter(|| gcra.check(black_box(&tat), black_box(now)))
    });

    let name = format!("reference_fetch_add/{cores}_threads");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            contended(cores, iters, || {
                counter.fetch_add(1, Ordering::AcqRel);
            })
        })
    });
    let name = format!("gcra_decision/{cores}_threads");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            contended(cores, iters, || {
                black_box(gcra.check(&tat, now));
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
