//! Hot-path steps not covered by the billing and rate-limit benches, each
//! beside what it cannot avoid, measured in the same run:
//! - key lookup (shape check, SHA-256, map) vs the SHA-256 alone, in a
//!   registry of 100,000 keys;
//! - ledger enqueue (hold, journal line, queue; then release) vs one plain
//!   `write` of the same journal line to a file (what an append cost before
//!   the journal was mapped into memory);
//! - the request's log line in our layout vs tracing_subscriber's default
//!   one, the same text, into a sink;
//! - the ledger writer's commit of a batch of requests (each a hold and its
//!   charge) vs one transaction inserting the same number of bare rows, a
//!   text id and a number each.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abhiapi::billing::journal::HoldRecord;
use abhiapi::billing::journal::Journal;
use abhiapi::billing::ledger::Ledger;
use abhiapi::billing::pricing::Quote;
use abhiapi::billing::receipt::FalReceipt;
use abhiapi::keys::{secret, Registry};
use abhiapi::metrics::Metrics;
use abhiapi::store::ledger::{ChargeRecord, Outcome};
use abhiapi::store::sql::{Mode, Sql};
use abhiapi::store::writer::{self, StoreWriter, WriteOp};
use abhiapi::store::{self, snapshot};
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "common/keys.rs"]
mod keys;

const KEYS: usize = 100_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, key) = keys::populated(&dir.path().join("bench.db"), KEYS);
    let registry = Registry::from_snapshot(&snapshot::load(&mut conn).unwrap());

    let mut group = c.benchmark_group("key_lookup");
    group.bench_function("reference_sha256", |b| {
        b.iter(|| secret::hash(black_box(&key)))
    });
    group.bench_function("authenticate_100k_keys", |b| {
        b.iter(|| registry.authenticate(black_box(&key)).unwrap())
    });
    group.finish();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api_key = registry.authenticate(&key).unwrap();
    let journal = Arc::new(Journal::open(&dir.path().join("holds"), false).unwrap());
    let metrics = Arc::new(Metrics::default());
    let (writer, _thread) = StoreWriter::spawn(
        store::open(&abhiapi::config::StoreConfig::at(
            dir.path().join("bench.db"),
        ))
        .unwrap(),
        Arc::clone(&journal),
        Arc::clone(&metrics),
        None,
    );
    let ledger = Arc::new(Ledger::new(writer, journal, metrics, None));
    let quote = Quote {
        units_milli: 1000,
        credits: 28,
    };
    let line = "req_0123456789abcdef00000001\t1\t1\t28\t1700000000000\tfal-ai/flux/dev\n";
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("reference.log"))
        .unwrap();

    let mut group = c.benchmark_group("ledger");
    group.bench_function("reference_write_syscall", |b| {
        b.iter(|| file.write_all(black_box(line.as_bytes())).unwrap())
    });
    group.bench_function("reserve_and_release", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let id = format!("req_bench{i:016x}");
                    let r = ledger
                        .reserve(&api_key, "fal-ai/flux/dev", &id, quote)
                        .await
                        .unwrap();
                    r.release(Some(500));
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    // Let the writer drain before the temp dir goes.
    std::thread::sleep(Duration::from_millis(200));

    let mut group = c.benchmark_group("log_line");
    let request_line = || {
        let path = "/fal-ai/flux/dev";
        tracing::info!(
            method = %"POST",
            %path,
            status = 200u16,
            key_id = Some(42i64),
            upstream_ms = %"0.412",
            total_ms = %"0.520",
            request_id = %"req_0123456789abcdef00000001",
            "request"
        );
    };
    group.bench_function("reference_default_layout", |b| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || b.iter(request_line));
    });
    group.bench_function("our_layout", |b| {
        let subscriber = tracing_subscriber::fmt()
            .event_format(abhiapi::log_format::Line)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || b.iter(request_line));
    });
    group.finish();
}

/// Requests per batch: about what the writer gathers in its 20 ms under the
/// closed-loop load benchmark.
const BATCH_REQUESTS: usize = 512;

fn ledger_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (mut conn, _) = keys::populated(&dir.path().join("commit.db"), 1);
    conn.exec(
        "CREATE TABLE reference (id TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        &[],
    )
    .unwrap();
    let mut next = 0u64;
    let mut ids = move || {
        next += 1;
        format!("req_0123456789abcdef{next:08x}")
    };

    let mut group = c.benchmark_group("ledger_commit");
    group.bench_function("reference_bare_rows", |b| {
        b.iter_batched(
            || (0..BATCH_REQUESTS).map(|_| ids()).collect::<Vec<_>>(),
            |batch| {
                let mut tx = conn.transaction(Mode::Plain).unwrap();
                for id in &batch {
                    tx.exec(
                        "INSERT INTO reference (id, n) VALUES (?1, ?2)",
                        abhiapi::args![id, 28],
                    )
                    .unwrap();
                }
                tx.commit().unwrap();
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.bench_function("holds_and_charges", |b| {
        b.iter_batched(
            || {
                (0..BATCH_REQUESTS)
                    .flat_map(|_| {
                        let id = ids();
                        let hold = HoldRecord {
                            id: id.clone(),
                            account_id: 1,
                            key_id: 1,
                            credits: 28,
                            created_at_ms: 1_700_000_000_000,
                            model: "fal-ai/flux/dev".into(),
                        };
                        let fal_id = format!("0b7c1d2e-3f40-4a5b-{}", &id[4..]);
                        let charge = ChargeRecord {
                            id,
                            account_id: 1,
                            key_id: 1,
                            model: "fal-ai/flux/dev".into(),
                            units_milli: 1000,
                            credits: 28,
                            held: 28,
                            shortfall: 0,
                            fal_status: Some(200),
                            outcome: Outcome::Charged,
                            started_at_ms: 1_700_000_000_000,
                            settled_at_ms: 1_700_000_000_001,
                            // As fal's answers give them: a UUID and the units billed.
                            fal: FalReceipt {
                                request_id: Some(fal_id),
                                units_milli: Some(1000),
                            },
                        };
                        [
                            WriteOp::Hold { hold, segment: 1 },
                            WriteOp::Settle {
                                charge,
                                segment: Some(1),
                                epoch: 0,
                            },
                        ]
                    })
                    .collect::<Vec<_>>()
            },
            |batch| writer::commit(&mut conn, &batch, None).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench, ledger_commit);
criterion_main!(benches);
