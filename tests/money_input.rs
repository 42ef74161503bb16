//! Money exactness on the request side: what is priced is what fal runs.
//! A hostile client may spell a path or a cost field any way fal accepts;
//! the hold must still cover what fal will charge. Each test ends by
//! reconciling the books from SQLite against what the mock fal served.

mod support;

use std::time::Duration;

use abhiapi::mock_fal::Input;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use simd_json::prelude::*;
use support::*;

/// Whole credits per unit at a 10% margin and $0.001 a credit: sora-2 110
/// a second (`…/pro` 330), Kling v2 77 a second, flux/dev 22 a megapixel.
const PRICING: &str = r#"
[billing]
usd_per_credit = 0.001
margin = 0.10

[[pricing]]
model = "fal-ai/sora-2/*"
unit = "second"
usd = 0.10
default_seconds = 4

[[pricing]]
model = "fal-ai/sora-2/text-to-video/pro"
unit = "second"
usd = 0.30
default_seconds = 4

[[pricing]]
model = "fal-ai/kling-video/v2/*"
unit = "second"
usd = 0.07
default_seconds = 5

[[pricing]]
model = "fal-ai/flux/dev"
unit = "megapixel"
usd = 0.02
"#;

const PRO: &str = "/fal-ai/sora-2/text-to-video/pro";
const KLING: &str = "/fal-ai/kling-video/v2/master/text-to-video";
const FLUX: &str = "/fal-ai/flux/dev";

/// The same table, worked by hand: the credits for what the mock ran at `path`.
fn price(path: &str, input: &Input) -> i64 {
    let seconds = |default: u64, per_second: u64| {
        let milli = input.duration_milli.unwrap_or(default * 1000);
        (milli * per_second).div_ceil(1000) as i64
    };
    match path {
        PRO => seconds(4, 330),
        p if p.starts_with("/fal-ai/sora-2/") => seconds(4, 110),
        p if p.starts_with("/fal-ai/kling-video/v2/") => seconds(5, 77),
        FLUX => {
            let (w, h) = input.image_size;
            (input.num_images * (w * h).div_ceil(1 << 20) * 22) as i64
        }
        other => panic!("the mock ran {other}, which the table does not price"),
    }
}

async fn setup(accounts: &[(&str, i64)]) -> (MockFal, Server, Vec<String>) {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = PRICING.to_owned();
    let (first, credits) = accounts[0];
    let (server, key) = Server::start_with_key(opts, first, credits);
    let mut keys = vec![key];
    for (account, credits) in &accounts[1..] {
        let key = server.create_key(account, *credits);
        // A key made while the server runs goes live within a refresh.
        let live = eventually(Duration::from_secs(10), || async {
            let resp = client().request(get(&server.url("/v1/account"), Some(&key)));
            resp.await.unwrap().status() == 200
        })
        .await;
        assert!(live, "{account}'s key never went live");
        keys.push(key);
    }
    (mock, server, keys)
}

