//! The store behind the server, SQLite and PostgreSQL alike: each case runs
//! once on each, through the real binary and its CLI, and ends by
//! reconciling the books in the store it ran on.

mod support;

use std::time::Duration;

use simd_json::prelude::*;
use support::*;

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Two tests per case: `case::sqlite` and `case::postgres`.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case(super::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$case(super::Backend::Postgres).await
            }
        }
    )*};
}

on_both!(
    edits_reach_the_server_and_charges_the_store,
    a_killed_server_settles_every_hold_on_restart,
    a_queued_job_outlives_a_restart_and_is_charged_once,
    fals_books_are_kept_in_the_store,
);

/// `store migrate` copies a single node's database into PostgreSQL row for
/// row, and a server on the copy goes on where the first left off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_migrates_to_postgres_exactly() {
    let (_mock, mut server, key) = start(Backend::Sqlite, "acme", 1000).await;
    assert_eq!(image(&server, &key).await, (200, Some(972)));
    let fal_id = submit(&server, &key).await;
    assert!(job_result(&server, &key, &fal_id).await);
    ok(server.cli(&["accounts", "topup", "acme", "--credits", "100"]));
    assert!(books_close(&server, &[("acme", 56)]).await);
    server.signal("TERM");
    assert!(server.wait().success());

    let url = pg::database();
    let db = server.dir.path().join("abhiapi.db");
    let migrate = |to: &str| {
        abhiapi_cli(&[
            "store",
            "migrate",
            "--from",
            db.to_str().unwrap(),
            "--to",
            to,
        ])
    };
    let out = ok(migrate(&url));
    assert!(out.contains("accounts"), "{out}");
    let pg_config = server.dir.path().join("pg.toml");
    let text = std::fs::read_to_string(&server.config)
        .unwrap()
        .replace("[store]\n", &format!("[store]\nurl = {url:?}\n"))
        + "\n[cluster]\nnode = \"copy\"\n";
    std::fs::write(&pg_config, text).unwrap();
    let copy = Server::start_config(tempfile::tempdir().unwrap(), pg_config.clone());
    // What the copy's own node writes as it starts (its liveness, leases
    // and shared limits) is its own, not the copy's.
    let copied = abhiapi::store::TABLES
        .iter()
        .filter(|t| !["nodes", "leases", "rate_limits"].contains(t));
    for table in copied {
        let all = format!("SELECT * FROM {table} ORDER BY 1");
        assert_eq!(server.query(&all), copy.query(&all), "{table}");
    }
    // A second migration into the same database is refused, and changes nothing.
    assert!(!migrate(&url).status.success());
    // The copy serves the same key from the same balance, and numbers new rows after the old.
    assert!(
        eventually(Duration::from_secs(5), || async {
            live_balance(&copy, &key).await == Some(1100 - 56)
        })
        .await
    );
    let newer = copy.create_key("newer", 50);
    assert!(
        eventually(Duration::from_secs(5), || async {
            image(&copy, &newer).await == (200, Some(22))
        })
        .await
    );
    assert!(books_close(&copy, &[("acme", 56), ("newer", 28)]).await);
}

/// Submits a 1 MP image to fal's queue; fal's request id.
async fn submit(server: &Server, key: &str) -> String {
    let resp = call(server, key, "/queue/fal-ai/flux/dev", "{}").await;
    assert_eq!(resp.status(), 200);
    json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned()
}

/// Polls job `fal_id` until its result comes; true when it came charged 28.
async fn job_result(server: &Server, key: &str, fal_id: &str) -> bool {
    let status = format!("/fal-ai/queue/requests/{fal_id}");
    let result = format!("/queue/fal-ai/flux/requests/{fal_id}");
    for _ in 0..8 {
        let _ = client()
            .request(get(&server.url(&status), Some(key)))
            .await
            .unwrap();
        let resp = client()
            .request(get(&server.url(&result), Some(key)))
            .await
            .unwrap();
        if resp.status() == 200 {
            return resp.headers()["x-billing-credits-used"] == "28";
        }
    }
    false
}

/// A second server under the same node name on the same PostgreSQL (a copy
/// of the config on another machine) is refused before it touches
/// anything: its recovery would settle the first one's live holds as its
/// own. The first stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_under_the_same_node_name_is_refused() {
    let (_mock, mut server, key) = start(Backend::Postgres, "acme", 1000).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let db = |dir: &std::path::Path| dir.join("abhiapi.db").display().to_string();
    let text = std::fs::read_to_string(&server.config)
        .unwrap()
        .replace(&db(server.dir.path()), &db(elsewhere.path()));
    let second_config = elsewhere.path().join("config.toml");
    std::fs::write(&second_config, text).unwrap();
    let second = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&second_config)
        .env("ABHIAPI_TEST_FAL_KEY", FAL_KEY)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("another `abhiapi serve` is running"),
        "{said}"
    );

    assert_eq!(image(&server, &key).await, (200, Some(972)));
    assert!(books_close(&server, &[("acme", 28)]).await);
    server.signal("TERM");
    assert!(server.wait().success(), "{}", server.stderr_log());
}

