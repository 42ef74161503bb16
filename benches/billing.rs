//! The billing steps on the hot path, each beside a reference measured in
//! the same run, so that the ratio (not the machine) is what we read:
//! - splice vs a plain copy of the same body (what any buffering proxy pays);
//! - estimate (parse the request, read its facts, price them) vs the bare
//!   simd-json parse that validation costs anyway.
//!
//! `cargo bench --bench billing`

use std::hint::black_box;

use abhiapi::billing::facts::RequestFacts;
use abhiapi::billing::json;
use abhiapi::billing::pricing::PriceTable;
use abhiapi::billing::splice::{splice, Billing};
use abhiapi::config::Config;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// A fal-shaped answer of about `size` bytes (images plus padding in `prompt`).
fn fal_answer(size: usize) -> Vec<u8> {
    let head = r#"{"images":[{"url":"https://v3.fal.media/files/mock/0.jpg","width":1024,"height":1024,"content_type":"image/jpeg"}],"timings":{"inference":0.42},"seed":42,"has_nsfw_concepts":[false],"prompt":""#;
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "a".repeat(pad)).into_bytes()
}

fn bench_splice(c: &mut Criterion) {
    let mut group = c.benchmark_group("splice");
    let billing = Billing {
        model: "fal-ai/flux/dev",
        credits_used: 28,
        cost_usd: "0.028".into(),
        balance_remaining: 4972,
    };
    for size in [1024, 256 * 1024] {
        let body = fal_answer(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("reference_copy", size),
            &body,
            |b, body| b.iter(|| Bytes::copy_from_slice(black_box(body))),
        );
        group.bench_with_input(BenchmarkId::new("splice", size), &body, |b, body| {
            b.iter(|| splice(black_box(body), black_box(&billing)).unwrap())
        });
    }
    group.finish();
}

fn bench_estimate(c: &mut Criterion) {
    let config = Config::parse(abhiapi::config::EMBEDDED_DEFAULT).unwrap();
    let prices = PriceTable::new(&config.billing, &config.pricing, &[]).unwrap();
    let request = br#"{"prompt":"a red fox in the snow, golden hour, 35mm","image_size":{"width":1536,"height":1024},"num_images":2,"guidance_scale":3.5,"num_inference_steps":28,"enable_safety_checker":true}"#;
    let mut group = c.benchmark_group("estimate");
    group.bench_function("reference_parse_only", |b| {
        b.iter(|| {
            let mut copy = black_box(&request[..]).to_vec();
            simd_json::to_borrowed_value(&mut copy).map(drop).unwrap()
        })
    });
    group.bench_function("parse_facts_and_price", |b| {
        b.iter(|| {
            let facts = json::read(black_box(&request[..]), RequestFacts::read)
                .unwrap()
                .unwrap();
            let tariff = prices.tariff(black_box("fal-ai/flux/dev")).unwrap();
            tariff.estimate(&facts)
        })
    });
    group.bench_function("rule_lookup_prefix", |b| {
        b.iter(|| {
            prices
                .rule(black_box("fal-ai/kling-video/v2/master/text-to-video"))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_splice, bench_estimate);
criterion_main!(benches);
