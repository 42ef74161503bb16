//! A client that turns the proxy against its operator: minting keys to
//! multiply its allowance, methods and upgrades fal has no use for, paths
//! that could slip past a route into a billed call, and a page that could
//! run script it was not shipped with.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use support::*;

async fn dashboard_call(
    server: &Server,
    method: Method,
    path: &str,
    key: &str,
) -> http::Response<hyper::body::Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(server.url(path))
        .header("x-api-key", key)
        .body(Full::default())
        .unwrap();
    client().request(req).await.unwrap()
}

/// `POST /v1/keys` with `key`: the new key's id and secret.
async fn mint(server: &Server, key: &str) -> (i64, String) {
    let resp = dashboard_call(server, Method::POST, "/v1/keys", key).await;
    assert_eq!(resp.status(), 201);
    let v = json(&body(resp).await);
    (
        v.get_i64("id").unwrap(),
        v.get_str("key").unwrap().to_owned(),
    )
}

async fn echo(server: &Server, key: &str) -> http::Response<hyper::body::Incoming> {
    call(server, key, "/mock/echo", "{}").await
}

fn with_limits(mock: &MockFal, limits: &str) -> Options {
    let mut opts = Options::new(mock.url(false));
    opts.limits = limits.to_owned();
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_has_at_most_max_keys_per_account_live_keys_however_made() {
    let mock = MockFal::start(None).await.unwrap();
    let opts = with_limits(
        &mock,
        "max_keys_per_account = 3\nkey_creations_per_minute = 100",
    );
    let (server, key) = Server::start_with_key(opts, "acme", 1_000);

    let (first, _) = mint(&server, &key).await;
    mint(&server, &key).await;
    let resp = dashboard_call(&server, Method::POST, "/v1/keys", &key).await;
    let detail = assert_error(resp, 409, "key_limit_reached").await;
    assert!(detail.contains('3'), "{detail}");
    // The operator's CLI is held to the same cap.
    let out = server.cli(&["keys", "create", "--account", "acme"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("live keys"));

    // A revoked key no longer counts.
    let resp = dashboard_call(&server, Method::DELETE, &format!("/v1/keys/{first}"), &key).await;
    assert_eq!(resp.status(), 200);
    mint(&server, &key).await;
    let live: i64 = server
        .db()
        .query_row(
            "SELECT COUNT(*) FROM api_keys WHERE disabled = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(live, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_creates_at_most_key_creations_per_minute_keys() {
    let mock = MockFal::start(None).await.unwrap();
    // The default: 5 a minute, 5 at once.
    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    let (server, key) = Server::start_with_key(opts, "acme", 1_000);
    let mut minted = Vec::new();
    for _ in 0..5 {
        minted.push(mint(&server, &key).await.1);
    }
    let resp = dashboard_call(&server, Method::POST, "/v1/keys", &key).await;
    assert_eq!(resp.headers()["retry-after"], "12");
    assert_error(resp, 429, "key_creation_rate_limited").await;
    // Keys minted by a key share its account's allowance.
    let resp = dashboard_call(&server, Method::POST, "/v1/keys", &minted[0]).await;
    assert_error(resp, 429, "key_creation_rate_limited").await;
    let keys: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 6);
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(r#"abhiapi_rate_limit_denials_total{scope="key_creation"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_revokes_the_keys_it_created_down_the_line() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, owner) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000);
    let (leaked_id, leaked) = mint(&server, &owner).await;
    let (_, child) = mint(&server, &leaked).await;
    let (_, grandchild) = mint(&server, &child).await;
    let (_, sibling) = mint(&server, &owner).await;
    for k in [&leaked, &child, &grandchild, &sibling] {
        assert_eq!(echo(&server, k).await.status(), 200);
    }

    let resp = dashboard_call(
        &server,
        Method::DELETE,
        &format!("/v1/keys/{leaked_id}"),
        &owner,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v = json(&body(resp).await);

    for k in [&leaked, &child, &grandchild] {
        assert_error(echo(&server, k).await, 403, "key_disabled").await;
    }
    for k in [&owner, &sibling] {
        assert_eq!(echo(&server, k).await.status(), 200);
    }
    assert_eq!(v["revoked"].as_array().unwrap().len(), 3, "{v}");
}

/// The plans `config.toml` documents (and the binary has built in), as a
/// config without `[plans]` gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_free_plan_caps_an_account_however_many_keys_it_has() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.plans = String::new();
    let (server, owner) = Server::start_with_key(opts, "acme", 10_000);
    let mut keys = vec![owner.clone()];
    for _ in 0..4 {
        keys.push(mint(&server, &owner).await.1);
    }
    // 30 a minute for the account, spread over five keys.
    for i in 0..30 {
        let resp = echo(&server, &keys[i % keys.len()]).await;
        assert_eq!(resp.status(), 200, "request {}", i + 1);
        body(resp).await;
    }
    for k in &keys {
        assert_error(echo(&server, k).await, 429, "account_rate_limited").await;
    }
    assert_eq!(mock.seen().len(), 30);
}

/// Sends `head` (a request without a body) on a fresh connection and reads
/// the answer until the server closes it.
fn raw(server: std::net::SocketAddr, head: &str) -> String {
    let mut conn = std::net::TcpStream::connect(server).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and `error_type` of a raw answer.
fn refusal(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let mut body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .as_bytes()
        .to_vec();
    // Whatever fal (the mock) answered, if it got that far, is not our error.
    let error_type = simd_json::to_owned_value(&mut body)
        .ok()
        .and_then(|v| v.get_str("error_type").map(str::to_owned))
        .unwrap_or_default();
    (status, error_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_trace_and_upgrades_are_refused_before_fal() {
    let mock = MockFal::start(None).await.unwrap();
    // A catch-all price rule: anything forwarded would be billed.
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000);
    let cases = [
        (
            format!("CONNECT fal.run:443 HTTP/1.1\r\nhost: fal.run:443\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"),
            405,
            "method_not_allowed",
        ),
        (
            format!("TRACE /mock/echo HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"),
            405,
            "method_not_allowed",
        ),
        (
            format!(
                "GET /mock/echo HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nconnection: upgrade, close\r\n\
                 upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
            400,
            "upgrade_not_supported",
        ),
    ];
    let mut wrong = Vec::new();
    for (head, status, error_type) in cases {
        let (addr, sent) = (server.plain, head.clone());
        let answer = tokio::task::spawn_blocking(move || raw(addr, &sent))
            .await
            .unwrap();
        if refusal(&answer) != (status, error_type.to_owned()) {
            wrong.push(format!("{head:?} answered {answer:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(mock.seen().is_empty(), "fal was contacted");
    assert!(books_close(&server, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_route_with_a_trailing_slash_is_never_a_billed_call() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000);
    let resp = call(&server, &key, "/queue/fal-ai/flux/dev", r#"{"prompt":"x"}"#).await;
    assert_eq!(resp.status(), 200);
    let id = json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned();
    let seen = mock.seen().len();
    for path in [
        format!("/queue/fal-ai/flux/requests/{id}/"),
        format!("/queue/fal-ai/flux/requests/{id}/status/"),
        format!("/fal-ai/queue/requests/{id}/"),
    ] {
        let resp = client()
            .request(get(&server.url(&path), Some(&key)))
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!(matches!(status, 400 | 404), "{path}: {status}");
        body(resp).await;
    }
    assert_eq!(mock.seen().len(), seen, "fal was contacted");
    // The job is still pending: nothing was charged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let charges: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM charges", [], |r| r.get(0))
        .unwrap();
    assert_eq!(charges, 0);
}

/// A job not in memory is looked up in SQLite, on the one connection the
/// dashboard's endpoints share: polls of ids nobody owns (guessed, or
/// another account's) spend the poll allowance like any other, so that a
/// key cannot turn them into unlimited database reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_of_unknown_jobs_spend_the_poll_allowance() {
    let mock = MockFal::start(None).await.unwrap();
    let opts = with_limits(&mock, "poll_requests_per_second = 2");
    let (server, key) = Server::start_with_key(opts, "acme", 1_000);
    let mut limited = false;
    for n in 0..30 {
        for path in [
            format!("/fal-ai/queue/requests/guess-{n}"),
            format!("/queue/fal-ai/flux/requests/guess-{n}/status"),
        ] {
            let resp = client()
                .request(get(&server.url(&path), Some(&key)))
                .await
                .unwrap();
            let status = resp.status().as_u16();
            assert!(matches!(status, 404 | 429), "{path}: {status}");
            limited |= status == 429;
            body(resp).await;
        }
    }
    assert!(
        limited,
        "60 polls of unknown jobs in a burst were never limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_allows_only_its_own_script_and_style_by_hash() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));
    let (csp, _) = dashboard_page(&server).await;
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    for directive in ["script-src 'sha256-", "style-src 'sha256-"] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
}