/// On PostgreSQL an edit reaches the server when it commits, by
/// notification, not at the next poll of the change feed (here an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_edits_arrive_by_notification() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.store_url = Some(pg::database());
    opts.refresh_interval_ms = 3_600_000;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    assert_eq!(image(&server, &key).await, (200, Some(972)));
    ok(server.cli(&["accounts", "topup", "acme", "--credits", "100"]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            live_balance(&server, &key).await == Some(1072)
        })
        .await,
        "the top-up waited for the poll"
    );
    ok(server.cli(&["accounts", "suspend", "acme"]));
    let account = || async {
        let resp = client()
            .request(get(&server.url("/v1/account"), Some(&key)))
            .await
            .unwrap();
        resp.status().as_u16()
    };
    assert!(
        eventually(Duration::from_secs(5), || async { account().await == 403 }).await,
        "the suspension waited for the poll"
    );
    assert_eq!(image(&server, &key).await.0, 403);
    assert!(books_close(&server, &[("acme", 28)]).await);
}

/// The binary with `args`, no config.
fn abhiapi_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_abhiapi"))
        .args(args)
        .output()
        .unwrap()
}

async fn start(backend: Backend, account: &str, credits: i64) -> (MockFal, Server, String) {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    // The admin API shares the store's connection: started on both.
    opts.admin = true;
    if let Backend::Postgres = backend {
        opts.store_url = Some(pg::database());
    }
    let (server, key) = Server::start_with_key(opts, account, credits);
    (mock, server, key)
}

/// One 1 MP image: $0.025 × 1.1 = 28 credits.
const IMAGE: &str = r#"{"image_size":"square_hd"}"#;

async fn image(server: &Server, key: &str) -> (u16, Option<i64>) {
    let resp = call(server, key, "/fal-ai/flux/dev", IMAGE).await;
    let status = resp.status().as_u16();
    let billing = json(&body(resp).await);
    let balance = billing
        .get("_billing")
        .and_then(|b| b.get_i64("balance_remaining"));
    (status, balance)
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn edits_reach_the_server_and_charges_the_store(backend: Backend) {
    let (_mock, mut server, key) = start(backend, "acme", 1000).await;
    for n in 1..=3 {
        assert_eq!(image(&server, &key).await, (200, Some(1000 - 28 * n)));
    }
    // A top-up made with the CLI reaches the running server's memory.
    ok(server.cli(&["accounts", "topup", "acme", "--credits", "500"]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            live_balance(&server, &key).await == Some(916 + 500)
        })
        .await,
        "the top-up never reached the server"
    );
    // A key disabled with the CLI is refused.
    let other = server.create_key("acme", 0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            image(&server, &other).await.0 == 200
        })
        .await
    );
    let id: i64 = server.query("SELECT MAX(id) FROM api_keys")[0]
        .get(0)
        .unwrap();
    ok(server.cli(&["keys", "disable", &id.to_string()]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            image(&server, &other).await.0 == 403
        })
        .await
    );
    // What was charged is in the store: after a restart the balance goes on from it.
    let charged = books(&server)[0].1.charged;
    assert!(books_close(&server, &[("acme", charged)]).await);
    server.restart();
    let (status, balance) = image(&server, &key).await;
    assert_eq!((status, balance), (200, Some(1000 + 500 - charged - 28)));
    assert!(books_close(&server, &[("acme", charged + 28)]).await);
    let usage = ok(server.cli(&["usage", "acme", "--json"]));
    let report = json(usage.as_bytes());
    assert_eq!(report.get_i64("total_credits"), Some(charged + 28));
}

