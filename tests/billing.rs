//! Money: `_billing` figures worked out by hand, holds that never overdraw,
//! no charge for fal's failures, and a ledger that survives SIGTERM and SIGKILL.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use simd_json::prelude::*;
use support::*;

fn flux_body(size: &str, n: u64) -> String {
    format!(r#"{{"prompt":"a fox","image_size":{size},"num_images":{n}}}"#)
}

/// What fal itself answers for the same request, straight from the mock.
async fn direct(mock: &MockFal, path: &str, json: &str) -> bytes::Bytes {
    let resp = client()
        .request(post(
            &format!("{}{path}", mock.url(false)),
            None,
            "application/json",
            json.to_owned(),
        ))
        .await
        .unwrap();
    body(resp).await
}

/// Balance, held credits and the sum of charges for `account`, from SQLite.
fn ledger_of(server: &Server, account: &str) -> (i64, i64, i64) {
    let db = server.db();
    db.query_row(
        "SELECT a.balance,
                (SELECT COALESCE(SUM(credits), 0) FROM holds WHERE account_id = a.id),
                (SELECT COALESCE(SUM(credits), 0) FROM charges WHERE account_id = a.id)
         FROM accounts a WHERE name = ?1",
        [account],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

/// Waits until the writer has flushed: no holds left and the balance as expected.
async fn settles_to(server: &Server, account: &str, balance: i64) -> bool {
    eventually(Duration::from_secs(5), || async {
        let (b, held, _) = ledger_of(server, account);
        b == balance && held == 0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_figures_match_hand_worked_prices() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 10_000);
    // (path, request, credits worked out by hand at a 10% margin, 1 credit = $0.001)
    let cases = [
        // Two 1025×1024 images: each rounds up to 2 MP. 4 MP × $0.025 × 1.1 = $0.11.
        (
            "/fal-ai/flux/dev",
            flux_body(r#"{"width":1025,"height":1024}"#, 2),
            110,
            "0.11",
        ),
        // One 1024×1024 image: 1 MP × $0.025 × 1.1 = $0.0275, rounded up to 28 credits.
        (
            "/fal-ai/flux/dev",
            flux_body(r#""square_hd""#, 1),
            28,
            "0.028",
        ),
        // 1024×768 is also 1 MP (fal's rule), three of them: 3 × 27.5 = 82.5 → 83.
        (
            "/fal-ai/flux/dev",
            flux_body(r#""landscape_4_3""#, 3),
            83,
            "0.083",
        ),
        // 10 s of Kling v2 at $0.07/s × 1.1 = $0.77.
        (
            "/fal-ai/kling-video/v2/master/text-to-video",
            r#"{"prompt":"waves","duration":"10"}"#.into(),
            770,
            "0.77",
        ),
        // No duration: the rule's default 5 s, $0.385.
        (
            "/fal-ai/kling-video/v2/master/text-to-video",
            r#"{"prompt":"waves"}"#.into(),
            385,
            "0.385",
        ),
        // Upscale: $0.05 per request × 1.1 = $0.055.
        (
            "/fal-ai/creative-upscaler",
            r#"{"image_url":"https://x/y.png"}"#.into(),
            55,
            "0.055",
        ),
    ];
    let mut balance = 10_000i64;
    for (path, req, credits, usd) in &cases {
        let resp = call(&server, &key, path, req).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["x-billing-credits-used"],
            credits.to_string()
        );
        let bytes = body(resp).await;
        let (original, billing) = unsplice(&bytes);
        // Every byte besides the splice is fal's.
        assert_eq!(original, direct(&mock, path, req).await.as_ref(), "{path}");
        balance -= credits;
        assert_eq!(billing.get_str("model"), Some(&path[1..]));
        assert_eq!(
            billing.get_u64("credits_used"),
            Some(*credits as u64),
            "{path} {req}"
        );
        assert_eq!(billing.get_i64("balance_remaining"), Some(balance));
        // cost_usd is a JSON number with exactly the digits of credits × $0.001.
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(text.contains(&format!("\"cost_usd\":{usd},")), "{text}");
    }
    assert!(
        settles_to(&server, "acme", balance).await,
        "ledger never reached {balance}"
    );
    let (_, _, charged) = ledger_of(&server, "acme");
    assert_eq!(charged, 10_000 - balance);

    let shown = String::from_utf8(server.cli(&["accounts", "show", "acme"]).stdout).unwrap();
    assert!(
        shown.contains(&format!("available {balance} credits")),
        "{shown}"
    );
    let usage = server.cli(&["usage", "acme", "--json"]);
    let report = json(&usage.stdout);
    assert_eq!(
        report.get_u64("total_credits"),
        Some((10_000 - balance) as u64)
    );
    let models = report.get_array("models").unwrap();
    let flux = models
        .iter()
        .find(|m| m.get_str("model") == Some("fal-ai/flux/dev"))
        .unwrap();
    assert_eq!(
        (flux.get_u64("requests"), flux.get_u64("credits")),
        (Some(3), Some(221))
    );
    assert_eq!(report.get_array("charges").unwrap().len(), cases.len());
    let text = String::from_utf8(
        server
            .cli(&["usage", "acme", "--since", "2000-01-01"])
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains("fal-ai/kling-video/v2/master/text-to-video") && text.contains("1155"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_credits_are_refused_before_fal_is_contacted() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 20);
    let resp = call(
        &server,
        &key,
        "/fal-ai/flux/dev",
        &flux_body(r#""square_hd""#, 1),
    )
    .await;
    let detail = assert_error(resp, 402, "insufficient_credits").await;
    assert!(detail.contains("28") && detail.contains("20"), "{detail}");
    assert!(
        mock.seen().is_empty(),
        "fal was called without a covering hold"
    );

    // A path no rule prices is refused too, when there is no catch-all.
    let mut opts = Options::new(mock.url(false));
    opts.pricing =
        "[[pricing]]\nmodel = \"fal-ai/flux/dev\"\nunit = \"megapixel\"\nusd = 0.025\n".into();
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = call(&server, &key, "/fal-ai/unknown-model", "{}").await;
    let detail = assert_error(resp, 404, "model_not_priced").await;
    assert!(detail.contains("fal-ai/unknown-model"), "{detail}");
    assert!(mock.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_overdraw_an_account() {
    let mock = MockFal::start(None).await.unwrap();
    // Each request costs 385 credits (5 s of Kling at $0.077/s); the account affords exactly 37.
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 37 * 385);
    let client = client();
    let url = server.url("/fal-ai/kling-video/v2/master/text-to-video");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            tokio::spawn(async move {
                let resp = client
                    .request(post(
                        &url,
                        Some(&key),
                        "application/json",
                        r#"{"prompt":"x"}"#,
                    ))
                    .await
                    .unwrap();
                resp.status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 37);
    assert_eq!(statuses.iter().filter(|&&s| s == 402).count(), 163);
    assert_eq!(mock.seen().len(), 37);
    assert!(
        settles_to(&server, "acme", 0).await,
        "balance did not end at exactly 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_failures_cost_nothing_and_a_departed_client_pays_for_work_done() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.timeout_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = call(&server, &key, "/mock/status/422", "{}").await;
    assert_eq!(resp.headers()["x-billing-credits-used"], "0");
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(
        (
            billing.get_u64("credits_used"),
            billing.get_i64("balance_remaining")
        ),
        (Some(0), Some(1000))
    );
    assert_eq!(
        call(&server, &key, "/mock/status/500", "{}").await.status(),
        502
    );
    assert_eq!(
        call(&server, &key, "/mock/status/503", "{}").await.status(),
        502
    );
    assert_eq!(call(&server, &key, "/mock/hang", "{}").await.status(), 504);

    // A client that leaves before fal answers: fal's call runs on to its
    // answer, and the work fal did is charged (2 credits, the catch-all rule).
    let url = server.url("/mock/slow/800");
    let k = key.clone();
    let leaving = tokio::spawn(async move {
        client()
            .request(post(&url, Some(&k), "application/json", "{}"))
            .await
    });
    let seen_before = mock.seen().len();
    assert!(
        eventually(Duration::from_secs(5), || async {
            mock.seen().len() > seen_before
        })
        .await
    );
    leaving.abort();

    assert!(
        settles_to(&server, "acme", 998).await,
        "failed requests were charged, or the departed client's served one was not"
    );
    let db = server.db();
    let outcomes = |outcome: &str| -> (i64, i64) {
        db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(credits), 0) FROM charges WHERE outcome = ?1",
            [outcome],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(outcomes("released"), (4, 0));
    assert_eq!(outcomes("charged"), (1, 2));
}

/// fal's answer that goes silent mid-body (its app hung after the
/// headers): the call ends once fal has sent nothing for `timeout_secs`,
/// and costs nothing, instead of holding the client and its credits for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_stalls_mid_body_ends_after_the_timeout_and_costs_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.timeout_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        call(&server, &key, "/mock/stalled", "{}"),
    )
    .await
    .expect("the stalled answer was waited on for ever");
    assert_error(resp, 502, "upstream_unreachable").await;
    assert!(
        settles_to(&server, "acme", 1000).await,
        "the stalled call was charged, or its hold was kept"
    );
}

/// One answer a load worker received whole.
struct Answer {
    status: u16,
    request_id: String,
    credits_used: i64,
}

/// `workers` tasks sending a 1 MP flux request in a loop until `stop` is set
/// or the server goes away; each returns the answers it received.
fn load(
    server: &Server,
    key: &str,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    let client = client();
    let url = server.url("/fal-ai/flux/dev");
    (0..workers)
        .map(|_| {
            let (client, url, key, stop) =
                (client.clone(), url.clone(), key.to_owned(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let req = post(
                        &url,
                        Some(&key),
                        "application/json",
                        flux_body(r#""square_hd""#, 1),
                    );
                    let Ok(resp) = client.request(req).await else {
                        break; // the server died under us
                    };
                    let header = |name| {
                        resp.headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_owned())
                    };
                    let request_id = header("x-request-id").unwrap();
                    let credits_used =
                        header("x-billing-credits-used").map_or(0, |v| v.parse().unwrap());
                    let status = resp.status().as_u16();
                    if resp.into_body().collect().await.is_ok() {
                        answers.push(Answer {
                            status,
                            request_id,
                            credits_used,
                        });
                    }
                }
                answers
            })
        })
        .collect()
}

async fn answers(workers: Vec<tokio::task::JoinHandle<Vec<Answer>>>) -> Vec<Answer> {
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_ups_during_load_and_sigterm_lose_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&server, &key, 6, &stop);
    // Top-ups land while requests are being charged: neither overwrites the other.
    for _ in 0..5 {
        let out = server.cli(&["accounts", "topup", "acme", "--credits", "1000"]);
        assert!(out.status.success());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two refresh intervals for the last top-up to reach the server and be spent.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = answers(workers).await;
    // The account runs dry between top-ups: 402s, never anything else.
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 402));
    let spent: i64 = answers.iter().map(|a| a.credits_used).sum();
    assert!(
        spent > 1_000,
        "load too light to overlap the top-ups ({spent})"
    );

    server.signal("TERM");
    let (status, server) = server.exited().await;
    assert!(status.success());
    // Stopped: everything is on disk, nothing held, the journal is gone.
    let (balance, held, charged) = ledger_of(&server, "acme");
    assert_eq!(held, 0);
    assert_eq!(charged, spent);
    assert_eq!(balance, 1_000 + 5 * 1_000 - spent);
    let journal = server.dir.path().join("abhiapi.db.holds");
    assert_eq!(
        std::fs::read_dir(journal).unwrap().count(),
        0,
        "journal left after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_never_loses_or_doubles_a_charge() {
    const COST: i64 = 28; // 1 MP of flux/dev: the hold and the actual charge are equal
    const WORKERS: usize = 8;
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000_000);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&server, &key, WORKERS, &stop);
    // One request fal is still working on when the process dies: its hold
    // (2 credits, the catch-all price) exists only in the journal and memory.
    let slow_url = server.url("/mock/slow/60000");
    let slow_key = key.clone();
    let slow = tokio::spawn(async move {
        client()
            .request(post(&slow_url, Some(&slow_key), "application/json", "{}"))
            .await
    });
    let fal_has_it = || mock.seen().iter().any(|s| s.target == "/mock/slow/60000");
    assert!(eventually(Duration::from_secs(10), || async { fal_has_it() }).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            mock.seen().len() >= 200
        })
        .await
    );
    server.signal("KILL");
    stop.store(true, Ordering::SeqCst);
    let answered: Vec<Answer> = answers(workers)
        .await
        .into_iter()
        .filter(|a| a.status == 200)
        .collect();
    let (_, mut server) = server.exited().await;
    slow.abort();
    let served = mock
        .seen()
        .iter()
        .filter(|s| s.target == "/fal-ai/flux/dev")
        .count() as i64;

    // Restart: recovery settles whatever the killed process left.
    server.restart();
    let (balance, held, charged) = ledger_of(&server, "acme");
    assert_eq!(held, 0, "holds left after recovery");
    assert_eq!(balance, 1_000_000 - charged, "balance and charges disagree");
    let db = server.db();
    let count = |sql: &str| -> i64 { db.query_row(sql, [COST], |r| r.get(0)).unwrap() };
    let charged_requests =
        count("SELECT COUNT(*) FROM charges WHERE credits = ?1 AND model = 'fal-ai/flux/dev'");
    // The request fal was serving at the kill is charged once, at its hold, by recovery.
    let slow: Vec<(i64, String)> = db
        .prepare("SELECT credits, outcome FROM charges WHERE model = 'mock/slow/60000'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        slow,
        [(2, "recovered".to_owned())],
        "the in-flight request was not recovered"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM charges WHERE credits NOT IN (0, ?1) AND model = 'fal-ai/flux/dev'"),
        0,
        "a charge other than the exact cost"
    );
    // Every request fal served is charged (none free); at most one per worker
    // was held but never reached fal, and is charged its hold.
    assert!(
        charged_requests >= served,
        "{charged_requests} charged, {served} served by fal"
    );
    assert!(
        charged_requests <= served + WORKERS as i64,
        "{charged_requests} charged, {served} served"
    );
    // Every answer a client received is charged exactly once, at its price (ids are primary keys).
    for a in &answered {
        let credits: i64 = db
            .query_row(
                "SELECT credits FROM charges WHERE id = ?1",
                [&a.request_id],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("answered request {} was never charged: {e}", a.request_id));
        assert_eq!((credits, a.credits_used), (COST, COST));
    }
    drop(db);
    // And the restarted server carries on from the recovered balance.
    let resp = call(
        &server,
        &key,
        "/fal-ai/flux/dev",
        &flux_body(r#""square_hd""#, 1),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_i64("balance_remaining"), Some(balance - COST));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_over_the_buffer_limit_stream_unchanged_and_are_charged_all_the_same() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = TEST_PRICING.replace(
        "margin = 0.10",
        "margin = 0.10\nmax_json_response_bytes = 4096",
    );
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let small = r#"{"a":1}"#.to_owned();
    let large = format!(r#"{{"data":"{}"}}"#, "x".repeat(20_000));
    for (sent, spliced) in [(small, true), (large, false)] {
        let resp = call(&server, &key, "/mock/echo", &sent).await;
        assert_eq!(resp.status(), 200);
        // A large answer is priced once it has passed: its headers cannot say.
        let figures = resp.headers().get("x-billing-credits-used").cloned();
        assert_eq!(figures, spliced.then(|| http::HeaderValue::from(2)));
        let got = body(resp).await;
        if spliced {
            assert_eq!(unsplice(&got).0, sent.as_bytes());
        } else {
            assert_eq!(got.as_ref(), sent.as_bytes(), "a large answer was altered");
        }
    }
    assert!(settles_to(&server, "acme", 996).await);
}

/// The tests' prices with a 4 KiB answer buffer, and an upscaler priced per
/// megapixel: the mock's upscaler returns one 2048×2048 image (4 MP) however
/// little was held for it.
fn large_answer_pricing() -> String {
    format!(
        "{}\n[[pricing]]\nmodel = \"fal-ai/some-upscaler\"\nunit = \"megapixel\"\nusd = 0.025\n",
        TEST_PRICING.replace(
            "margin = 0.10",
            "margin = 0.10\nmax_json_response_bytes = 4096",
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_streams_unchanged_and_is_charged_what_it_returned() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = large_answer_pricing();
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    // Two square_hd images: 2 MP × $0.025 × 1.1 = 55 credits, each padded
    // the way sync_mode's base64 images are, about 200 kB in all.
    let input =
        r#"{"prompt":"a fox","image_size":"square_hd","num_images":2,"mock_result_bytes":200000}"#;
    // An upscaler, held at fal's default 1 MP (28 credits), returns one
    // 2048×2048 image: 4 MP, 110 credits, however large its answer is made.
    let upscale = r#"{"mock_result_bytes":300000}"#;
    for (path, input, cost, balance) in [
        ("/fal-ai/flux/dev", input, 55, 945),
        ("/fal-ai/some-upscaler", upscale, 110, 835),
    ] {
        let resp = call(&server, &key, path, input).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("x-billing-credits-used").is_none());
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let got = body(resp).await;
        let sent = direct(&mock, path, input).await;
        assert!(sent.len() > 190_000, "{}", sent.len());
        assert!(got == sent, "a large answer was altered");
        assert!(settles_to(&server, "acme", balance).await, "{path}");
        let charged: i64 = server
            .db()
            .query_row("SELECT credits FROM charges WHERE id = ?1", [&id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(charged, cost, "{path}");
    }
    assert!(books_close(&server, &[("acme", 55 + 110)]).await);
}

/// A client that reads the head of a large answer and then stops reading:
/// the answer is still read through from fal (the client's stream ends
/// short once it has not taken a chunk for `timeout_secs`) and charged
/// what it returned, and SIGTERM does not wait on the stalled client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_answer_still_pays_what_it_returned() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = large_answer_pricing();
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(server.plain).await.unwrap();
    let input = r#"{"mock_result_bytes":40000000}"#;
    let req = format!(
        "POST /fal-ai/some-upscaler HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{input}",
        input.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // 2048×2048 returned: 4 MP × $0.025 × 1.1 = 110 credits, not the 28 held.
    let stalled_for = Duration::from_secs(5 + 10);
    assert!(
        eventually(stalled_for, || async {
            ledger_of(&server, "acme") == (890, 0, 110)
        })
        .await,
        "{:?}",
        ledger_of(&server, "acme")
    );
    let asked = std::time::Instant::now();
    server.signal("TERM");
    let (_, server) = server.exited().await;
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    drop(stream);
    assert!(books_close(&server, &[("acme", 110)]).await);
}
