//! The admin API: every operation of docs/openapi.json replayed against the
//! server, the token required on each, and edits that reach the proxy at once.

mod support;

use std::time::Duration;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use simd_json::OwnedValue;
use support::*;

async fn admin(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, OwnedValue) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(format!(
            "http://{}{path}",
            server.admin.expect("admin listener")
        ));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/json");
    let bytes = body_of(resp).await;
    match is_json {
        true => (status, json(&bytes)),
        false => (
            status,
            OwnedValue::from(String::from_utf8(bytes.to_vec()).unwrap()),
        ),
    }
}

async fn body_of(resp: http::Response<hyper::body::Incoming>) -> bytes::Bytes {
    body(resp).await
}

/// The schema `reference` (`#/components/schemas/X`, or inline) in `doc`.
fn schema<'d>(doc: &'d OwnedValue, s: &'d OwnedValue) -> &'d OwnedValue {
    match s.get_str("$ref") {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            doc.get("components")
                .unwrap()
                .get("schemas")
                .unwrap()
                .get(name)
                .unwrap()
        }
        None => s,
    }
}

/// Every property the schema requires is in `value` (first item, for arrays; one level deeper for objects).
fn conforms(doc: &OwnedValue, s: &OwnedValue, value: &OwnedValue, at: &str) {
    let s = schema(doc, s);
    if s.get_str("type") == Some("array") {
        let items = value
            .as_array()
            .unwrap_or_else(|| panic!("{at}: not an array: {value}"));
        if let Some(first) = items.first() {
            conforms(doc, s.get("items").unwrap(), first, at);
        }
        return;
    }
    for field in s.get_array("required").map(|r| r.as_slice()).unwrap_or(&[]) {
        let field = field.as_str().unwrap();
        let got = value
            .get(field)
            .unwrap_or_else(|| panic!("{at}: no `{field}` in {value}"));
        if let Some(inner) = s.get("properties").and_then(|p| p.get(field)) {
            if inner.get("required").is_some() || inner.get_str("type") == Some("array") {
                conforms(doc, inner, got, &format!("{at}.{field}"));
            }
        }
    }
}

