//! The ledger when things go wrong: a model that returns more than was held,
//! a SIGKILL with settlements not yet in SQLite, an entry SQLite refuses, a
//! database nobody can write, and a second server on the same database.
//! Each test ends by reconciling the books in SQLite.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use simd_json::prelude::*;
use support::*;

/// The tests' prices plus an upscaler priced per megapixel: the mock's
/// upscaler returns one 2048×2048 image (4 MP) whatever it was asked, so a
/// request can cost more or less than its hold.
fn pricing() -> String {
    format!(
        "{TEST_PRICING}\n[[pricing]]\nmodel = \"fal-ai/upscale/*\"\nunit = \"megapixel\"\nusd = 0.01\n"
    )
}

async fn start(account: &str, credits: i64) -> (MockFal, Server, String) {
    start_with_fsync(account, credits, false).await
}

async fn start_with_fsync(account: &str, credits: i64, fsync: bool) -> (MockFal, Server, String) {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = pricing();
    opts.fsync = fsync;
    let (server, key) = Server::start_with_key(opts, account, credits);
    (mock, server, key)
}

/// `(outcome, credits, shortfall)` of the charge with id `request_id`, as
/// soon as the ledger writer has committed it (`None` after 10 s without).
async fn charge_of(server: &Server, request_id: &str) -> Option<(String, i64, i64)> {
    let read = || {
        server
            .db()
            .query_row(
                "SELECT outcome, credits, shortfall FROM charges WHERE id = ?1",
                [request_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .ok()
    };
    eventually(Duration::from_secs(10), || async { read().is_some() }).await;
    read()
}

async fn call_url(url: &str, key: &str) -> http::Response<hyper::body::Incoming> {
    client()
        .request(post(url, Some(key), "application/json", "{}".to_owned()))
        .await
        .unwrap()
}

fn request_id(resp: &http::Response<hyper::body::Incoming>) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// A connection that holds SQLite's write lock until dropped (or committed):
/// the server's ledger writer cannot commit while it is held.
fn lock_database(server: &Server) -> rusqlite::Connection {
    let db = server.db();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excess_over_the_hold_is_charged_whole_and_the_account_then_gets_402() {
    let (_mock, server, key) = start("acme", 20).await;
    // Held: the request names no size, so 1 MP (landscape_4_3): 0.01 × 1.1 = 11 credits.
    // Returned: 2048×2048, 4 MP: 44 credits, 24 more than the account has.
    let resp = call(&server, &key, "/fal-ai/upscale/x", "{}").await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let (_, billing) = unsplice(&body(resp).await);
    assert_eq!(billing.get_u64("credits_used"), Some(44));
    assert_eq!(billing.get_i64("balance_remaining"), Some(-24));
    assert_eq!(
        charge_of(&server, &id).await,
        Some(("charged".into(), 44, 24)),
        "the whole cost is charged and the part beyond the balance recorded"
    );

    // In debt: refused before fal, even for a request that would cost little.
    let resp = call(&server, &key, "/mock/echo", "{}").await;
    assert_error(resp, 402, "insufficient_credits").await;

    // The shortfall shows in the account's usage.
    let usage = server.cli(&["usage", "acme", "--json"]);
    let usage = json(&usage.stdout);
    assert_eq!(usage.get_u64("total_shortfall"), Some(24));

    // A top-up pays the debt first.
    assert!(server
        .cli(&["accounts", "topup", "acme", "--credits", "100"])
        .status
        .success());
    assert!(
        eventually(Duration::from_secs(5), || async {
            call(&server, &key, "/mock/echo", "{}").await.status() == 200
        })
        .await
    );
    let balance = || -> i64 {
        server
            .db()
            .query_row(
                "SELECT balance FROM accounts WHERE name = 'acme'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    // The debt, the top-up, and the 2-credit call that worked after it.
    assert!(books_close(&server, &[("acme", 44 + 2)]).await);
    assert_eq!(balance(), 20 - 44 + 100 - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_each_hold_is_settled_as_it_ended_not_at_its_hold() {
    settled_as_ended_after_sigkill(false).await;
}

/// The same with `[store] fsync`, where holds reach the disk through the
/// journal's flusher before fal is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_after_sigkill_each_hold_is_settled_as_it_ended() {
    settled_as_ended_after_sigkill(true).await;
}

async fn settled_as_ended_after_sigkill(fsync: bool) {
    let (_mock, mut server, key) = start_with_fsync("acme", 10_000, fsync).await;
    // Nothing reaches SQLite while this is held: every settlement below is
    // in memory and the journal only when the process is killed.
    let lock = lock_database(&server);
    let (served, failed, cheaper) = tokio::join!(
        // Two 1 MP images: 2 × $0.025 × 1.1 = 55 credits, held and charged.
        call(
            &server,
            &key,
            "/fal-ai/flux/dev",
            r#"{"image_size":"square_hd","num_images":2}"#
        ),
        // fal fails: held 2, released.
        call(&server, &key, "/mock/status/500", "{}"),
        // Held 16 MP (176 credits); fal returned 4 MP: charged 44.
        call(
            &server,
            &key,
            "/fal-ai/upscale/x",
            r#"{"image_size":{"width":4096,"height":4096}}"#
        ),
    );
    assert_eq!(
        (
            served.status().as_u16(),
            failed.status().as_u16(),
            cheaper.status().as_u16()
        ),
        (200, 502, 200)
    );
    let ids = [&served, &failed, &cheaper].map(request_id);
    server.kill();
    drop(lock);
    server.restart();

    assert_eq!(
        [
            charge_of(&server, &ids[0]).await,
            charge_of(&server, &ids[1]).await,
            charge_of(&server, &ids[2]).await
        ],
        [
            Some(("charged".into(), 55, 0)),
            Some(("released".into(), 0, 0)),
            Some(("charged".into(), 44, 0)),
        ],
        "recovery must record each settlement as it happened"
    );
    assert!(books_close(&server, &[("acme", 55 + 44)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_sqlite_refuses_is_set_aside_and_the_rest_commits() {
    let (_mock, server, key) = start("acme", 10_000).await;
    server
        .db()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON charges WHEN NEW.model = 'fal-ai/refused'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let refused = call(&server, &key, "/fal-ai/refused", "{}").await;
    assert_eq!(refused.status(), 200);
    let refused_id = request_id(&refused);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let resp = call(&server, &key, "/fal-ai/flux/dev", "{}").await;
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
    }
    // Every other charge reaches SQLite; the refused one is set aside with its reason.
    for id in &ids {
        assert!(
            charge_of(&server, id).await.is_some(),
            "one refused entry held up the others"
        );
    }
    let (subject, reason): (String, String) = server
        .db()
        .query_row("SELECT subject, reason FROM ledger_rejects", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(subject, refused_id);
    assert!(reason.contains("refused by the test"), "{reason}");
    assert!(server.stderr_log().contains("set aside in ledger_rejects"));
    assert_eq!(charge_of(&server, &refused_id).await, None);
    // Still serving and still writing.
    let later = call(&server, &key, "/fal-ai/flux/dev", "{}").await;
    let later_id = request_id(&later);
    assert!(charge_of(&server, &later_id).await.is_some());
    // Six flux calls recorded; the refused one is in ledger_rejects instead.
    assert!(books_close(&server, &[("acme", 6 * 28)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_sqlite_cannot_be_written_billable_requests_get_503_then_service_resumes() {
    let (mock, server, key) = start("acme", 10_000).await;
    let lock = lock_database(&server);
    // Served before the writer finds out; charged once it can write again.
    let first = call(&server, &key, "/fal-ai/flux/dev", "{}").await;
    assert_eq!(first.status(), 200);
    let first_id = request_id(&first);
    assert!(
        eventually(Duration::from_secs(15), || async {
            call(&server, &key, "/fal-ai/flux/dev", "{}").await.status() == 503
        })
        .await,
        "requests kept being served while nothing could be recorded"
    );
    let seen = mock.seen().len();
    let resp = call(&server, &key, "/fal-ai/flux/dev", "{}").await;
    assert_error(resp, 503, "ledger_unavailable").await;
    assert_eq!(
        mock.seen().len(),
        seen,
        "fal was called for unbillable work"
    );
    let health = client().request(get(&server.url("/healthz"), None)).await;
    assert_eq!(health.unwrap().status(), 200);

    drop(lock);
    assert!(
        eventually(Duration::from_secs(15), || async {
            call(&server, &key, "/fal-ai/flux/dev", "{}").await.status() == 200
        })
        .await,
        "service did not resume once SQLite could be written"
    );
    assert_eq!(
        charge_of(&server, &first_id).await,
        Some(("charged".into(), 28, 0))
    );
    // Every flux call fal served is charged 28, and nothing else.
    let served = mock
        .seen()
        .iter()
        .filter(|s| s.target == "/fal-ai/flux/dev")
        .count() as i64;
    assert!(books_close(&server, &[("acme", 28 * served)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_its_grace_though_sqlite_is_locked_and_loses_nothing() {
    let (_mock, mut server, key) = start("acme", 10_000).await;
    let lock = lock_database(&server);
    let resp = call(&server, &key, "/fal-ai/flux/dev", "{}").await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let asked = Instant::now();
    server.signal("TERM");
    server.wait();
    // shutdown_grace_secs is 10 in the tests' config; the writer gets as long again at most.
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "shutdown took {:?}",
        asked.elapsed()
    );
    drop(lock);
    server.restart();
    assert_eq!(
        charge_of(&server, &id).await,
        Some(("charged".into(), 28, 0))
    );
    assert!(books_close(&server, &[("acme", 28)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_database_exits_and_touches_nothing() {
    let (_mock, server, key) = start("acme", 10_000).await;
    // A request in flight: its hold is live in the first server.
    let url = server.url("/mock/slow/3000");
    let k = key.clone();
    let in_flight = tokio::spawn(async move {
        client()
            .request(post(&url, Some(&k), "application/json", "{}".to_owned()))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&server.config)
        .env("ABHIAPI_TEST_FAL_KEY", FAL_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server ran on the same database");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let mut said = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(
        said.contains("another `abhiapi serve` is running"),
        "{said}"
    );

    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert_eq!(
        charge_of(&server, &id).await,
        Some(("charged".into(), 2, 0)),
        "the second server recovered the first one's live hold"
    );
    // The CLI works beside a running server.
    assert!(server.cli(&["accounts", "show", "acme"]).status.success());
    assert!(books_close(&server, &[("acme", 2)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_call_whose_client_hung_up_and_charges_it() {
    let (mock, server, key) = start("acme", 1000).await;
    let url = server.url("/mock/slow/1500");
    let hung_up = tokio::time::timeout(Duration::from_millis(300), call_url(&url, &key)).await;
    assert!(hung_up.is_err(), "the client leaves before fal answers");
    server.signal("TERM");
    let (status, mut server) = server.exited().await;
    assert!(status.success());
    assert!(mock.seen().iter().any(|s| s.target == "/mock/slow/1500"));
    // Settled as it ended, before the exit: nothing left to recover.
    server.restart();
    let outcomes: Vec<(String, i64)> = server
        .db()
        .prepare("SELECT outcome, credits FROM charges")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes, [("charged".to_owned(), 2)]);
    assert!(books_close(&server, &[("acme", 2)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_fal_accepted_survives_a_sigkill_before_it_reached_sqlite() {
    let (_mock, mut server, key) = start("acme", 1000).await;
    let lock = lock_database(&server);
    let resp = call(&server, &key, "/queue/fal-ai/flux/dev", "{}").await;
    assert_eq!(resp.status(), 200);
    let job = json(&body(resp).await);
    let fal_id = job.get_str("request_id").unwrap().to_owned();
    server.kill();
    drop(lock);
    server.restart();
    // Still the owner's pending job, its hold kept, not charged as an orphan.
    let status = format!("/fal-ai/queue/requests/{fal_id}");
    let resp = client()
        .request(get(&server.url(&status), Some(&key)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "the job was lost");
    let (state, held): (String, i64) = server
        .db()
        .query_row(
            "SELECT state, held FROM jobs WHERE request_id = ?1",
            [&fal_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), held), ("pending", 28));
    let recovered: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM charges", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recovered, 0);
    // Its result is charged once, as any job's.
    let result = format!("/queue/fal-ai/flux/requests/{fal_id}");
    let mut charged = None;
    for _ in 0..5 {
        let resp = client()
            .request(get(&server.url(&result), Some(&key)))
            .await
            .unwrap();
        if resp.status() == 200 {
            charged = resp.headers().get("x-billing-credits-used").cloned();
            break;
        }
        let _ = client()
            .request(get(&server.url(&status), Some(&key)))
            .await
            .unwrap();
    }
    assert_eq!(charged.unwrap(), "28");
    assert!(books_close(&server, &[("acme", 28)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_charged_just_before_a_sigkill_comes_back_ended() {
    let (_mock, mut server, key) = start("acme", 1000).await;
    let lock = lock_database(&server);
    let resp = call(&server, &key, "/queue/fal-ai/flux/dev", "{}").await;
    let fal_id = json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned();
    let status = server.url(&format!("/fal-ai/queue/requests/{fal_id}"));
    for _ in 0..3 {
        let _ = client().request(get(&status, Some(&key))).await.unwrap();
    }
    let result = server.url(&format!("/queue/fal-ai/flux/requests/{fal_id}"));
    let resp = client().request(get(&result, Some(&key))).await.unwrap();
    assert_eq!(resp.headers()["x-billing-credits-used"], "28");
    // Charged in memory and the journal; nothing of it in SQLite yet.
    server.kill();
    drop(lock);
    server.restart();
    let (state, credits): (String, i64) = server
        .db()
        .query_row(
            "SELECT state, credits_used FROM jobs WHERE request_id = ?1",
            [&fal_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), credits), ("charged", 28));
    assert!(books_close(&server, &[("acme", 28)]).await);
}

/// Store calls of the request path (here a self-service key revocation)
/// run on blocking threads, and wait up to SQLite's busy timeout each while
/// another process holds the write lock, one after another on the shared
/// connection. SIGTERM must still end within the grace: the request
/// threads' runtimes must not wait for those threads when they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_within_its_grace_though_store_calls_wait_on_a_locked_sqlite() {
    let (_mock, mut server, key) = start("acme", 1000).await;
    let lock = lock_database(&server);
    for _ in 0..4 {
        let mut req = get(&server.url("/v1/keys/999999"), Some(&key));
        *req.method_mut() = http::Method::DELETE;
        tokio::spawn(client().request(req));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    server.signal("TERM");
    let exited = tokio::task::spawn_blocking(move || {
        let status = server.wait();
        (status, server)
    })
    .await;
    let took = asked.elapsed();
    assert!(
        exited.is_ok(),
        "the server did not exit within 30 s of SIGTERM"
    );
    // shutdown_grace_secs is 10 in the tests' config, and the writer gets a
    // second more when the grace is spent.
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    let (_, mut server) = exited.unwrap();
    drop(lock);
    server.restart();
    assert!(books_close(&server, &[("acme", 0)]).await);
}

/// A billed call still waiting on fal when SIGTERM's grace runs out may yet
/// be served by fal: it is cut off, and charged its hold at the next start
/// (as after a crash), not released as if fal had refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_at_the_end_of_the_grace_is_charged_its_hold_not_released() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.pricing = pricing();
    opts.timeout_secs = 60;
    let (mut server, key) = Server::start_with_key(opts, "acme", 10_000);
    let url = server.url("/mock/slow/30000");
    let in_flight = tokio::spawn(async move {
        client()
            .request(post(&url, Some(&key), "application/json", "{}".to_owned()))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("TERM");
    assert!(server.wait().success());
    assert!(
        in_flight.await.unwrap().is_err(),
        "cut off without an answer"
    );
    server.restart();
    let outcome: String = server
        .db()
        .query_row("SELECT outcome FROM charges", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outcome, "recovered");
    assert!(books_close(&server, &[("acme", 2)]).await);
}
