//! The user dashboard in a real browser (Debian's headless Chromium, driven
//! by playwright-core), and its JSON endpoints directly.

mod support;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use support::*;

const FLUX: &str = r#"{"prompt":"a red fox","image_size":"square_hd"}"#;

async fn call(method: Method, url: &str, key: &str) -> http::Response<hyper::body::Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(FLUX.as_bytes())))
        .unwrap();
    client().request(req).await.unwrap()
}

/// Waits until the ledger has written `n` charges, as the dashboard reads them.
async fn charges_written(server: &Server, n: i64) -> bool {
    eventually(Duration::from_secs(5), || async {
        server
            .db()
            .query_row("SELECT COUNT(*) FROM charges WHERE credits > 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
            == n
    })
    .await
}

/// The browser: `$CHROMIUM`, or Debian's chromium, installed on first use
/// (as root, from the machine's apt sources) like the npm packages that drive it.
fn chromium_ready() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    const DEBIAN: &str = "/usr/bin/chromium";
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    installed(&DONE, DEBIAN.into(), || {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "apt-get update -qq && apt-get install -y -qq chromium >/dev/null",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive");
        c
    });
    DEBIAN.into()
}

/// Chromium and the packages that drive it, installed on first use; and
/// the folder of the driver scripts.
fn browser_ready() -> (String, std::path::PathBuf) {
    let chromium = chromium_ready();
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = repo_path("tests/browser");
    npm_ready(&DONE, &dir, "playwright-core");
    (chromium, dir)
}

/// A Stripe stand-in, and `opts` taking card payments through it.
async fn with_stripe(opts: Options) -> (abhiapi::mock_stripe::MockStripe, Options) {
    let stripe = abhiapi::mock_stripe::MockStripe::start(STRIPE_SECRET_KEY)
        .await
        .unwrap();
    let opts = Options {
        payments: true,
        stripe_api: Some(stripe.url()),
        ..opts
    };
    (stripe, opts)
}