/// Synced prices reach the server through the store's change feed, and
/// reconciliation reads the store's charges and records its run there.
async fn fals_books_are_kept_in_the_store(backend: Backend) {
    let (mock, server, key) = start(backend, "acme", 10_000).await;
    mock.books()
        .set_price("fal-ai/flux/dev", "megapixels", 30_000_000);
    assert_eq!(image(&server, &key).await, (200, Some(10_000 - 28)));
    ok(server.cli(&["prices", "sync", "--apply"]));
    // What the next image costs, from the balance it leaves.
    let charged = std::cell::Cell::new(28);
    let next = || async {
        let (_, balance) = image(&server, &key).await;
        let cost = 10_000 - charged.get() - balance.unwrap();
        charged.set(charged.get() + cost);
        cost
    };
    assert!(eventually(Duration::from_secs(10), || async { next().await == 33 }).await);
    ok(server.cli(&["prices", "forget"]));
    assert!(eventually(Duration::from_secs(10), || async { next().await == 28 }).await);
    assert!(books_close(&server, &[("acme", charged.get())]).await);
    let calls = server.query("SELECT COUNT(*) FROM charges")[0]
        .get::<i64>(0)
        .unwrap();

    let since = format!(
        "{}Z",
        abhiapi::dates::format_rfc3339(abhiapi::store::now_secs() - 3600)
    );
    let report = json(ok(server.cli(&["reconcile", "--since", &since, "--json"])).as_bytes());
    let total = report.get("total").unwrap();
    assert_eq!(total.get_str("unbilled_usd"), Some("0"), "{report}");
    assert_eq!(total.get_u64("not_billed_by_fal"), Some(0), "{report}");
    let flux = &report.get_array("models").unwrap()[0];
    assert_eq!(flux.get_i64("fal_requests"), Some(calls), "{report}");
    // A charge gone from the store: fal's call is looked up by its id, and is unbilled.
    server.query("DELETE FROM charges WHERE id = (SELECT MIN(id) FROM charges)");
    let out = server.cli(&["reconcile", "--since", &since, "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let report = json(&out.stdout);
    assert_eq!(report.get_array("unbilled").unwrap().len(), 1, "{report}");
    assert!(metrics(&server)
        .await
        .contains("abhiapi_reconcile_unbilled_usd 0.03"));
}

async fn a_killed_server_settles_every_hold_on_restart(backend: Backend) {
    let (mock, mut server, key) = start(backend, "acme", 100_000).await;
    let calls: Vec<_> = (0..24)
        .map(|_| {
            let (url, key) = (server.url("/fal-ai/flux/dev"), key.clone());
            tokio::spawn(async move {
                client()
                    .request(post(&url, Some(&key), "application/json", IMAGE))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.kill();
    for c in calls {
        let _ = c.await;
    }
    server.restart();
    // Every request fal served is charged: the settled as they ended, the
    // rest at their hold (28 either way, here), and nothing twice. A hold
    // the kill cut off before fal had it is charged too: the journal cannot
    // tell it from one fal served.
    let served = mock
        .seen()
        .iter()
        .filter(|s| s.target == "/fal-ai/flux/dev")
        .count() as i64;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let b = books(&server)[0].1;
            b.balance() && b.charged % 28 == 0 && (28 * served..=28 * 24).contains(&b.charged)
        })
        .await,
        "served {served}: {:?}",
        books(&server)
    );
}

async fn a_queued_job_outlives_a_restart_and_is_charged_once(backend: Backend) {
    let (_mock, mut server, key) = start(backend, "acme", 1000).await;
    let fal_id = submit(&server, &key).await;
    server.restart();
    // Fetched again and again, charged 28 once.
    for _ in 0..3 {
        assert!(
            job_result(&server, &key, &fal_id).await,
            "the job never completed"
        );
    }
    let result = format!("/queue/fal-ai/flux/requests/{fal_id}");
    // Another account cannot see it.
    let stranger = server.create_key("stranger", 1000);
    let stranger_gets = || async {
        let resp = client()
            .request(get(&server.url(&result), Some(&stranger)))
            .await
            .unwrap();
        resp.status().as_u16()
    };
    eventually(Duration::from_secs(5), || async {
        stranger_gets().await != 401
    })
    .await;
    assert_eq!(stranger_gets().await, 404);
    assert!(books_close(&server, &[("acme", 28)]).await);
}

/// A transaction dropped unfinished (an edit refused halfway) lets its
/// locks go at once: the next session does not wait on them.
#[test]
fn on_postgres_a_transaction_dropped_unfinished_lets_go_at_once() {
    use abhiapi::store::sql::{Mode, Sql};
    let dir = tempfile::tempdir().unwrap();
    let config = abhiapi::config::StoreConfig {
        url: Some(pg::database()),
        ..abhiapi::config::StoreConfig::at(dir.path().join("abhiapi.db"))
    };
    let mut first = abhiapi::store::open(&config).unwrap();
    let mut second = abhiapi::store::connect(&config).unwrap();
    {
        let mut tx = first.transaction(Mode::Plain).unwrap();
        tx.exec("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE", &[])
            .unwrap();
    }
    second.exec("SET lock_timeout = 200", &[]).unwrap();
    let read = second.rows("SELECT COUNT(*) FROM accounts", &[]);
    assert!(
        read.is_ok(),
        "the dropped transaction still held its lock: {read:?}"
    );
}