async fn send(
    server: &Server,
    key: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Response<Incoming> {
    let mut req = Request::post(server.url(path)).header("x-api-key", key);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    client().request(req).await.unwrap()
}

fn credits_used(resp: &Response<Incoming>) -> i64 {
    resp.headers()["x-billing-credits-used"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The model runs the mock served, as (path fal ran, input fal ran): sync
/// calls and queue submissions, without the queue's own routes.
fn served(mock: &MockFal) -> Vec<(String, Input)> {
    mock.seen()
        .into_iter()
        .filter(|s| s.method == http::Method::POST)
        .filter_map(|s| {
            let path = s.target.split('?').next().unwrap();
            let path = path.strip_prefix("/_queue").unwrap_or(path).to_owned();
            Some((path, Input::read(&s.body).ok()?))
        })
        .collect()
}

/// Every path that reached the mock is in its one canonical spelling.
fn assert_only_canonical_paths(mock: &MockFal) {
    for s in mock.seen() {
        let path = s.target.split('?').next().unwrap();
        assert!(
            !path.contains('%') && !path.contains('\\') && !path.contains("//"),
            "fal was sent {path}"
        );
        assert!(!path.ends_with('/'), "fal was sent {path}");
        assert!(
            path.split('/').all(|seg| seg != "." && seg != ".."),
            "fal was sent {path}"
        );
    }
}

/// The books, once the ledger writer has caught up: nothing held; for
/// every account, what it was given (opening credits and top-ups, the
/// `changes` rows) minus what it was charged is its balance; and the
/// charges add up to what the mock served, priced by the table.
async fn assert_books_balance(server: &Server, mock: &MockFal) {
    let served: i64 = served(mock).iter().map(|(p, i)| price(p, i)).sum();
    let totals = || {
        let db = server.db();
        db.query_row(
            "SELECT (SELECT COALESCE(SUM(credits), 0) FROM holds),
                    (SELECT COALESCE(SUM(credits), 0) FROM charges)",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .unwrap()
    };
    eventually(Duration::from_secs(5), || async { totals() == (0, served) }).await;
    assert_eq!(
        totals(),
        (0, served),
        "(held, charged) against what fal served"
    );
    let all = books(server);
    assert!(all.iter().all(|(_, b)| b.balance()), "books: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_priced_as_fal_routes_them() {
    let (mock, server, keys) = setup(&[("acme", 100_000)]).await;
    let key = &keys[0];
    // fal decodes %70 to `p`: this is the dear model, and must cost what it costs.
    let resp = send(&server, key, "/fal-ai/sora-2/text-to-video/%70ro", None, "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(credits_used(&resp), 1320);
    // Spellings that fal may route to `…/pro` but a prefix rule prices cheaper.
    for path in [
        "/fal-ai/sora-2/text-to-video/pro/",
        "/fal-ai/sora-2/text-to-video//pro",
        "/fal-ai/sora-2/x/..%2Ftext-to-video/pro",
        "/fal-ai/sora-2/x/..%2ftext-to-video%2Fpro",
        "/fal-ai/sora-2/x/..%5ctext-to-video/pro",
        "/fal-ai/sora-2/x/..\\text-to-video/pro",
        "/fal-ai/sora-2/x/%2e%2E/text-to-video/pro",
        "/fal-ai/sora-2/x/%2E/../text-to-video/pro",
    ] {
        let resp = send(&server, key, path, Some("application/json"), "{}").await;
        assert_error(resp, 400, "invalid_path").await;
        assert_eq!(mock.seen().len(), 1, "{path} reached fal");
    }

    // The queue: submitted, held and charged as the dear model.
    let resp = send(
        &server,
        key,
        "/queue/fal-ai/sora-2/text-to-video/%70ro",
        None,
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned();
    let status = server.url(&format!("/queue/fal-ai/sora-2/requests/{id}/status"));
    for _ in 0..5 {
        let resp = client().request(get(&status, Some(key))).await.unwrap();
        if resp.status() == 200 {
            break;
        }
    }
    let result = server.url(&format!("/queue/fal-ai/sora-2/requests/{id}"));
    let resp = client().request(get(&result, Some(key))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(credits_used(&resp), 1320);
    let resp = send(
        &server,
        key,
        "/queue/fal-ai/sora-2/text-to-video//pro",
        None,
        "",
    )
    .await;
    assert_error(resp, 400, "invalid_path").await;

    // fal's proxy protocol: the target URL's path is read the same way.
    for (target, status) in [
        ("https://fal.run/fal-ai/sora-2/text-to-video/%70ro", 200),
        (
            "https://fal.run/fal-ai/sora-2/x/..%2Ftext-to-video/pro",
            400,
        ),
        (
            "https://queue.fal.run/fal-ai/sora-2/text-to-video//pro",
            400,
        ),
    ] {
        let req = Request::post(server.url("/api/fal/proxy"))
            .header("authorization", format!("Key {key}"))
            .header("x-fal-target-url", target)
            .body(Full::default())
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{target}");
        if status == 200 {
            assert_eq!(credits_used(&resp), 1320);
        }
    }
    let sent: Vec<String> = served(&mock).into_iter().map(|(p, _)| p).collect();
    assert_eq!(sent, [PRO, PRO, PRO]);
    assert_only_canonical_paths(&mock);
    assert_books_balance(&server, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_is_held_whatever_the_content_type() {
    // 10 s of Kling is 770 credits: `poor` can pay for the default 5 s, not for 10.
    let (mock, server, keys) = setup(&[("rich", 10_000), ("poor", 769)]).await;
    let ten = r#"{"prompt":"waves","duration":"10"}"#;
    for ct in [Some("text/plain"), None, Some("application/json")] {
        let resp = send(&server, &keys[0], KLING, ct, ten).await;
        assert_eq!(resp.status(), 200, "{ct:?}");
        assert_eq!(credits_used(&resp), 770, "{ct:?}");
        let resp = send(&server, &keys[1], KLING, ct, ten).await;
        assert_error(resp, 402, "insufficient_credits").await;
    }
    assert_eq!(served(&mock).len(), 3);
    assert_books_balance(&server, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_are_held_per_image_whatever_the_content_type() {
    // Four 1 MP images are 88 credits; 280 credits pay for three such requests.
    let (mock, server, keys) = setup(&[("rich", 10_000), ("small", 280)]).await;
    let four = r#"{"prompt":"a fox","num_images":4}"#;
    let resp = send(&server, &keys[0], FLUX, Some("text/plain"), four).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(credits_used(&resp), 88);
    assert_eq!(
        json(&body(resp).await).get_array("images").unwrap().len(),
        4
    );

    let client = client();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url, key) = (client.clone(), server.url(FLUX), keys[1].clone());
            tokio::spawn(async move {
                let req = post(&url, Some(&key), "text/plain", four);
                client.request(req).await.unwrap().status().as_u16()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(ok, 3);
    let images: u64 = served(&mock).iter().map(|(_, i)| i.num_images).sum();
    let for_small = images - 4;
    assert_eq!(for_small, 3 * 4, "images served to the small account");
    assert!(
        for_small * 22 <= 280,
        "served more than 280 credits pay for"
    );
    assert_books_balance(&server, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_cost_fields_are_refused_before_fal() {
    // A count that would wrap to a small hold is refused, not held: even
    // for an account with credits enough for that small hold.
    let (mock, server, keys) = setup(&[("acme", 10_000)]).await;
    let resp = send(
        &server,
        &keys[0],
        FLUX,
        Some("application/json"),
        r#"{"num_images":2305843009213693952}"#,
    )
    .await;
    let detail = assert_error(resp, 400, "invalid_input").await;
    assert!(detail.contains("num_images"), "{detail}");
    for bad in [
        r#"{"num_images":0}"#,
        r#"{"num_images":-1}"#,
        r#"{"num_images":101}"#,
        r#"{"num_images":"many"}"#,
        r#"{"num_images":2.5}"#,
        r#"{"num_images":[4]}"#,
        r#"{"image_size":"huge"}"#,
        r#"{"image_size":{"width":100000,"height":1}}"#,
        r#"{"image_size":{"width":1024}}"#,
        r#"{"image_size":{"width":0,"height":1024}}"#,
    ] {
        let resp = send(&server, &keys[0], FLUX, Some("text/plain"), bad).await;
        assert_error(resp, 400, "invalid_input").await;
    }
    for bad in [
        r#"{"duration":"-5"}"#,
        r#"{"duration":0}"#,
        r#"{"duration":"ten"}"#,
        r#"{"duration":3601}"#,
        r#"{"duration":1e300}"#,
    ] {
        let resp = send(&server, &keys[0], KLING, None, bad).await;
        assert_error(resp, 400, "invalid_input").await;
    }
    let resp = send(&server, &keys[0], FLUX, Some("text/plain"), "num_images=4").await;
    assert_error(resp, 400, "malformed_json").await;
    // Large but within bounds: priced in full (256 MP × 100 images), so refused for want of credits.
    let resp = send(
        &server,
        &keys[0],
        FLUX,
        None,
        r#"{"num_images":100,"image_size":{"width":16384,"height":16384}}"#,
    )
    .await;
    let detail = assert_error(resp, 402, "insufficient_credits").await;
    assert!(detail.contains("563200"), "{detail}");
    assert!(mock.seen().is_empty(), "fal was contacted");
    assert_books_balance(&server, &mock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_fal_coerces_are_held_and_charged_as_fal_runs_them() {
    let cases = [
        (FLUX, r#"{"num_images":"4"}"#, 88),
        (FLUX, r#"{"num_images":4.0}"#, 88),
        (FLUX, r#"{"num_images":" 4 "}"#, 88),
        (FLUX, r#"{"num_images":true}"#, 22),
        (FLUX, r#"{"num_images":null}"#, 22),
        // 1025 × 1024 is just over 1 MP: 2 MP.
        (
            FLUX,
            r#"{"image_size":{"width":"1025","height":1024.0}}"#,
            44,
        ),
        (KLING, r#"{"duration":10.0}"#, 770),
        (KLING, r#"{"duration":" 10 "}"#, 770),
        (KLING, r#"{"duration":"8s"}"#, 616),
        (KLING, "", 385),
    ];
    // Each case also from an account one credit short of it: the hold must cover it all.
    let names: Vec<String> = (0..cases.len()).map(|i| format!("short{i}")).collect();
    let mut accounts = vec![("acme", 10_000)];
    accounts.extend(names.iter().zip(&cases).map(|(n, c)| (n.as_str(), c.2 - 1)));
    let (mock, server, keys) = setup(&accounts).await;
    for ((path, body, credits), short) in cases.iter().zip(&keys[1..]) {
        let resp = send(&server, short, path, Some("application/json"), body).await;
        assert_error(resp, 402, "insufficient_credits").await;
        let resp = send(&server, &keys[0], path, Some("application/json"), body).await;
        assert_eq!(resp.status(), 200, "{body}");
        assert_eq!(credits_used(&resp), *credits, "{body}");
    }
    assert_eq!(served(&mock).len(), cases.len());
    assert_books_balance(&server, &mock).await;
}