/// The proxy with its admin API on, and a free and a pro plan.
fn admin_server(mock: &MockFal) -> Server {
    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    opts.plans =
        "[plans.free]\nrequests_per_minute = 30\n[plans.pro]\nrequests_per_minute = 600\n".into();
    Server::start(opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let mock = MockFal::start(None).await.unwrap();
    let server = admin_server(&mock);
    let doc = json(abhiapi::admin::OPENAPI.as_bytes());
    let mut operations = Vec::new();
    for (path, item) in doc.get("paths").unwrap().as_object().unwrap().iter() {
        for (method, op) in item.as_object().unwrap().iter() {
            let example = op
                .get("x-example")
                .unwrap_or_else(|| panic!("{method} {path}: no x-example"));
            operations.push((
                example.get_u64("order").unwrap(),
                method.to_uppercase(),
                path.clone(),
                op.clone(),
            ));
        }
    }
    operations.sort_by_key(|o| o.0);
    assert_eq!(operations.len(), 17);
    for (_, method, path, op) in &operations {
        let example = op.get("x-example").unwrap();
        let target = example.get_str("path").unwrap_or(path);
        let body = example.get("body").map(|b| b.encode());
        let at = format!("{method} {target}");

        // Without the token, and with a wrong one: refused, whatever the route.
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let (status, v) = admin(&server, method, target, token, body.clone()).await;
            assert_eq!(
                (status, v.get_str("error_type")),
                (401, Some("admin_unauthorized")),
                "{at}"
            );
        }

        let (status, value) = admin(&server, method, target, Some(ADMIN_TOKEN), body).await;
        let expected = example.get_u64("status").unwrap();
        assert_eq!(status as u64, expected, "{at}: {value}");
        let documented = op
            .get("responses")
            .unwrap()
            .get(status.to_string().as_str());
        let documented = documented.unwrap_or_else(|| panic!("{at}: {status} is not documented"));
        let content = documented.get("content").unwrap();
        match content.get("application/json") {
            Some(media) => conforms(&doc, media.get("schema").unwrap(), &value, &at),
            None => assert!(
                value.as_str().is_some_and(|t| !t.is_empty()),
                "{at}: empty text"
            ),
        }
    }
    // An undocumented route is not served.
    let (status, _) = admin(
        &server,
        "GET",
        "/admin/nothing-here",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_edits_reach_the_proxy_at_once() {
    let mock = MockFal::start(None).await.unwrap();
    let server = admin_server(&mock);
    let t = Some(ADMIN_TOKEN);
    let body = |v: &str| Some(v.to_owned());

    let (status, account) = admin(
        &server,
        "POST",
        "/admin/accounts",
        t,
        body(r#"{"name":"acme","credits":100}"#),
    )
    .await;
    assert_eq!((status, account.get_i64("balance")), (201, Some(100)));
    let (status, dup) = admin(
        &server,
        "POST",
        "/admin/accounts",
        t,
        body(r#"{"name":"acme"}"#),
    )
    .await;
    assert_eq!((status, dup.get_str("error_type")), (409, Some("conflict")));
    let (status, _) = admin(
        &server,
        "POST",
        "/admin/accounts",
        t,
        body(r#"{"name":"x","plan":"gold"}"#),
    )
    .await;
    assert_eq!(status, 400);
    let (status, bad) = admin(&server, "POST", "/admin/accounts", t, body("{not json")).await;
    assert_eq!(
        (status, bad.get_str("error_type")),
        (400, Some("malformed_json"))
    );
    for (method, path) in [
        ("GET", "/admin/accounts/nobody"),
        ("POST", "/admin/keys/999/disable"),
    ] {
        assert_eq!(
            admin(&server, method, path, t, None).await.0,
            404,
            "{method} {path}"
        );
    }
    assert_eq!(
        admin(
            &server,
            "POST",
            "/admin/keys",
            t,
            body(r#"{"account":"nobody"}"#)
        )
        .await
        .0,
        404
    );

    let (status, created) = admin(
        &server,
        "POST",
        "/admin/keys",
        t,
        body(r#"{"account":"acme"}"#),
    )
    .await;
    assert_eq!(status, 201);
    let key = created.get_str("key").unwrap().to_owned();
    let id = created.get_i64("id").unwrap();
    let echo = || async {
        client()
            .request(post(
                &server.url("/mock/echo"),
                Some(&key),
                "application/json",
                "{}",
            ))
            .await
            .unwrap()
    };
    // The new key works at once, without waiting for a refresh.
    let resp = echo().await;
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["x-ratelimit-limit"].to_str().unwrap()
        ),
        (200, "30")
    );

    admin(
        &server,
        "POST",
        &format!("/admin/keys/{id}/disable"),
        t,
        None,
    )
    .await;
    assert_error(echo().await, 403, "key_disabled").await;
    let (_, enabled) = admin(
        &server,
        "POST",
        &format!("/admin/keys/{id}/enable"),
        t,
        None,
    )
    .await;
    assert_eq!(enabled.get_bool("disabled"), Some(false));
    assert_eq!(echo().await.status(), 200);

    let (_, suspended) = admin(&server, "POST", "/admin/accounts/acme/suspend", t, None).await;
    assert_eq!(suspended.get_bool("suspended"), Some(true));
    assert_error(echo().await, 403, "account_suspended").await;
    admin(&server, "POST", "/admin/accounts/acme/resume", t, None).await;
    admin(
        &server,
        "PUT",
        "/admin/accounts/acme/plan",
        t,
        body(r#"{"plan":"pro"}"#),
    )
    .await;
    let resp = echo().await;
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["x-ratelimit-limit"].to_str().unwrap()
        ),
        (200, "600")
    );

    // A top-up moves the balance by a delta: it reaches memory within a refresh.
    let (_, before) = admin(&server, "GET", "/admin/accounts/acme", t, None).await;
    let before = before.get_i64("balance").unwrap();
    admin(
        &server,
        "POST",
        "/admin/accounts/acme/topup",
        t,
        body(r#"{"credits":500}"#),
    )
    .await;
    let topped = eventually(Duration::from_secs(1), || async {
        admin(&server, "GET", "/admin/accounts/acme", t, None)
            .await
            .1
            .get_i64("balance")
            == Some(before + 500)
    })
    .await;
    assert!(topped, "top-up not in memory within 1 s");
    let (status, _) = admin(
        &server,
        "POST",
        "/admin/accounts/acme/topup",
        t,
        body(r#"{"credits":-5}"#),
    )
    .await;
    assert_eq!(status, 400);
    // Three requests went through at 2 credits each; the ledger writer commits them shortly.
    let charged = eventually(Duration::from_secs(5), || async {
        let (_, usage) = admin(&server, "GET", "/admin/accounts/acme/usage", t, None).await;
        usage.get_u64("total_credits") == Some(6)
    })
    .await;
    assert!(charged, "usage never showed the 6 credits charged");
    let (_, prices) = admin(&server, "GET", "/admin/prices", t, None).await;
    assert!(prices
        .get_array("pricing")
        .unwrap()
        .iter()
        .any(|r| r.get_str("model") == Some("fal-ai/flux/dev")));
}

/// The value of one metric line (`name{labels} value`) in a scrape.
fn metric(text: &str, line: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    opts.plans = "[plans.free]\nrequests_per_minute = 2\n".into();
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let scrape = || async {
        let req = Request::get(format!("http://{}/metrics", server.admin.unwrap()))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::default())
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        String::from_utf8(body(resp).await.to_vec()).unwrap()
    };
    let before = scrape().await;
    assert_eq!(metric(&before, "abhiapi_credits_charged_total"), Some(0.0));

    let flux = r#"{"prompt":"a fox","image_size":"square_hd"}"#;
    let url = server.url("/fal-ai/flux/dev");
    for _ in 0..3 {
        client()
            .request(post(&url, Some(&key), "application/json", flux))
            .await
            .unwrap();
    }
    client()
        .request(post(&url, None, "application/json", flux))
        .await
        .unwrap();

    let text = scrape().await;
    let requests = |status: &str, model: &str| {
        metric(
            &text,
            &format!(r#"abhiapi_requests_total{{route="sync",model="{model}",status="{status}"}}"#),
        )
    };
    assert_eq!(requests("200", "fal-ai/flux/dev"), Some(2.0), "{text}");
    assert_eq!(requests("429", "fal-ai/flux/dev"), Some(1.0));
    assert_eq!(requests("401", ""), Some(1.0));
    assert_eq!(
        metric(&text, r#"abhiapi_rate_limit_denials_total{scope="key"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&text, "abhiapi_credits_charged_total"), Some(56.0));
    assert_eq!(metric(&text, "abhiapi_holds_outstanding"), Some(0.0));
    assert_eq!(metric(&text, "abhiapi_credits_held"), Some(0.0));
    // Only the two that reached fal have an upstream latency; all four have ours.
    assert_eq!(
        metric(&text, "abhiapi_upstream_latency_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"abhiapi_upstream_latency_seconds_bucket{le="+Inf"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "abhiapi_added_latency_seconds_count"),
        Some(4.0)
    );
    assert!(metric(&text, "abhiapi_ledger_queue_depth").is_some());
    let flushed = eventually(Duration::from_secs(2), || async {
        metric(&scrape().await, "abhiapi_ledger_flush_seconds_count") >= Some(1.0)
    })
    .await;
    assert!(flushed, "no ledger flush recorded");
    // The scrape needs the token like the rest of the admin API.
    let resp = client()
        .request(get(
            &format!("http://{}/metrics", server.admin.unwrap()),
            None,
        ))
        .await
        .unwrap();
    assert_error(resp, 401, "admin_unauthorized").await;
}

/// Documented in README.md: no balance may go above 10^15 credits.
const MAX_BALANCE: i64 = 1_000_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_positive_integers_and_no_balance_passes_the_maximum() {
    let mock = MockFal::start(None).await.unwrap();
    let server = admin_server(&mock);
    let t = Some(ADMIN_TOKEN);
    let post = |path: &'static str, body: String| admin(&server, "POST", path, t, Some(body));

    let (status, _) = post("/admin/accounts", r#"{"name":"acme","credits":100}"#.into()).await;
    assert_eq!(status, 201);
    let topup = |credits: String| {
        post(
            "/admin/accounts/acme/topup",
            format!(r#"{{"credits":{credits}}}"#),
        )
    };
    // i64::MAX, or anything that would take the balance past the maximum: 400, nothing changes.
    for credits in [i64::MAX, i64::MAX - 100, MAX_BALANCE, MAX_BALANCE - 99] {
        let (status, refused) = topup(credits.to_string()).await;
        assert_eq!(status, 400, "{credits}: {refused}");
        assert_eq!(refused.get_str("error_type"), Some("invalid_request"));
        assert!(
            refused
                .get_str("detail")
                .unwrap()
                .contains("1000000000000000"),
            "{refused}"
        );
    }
    for credits in ["0", "-5", "1.5", "9223372036854775808", "\"7\""] {
        let (status, _) = topup(credits.to_owned()).await;
        assert_eq!(status, 400, "{credits}");
    }
    let (status, refused) = post(
        "/admin/accounts",
        format!(r#"{{"name":"whale","credits":{}}}"#, MAX_BALANCE + 1),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    // Up to the maximum exactly is fine, and later top-ups still work.
    assert_eq!(topup((MAX_BALANCE - 200).to_string()).await.0, 200);
    assert_eq!(topup("100".into()).await.0, 200);
    assert_eq!(topup("1".into()).await.0, 400);

    // The CLI refuses the same, with a message and a failing exit status.
    let out = server.cli(&["accounts", "topup", "acme", "--credits", "1"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("1000000000000000"), "{said}");
    let big = (MAX_BALANCE + 1).to_string();
    let out = server.cli(&["keys", "create", "--account", "whale", "--credits", &big]);
    assert!(!out.status.success());
    let out = server.cli(&["keys", "create", "--account", "acme", "--credits", "-1"]);
    assert!(!out.status.success());

    let names: Vec<String> = books(&server).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["acme"], "a refused creation made an account");
    assert!(books_close(&server, &[]).await);
    assert_eq!(books(&server)[0].1.balance, MAX_BALANCE);
}
