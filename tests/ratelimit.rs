//! Rate limits through the server: 30 a minute per key on the free plan,
//! exact under concurrency, capped per account, refilled by the clock.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abhiapi::clock::{Clock, ManualClock};
use abhiapi::config::Config;
use support::*;

const FREE_30: &str =
    "[plans.free]\nrequests_per_minute = 30\n[plans.pro]\nrequests_per_minute = 600\n";

fn with_plans(mock: &MockFal, plans: &str) -> Options {
    let mut opts = Options::new(mock.url(false));
    opts.plans = plans.to_owned();
    opts
}

async fn echo(server_url: &str, key: &str) -> http::Response<hyper::body::Incoming> {
    client()
        .request(post(
            &format!("{server_url}/mock/echo"),
            Some(key),
            "application/json",
            "{}",
        ))
        .await
        .unwrap()
}

fn header(resp: &http::Response<hyper::body::Incoming>, name: &str) -> String {
    resp.headers()[name].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_31st_request_gets_429_and_another_key_is_unaffected() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, with_plans(&mock, FREE_30).render(dir.path())).unwrap();
    let key = create_key(&config, "acme", 10_000);
    let other = create_key(&config, "acme", 0);
    let server = Server::start_config(dir, config);
    let base = server.url("");

    for i in 0..30u64 {
        let resp = echo(&base, &key).await;
        assert_eq!(resp.status(), 200, "request {}", i + 1);
        assert_eq!(header(&resp, "x-ratelimit-limit"), "30");
        assert_eq!(header(&resp, "x-ratelimit-remaining"), (29 - i).to_string());
        body(resp).await;
    }
    let resp = echo(&base, &key).await;
    assert_eq!(header(&resp, "retry-after"), "2");
    assert_eq!(header(&resp, "x-ratelimit-limit"), "30");
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&resp, "x-ratelimit-reset"), "60");
    assert_error(resp, 429, "rate_limited").await;

    let resp = echo(&base, &other).await;
    assert_eq!(
        resp.status(),
        200,
        "another key of the same account was limited"
    );
    assert_eq!(header(&resp, "x-ratelimit-remaining"), "29");
    body(resp).await;

    // The 429 never reached fal and held nothing: 31 requests served, 31 charged.
    assert_eq!(mock.seen().len(), 31);
    let charges: i64 = eventually_value(&server, "SELECT COUNT(*) FROM charges", 31).await;
    assert_eq!(charges, 31);
}

/// Polls a count in the server's database until it reaches `want` (or 5 s pass).
async fn eventually_value(server: &Server, sql: &str, want: i64) -> i64 {
    let mut last = -1;
    eventually(Duration::from_secs(5), || {
        last = server.db().query_row(sql, [], |r| r.get(0)).unwrap();
        async move { last == want }
    })
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrent_burst_on_a_fresh_key_admits_exactly_burst() {
    let mock = MockFal::start(None).await.unwrap();
    let plans = "[plans.free]\nrequests_per_minute = 30\nburst = 12\n";
    let (server, key) = Server::start_with_key(with_plans(&mock, plans), "acme", 10_000);
    let base = server.url("");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (base, key) = (base.clone(), key.clone());
            tokio::spawn(async move { echo(&base, &key).await.status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 12);
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 88);
    assert_eq!(mock.seen().len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_cap_holds_across_its_keys() {
    let mock = MockFal::start(None).await.unwrap();
    let plans = "[plans.free]\nrequests_per_minute = 30\naccount_requests_per_minute = 10\n";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, with_plans(&mock, plans).render(dir.path())).unwrap();
    let keys: Vec<String> = (0..3)
        .map(|_| create_key(&config, "acme", 10_000))
        .collect();
    let elsewhere = create_key(&config, "other", 10_000);
    let server = Server::start_config(dir, config);
    let base = server.url("");
    let mut passed = 0;
    for round in 0..12 {
        for key in &keys {
            let resp = echo(&base, key).await;
            match resp.status().as_u16() {
                200 => passed += 1,
                429 => {
                    assert_error(resp, 429, "account_rate_limited").await;
                    continue;
                }
                s => panic!("round {round}: {s}"),
            }
            body(resp).await;
        }
    }
    assert_eq!(passed, 10, "three keys together got past the account cap");
    // Another account has its own cap.
    assert_eq!(echo(&base, &elsewhere).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_upgrade_applies_within_a_second() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(with_plans(&mock, FREE_30), "acme", 10_000);
    let base = server.url("");
    for _ in 0..30 {
        assert_eq!(echo(&base, &key).await.status(), 200);
    }
    assert_eq!(echo(&base, &key).await.status(), 429);
    let out = server.cli(&["accounts", "plan", "acme", "pro"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = server.cli(&["accounts", "plan", "acme", "platinum"]);
    assert!(!refused.status.success(), "an unknown plan was accepted");
    let upgraded = eventually(Duration::from_secs(1), || async {
        let resp = echo(&base, &key).await;
        resp.status() == 200 && header(&resp, "x-ratelimit-limit") == "600"
    })
    .await;
    assert!(upgraded, "plan upgrade not applied within 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowance_refills_with_the_clock_not_with_sleep() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, with_plans(&mock, FREE_30).render(dir.path())).unwrap();
    let key = create_key(&config_path, "acme", 10_000);

    // The real server, in this process, on a real socket, with a clock we move.
    let clock = Arc::new(ManualClock::default());
    clock.advance(Duration::from_secs(3600));
    let config = Config::load(Some(&config_path)).unwrap();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn({
        let clock: Arc<dyn Clock> = clock.clone();
        async move {
            abhiapi::app::serve(
                config,
                Some(config_path),
                FAL_KEY,
                clock,
                |bound| {
                    let _ = bound_tx.send(bound.plain.unwrap());
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });
    let base = format!("http://{}", bound_rx.await.unwrap());

    let passed = Arc::new(AtomicUsize::new(0));
    let send = |n: usize| {
        let (base, key, passed) = (base.clone(), key.clone(), passed.clone());
        async move {
            for _ in 0..n {
                if echo(&base, &key).await.status() == 200 {
                    passed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    };
    send(35).await;
    assert_eq!(passed.load(Ordering::SeqCst), 30);
    clock.advance(Duration::from_millis(1999));
    send(3).await;
    assert_eq!(passed.load(Ordering::SeqCst), 30, "refilled before 2 s");
    clock.advance(Duration::from_millis(1));
    send(3).await;
    assert_eq!(
        passed.load(Ordering::SeqCst),
        31,
        "exactly one more after 2 s"
    );
    clock.advance(Duration::from_secs(60));
    send(40).await;
    assert_eq!(
        passed.load(Ordering::SeqCst),
        61,
        "a minute's pause brings back the whole burst"
    );

    stop_tx.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
