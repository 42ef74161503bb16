//! fal's own books, through the real binary against the mock's Platform
//! API: prices synced from fal's pricing API (reported, applied, picked up
//! by a running server for the next request and never for one in flight),
//! fal's request id and billed units kept with each charge, and our ledger
//! reconciled against fal's billing events.

mod support;

use std::time::Duration;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use support::*;

const FLUX: &str = r#"{"prompt":"a fox","image_size":"square_hd"}"#;

/// The tests' table (an exact flux rule that fal's price moves away from,
/// an upscaler rule that agrees, a kling rule for many, a catch-all) and,
/// beside it, a pinned rule and one fal bills in compute seconds.
const MORE_PRICING: &str = r#"
[[pricing]]
model = "fal-ai/veo3"
unit = "second"
usd = 0.40
default_seconds = 8
pinned = true

[[pricing]]
model = "fal-ai/any-llm"
unit = "request"
usd = 0.01
"#;

fn options(mock: &MockFal) -> Options {
    let mut opts = Options::new(mock.url(false));
    opts.pricing = format!("{TEST_PRICING}{MORE_PRICING}");
    opts.admin = true;
    // Room for a call that stays at fal while the prices change under it.
    opts.timeout_secs = 30;
    opts
}

async fn credits_used(server: &Server, key: &str, path: &str, input: &str) -> i64 {
    let resp = call(server, key, path, input).await;
    assert_eq!(resp.status(), 200, "{path}");
    let bytes = body(resp).await;
    let (_, billing) = unsplice(&bytes);
    billing.get_i64("credits_used").unwrap()
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The report line of `endpoint`.
fn line<'a>(report: &'a str, endpoint: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{endpoint} ")))
        .unwrap_or_else(|| panic!("no line for {endpoint} in:\n{report}"))
}

