//! fal's queue through the proxy, against the mock's queue: URLs that lead
//! back to us, jobs private to their account, charged once, released when
//! they fail or are cancelled, settled even when nobody fetches them.

mod support;

use std::time::Duration;

use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use simd_json::prelude::*;
use support::*;

const FLUX: &str = r#"{"prompt":"a fox","image_size":"square_hd"}"#;
const COST: i64 = 28; // 1 MP of flux/dev at $0.025 × 1.1

async fn send(
    method: Method,
    url: &str,
    key: &str,
    body: &str,
) -> http::Response<hyper::body::Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    client().request(req).await.unwrap()
}

async fn get_json(url: &str, key: &str) -> (u16, simd_json::OwnedValue) {
    let resp = send(Method::GET, url, key, "").await;
    let status = resp.status().as_u16();
    (status, json(&body(resp).await))
}

/// Submits a flux job; returns the submit answer.
async fn submit(server: &Server, key: &str, query: &str) -> simd_json::OwnedValue {
    let resp = send(
        Method::POST,
        &server.url(&format!("/queue/fal-ai/flux/dev{query}")),
        key,
        FLUX,
    )
    .await;
    assert_eq!(resp.status(), 200);
    json(&body(resp).await)
}

fn str_of<'v>(v: &'v simd_json::OwnedValue, field: &str) -> &'v str {
    v.get_str(field)
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// Balance, held credits, and the charge (credits, outcome) of a job from
/// SQLite; `(-1, -1, None)` while the job is not written yet.
fn job_ledger(server: &Server, request_id: &str) -> (i64, i64, Option<(i64, String)>) {
    let db = server.db();
    let Ok((balance, held)) = db.query_row(
        "SELECT a.balance, (SELECT COALESCE(SUM(credits), 0) FROM holds WHERE account_id = a.id)
             FROM accounts a JOIN jobs j ON j.account_id = a.id WHERE j.request_id = ?1",
        [request_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ) else {
        return (-1, -1, None);
    };
    let charge = db
        .query_row(
            "SELECT c.credits, c.outcome FROM charges c JOIN jobs j ON j.hold_id = c.id WHERE j.request_id = ?1",
            [request_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok();
    (balance, held, charge)
}

/// Polls the job's status `times` times; the last status fal gave.
async fn poll_status(job: &simd_json::OwnedValue, key: &str, times: usize) -> String {
    let mut last = String::new();
    for _ in 0..times {
        let (_, status) = get_json(str_of(job, "status_url"), key).await;
        last = str_of(&status, "status").to_owned();
    }
    last
}

/// The job still holds its cost after the writer has had time to flush
/// anything that would have settled it.
async fn still_held(server: &Server, request_id: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job_ledger(server, request_id), (1000, COST, None));
}

async fn ledger_settles(
    server: &Server,
    request_id: &str,
    want: (i64, i64, Option<(i64, &str)>),
) -> bool {
    eventually(Duration::from_secs(10), || async {
        let (b, h, c) = job_ledger(server, request_id);
        (b, h, c.as_ref().map(|(n, o)| (*n, o.as_str()))) == want
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rewritten_urls_lead_to_the_result_charged_once() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let job = submit(&server, &key, "").await;
    let id = str_of(&job, "request_id").to_owned();
    let ours = server.url(&format!("/queue/fal-ai/flux/requests/{id}"));
    assert_eq!(str_of(&job, "response_url"), ours);
    assert_eq!(str_of(&job, "status_url"), format!("{ours}/status"));
    assert_eq!(str_of(&job, "cancel_url"), format!("{ours}/cancel"));
    // Held, not charged, while the job runs.
    assert!(ledger_settles(&server, &id, (1000, COST, None)).await);

    // Follow status_url as a client would, until the job is done.
    let status_url = format!("{}?logs=1", str_of(&job, "status_url"));
    let mut seen = Vec::new();
    loop {
        let (code, status) = get_json(&status_url, &key).await;
        let state = str_of(&status, "status").to_owned();
        assert_eq!(
            str_of(&status, "response_url"),
            ours,
            "status answer not rewritten"
        );
        seen.push((code, state.clone()));
        if state == "COMPLETED" {
            break;
        }
        assert!(seen.len() < 10, "{seen:?}");
    }
    let expected = [(202, "IN_QUEUE"), (202, "IN_PROGRESS"), (200, "COMPLETED")];
    assert_eq!(seen, expected.map(|(c, s)| (c, s.to_owned())));
    assert!(
        mock.seen()
            .iter()
            .any(|s| s.target.ends_with("/status?logs=1")),
        "query not passed to fal"
    );

    // The result, fetched three times: charged once, the same `_billing` each time.
    for _ in 0..3 {
        let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
        assert_eq!(resp.status(), 200);
        let (original, billing) = unsplice(&body(resp).await);
        assert_eq!(billing.get_i64("credits_used"), Some(COST));
        assert_eq!(billing.get_i64("balance_remaining"), Some(1000 - COST));
        assert_eq!(billing.get_str("model"), Some("fal-ai/flux/dev"));
        let output = json(&original);
        assert_eq!(
            output.get_array("images").unwrap()[0].get_u64("width"),
            Some(1024)
        );
    }
    // The short route knows the app.
    let (code, short) = get_json(&server.url(&format!("/fal-ai/queue/requests/{id}")), &key).await;
    assert_eq!((code, str_of(&short, "status")), (200, "COMPLETED"));
    assert_eq!(str_of(&short, "response_url"), ours);
    assert!(ledger_settles(&server, &id, (1000 - COST, 0, Some((COST, "charged")))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_key_gets_404_on_every_route() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, Options::new(mock.url(false)).render(dir.path())).unwrap();
    let owner = create_key(&config, "acme", 1000);
    let colleague = create_key(&config, "acme", 0);
    let stranger = create_key(&config, "other", 1000);
    let server = Server::start_config(dir, config);
    let job = submit(&server, &owner, "").await;
    let id = str_of(&job, "request_id").to_owned();
    let base = server.url(&format!("/queue/fal-ai/flux/requests/{id}"));
    let routes = [
        (Method::GET, format!("{base}/status")),
        (Method::GET, format!("{base}/status/stream")),
        (Method::GET, base.clone()),
        (Method::PUT, format!("{base}/cancel")),
        (
            Method::GET,
            server.url(&format!("/fal-ai/queue/requests/{id}")),
        ),
    ];
    let seen_before = mock.seen().len();
    let unknown_body = body(
        send(
            Method::GET,
            &server.url("/queue/fal-ai/flux/requests/no-such-id/status"),
            &owner,
            "",
        )
        .await,
    )
    .await;
    for (method, url) in &routes {
        let resp = send(method.clone(), url, &stranger, "").await;
        assert_eq!(resp.status(), 404, "{method} {url}");
        // Exactly what a job that does not exist gets.
        assert_eq!(body(resp).await, unknown_body, "{method} {url}");
    }
    // Under another app's path, even the owner's own job is unknown.
    let wrong_app = server.url(&format!("/queue/fal-ai/other/requests/{id}/status"));
    assert_eq!(
        send(Method::GET, &wrong_app, &owner, "").await.status(),
        404
    );
    assert_eq!(mock.seen().len(), seen_before, "a refused poll reached fal");
    // A colleague on the same account may read it.
    let (code, _) = get_json(&format!("{base}/status"), &colleague).await;
    assert_eq!(code, 202);
    // A disabled key cannot read its own old jobs.
    let list =
        String::from_utf8(server.cli(&["keys", "list", "--account", "acme"]).stdout).unwrap();
    let owner_id = list
        .lines()
        .find(|l| l.contains(&owner[..11]))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(server.cli(&["keys", "disable", &owner_id]).status.success());
    assert!(
        eventually(Duration::from_secs(2), || async {
            send(Method::GET, &format!("{base}/status"), &owner, "")
                .await
                .status()
                == 403
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_failed_jobs_cost_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);

    // Cancelled while queued: the 202 is only a request, so the job stays
    // held until fal says it ended; then it is released.
    let job = submit(&server, &key, "").await;
    let id = str_of(&job, "request_id").to_owned();
    let resp = send(Method::PUT, str_of(&job, "cancel_url"), &key, "").await;
    assert_eq!(resp.status(), 202);
    assert_eq!(
        json(&body(resp).await).get_str("status"),
        Some("CANCELLATION_REQUESTED")
    );
    still_held(&server, &id).await;
    // Fetching its result says so: fal's error passes through, and fal's
    // status (asked by the proxy) says CANCELLED, which releases it.
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 400, "fal's own error passes through");
    assert!(ledger_settles(&server, &id, (1000, 0, Some((0, "released")))).await);
    assert_eq!(poll_status(&job, &key, 1).await, "CANCELLED");

    // Cancel refused once the job is done: passed through, and the result is charged.
    let job = submit(&server, &key, "").await;
    let done = str_of(&job, "request_id").to_owned();
    for _ in 0..3 {
        get_json(str_of(&job, "status_url"), &key).await;
    }
    let resp = send(Method::PUT, str_of(&job, "cancel_url"), &key, "").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json(&body(resp).await).get_str("status"),
        Some("ALREADY_COMPLETED")
    );
    assert_eq!(
        send(Method::GET, str_of(&job, "response_url"), &key, "")
            .await
            .status(),
        200
    );
    assert!(ledger_settles(&server, &done, (1000 - COST, 0, Some((COST, "charged")))).await);

    // A job that fails at fal: its status says so, and the hold is released.
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &key,
        r#"{"prompt":"x","mock_fail":true}"#,
    )
    .await;
    let job = json(&body(resp).await);
    let failed = str_of(&job, "request_id").to_owned();
    let mut last = String::new();
    for _ in 0..3 {
        let (_, status) = get_json(str_of(&job, "status_url"), &key).await;
        last = str_of(&status, "status").to_owned();
    }
    assert_eq!(last, "FAILED");
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 422, "fal's own error passes through");
    assert!(ledger_settles(&server, &failed, (1000 - COST, 0, Some((0, "released")))).await);
    assert!(books_close(&server, &[("acme", COST)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_settles_jobs_nobody_fetched() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    // One with a webhook (passed to fal unchanged), one that fails; neither is ever polled.
    let hook = "fal_webhook=https%3A%2F%2Fclient.example%2Fhook";
    let paid = str_of(
        &submit(&server, &key, &format!("?{hook}")).await,
        "request_id",
    )
    .to_owned();
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &key,
        r#"{"mock_fail":true}"#,
    )
    .await;
    let failed = str_of(&json(&body(resp).await), "request_id").to_owned();
    assert!(mock
        .seen()
        .iter()
        .any(|s| s.target == format!("/_queue/fal-ai/flux/dev?{hook}")));
    assert!(
        ledger_settles(&server, &paid, (1000 - COST, 0, Some((COST, "charged")))).await,
        "{:?}",
        job_ledger(&server, &paid)
    );
    assert!(ledger_settles(&server, &failed, (1000 - COST, 0, Some((0, "released")))).await);
    // The owner fetching it later sees the reconciler's figures, not a second charge.
    let resp = send(
        Method::GET,
        &server.url(&format!("/queue/fal-ai/flux/requests/{paid}")),
        &key,
        "",
    )
    .await;
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_i64("credits_used"), Some(COST));
    assert!(ledger_settles(&server, &paid, (1000 - COST, 0, Some((COST, "charged")))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_and_pending_holds_survive_a_restart() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, Options::new(mock.url(false)).render(dir.path())).unwrap();
    let key = create_key(&config, "acme", 1000);
    let stranger = create_key(&config, "other", 1000);
    let server = Server::start_config(dir, config);
    let id = str_of(&submit(&server, &key, "").await, "request_id").to_owned();
    assert!(ledger_settles(&server, &id, (1000, COST, None)).await);

    server.signal("TERM");
    let (_, mut server) = server.exited().await;
    server.restart();
    // Still held after the restart, not recovered as an orphan.
    assert_eq!(job_ledger(&server, &id), (1000, COST, None));
    let shown = String::from_utf8(server.cli(&["accounts", "show", "acme"]).stdout).unwrap();
    assert!(
        shown.contains(&format!("held      {COST} credits")),
        "{shown}"
    );
    // The restarted server knows the hold: only 1000 - 28 is available.
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &key,
        r#"{"image_size":{"width":6000,"height":6000},"num_images":2}"#,
    )
    .await;
    let detail = assert_error(resp, 402, "insufficient_credits").await;
    assert!(
        detail.contains(&format!("{} are available", 1000 - COST)),
        "{detail}"
    );

    let url = server.url(&format!("/queue/fal-ai/flux/requests/{id}"));
    assert_eq!(
        send(Method::GET, &format!("{url}/status"), &stranger, "")
            .await
            .status(),
        404
    );
    for _ in 0..3 {
        get_json(&format!("{url}/status"), &key).await;
    }
    let resp = send(Method::GET, &url, &key, "").await;
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_i64("balance_remaining"), Some(1000 - COST));
    assert!(ledger_settles(&server, &id, (1000 - COST, 0, Some((COST, "charged")))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_stream_arrives_event_by_event() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let job = submit(&server, &key, "").await;
    let url = format!("{}/stream?mock_gate=1", str_of(&job, "status_url"));
    let resp = send(Method::GET, &url, &key, "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    // The mock holds every later event until the gate opens: the first can
    // only be here if the proxy passed it on by itself.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.frame())
        .await
        .expect("first event never arrived: the stream is buffered")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(
        first.starts_with("data: ") && first.contains("\"IN_QUEUE\""),
        "{first}"
    );
    mock.open_gate();
    let rest = String::from_utf8(stream.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        rest.contains("\"IN_PROGRESS\"") && rest.contains("\"COMPLETED\""),
        "{rest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_spend_the_generation_allowance_and_polls_do_not() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.plans = "[plans.free]\nrequests_per_minute = 2\n".into();
    let (server, key) = Server::start_with_key(opts, "acme", 10_000);
    let job = submit(&server, &key, "").await;
    submit(&server, &key, "").await;
    // Eight polls on a key whose generation allowance is spent: all pass.
    for _ in 0..8 {
        let resp = send(Method::GET, str_of(&job, "status_url"), &key, "").await;
        assert!(
            resp.status() == 200 || resp.status() == 202,
            "{}",
            resp.status()
        );
        assert_eq!(resp.headers()["x-ratelimit-limit"], "10");
    }
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &key,
        FLUX,
    )
    .await;
    assert_error(resp, 429, "rate_limited").await;
    // The poll allowance is its own, and finite: a runaway poller is stopped too.
    let mut limited = false;
    for _ in 0..20 {
        let resp = send(Method::GET, str_of(&job, "status_url"), &key, "").await;
        if resp.status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "polls were never limited");
}

/// Submits `input` to flux/dev.
async fn submit_input(server: &Server, key: &str, input: &str) -> simd_json::OwnedValue {
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        key,
        input,
    )
    .await;
    assert_eq!(resp.status(), 200);
    json(&body(resp).await)
}

/// Cancels a job the mock has just handed to a runner (one status poll
/// took it out of the queue): fal accepts the request, and the job still completes.
async fn cancel_once_running(job: &simd_json::OwnedValue, key: &str) {
    assert_eq!(poll_status(job, key, 1).await, "IN_QUEUE");
    let resp = send(Method::PUT, str_of(job, "cancel_url"), key, "").await;
    assert_eq!(resp.status(), 202);
    assert_eq!(
        json(&body(resp).await).get_str("status"),
        Some("CANCELLATION_REQUESTED")
    );
}

/// Stops the server with SIGTERM and starts it again, on its config file as it is now.
async fn restart(server: Server) -> Server {
    server.signal("TERM");
    let (_, mut server) = server.exited().await;
    server.restart();
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_that_completes_despite_a_cancel_is_charged_once_on_its_result() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let job = submit(&server, &key, "").await;
    let id = str_of(&job, "request_id").to_owned();
    cancel_once_running(&job, &key).await;
    still_held(&server, &id).await;
    assert_eq!(poll_status(&job, &key, 2).await, "COMPLETED");
    for _ in 0..2 {
        let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
        assert_eq!(resp.status(), 200);
        let (_, billing) = unsplice(&body(resp).await);
        assert_eq!(billing.get_i64("credits_used"), Some(COST));
        assert_eq!(billing.get_i64("balance_remaining"), Some(1000 - COST));
    }
    assert!(ledger_settles(&server, &id, (1000 - COST, 0, Some((COST, "charged")))).await);
    assert!(books_close(&server, &[("acme", COST)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_that_completes_despite_a_cancel_is_charged_by_the_reconciler() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let job = submit(&server, &key, "").await;
    let id = str_of(&job, "request_id").to_owned();
    cancel_once_running(&job, &key).await;
    // The reconciler, off until now so that it could not move the job
    // along, runs every second from here on; nobody fetches the result.
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    std::fs::write(&server.config, opts.render(server.dir.path())).unwrap();
    let server = restart(server).await;
    assert_charged_once(&server, &id).await;
    assert!(books_close(&server, &[("acme", COST)]).await);
}

/// Options whose `_billing` buffer is 4 KiB, and an input whose answer is about 200 kB.
fn oversized(mock: &MockFal) -> (Options, &'static str) {
    let mut opts = Options::new(mock.url(false));
    opts.pricing = TEST_PRICING.replace(
        "margin = 0.10",
        "margin = 0.10\nmax_json_response_bytes = 4096",
    );
    let input = r#"{"prompt":"a fox","image_size":"square_hd","mock_result_bytes":200000}"#;
    (opts, input)
}

/// The job ends charged its cost, once, on an account that had 1000 credits.
async fn assert_charged_once(server: &Server, request_id: &str) {
    let want = (1000 - COST, 0, Some((COST, "charged")));
    assert!(
        ledger_settles(server, request_id, want).await,
        "{:?}",
        job_ledger(server, request_id)
    );
}

/// The job's result as the mock serves it, fetched from the mock itself.
async fn result_from_fal(mock: &MockFal, request_id: &str) -> bytes::Bytes {
    let url = format!(
        "{}/fal-ai/flux/requests/{request_id}",
        mock.queue_url(false)
    );
    body(client().request(get(&url, None)).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_streams_unchanged_and_is_charged_what_it_returned_once() {
    let mock = MockFal::start(None).await.unwrap();
    let (opts, input) = oversized(&mock);
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let job = submit_input(&server, &key, input).await;
    let id = str_of(&job, "request_id").to_owned();
    assert_eq!(poll_status(&job, &key, 3).await, "COMPLETED");
    let served = result_from_fal(&mock, &id).await;
    assert!(served.len() > 190_000, "{}", served.len());
    for _ in 0..2 {
        let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
        assert_eq!(resp.status(), 200);
        // Priced as it passes: no figures in its headers.
        assert!(resp.headers().get("x-billing-credits-used").is_none());
        assert!(body(resp).await == served, "the result was altered");
    }
    assert!(ledger_settles(&server, &id, (1000 - COST, 0, Some((COST, "charged")))).await);
    assert!(books_close(&server, &[("acme", COST)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_nobody_fetched_is_charged_what_it_returned_by_the_reconciler() {
    let mock = MockFal::start(None).await.unwrap();
    let (mut opts, input) = oversized(&mock);
    opts.reconcile_interval_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let job = submit_input(&server, &key, input).await;
    let id = str_of(&job, "request_id").to_owned();
    assert_charged_once(&server, &id).await;
    // Fetched afterwards: the same bytes, no second charge.
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 200);
    assert!(body(resp).await == result_from_fal(&mock, &id).await);
    assert!(books_close(&server, &[("acme", COST)]).await);
}

/// Polls a job to completion and fetches its result, on this server's
/// current address; the credits its `_billing` shows.
async fn complete_and_fetch(server: &Server, key: &str, request_id: &str) -> Option<i64> {
    let url = server.url(&format!("/queue/fal-ai/flux/requests/{request_id}"));
    let mut state = String::new();
    for _ in 0..3 {
        let (_, status) = get_json(&format!("{url}/status"), key).await;
        state = str_of(&status, "status").to_owned();
        if state == "COMPLETED" {
            break;
        }
    }
    assert_eq!(state, "COMPLETED");
    let resp = send(Method::GET, &url, key, "").await;
    assert_eq!(resp.status(), 200);
    unsplice(&body(resp).await).1.get_i64("credits_used")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_priced_as_admitted_across_a_reload_and_a_restart() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    let (server, key) = Server::start_with_key(opts, "acme", 10_000);
    let first = str_of(&submit(&server, &key, "").await, "request_id").to_owned();
    let second = str_of(&submit(&server, &key, "").await, "request_id").to_owned();

    // fal's price doubles: new work costs 55 from now on, work already admitted 28.
    let config = std::fs::read_to_string(&server.config).unwrap();
    let doubled = config.replace("usd = 0.025", "usd = 0.05");
    assert_ne!(config, doubled);
    std::fs::write(&server.config, &doubled).unwrap();
    assert_eq!(reload(&server).await.0, 200);
    assert_eq!(complete_and_fetch(&server, &key, &first).await, Some(COST));

    // Restarted on the new file, the second job still costs its admission price.
    let server = restart(server).await;
    assert_eq!(complete_and_fetch(&server, &key, &second).await, Some(COST));

    // New work is priced by the new table.
    let resp = send(Method::POST, &server.url("/fal-ai/flux/dev"), &key, FLUX).await;
    assert_eq!(resp.headers()["x-billing-credits-used"], "55");
    body(resp).await;
    assert!(books_close(&server, &[("acme", 2 * COST + 55)]).await);
}

/// fal's race: status COMPLETED, then the result 404 once (its result store
/// lags). fal did the work, so the reconciler must not release the job: it
/// asks again and charges it, and the owner's fetch shows the same figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_job_whose_result_is_missing_once_is_charged_not_released() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &key,
        r#"{"prompt":"a fox","image_size":"square_hd","mock_result_404_once":true}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let job = json(&body(resp).await);
    let id = str_of(&job, "request_id").to_owned();
    assert_charged_once(&server, &id).await;
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 200);
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_i64("credits_used"), Some(COST));
    assert!(books_close(&server, &[("acme", COST)]).await);
}

/// fal's ingress answers 502 after it queued the job. With the client's own
/// `fal_webhook`, fal delivers the output to the client directly: the
/// submission is charged its hold. Without one, nobody can have the output,
/// and it costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_fal_queued_but_answered_5xx_is_charged_its_hold_when_it_names_a_webhook() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let other = server.create_key("other", 1000);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_json(&server.url("/v1/account"), &other).await.0 == 200
        })
        .await
    );
    let input = r#"{"prompt":"a fox","image_size":"square_hd","mock_submit_status":502}"#;
    let with_hook = "/queue/fal-ai/flux/dev?fal_webhook=https://client.example/hook";
    let resp = send(Method::POST, &server.url(with_hook), &key, input).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-fal-error-type"], "upstream_error");
    // The escaped spelling of the same parameter, as fal decodes it.
    let escaped = "/queue/fal-ai/flux/dev?fal%5Fwebhook=https://client.example/hook";
    let resp = send(Method::POST, &server.url(escaped), &key, input).await;
    assert_eq!(resp.status(), 502);
    let resp = send(
        Method::POST,
        &server.url("/queue/fal-ai/flux/dev"),
        &other,
        input,
    )
    .await;
    assert_eq!(resp.status(), 502);
    assert!(books_close(&server, &[("acme", 2 * COST), ("other", 0)]).await);
}

/// After COMPLETED, a result fetch fal refuses for now (429 at its
/// concurrency limit, 400 while its result store lags) is asked again,
/// never taken for a failure: the job is charged once the result comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_job_whose_result_fetch_is_refused_for_now_is_charged_not_released() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let mut ids = Vec::new();
    for code in [429, 400] {
        let input = format!(
            r#"{{"prompt":"a fox","image_size":"square_hd","mock_result_status_once":{code}}}"#
        );
        let job = submit_input(&server, &key, &input).await;
        ids.push(str_of(&job, "request_id").to_owned());
    }
    assert!(books_close(&server, &[("acme", 2 * COST)]).await);
    for id in &ids {
        assert_eq!(job_ledger(&server, id).2, Some((COST, "charged".into())));
    }
}

/// fal reported the job COMPLETED, its result was not there yet, and the
/// proxy restarted. That fal did the work is remembered across the
/// restart: when fal no longer knows the job, it is charged its hold,
/// never released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_job_that_fal_forgets_after_a_restart_is_charged_its_hold() {
    let mock = MockFal::start(None).await.unwrap();
    let (mut server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let input = r#"{"prompt":"a fox","image_size":"square_hd","mock_result_404_once":true}"#;
    let job = submit_input(&server, &key, input).await;
    let id = str_of(&job, "request_id").to_owned();
    assert_eq!(poll_status(&job, &key, 3).await, "COMPLETED");
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 404);

    // Back on a fal that does not know the job, giving up on it at once.
    let other = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(other.url(false));
    opts.reconcile_interval_secs = 1;
    let text = opts
        .render(server.dir.path())
        .replace("[queue]\n", "[queue]\ngive_up_after_secs = 0\n");
    std::fs::write(&server.config, text).unwrap();
    server.restart();
    assert_charged_once(&server, &id).await;
    assert!(books_close(&server, &[("acme", COST)]).await);
}

/// A listener whose accept queue is full: a connect to it hangs, so
/// nothing reaches "fal" behind it.
async fn black_hole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        match tokio::time::timeout(Duration::from_millis(300), s.connect(addr)).await {
            Ok(Ok(c)) => fill.push(c),
            _ => break,
        }
    }
    (listener, fill, format!("http://{addr}"))
}

/// fal's ingress answering 503 itself (no `x-fal-request-id`: no app saw it).
async fn failing_ingress() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ingress = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ingress.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = ingress.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let page =
                    "<html><body><h1>503 Service Temporarily Unavailable</h1>nginx</body></html>";
                let resp = format!(
                    "HTTP/1.1 503 Service Temporarily Unavailable\r\nserver: nginx\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

/// `[upstream] timeout_secs` running out while the connection to fal is
/// still being made (it is shorter than `connect_timeout_secs` here): the
/// submission never left, and costs nothing even with a webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_submission_timed_out_before_it_was_sent_costs_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (_listener, _fill, hole) = black_hole().await;
    let with_hook = "/queue/fal-ai/flux/dev?fal_webhook=https://client.example/hook";
    let mut opts = Options::new(mock.url(false));
    opts.queue = hole;
    opts.timeout_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = send(Method::POST, &server.url(with_hook), &key, FLUX).await;
    assert_eq!(resp.status(), 504);
    assert!(
        released_for_nothing(&server).await,
        "a submission that never reached fal was charged"
    );
    assert!(books_close(&server, &[("acme", 0)]).await);
}

/// The one submission made is recorded as released, for nothing.
async fn released_for_nothing(server: &Server) -> bool {
    let released = || -> i64 {
        server
            .db()
            .query_row(
                "SELECT COUNT(*) FROM charges WHERE outcome = 'released' AND credits = 0",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    eventually(Duration::from_secs(10), || async { released() == 1 }).await
}

/// A submission that certainly never reached fal's app (no connection in
/// time; fal's ingress refusing it) costs nothing, webhook or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_submission_that_never_reached_fal_costs_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (_listener, _fill, hole) = black_hole().await;
    let with_hook = "/queue/fal-ai/flux/dev?fal_webhook=https://client.example/hook";
    for queue in [hole, failing_ingress().await] {
        let mut opts = Options::new(mock.url(false));
        opts.queue = queue;
        let (server, key) = Server::start_with_key(opts, "acme", 1000);
        let resp = send(Method::POST, &server.url(with_hook), &key, FLUX).await;
        assert!(resp.status().is_server_error(), "{}", resp.status());
        assert!(released_for_nothing(&server).await);
        assert!(books_close(&server, &[("acme", 0)]).await);
    }
}

/// A HEAD of the result is answered as fal answers it, without content:
/// it must not settle the job (at its hold, from an empty answer); the
/// GET that follows is charged what the result says, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_of_the_result_settles_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let job = submit(&server, &key, "").await;
    let id = str_of(&job, "request_id").to_owned();
    assert_eq!(poll_status(&job, &key, 3).await, "COMPLETED");
    let resp = send(Method::HEAD, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 200);
    assert!(body(resp).await.is_empty());
    still_held(&server, &id).await;
    let resp = send(Method::GET, str_of(&job, "response_url"), &key, "").await;
    assert_eq!(resp.status(), 200);
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_i64("credits_used"), Some(COST));
    assert!(ledger_settles(&server, &id, (1000 - COST, 0, Some((COST, "charged")))).await);
    assert!(books_close(&server, &[("acme", COST)]).await);
}
