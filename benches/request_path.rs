//! The whole request path, in process: a client on an in-memory pipe to
//! the proxy — key check, rate limit, hold and its journal line, the mock
//! fal on an in-memory pipe of its own, the `_billing` splice, settlement,
//! and the ledger writer committing to SQLite on its thread — beside the
//! same client on a pipe straight to the mock, which is the HTTP work one
//! hop costs any proxy. No sockets: what is measured is our own code.
//!
//! `cargo bench --bench request_path`

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abhiapi::app::Core;
use abhiapi::clock::MonotonicClock;
use abhiapi::config::Config;
use abhiapi::mock_fal::MockFal;
use abhiapi::proxy::{Conn, Proxy};
use abhiapi::store::{self, admin};
use abhiapi::upstream::{ServeInMemory, Upstream};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::runtime::Runtime;

/// The proxy served on each new pipe, as `server` serves it on a socket.
fn serve_proxy(proxy: Arc<Proxy>) -> ServeInMemory {
    Arc::new(move |pipe| {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move {
                    Ok::<_, Infallible>(
                        proxy
                            .handle(
                                req,
                                Conn {
                                    tls: false,
                                    peer: std::net::Ipv4Addr::LOCALHOST.into(),
                                },
                            )
                            .await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(pipe), service)
                .await;
        });
    })
}

/// An HTTP/1.1 client connection to whatever `serve` serves.
async fn connect(serve: &ServeInMemory) -> SendRequest<Full<Bytes>> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    serve(theirs);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One flux request, answered in full; the status and body length.
async fn call(send: &mut SendRequest<Full<Bytes>>, key: Option<&str>) -> (u16, usize) {
    let mut req = Request::post("/mock/canned")
        .header("host", "bench")
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            req.body(Full::new(Bytes::from_static(common::FLUX.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body().collect().await.unwrap().to_bytes().len(),
    )
}

/// `iters` requests one after another on one connection.
fn timed(runtime: &Runtime, serve: &ServeInMemory, key: Option<&str>, iters: u64) -> Duration {
    runtime.block_on(async {
        let mut send = connect(serve).await;
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(call(&mut send, key).await);
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    // One thread, as one worker of the server: the time is the work, not
    // wake-ups passed between threads. The ledger writer keeps its own thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mock = runtime.block_on(MockFal::start(None)).unwrap();
    let config = Config::parse(&common::config_toml(&mock, &dir.path().join("bench.db"))).unwrap();
    let mut conn = store::open(&config.store).unwrap();
    let key = admin::create_key(
        &mut conn,
        "bench",
        1_000_000_000_000,
        "free",
        admin::KeyOrigin::operator(&config),
    )
    .unwrap()
    .secret;
    let upstream = Upstream::in_memory(&config.upstream, "bench:bench", mock.in_memory()).unwrap();
    let core = {
        let _entered = runtime.enter();
        Core::start(
            &config,
            upstream,
            Arc::new(MonotonicClock::new()),
            "http://127.0.0.1".into(),
        )
        .unwrap()
    };
    let through_proxy = serve_proxy(Arc::clone(&core.proxy));
    let direct = mock.in_memory();

    // Both paths answer, and the proxy's answer is the mock's plus `_billing`.
    let (proxied, direct_answer) = runtime.block_on(async {
        let p = call(&mut connect(&through_proxy).await, Some(&key)).await;
        let d = call(&mut connect(&direct).await, None).await;
        (p, d)
    });
    assert_eq!((proxied.0, direct_answer.0), (200, 200));
    assert!(proxied.1 > direct_answer.1, "no _billing spliced in");

    let mut group = c.benchmark_group("request_path");
    group.bench_function("reference_direct_to_mock", |b| {
        b.iter_custom(|iters| timed(&runtime, &direct, None, iters))
    });
    group.bench_function("through_proxy", |b| {
        b.iter_custom(|iters| timed(&runtime, &through_proxy, Some(&key), iters))
    });
    group.finish();
    runtime
        .block_on(core.stop(true, std::time::Duration::from_secs(10)))
        .unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
