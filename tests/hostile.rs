//! A client that turns the proxy against its operator: minting keys to
//! multiply its allowance.

mod support;

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
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1_000);
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