fn synced(server: &Server) -> Vec<(String, i64)> {
    server
        .query("SELECT endpoint, nano_usd FROM synced_prices ORDER BY endpoint")
        .iter()
        .map(|r| (r.get(0).unwrap(), r.get(1).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_sync_reports_applies_and_never_reprices_a_request_in_flight() {
    let mock = MockFal::start(None).await.unwrap();
    let books = mock.books();
    books.set_price("fal-ai/flux/dev", "megapixels", 30_000_000);
    books.set_price("fal-ai/veo3", "seconds", 500_000_000);
    // A slow endpoint fal lists, priced by our catch-all at 2 credits a call.
    books.set_price("mock/slow/10000", "requests", 10_000_000);
    let (server, key) = Server::start_with_key(options(&mock), "acme", 100_000);
    // What the answers said they cost, to close the books on.
    let spent = std::sync::atomic::AtomicI64::new(0);
    let used = |path: &'static str, input: &'static str| {
        let (server, key, spent) = (&server, &key, &spent);
        async move {
            let credits = credits_used(server, key, path, input).await;
            spent.fetch_add(credits, std::sync::atomic::Ordering::Relaxed);
            credits
        }
    };

    let report = server.cli(&["prices", "sync"]);
    assert!(report.status.success(), "{}", out(&report));
    let text = out(&report);
    // $0.025 × 1.1 against fal's $0.03: 8.3% under cost until applied.
    let flux = line(&text, "fal-ai/flux/dev");
    assert!(
        flux.contains("0.025/megapixel") && flux.contains("0.03/megapixels"),
        "{flux}"
    );
    assert!(flux.contains("-8.3") && flux.ends_with("changed"), "{flux}");
    assert!(
        line(&text, "fal-ai/veo3").contains("pinned, kept"),
        "{text}"
    );
    let llm = line(&text, "fal-ai/any-llm");
    assert!(
        llm.contains("left") && llm.contains("compute seconds"),
        "{llm}"
    );
    let upscaler = line(&text, "fal-ai/creative-upscaler");
    assert!(
        upscaler.contains("10.0") && upscaler.ends_with("same"),
        "{upscaler}"
    );
    // Without --all, only endpoints the table names are asked about.
    assert!(!text.contains("fal-ai/flux/schnell"), "{text}");
    assert!(text.contains("1 prices would change"), "{text}");
    assert!(synced(&server).is_empty());
    assert_eq!(used("/fal-ai/flux/dev", FLUX).await, 28);

    // A call admitted at the old price, still at fal when the new one applies.
    let slow = {
        let (url, key) = (server.url("/mock/slow/10000"), key.clone());
        tokio::spawn(async move {
            let resp = client()
                .request(post(&url, Some(&key), "application/json", "{}"))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let bytes = body(resp).await;
            unsplice(&bytes).1.get_i64("credits_used").unwrap()
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            mock.seen().iter().any(|s| s.target == "/mock/slow/10000")
        })
        .await
    );
    // A synced price for a pinned rule's endpoint (stored before the rule
    // was pinned, say) never prices it.
    server
        .db()
        .execute_batch(
            "INSERT INTO synced_prices (endpoint, unit, nano_usd, synced_at_ms)
             VALUES ('fal-ai/veo3', 'second', 500000000, 0)",
        )
        .unwrap();
    let applied = server.cli(&["prices", "sync", "--all", "--apply"]);
    assert!(applied.status.success(), "{}", out(&applied));
    let text = out(&applied);
    // fal lists endpoints the table prices only by a rule for many: each gets its own.
    assert!(
        line(&text, "fal-ai/flux/schnell").ends_with("new"),
        "{text}"
    );
    assert!(line(&text, "mock/slow/10000").ends_with("new"), "{text}");
    assert!(text.contains("applied"), "{text}");
    let stored = synced(&server);
    assert!(
        stored.contains(&("fal-ai/flux/dev".into(), 30_000_000)),
        "{stored:?}"
    );
    assert!(
        stored.contains(&("mock/slow/10000".into(), 10_000_000)),
        "{stored:?}"
    );
    // Sync stores no unmeterable price, and leaves the pinned endpoint's row as it was.
    assert!(
        !stored.iter().any(|(e, _)| e == "fal-ai/any-llm"),
        "{stored:?}"
    );
    assert!(
        stored.contains(&("fal-ai/veo3".into(), 500_000_000)),
        "{stored:?}"
    );

    // The running server charges fal's new price from its next request: 1 MP × $0.03 × 1.1.
    assert!(
        eventually(Duration::from_secs(10), || async {
            used("/fal-ai/flux/dev", FLUX).await == 33
        })
        .await
    );
    // The call in flight, still at fal when the server repriced, keeps the
    // price it was admitted at; the next pays the new one.
    assert!(
        !slow.is_finished(),
        "the call ended before the reprice: nothing shown"
    );
    assert_eq!(slow.await.unwrap(), 2);
    assert_eq!(used("/mock/slow/10000", "{}").await, 11);
    // The pinned rule still prices veo3 at $0.40 a second: 8 s × 1.1 = 3.52.
    assert_eq!(used("/fal-ai/veo3", "{}").await, 3520);

    // Synced again: nothing left to change, the pinned rule still reported.
    let again = out(&server.cli(&["prices", "sync"]));
    assert!(line(&again, "fal-ai/flux/dev").ends_with("same"), "{again}");
    assert!(
        line(&again, "fal-ai/flux/dev").contains("(synced)"),
        "{again}"
    );
    assert!(
        line(&again, "fal-ai/veo3").contains("pinned, kept"),
        "{again}"
    );
    assert!(again.contains("nothing to apply"), "{again}");
    // The admin API shows the table in force, synced prices included.
    let admin = server.admin.unwrap();
    let req = Request::get(format!("http://{admin}/admin/prices"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::default())
        .unwrap();
    let prices = json(&body(client().request(req).await.unwrap()).await);
    let synced = prices.get_array("synced").unwrap();
    assert!(
        synced
            .iter()
            .any(|p| p.get_str("endpoint") == Some("fal-ai/flux/dev")
                && p.get_str("usd") == Some("0.03")),
        "{prices}"
    );

    // Forgotten, an endpoint's price is its rule's again, from the next request.
    let forgot = server.cli(&["prices", "forget", "fal-ai/flux/dev"]);
    assert!(out(&forgot).contains("dropped 1"), "{}", out(&forgot));
    assert!(
        eventually(Duration::from_secs(10), || async {
            used("/fal-ai/flux/dev", FLUX).await == 28
        })
        .await
    );

    let charged = spent.load(std::sync::atomic::Ordering::Relaxed) + 2;
    assert!(books_close(&server, &[("acme", charged)]).await);
}

/// A queued flux job, polled to completion and fetched: its charge's fal id is the queue's.
async fn queued_job(server: &Server, key: &str) -> String {
    let send = |method: Method, url: String, body: &'static str| {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        client().request(req)
    };
    let resp = send(Method::POST, server.url("/queue/fal-ai/flux/dev"), FLUX)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let job = json(&body(resp).await);
    let id = job.get_str("request_id").unwrap().to_owned();
    let status_url = job.get_str("status_url").unwrap().to_owned();
    for _ in 0..5 {
        let status = json(&body(send(Method::GET, status_url.clone(), "").await.unwrap()).await);
        if status.get_str("status") == Some("COMPLETED") {
            break;
        }
    }
    let result = send(Method::GET, job.get_str("response_url").unwrap().into(), "")
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    body(result).await;
    id
}

fn reconcile(server: &Server, extra: &[&str]) -> (std::process::Output, simd_json::OwnedValue) {
    let now = abhiapi::store::now_secs();
    let since = format!("{}Z", abhiapi::dates::format_rfc3339(now - 3600));
    let until = format!("{}Z", abhiapi::dates::format_rfc3339(now + 60));
    let mut args = vec!["reconcile", "--since", &since, "--until", &until, "--json"];
    args.extend_from_slice(extra);
    let o = server.cli(&args);
    let report = json(&o.stdout);
    (o, report)
}

fn list_len(report: &simd_json::OwnedValue, field: &str) -> usize {
    report
        .get_array(field)
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_matches_fals_billing_events_to_our_charges() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(options(&mock), "acme", 100_000);
    // Seven calls, more than a page of billing events: sync images, a
    // queued job, seconds of video, a flat-priced call.
    assert_eq!(
        credits_used(&server, &key, "/fal-ai/flux/dev", FLUX).await,
        28
    );
    let two = r#"{"prompt":"a fox","image_size":{"width":1025,"height":1024},"num_images":2}"#;
    assert_eq!(
        credits_used(&server, &key, "/fal-ai/flux/dev", two).await,
        110
    );
    let job = queued_job(&server, &key).await;
    let kling = r#"{"prompt":"a fox","duration":"10"}"#;
    let video = "/fal-ai/kling-video/v2/master/text-to-video";
    assert_eq!(credits_used(&server, &key, video, kling).await, 770);
    assert_eq!(
        credits_used(&server, &key, "/fal-ai/creative-upscaler", "{}").await,
        55
    );
    for _ in 0..2 {
        assert_eq!(
            credits_used(&server, &key, "/fal-ai/flux/dev", FLUX).await,
            28
        );
    }
    assert!(books_close(&server, &[("acme", 28 * 4 + 110 + 770 + 55)]).await);
    // fal billed each call once, the queued job when it completed.
    assert_eq!(mock.books().events().len(), 7);
    // Every charge keeps fal's request id; the billed units came with each sync answer.
    let ids = server.query(
        "SELECT fal_request_id, fal_units_milli, units_milli FROM charges ORDER BY settled_at_ms",
    );
    assert_eq!(ids.len(), 7);
    for r in &ids {
        assert!(r.get::<Option<String>>(0).unwrap().is_some());
    }
    assert!(ids
        .iter()
        .any(|r| r.get::<Option<String>>(0).unwrap().as_deref() == Some(job.as_str())));
    let video_units: Vec<(Option<i64>, i64)> = ids
        .iter()
        .map(|r| (r.get(1).unwrap(), r.get(2).unwrap()))
        .filter(|(_, ours)| *ours == 10_000)
        .collect();
    assert_eq!(video_units, [(Some(10_000), 10_000)]);

    // Books that agree: a clean report, exit 0.
    let (o, report) = reconcile(&server, &[]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(report.get_str("source"), Some("billing_events"));
    let total = report.get("total").unwrap();
    // fal: 4 × $0.025 + 4 MP × $0.025 + 10 s × $0.112 + $0.05 = $1.37;
    // we charged 1,047 credits: our kling rule ($0.07 a second) is below fal's price.
    assert_eq!(total.get_str("fal_usd"), Some("1.37"), "{report}");
    assert_eq!(total.get_str("charged_usd"), Some("1.047"), "{report}");
    assert_eq!(total.get_str("unbilled_usd"), Some("0"), "{report}");
    for list in ["unbilled", "not_billed_by_fal", "unit_mismatches"] {
        assert_eq!(list_len(&report, list), 0, "{list}: {report}");
    }
    let flux = report
        .get_array("models")
        .unwrap()
        .iter()
        .find(|m| m.get_str("model") == Some("fal-ai/flux/dev"))
        .unwrap()
        .clone();
    assert_eq!(flux.get_u64("fal_requests"), Some(5), "{flux}");
    assert_eq!(flux.get_str("fal_usd"), Some("0.2"), "{flux}");
    assert_eq!(flux.get_str("charged_usd"), Some("0.222"), "{flux}");
    assert_eq!(flux.get_str("margin_pct"), Some("11.0"), "{flux}");

    // A call fal billed whose charge we lost (as a client hanging up lost
    // it before the money fixes): listed with fal's amount, exit status 2.
    let lost: String = server
        .query("SELECT id FROM charges WHERE model = 'fal-ai/creative-upscaler'")[0]
        .get(0)
        .unwrap();
    let lost_fal: String = server.query(&format!(
        "SELECT fal_request_id FROM charges WHERE id = '{lost}'"
    ))[0]
        .get(0)
        .unwrap();
    server
        .db()
        .execute("DELETE FROM charges WHERE id = ?1", [&lost])
        .unwrap();
    // A call fal billed more units for than we metered.
    let odd = r#"{"prompt":"a fox","image_size":"square_hd","mock_billed_units":2}"#;
    assert_eq!(
        credits_used(&server, &key, "/fal-ai/flux/dev", odd).await,
        28
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            server.query("SELECT COUNT(*) FROM charges")[0]
                .get::<i64>(0)
                .unwrap()
                == 7
        })
        .await
    );
    let (o, report) = reconcile(&server, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let unbilled = report.get_array("unbilled").unwrap();
    assert_eq!(unbilled.len(), 1, "{report}");
    assert_eq!(unbilled[0].get_str("request_id"), Some(lost_fal.as_str()));
    assert_eq!(
        unbilled[0].get_str("model"),
        Some("fal-ai/creative-upscaler")
    );
    assert_eq!(unbilled[0].get_str("fal_usd"), Some("0.05"));
    assert_eq!(
        report.get("total").unwrap().get_str("unbilled_usd"),
        Some("0.05")
    );
    let mismatches = report.get_array("unit_mismatches").unwrap();
    assert_eq!(mismatches.len(), 1, "{report}");
    let m = &mismatches[0];
    assert_eq!(
        (
            m.get_str("fal_units"),
            m.get_str("our_units"),
            m.get_str("reported_units")
        ),
        (Some("2"), Some("1"), Some("2")),
        "{m}"
    );
    // Within a tolerance the operator sets, the exit status is 0.
    let (o, _) = reconcile(&server, &["--tolerance-usd", "0.05"]);
    assert!(o.status.success(), "{}", out(&o));
    // The text report names the call and its amount.
    let now = abhiapi::store::now_secs();
    let since = format!("{}Z", abhiapi::dates::format_rfc3339(now - 3600));
    let text = out(&server.cli(&["reconcile", "--since", &since]));
    assert!(text.contains(&lost_fal) && text.contains("$0.05"), "{text}");

    // The metric gives the latest run's unbilled total, whoever ran it;
    // the admin API serves the same report.
    assert!(metrics(&server)
        .await
        .contains("abhiapi_reconcile_unbilled_usd 0.05"));
    let admin = server.admin.unwrap();
    let req = Request::get(format!(
        "http://{admin}/admin/reconcile?since={}&tolerance_usd=0.01",
        since.replace(':', "%3A")
    ))
    .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
    .body(Full::default())
    .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let via_api = json(&body(resp).await);
    assert_eq!(via_api.get_bool("over_tolerance"), Some(true), "{via_api}");
    assert_eq!(via_api.get_array("unbilled").unwrap().len(), 1, "{via_api}");

    // A key that may not read billing events: fal's usage totals stand in,
    // and units fal billed beyond ours count as unbilled at fal's average
    // price: the lost call, and the flux megapixel we did not meter ($0.025).
    mock.books().refuse_events();
    let (o, report) = reconcile(&server, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert_eq!(report.get_str("source"), Some("usage"), "{report}");
    assert_eq!(
        report.get("total").unwrap().get_str("unbilled_usd"),
        Some("0.075"),
        "{report}"
    );
    // A bad period is refused with a clear message.
    let bad = server.cli(&["reconcile", "--since", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(out(&bad).contains("YYYY-MM-DD"), "{}", out(&bad));
}