/// The stand-in checkout's "Pay" button delivers its event to `server`.
fn pay_into(stripe: &abhiapi::mock_stripe::MockStripe, server: &Server) {
    stripe.deliver_to(abhiapi::mock_stripe::WebhookTarget {
        url: server.url("/v1/stripe/webhook"),
        secret: STRIPE_WEBHOOK_SECRET.into(),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_signs_in_reads_the_chart_creates_and_revokes_a_key_in_a_browser() {
    let (chromium, dir) = browser_ready();

    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 10_000);
    for _ in 0..2 {
        assert_eq!(
            call(Method::POST, &server.url("/fal-ai/flux/dev"), &key)
                .await
                .status(),
            200
        );
    }
    assert!(charges_written(&server, 2).await);

    let shot = std::env::var("DASHBOARD_SCREENSHOT").unwrap_or_default();
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("dashboard.mjs")
        .arg(server.url(""))
        .arg(&key)
        .arg(&shot)
        .env("CHROMIUM", &chromium);
    let seen = drive(cmd).await;
    assert_eq!(seen.get_bool("ok"), Some(true), "{seen}");
    assert_eq!(seen.get_str("account"), Some("acme"));
    assert_eq!(seen.get_i64("balance"), Some(10_000 - 56), "{seen}");
    // The key lives in session storage only.
    assert_eq!(
        seen.get_array("stored")
            .map(|a| (a[0].as_u64(), a[1].as_u64())),
        Some((Some(1), Some(0)))
    );
    assert!(seen.get_u64("bars") >= Some(1), "no bar drawn: {seen}");
    assert!(
        seen.get_u64("painted") > Some(0),
        "the chart's canvas is blank"
    );
    assert_eq!(seen.get_u64("charges"), Some(2));
    assert!(seen.get_str("legend").unwrap().contains("fal-ai/flux/dev"));
    assert_eq!(seen.get_bool("created_shape"), Some(true));
    assert_eq!(
        seen.get_u64("created_status"),
        Some(200),
        "the new key did not work"
    );
    assert_eq!(
        seen.get_u64("revoked_status"),
        Some(403),
        "the revoked key still works"
    );
    // The new key's request was charged to the same account.
    assert!(charges_written(&server, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_endpoints_show_only_the_callers_account() {
    let mock = MockFal::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, Options::new(mock.url(false)).render(dir.path())).unwrap();
    let key = create_key(&config, "acme", 1000);
    let other = create_key(&config, "other", 1000);
    let server = Server::start_config(dir, config);
    assert_eq!(
        call(Method::POST, &server.url("/fal-ai/flux/dev"), &key)
            .await
            .status(),
        200
    );
    assert!(charges_written(&server, 1).await);

    let account = json(&body(call(Method::GET, &server.url("/v1/account"), &key).await).await);
    assert_eq!(account.get_str("account"), Some("acme"));
    assert_eq!(
        (account.get_i64("balance"), account.get_i64("held")),
        (Some(972), Some(0))
    );
    assert_eq!(account.get_array("keys").unwrap().len(), 1);
    let usage = json(&body(call(Method::GET, &server.url("/v1/account/usage"), &key).await).await);
    let daily = usage.get_array("daily").unwrap();
    assert_eq!((daily.len(), daily[0].get_u64("credits")), (1, Some(28)));
    assert_eq!(
        usage.get_array("recent").unwrap()[0].get_str("model"),
        Some("fal-ai/flux/dev")
    );

    // Another account's key cannot be revoked, and looks like no key at all.
    let other_id = json(&body(call(Method::GET, &server.url("/v1/account"), &other).await).await)
        .get_i64("key_id")
        .unwrap();
    let resp = call(
        Method::DELETE,
        &server.url(&format!("/v1/keys/{other_id}")),
        &key,
    )
    .await;
    assert_error(resp, 404, "not_found").await;
    let resp = call(Method::DELETE, &server.url("/v1/keys/999999"), &key).await;
    assert_error(resp, 404, "not_found").await;
    assert_eq!(
        call(Method::POST, &server.url("/fal-ai/flux/dev"), &other)
            .await
            .status(),
        200
    );
    // Without a key there is nothing to see.
    let resp = client()
        .request(get(&server.url("/v1/account"), None))
        .await
        .unwrap();
    assert_error(resp, 401, "missing_api_key").await;
    // The page itself needs no key, and fetches nothing from elsewhere.
    let (csp, page) = dashboard_page(&server).await;
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page references another origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_tops_up_by_card_in_a_browser_and_the_credits_arrive_once() {
    let (chromium, dir) = browser_ready();

    let mock = MockFal::start(None).await.unwrap();
    let (stripe, opts) = with_stripe(Options::new(mock.url(false))).await;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    pay_into(&stripe, &server);

    let shot = std::env::var("TOPUP_SCREENSHOT").unwrap_or_default();
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("topup.mjs")
        .arg(server.url(""))
        .arg(&key)
        .arg("5")
        .arg(&shot)
        .env("CHROMIUM", &chromium);
    let seen = drive(cmd).await;
    assert_eq!(seen.get_bool("ok"), Some(true), "{seen}");
    assert_eq!(seen.get_bool("offered"), Some(true));
    assert_eq!(seen.get_i64("before"), Some(1000));
    assert_eq!(seen.get_str("checkout_amount"), Some("5.00 USD"));
    assert!(
        seen.get_str("returned_to")
            .is_some_and(|u| u.ends_with("/dashboard?topup=paid")),
        "{seen}"
    );
    assert_eq!(seen.get_i64("after"), Some(6000), "{seen}");
    assert!(seen
        .get_str("note")
        .is_some_and(|n| n.starts_with("Payment received")));
    assert_eq!(seen.get_u64("payments"), Some(1));
    assert!(seen
        .get_str("payment_row")
        .is_some_and(|r| r.contains("5.00 USD") && r.contains("5000")));
    // Stripe's receipt for the charge, linked beside the payment.
    let receipt = seen
        .get_str("receipt")
        .unwrap_or_else(|| panic!("no receipt: {seen}"));
    assert!(receipt.starts_with(&stripe.url()), "{receipt}");
    let shown = body(client().request(get(receipt, None)).await.unwrap()).await;
    assert!(String::from_utf8_lossy(&shown).contains("Receipt"));
    assert!(books_close(&server, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_customer_signs_up_by_email_pays_and_spends_in_a_browser() {
    let (chromium, dir) = browser_ready();

    let mock = MockFal::start(None).await.unwrap();
    let sink = MailSink::start();
    let (stripe, opts) = with_stripe(Options {
        smtp_url: Some(format!("smtp://127.0.0.1:{}", sink.port)),
        ..Options::new(mock.url(false))
    })
    .await;
    let server = Server::start(opts);
    pay_into(&stripe, &server);

    let shot = std::env::var("SIGNUP_SCREENSHOT").unwrap_or_default();
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("signup.mjs")
        .arg(server.url(""))
        .arg("newcomer@example.com")
        .arg(&sink.file)
        .arg(&shot)
        .env("CHROMIUM", &chromium);
    let seen = drive(cmd).await;
    assert_eq!(seen.get_bool("ok"), Some(true), "{seen}");
    assert!(seen
        .get_str("note")
        .is_some_and(|n| n.starts_with("Check your mail")));
    assert_eq!(seen.get_str("landed"), Some("/dashboard"));
    assert_eq!(seen.get_str("account"), Some("newcomer@example.com"));
    assert_eq!(seen.get_i64("start_balance"), Some(0));
    // Signed in by session: no key is kept in the page.
    assert_eq!(seen.get_u64("key_in_storage"), Some(0));
    assert_eq!(seen.get_i64("paid_balance"), Some(5000), "{seen}");
    assert_eq!(seen.get_u64("proxied"), Some(200));
    assert!(
        seen.get_u64("bars") >= Some(1),
        "the charge is not in the chart: {seen}"
    );
    assert!(seen.get_i64("final_balance") < Some(5000));
    assert_eq!(seen.get_u64("after_sign_out"), Some(401));
    let charged: i64 = server
        .db()
        .query_row("SELECT COALESCE(SUM(credits), 0) FROM charges", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(books_close(&server, &[("newcomer@example.com", charged)]).await);
}
