//! Stripe's webhook through the real binary: events signed by Stripe's own
//! Node library (`tests/stripe`, pinned), credits that arrive once and can be
//! spent at once, refunds that take back their share once, and everything
//! unsigned, stale or foreign refused without a change to the books.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use simd_json::OwnedValue;
use support::*;

/// `Stripe-Signature` for `payload`, made by Stripe's library (at `timestamp`, or now).
fn stripe_signature(payload: &str, secret: &str, timestamp: Option<i64>) -> String {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = repo_path("tests/stripe");
    npm_ready(&DONE, &dir, "stripe");
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("sign.cjs")).arg(secret);
    if let Some(t) = timestamp {
        cmd.arg(t.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn signed(payload: &str) -> Option<String> {
    Some(stripe_signature(payload, STRIPE_WEBHOOK_SECRET, None))
}

/// A `checkout.session.completed` event as Stripe sends it (the fields we
/// read among others), for `cents` paid by `account`.
fn completed(event: &str, session: &str, account: &str, cents: i64, intent: &str) -> String {
    format!(
        r#"{{"id":"{event}","object":"event","api_version":"2024-06-20","created":1733000000,"livemode":false,"type":"checkout.session.completed","data":{{"object":{{"id":"{session}","object":"checkout.session","mode":"payment","payment_status":"paid","status":"complete","client_reference_id":"{account}","currency":"usd","amount_subtotal":{cents},"amount_total":{cents},"payment_intent":"{intent}","metadata":{{"credits":"{credits}"}},"customer_details":{{"email":"a@example.com"}}}}}}}}"#,
        credits = cents * 10
    )
}

/// A `charge.refunded` event: `refunded` cents refunded so far, in total.
fn refunded(event: &str, intent: &str, cents: i64, refunded: i64) -> String {
    format!(
        r#"{{"id":"{event}","object":"event","type":"charge.refunded","data":{{"object":{{"id":"ch_{event}","object":"charge","amount":{cents},"amount_refunded":{refunded},"currency":"usd","payment_intent":"{intent}","refunded":{full}}}}}}}"#,
        full = refunded == cents
    )
}

async fn deliver(server: &Server, payload: &str, signature: Option<String>) -> (u16, OwnedValue) {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(server.url("/v1/stripe/webhook"))
        .header("content-type", "application/json; charset=utf-8");
    if let Some(s) = signature {
        req = req.header("stripe-signature", s);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(payload.to_owned())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, json(&body(resp).await))
}

fn balance(server: &Server, account: &str) -> i64 {
    server
        .db()
        .query_row(
            "SELECT balance FROM accounts WHERE name = ?1",
            [account],
            |r| r.get(0),
        )
        .unwrap()
}

fn payments(server: &Server) -> i64 {
    server
        .db()
        .query_row("SELECT COUNT(*) FROM payments", [], |r| r.get(0))
        .unwrap()
}

fn options(mock: &MockFal) -> Options {
    Options {
        payments: true,
        admin: true,
        ..Options::new(mock.url(false))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_checkout_credits_its_account_once_and_its_key_spends_it_at_once() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(options(&mock), "acme", 0);
    let resp = call(&server, &key, "/fal-ai/flux/dev", r#"{"prompt":"a"}"#).await;
    assert_error(resp, 402, "insufficient_credits").await;

    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let (status, answer) = deliver(&server, &event, signed(&event)).await;
    assert_eq!(status, 200, "{answer:?}");
    assert_eq!(answer.get_str("outcome"), Some("credited"));
    assert_eq!(answer.get_i64("credits"), Some(5000));
    assert_eq!(balance(&server, "acme"), 5000);

    // The running server has the credits without a restart.
    let paid_call = flux_answers(&server, &key, 200).await;
    assert!(paid_call);

    // The same event again, and another event for the same session: nothing more.
    let (status, answer) = deliver(&server, &event, signed(&event)).await;
    assert_eq!((status, answer.get_str("outcome")), (200, Some("replayed")));
    let again = completed("evt_2", "cs_test_1", "acme", 500, "pi_1");
    let (status, answer) = deliver(&server, &again, signed(&again)).await;
    assert_eq!((status, answer.get_str("outcome")), (200, Some("replayed")));
    assert_eq!(payments(&server), 1);

    let charged: i64 = server
        .db()
        .query_row("SELECT COALESCE(SUM(credits), 0) FROM charges", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(charged > 0);
    assert!(books_close(&server, &[("acme", charged)]).await);
    assert_eq!(balance(&server, "acme"), 5000 - charged);

    // The operator sees the payment in the CLI and the admin API.
    let listed = server.cli(&["payments", "list", "acme"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("cs_test_1") && listed.contains("500 usd"),
        "{listed}"
    );
    let req = Request::builder()
        .uri(format!(
            "http://{}/admin/accounts/acme/payments",
            server.admin.unwrap()
        ))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let listed = json(&body(client().request(req).await.unwrap()).await);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].get_str("id"), Some("cs_test_1"));
    assert_eq!(listed[0].get_i64("credits"), Some(5000));
    assert_eq!(listed[0].get_str("payment_intent"), Some("pi_1"));
    assert_eq!(listed[0].get_str("receipt_url"), None);

    // The charge's receipt, whenever its event comes; only a web address is kept.
    let receipt = |event: &str, url: &str| {
        format!(
            r#"{{"id":"{event}","object":"event","type":"charge.succeeded","data":{{"object":{{"id":"ch_1","object":"charge","payment_intent":"pi_1","receipt_url":"{url}"}}}}}}"#
        )
    };
    let hostile = receipt("evt_r0", "javascript:alert(1)");
    let (_, answer) = deliver(&server, &hostile, signed(&hostile)).await;
    assert_eq!(answer.get_str("outcome"), Some("ignored"));
    let real = receipt("evt_r1", "https://pay.stripe.com/receipts/acct_1/ch_1");
    let (_, answer) = deliver(&server, &real, signed(&real)).await;
    assert_eq!(answer.get_str("outcome"), Some("receipt"));
    let req = Request::builder()
        .uri(server.url("/v1/account/payments"))
        .header("x-api-key", &key)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let own = json(&body(client().request(req).await.unwrap()).await);
    assert_eq!(
        own.as_array().unwrap()[0].get_str("receipt_url"),
        Some("https://pay.stripe.com/receipts/acct_1/ch_1")
    );
    assert_eq!(balance(&server, "acme"), 5000 - charged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_take_back_their_share_once_even_below_zero() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(options(&mock), "acme", 0);
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    assert_eq!(deliver(&server, &event, signed(&event)).await.0, 200);
    // Some of the credits are spent before the refunds.
    for _ in 0..3 {
        let ok = flux_answers(&server, &key, 200).await;
        assert!(ok);
    }
    let charged = || -> i64 {
        server
            .db()
            .query_row("SELECT COALESCE(SUM(credits), 0) FROM charges", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let written = eventually(std::time::Duration::from_secs(10), || async {
        charged() > 0 && balance(&server, "acme") == 5000 - charged()
    })
    .await;
    assert!(written);
    let spent = charged();

    // Stripe's amount_refunded is cumulative: $2 of $5, then all of it.
    let partial = refunded("evt_r1", "pi_1", 500, 200);
    let (status, answer) = deliver(&server, &partial, signed(&partial)).await;
    assert_eq!(status, 200, "{answer:?}");
    assert_eq!(answer.get_str("outcome"), Some("refunded"));
    assert_eq!(answer.get_i64("credits"), Some(2000));
    assert_eq!(balance(&server, "acme"), 3000 - spent);
    let (_, answer) = deliver(&server, &partial, signed(&partial)).await;
    assert_eq!(answer.get_str("outcome"), Some("replayed"));

    // The full refund takes back the rest, below zero by what was spent.
    let full = refunded("evt_r2", "pi_1", 500, 500);
    let (_, answer) = deliver(&server, &full, signed(&full)).await;
    assert_eq!(answer.get_i64("credits"), Some(3000));
    assert_eq!(balance(&server, "acme"), -spent);
    let (_, answer) = deliver(&server, &full, signed(&full)).await;
    assert_eq!(answer.get_str("outcome"), Some("replayed"));

    // A refund of a charge that is not one of our payments: not ours.
    let foreign = refunded("evt_r3", "pi_other", 500, 500);
    let (status, answer) = deliver(&server, &foreign, signed(&foreign)).await;
    assert_eq!((status, answer.get_str("outcome")), (200, Some("ignored")));
    assert!(books_close(&server, &[("acme", spent)]).await);
    assert_eq!(balance(&server, "acme"), -spent);

    // Below zero, the key is refused until the account is topped up.
    let refused = flux_answers(&server, &key, 402).await;
    assert!(refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_stale_or_foreign_events_change_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, _key) = Server::start_with_key(options(&mock), "acme", 100);
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let other = completed("evt_1", "cs_test_1", "acme", 50_000, "pi_1");
    for (why, signature) in [
        ("missing", None),
        ("for another body", signed(&other)),
        (
            "with another secret",
            Some(stripe_signature(&event, "whsec_wrong", None)),
        ),
        (
            "stale",
            Some(stripe_signature(
                &event,
                STRIPE_WEBHOOK_SECRET,
                Some(now - 400),
            )),
        ),
        ("not Stripe's format", Some("v1=abc".to_owned())),
    ] {
        let (status, answer) = deliver(&server, &event, signature).await;
        assert_eq!(status, 400, "{why}: {answer:?}");
        assert_eq!(
            answer.get_str("error_type"),
            Some("invalid_signature"),
            "{why}"
        );
    }

    let wrong_currency = event.replace(r#""currency":"usd""#, r#""currency":"eur""#);
    let no_account = completed("evt_2", "cs_test_2", "nobody", 500, "pi_2");
    let oversold = event.replace(r#""credits":"5000""#, r#""credits":"50000""#);
    for (why, payload) in [
        ("another currency", wrong_currency),
        ("an unknown account", no_account),
        ("credits that disagree with the amount", oversold),
    ] {
        let (status, answer) = deliver(&server, &payload, signed(&payload)).await;
        assert_eq!(status, 400, "{why}: {answer:?}");
        assert_eq!(answer.get_str("error_type"), Some("invalid_event"), "{why}");
    }
    let malformed = r#"{"id":"evt_3","type":"checkout.session.completed","data":"#;
    let (status, _) = deliver(&server, malformed, signed(malformed)).await;
    assert_eq!(status, 400);

    // Not paid yet (a bank debit), an event type we do not use, and sessions
    // that were not sold as credits (the Stripe account may sell other
    // things): 200, nothing.
    let unpaid = event.replace(r#""payment_status":"paid""#, r#""payment_status":"unpaid""#);
    let other_type = event.replace("checkout.session.completed", "customer.created");
    let not_credits = event.replace(r#""metadata":{"credits":"5000"}"#, r#""metadata":{}"#);
    let subscription = event.replace(r#""mode":"payment""#, r#""mode":"subscription""#);
    assert!(not_credits != event && subscription != event);
    for payload in [unpaid, other_type, not_credits, subscription] {
        let (status, answer) = deliver(&server, &payload, signed(&payload)).await;
        assert_eq!((status, answer.get_str("outcome")), (200, Some("ignored")));
    }
    assert_eq!(payments(&server), 0);
    assert_eq!(balance(&server, "acme"), 100);
    assert!(books_close(&server, &[]).await);
}

#[tokio::test]
async fn without_its_secret_the_webhook_is_not_there() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let (status, _) = deliver(&server, &event, signed(&event)).await;
    assert_eq!(status, 404);
}

async fn top_up(server: &Server, key: &str, asked: &str) -> (u16, OwnedValue, String) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(server.url("/v1/topups"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(asked.to_owned())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, json(&body(resp).await), request_id)
}

/// The buyer presses "Pay" on the stand-in's checkout page.
async fn pay(checkout_url: &str) -> (u16, Option<String>) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{checkout_url}/pay"))
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_asks_stripe_for_a_checkout_and_paying_it_credits_once() {
    let mock = MockFal::start(None).await.unwrap();
    let stripe = abhiapi::mock_stripe::MockStripe::start(STRIPE_SECRET_KEY)
        .await
        .unwrap();
    let opts = Options {
        stripe_api: Some(stripe.url()),
        ..options(&mock)
    };
    let (server, key) = Server::start_with_key(opts, "acme", 0);

    let (status, created, request_id) = top_up(&server, &key, r#"{"usd":5}"#).await;
    assert_eq!(status, 201, "{created:?}");
    assert_eq!(created.get_i64("credits"), Some(5000));
    let url = created.get_str("url").unwrap().to_owned();
    assert!(url.starts_with(&stripe.url()), "{url}");

    // What Stripe received, field by field.
    let calls = stripe.calls();
    assert_eq!(calls.len(), 1);
    let sent = &calls[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Bearer {STRIPE_SECRET_KEY}").as_str())
    );
    assert_eq!(sent.idempotency_key.as_deref(), Some(request_id.as_str()));
    let dashboard = server.url("/dashboard");
    for (name, value) in [
        ("mode", "payment"),
        ("client_reference_id", "acme"),
        ("line_items[0][quantity]", "1"),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][unit_amount]", "500"),
        ("metadata[credits]", "5000"),
        ("success_url", &format!("{dashboard}?topup=paid")),
        ("cancel_url", &format!("{dashboard}?topup=cancelled")),
    ] {
        assert_eq!(sent.param(name), Some(value), "{name}");
    }
    // Nothing is credited until Stripe says it was paid.
    assert_eq!(balance(&server, "acme"), 0);

    stripe.deliver_to(abhiapi::mock_stripe::WebhookTarget {
        url: server.url("/v1/stripe/webhook"),
        secret: STRIPE_WEBHOOK_SECRET.into(),
    });
    let (status, location) = pay(&url).await;
    assert_eq!(status, 303);
    assert_eq!(location, Some(format!("{dashboard}?topup=paid")));
    assert_eq!(balance(&server, "acme"), 5000);
    // A second press delivers the same session again: nothing more.
    pay(&url).await;
    assert_eq!(balance(&server, "acme"), 5000);
    assert_eq!(payments(&server), 1);
    let spent = flux_answers(&server, &key, 200).await;
    assert!(spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_outside_the_limits_or_without_stripe_are_refused_and_cost_nothing() {
    let mock = MockFal::start(None).await.unwrap();
    let stripe = abhiapi::mock_stripe::MockStripe::start(STRIPE_SECRET_KEY)
        .await
        .unwrap();
    let opts = Options {
        stripe_api: Some(stripe.url()),
        ..options(&mock)
    };
    let (server, key) = Server::start_with_key(opts, "acme", 0);
    for (body, status, error_type) in [
        (r#"{"usd":4}"#, 400, "invalid_input"),
        (r#"{"usd":1001}"#, 400, "invalid_input"),
        (r#"{"usd":-5}"#, 400, "malformed_json"),
        (r#"{"usd":5.5}"#, 400, "malformed_json"),
        (r#"{}"#, 400, "malformed_json"),
    ] {
        let (got, answer, _) = top_up(&server, &key, body).await;
        assert_eq!(
            (got, answer.get_str("error_type")),
            (status, Some(error_type)),
            "{body}"
        );
    }
    assert!(stripe.calls().is_empty());
    let (status, _, _) = top_up(&server, "sk-fal-nope", r#"{"usd":5}"#).await;
    assert_eq!(status, 401);

    // Stripe refusing the call (here: a key it does not know) is a 502.
    let wrong = abhiapi::mock_stripe::MockStripe::start("sk_test_other")
        .await
        .unwrap();
    let opts = Options {
        stripe_api: Some(wrong.url()),
        ..options(&mock)
    };
    let (server, key) = Server::start_with_key(opts, "acme", 0);
    let (status, answer, _) = top_up(&server, &key, r#"{"usd":5}"#).await;
    assert_eq!(
        (status, answer.get_str("error_type")),
        (502, Some("payment_provider_error"))
    );

    // Without Stripe's secret key, top-ups are off.
    let (server, key) = Server::start_with_key(options(&mock), "acme", 0);
    let (status, answer, _) = top_up(&server, &key, r#"{"usd":5}"#).await;
    assert_eq!(
        (status, answer.get_str("error_type")),
        (404, Some("payments_not_enabled"))
    );
    assert_eq!(balance(&server, "acme"), 0);
}

/// Waits until the running server's own view of the balance is `want`.
async fn assert_live_balance(server: &Server, key: &str, want: i64) {
    let live = eventually(std::time::Duration::from_secs(5), || async {
        live_balance(server, key).await == Some(want)
    })
    .await;
    assert!(
        live,
        "the server's own view: {:?}",
        live_balance(server, key).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_delivered_before_its_payment_is_taken_back_when_the_payment_arrives() {
    // Stripe does not promise the order of its events: the payment's event
    // may be retried (the server was down, the account not there yet) after
    // the operator refunded part of it and that refund's event went through.
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(options(&mock), "acme", 0);
    let early = refunded("evt_r1", "pi_1", 500, 200);
    let (status, answer) = deliver(&server, &early, signed(&early)).await;
    assert_eq!(status, 200, "{answer:?}");
    assert_eq!(balance(&server, "acme"), 0);

    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let (status, answer) = deliver(&server, &event, signed(&event)).await;
    assert_eq!(status, 200, "{answer:?}");
    assert_eq!(
        balance(&server, "acme"),
        3000,
        "the $2 refunded is not kept"
    );
    // The refund's event again, and the rest refunded: the rest taken back, once.
    let (_, answer) = deliver(&server, &early, signed(&early)).await;
    assert_eq!(answer.get_str("outcome"), Some("replayed"));
    let full = refunded("evt_r2", "pi_1", 500, 500);
    let (_, answer) = deliver(&server, &full, signed(&full)).await;
    assert_eq!(answer.get_i64("credits"), Some(3000));
    assert_eq!(balance(&server, "acme"), 0);
    assert!(books_close(&server, &[]).await);
    assert_live_balance(&server, &key, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_are_not_ours_are_answered_200_whatever_their_shape() {
    // A Stripe account that sells other things, in other currencies, with
    // every event type sent here: none of it may fail the endpoint (Stripe
    // retries a failing event for days and then disables the endpoint).
    let mock = MockFal::start(None).await.unwrap();
    let (server, _key) = Server::start_with_key(options(&mock), "acme", 100);
    let foreign_refund = refunded("evt_r1", "pi_other", 500, 500)
        .replace(r#""currency":"usd""#, r#""currency":"eur""#);
    // Stripe documents some objects' metadata as nullable (a PaymentMethod's).
    let other_object = r#"{"id":"evt_pm","object":"event","type":"payment_method.attached","data":{"object":{"id":"pm_1","object":"payment_method","metadata":null,"customer":"cus_1","type":"card"}}}"#;
    // A charge made without a PaymentIntent (the older Charges API) is never ours.
    let legacy_refund = refunded("evt_r2", "pi_x", 500, 500)
        .replace(r#""payment_intent":"pi_x""#, r#""payment_intent":null"#);
    for payload in [
        foreign_refund.as_str(),
        other_object,
        legacy_refund.as_str(),
    ] {
        let (status, answer) = deliver(&server, payload, signed(payload)).await;
        assert_eq!(
            (status, answer.get_str("outcome")),
            (200, Some("ignored")),
            "{payload}: {answer:?}"
        );
    }
    // A paid session whose metadata is null was not sold as credits by us
    // (ours always carry metadata[credits]): not ours either.
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1")
        .replace(r#""metadata":{"credits":"5000"}"#, r#""metadata":null"#);
    let (status, answer) = deliver(&server, &event, signed(&event)).await;
    assert_eq!(
        (status, answer.get_str("outcome")),
        (200, Some("ignored")),
        "{answer:?}"
    );
    assert_eq!(balance(&server, "acme"), 100);
    assert!(books_close(&server, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_of_one_event_credit_once() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(options(&mock), "acme", 0);
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let signature = signed(&event);
    let answers = futures_join_all(
        (0..8)
            .map(|_| deliver(&server, &event, signature.clone()))
            .collect(),
    )
    .await;
    let credited = answers
        .iter()
        .filter(|(s, a)| *s == 200 && a.get_str("outcome") == Some("credited"))
        .count();
    let replayed = answers
        .iter()
        .filter(|(s, a)| *s == 200 && a.get_str("outcome") == Some("replayed"))
        .count();
    assert_eq!((credited, replayed), (1, 7), "{answers:?}");
    assert_eq!(balance(&server, "acme"), 5000);
    assert_eq!(payments(&server), 1);
    assert!(books_close(&server, &[]).await);
    assert_live_balance(&server, &key, 5000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_the_balance_cannot_hold_is_refused_as_the_event_not_an_internal_error() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, _key) = Server::start_with_key(options(&mock), "acme", 1_000_000_000_000_000);
    let event = completed("evt_1", "cs_test_1", "acme", 500, "pi_1");
    let (status, answer) = deliver(&server, &event, signed(&event)).await;
    assert_eq!(status, 400, "{answer:?}");
    assert_eq!(
        answer.get_str("error_type"),
        Some("invalid_event"),
        "{answer:?}"
    );
    assert_eq!(payments(&server), 0);
}

/// Runs the futures at once (on this task), answers in order.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// Whether a priced call with `key` comes to answer `status` within 5 s
/// (the server applies payments through its change feed).
async fn flux_answers(server: &Server, key: &str, status: u16) -> bool {
    eventually(std::time::Duration::from_secs(5), || async {
        call(server, key, "/fal-ai/flux/dev", r#"{"prompt":"a"}"#)
            .await
            .status()
            == status
    })
    .await
}
