//! The server on a bad day, or after many: a log pipe nobody drains, a fal
//! that never answers while it stops, jobs that ended long ago, and files
//! other users of the machine must not read.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::Full;
use simd_json::prelude::*;
use support::*;

/// Submits a flux job to the queue; returns fal's request id for it.
async fn submit_job(server: &Server, key: &str) -> String {
    let resp = call(server, key, "/queue/fal-ai/flux/dev", r#"{"prompt":"x"}"#).await;
    assert_eq!(resp.status(), 200);
    json(&body(resp).await)
        .get_str("request_id")
        .unwrap()
        .to_owned()
}

/// Where the job's result is fetched.
fn result_path(request_id: &str) -> String {
    format!("/queue/fal-ai/flux/requests/{request_id}")
}

async fn metric(server: &Server, name: &str) -> f64 {
    let req = Request::get(format!("http://{}/metrics", server.admin.unwrap()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::default())
        .unwrap();
    let text = body(client().request(req).await.unwrap()).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_does_not_stall_requests_and_dropped_lines_are_counted() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.admin = true;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, opts.render(dir.path())).unwrap();
    // A pipe that is never read: it fills after some 64 KiB of log lines.
    let server = Server::start_with_stderr(dir, config, Stdio::piped());

    let client = client();
    for i in 0..4000 {
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(get(&server.url("/healthz"), None)),
        )
        .await;
        let resp = answered
            .unwrap_or_else(|_| panic!("request {i} stalled"))
            .unwrap();
        assert_eq!(resp.status(), 200);
        body(resp).await;
    }
    let dropped = metric(&server, "abhiapi_log_lines_dropped_total").await;
    assert!(dropped > 0.0, "no log line was counted as dropped");
}

/// A queue host that accepts connections and never answers.
fn hanging_fal() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in listener.incoming().map_while(Result::ok) {
            count.fetch_add(1, Ordering::SeqCst);
            open.push(conn);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reconciler_pass_against_a_hanging_fal_exits_within_the_grace() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    let (mut server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 10_000);
    for _ in 0..3 {
        submit_job(&server, &key).await;
    }
    server.signal("TERM");
    assert!(server.wait().success());

    // The pending jobs are checked every second with a queue host that
    // would keep each status call for `timeout_secs`.
    let (hang, accepted) = hanging_fal();
    opts.queue = format!("http://{hang}");
    opts.reconcile_interval_secs = 1;
    opts.timeout_secs = 300;
    std::fs::write(&server.config, opts.render(server.dir.path())).unwrap();
    server.restart();
    let pass_started = eventually(Duration::from_secs(10), || async {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(pass_started, "the reconciler never asked fal");

    let asked = Instant::now();
    server.signal("TERM");
    assert!(server.wait().success());
    // `shutdown_grace_secs` is 10 in the tests' config.
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        asked.elapsed()
    );
}

/// With `keep_ended_jobs_days = 0`, a job is forgotten by the reconciler's
/// next pass once it has ended: a long run holds only what a restart would load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_jobs_are_forgotten_while_the_server_runs() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    opts.keep_ended_jobs_days = 0;
    let (server, key) = Server::start_with_key(opts, "acme", 10_000);
    let result = server.url(&result_path(&submit_job(&server, &key).await));
    // The reconciler completes and charges the job (three status polls), then forgets it.
    assert!(books_close(&server, &[("acme", 28)]).await);
    let forgotten = eventually(Duration::from_secs(10), || async {
        let resp = client().request(get(&result, Some(&key))).await.unwrap();
        let status = resp.status();
        body(resp).await;
        status == 404
    })
    .await;
    assert!(forgotten, "the ended job is still served from memory");
}

/// Memory keeps only `max_ended_jobs_in_memory` ended jobs: the others are
/// read back from the store, to their owner only, with the figures they
/// ended with and no second charge, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_jobs_beyond_the_cap_are_read_from_the_store() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    opts.max_ended_jobs_in_memory = 1;
    opts.admin = true;
    let (mut server, key) = Server::start_with_key(opts, "acme", 10_000);
    let rival = server.create_key("rival", 10_000);
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(result_path(&submit_job(&server, &key).await));
    }
    // The reconciler charges the three jobs, then keeps one in memory.
    assert!(books_close(&server, &[("acme", 84)]).await);
    let capped = eventually(Duration::from_secs(15), || async {
        let metrics = metrics(&server).await;
        metrics.contains(r#"abhiapi_jobs_in_memory{state="ended"} 1"#)
            && metrics.contains(r#"abhiapi_jobs_in_memory{state="pending"} 0"#)
    })
    .await;
    assert!(capped, "{}", metrics(&server).await);

    for life in ["running", "restarted"] {
        for result in &results {
            let resp = client()
                .request(get(&server.url(result), Some(&key)))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{life}: {result}");
            let (_, billing) = unsplice(&body(resp).await);
            assert_eq!(
                billing.get_u64("credits_used"),
                Some(28),
                "{life}: {billing}"
            );
            let status = format!("{result}/status");
            let resp = client()
                .request(get(&server.url(&status), Some(&key)))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{life}: {status}");
            body(resp).await;
            // Another account's job is as unknown from the store as from memory.
            let resp = client()
                .request(get(&server.url(result), Some(&rival)))
                .await
                .unwrap();
            assert_error(resp, 404, "job_not_found").await;
        }
        assert!(books_close(&server, &[("acme", 84)]).await, "{life}");
        server.restart();
    }
}

/// `[server] workers` request threads, each on its own socket of the
/// shared port: every connection is served, whichever thread the kernel
/// gives it to, and SIGTERM stops them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_by_the_configured_request_threads() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.workers = 3;
    let (mut server, key) = Server::start_with_key(opts, "acme", 10_000);
    // A thread names itself once it runs, which may be just after the
    // server announced its (already listening) sockets.
    let request_threads = || {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| name.starts_with("request-"))
            .collect();
        names.sort();
        names
    };
    let named = eventually(Duration::from_secs(5), || async {
        request_threads() == ["request-0", "request-1", "request-2"]
    })
    .await;
    assert!(named, "{:?}", request_threads());
    // A new client, so a new connection, each: the kernel spreads them
    // over the three sockets.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let (url, key) = (server.url("/mock/echo"), key.clone());
        calls.spawn(async move {
            let resp = client()
                .request(post(&url, Some(&key), "application/json", "{}"))
                .await
                .unwrap();
            let status = resp.status();
            body(resp).await;
            status
        });
    }
    let statuses = calls.join_all().await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(books_close(&server, &[("acme", 120)]).await);
    server.signal("TERM");
    assert!(server.wait().success());
}

/// The request threads share a port among themselves (`SO_REUSEPORT`), but
/// never with another process: a second server configured on a port the
/// first listens on exits with "in use" instead of taking half its traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_port_exits_instead_of_sharing_it() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 10_000);
    let first = server.url("");
    let addr = first.trim_start_matches("http://").trim_end_matches('/');
    let other = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(&server.config)
        .unwrap()
        .replace(
            r#"plain_listen = "127.0.0.1:0""#,
            &format!(r#"plain_listen = "{addr}""#),
        )
        .replace(
            &server.dir.path().display().to_string(),
            &other.path().display().to_string(),
        );
    assert!(config.contains(addr), "{config}");
    let path = other.path().join("abhiapi.toml");
    std::fs::write(&path, config).unwrap();
    let mut second = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("ABHIAPI_TEST_FAL_KEY", FAL_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(Duration::from_secs(10), || {
        let exited = second.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    if !exited {
        let _ = second.kill();
    }
    let out = second.wait_with_output().unwrap();
    assert!(exited, "a second server listens on the first one's port");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("in use"), "{said}");
    // The first server has all its traffic still.
    for _ in 0..10 {
        let resp = call(&server, &key, "/mock/echo", "{}").await;
        assert_eq!(resp.status(), 200);
        body(resp).await;
    }
    assert!(books_close(&server, &[("acme", 20)]).await);
}

/// An ended job leaves memory only once the store can answer for it: while
/// SQLite lags (here a lock another process holds; a slow disk, a long
/// checkpoint or a CLI edit do the same), a charged job is still its
/// owner's, with the figures it ended with, not a 404 or a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_job_stays_readable_while_the_store_lags_behind() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.reconcile_interval_secs = 1;
    opts.max_ended_jobs_in_memory = 0;
    let (server, key) = Server::start_with_key(opts, "acme", 10_000);
    // Nothing reaches SQLite while this is held.
    let lock = server.db();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let result = server.url(&result_path(&submit_job(&server, &key).await));
    // The owner fetches the result once it is there: charged.
    let fetched = eventually(Duration::from_secs(5), || async {
        let resp = client().request(get(&result, Some(&key))).await.unwrap();
        let ok = resp.status() == 200;
        let bytes = body(resp).await;
        ok && unsplice(&bytes).1.get_u64("credits_used") == Some(28)
    })
    .await;
    assert!(fetched, "the result was never charged");
    // Past the seconds an ended job is sure to stay, the reconciler runs again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resp = client().request(get(&result, Some(&key))).await.unwrap();
    let status = resp.status();
    let bytes = body(resp).await;
    assert_eq!(
        status,
        200,
        "the owner's charged job, its end not yet in SQLite: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(unsplice(&bytes).1.get_u64("credits_used"), Some(28));
    drop(lock);
    assert!(books_close(&server, &[("acme", 28)]).await);
}

/// fal's queue host as the mock serves it, except that any call about the
/// job whose id is put in the returned slot never answers (a status call
/// that takes its full `timeout_secs`, as a slow fal's may).
async fn fal_slow_on_one_job(queue: String) -> (String, Arc<parking_lot::Mutex<Option<String>>>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let slot = Arc::clone(&slow);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (queue, slow) = (queue.clone(), Arc::clone(&slow));
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (queue, slow) = (queue.clone(), Arc::clone(&slow));
                        async move {
                            let path = req.uri().path_and_query().unwrap().as_str().to_owned();
                            if slow.lock().as_deref().is_some_and(|id| path.contains(id)) {
                                std::future::pending::<()>().await;
                            }
                            let (parts, incoming) = req.into_parts();
                            let bytes = incoming.collect().await.unwrap().to_bytes();
                            let mut out = Request::builder()
                                .method(parts.method)
                                .uri(format!("{queue}{path}"));
                            for (name, value) in &parts.headers {
                                if name != http::header::HOST {
                                    out = out.header(name, value);
                                }
                            }
                            let resp = client()
                                .request(out.body(Full::new(bytes)).unwrap())
                                .await
                                .unwrap();
                            let (parts, incoming) = resp.into_parts();
                            let bytes = incoming.collect().await.unwrap().to_bytes();
                            Ok::<_, std::convert::Infallible>(http::Response::from_parts(
                                parts,
                                Full::new(bytes),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), slot)
}

/// The cap on ended jobs in memory holds while the reconciler's pass is
/// long: a pass asks fal about every pending job in turn, each for up to
/// `timeout_secs`, and ended jobs must not pile up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_jobs_are_capped_while_a_reconciler_pass_waits_on_fal() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    let (front, slow) = fal_slow_on_one_job(opts.queue.clone()).await;
    opts.queue = front;
    opts.reconcile_interval_secs = 1;
    opts.timeout_secs = 300;
    opts.max_ended_jobs_in_memory = 1;
    opts.admin = true;
    let (server, key) = Server::start_with_key(opts, "acme", 10_000);
    let submit = || submit_job(&server, &key);
    // A job fal takes its time to tell about: the next pass waits on it.
    *slow.lock() = Some(submit().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Five jobs their owner runs to the end meanwhile.
    for _ in 0..5 {
        let id = submit().await;
        let result = server.url(&format!("/queue/fal-ai/flux/requests/{id}"));
        // As a client within the poll allowance (10 a second) would: the
        // status until COMPLETED, then the result.
        let completed = eventually(Duration::from_secs(5), || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = client()
                .request(get(&format!("{result}/status"), Some(&key)))
                .await
                .unwrap();
            let done = status.status() == 200;
            body(status).await;
            done
        })
        .await;
        assert!(completed, "{id} never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = client().request(get(&result, Some(&key))).await.unwrap();
        assert_eq!(resp.status(), 200, "{id}");
        body(resp).await;
    }
    let capped = eventually(Duration::from_secs(5), || async {
        metrics(&server)
            .await
            .contains(r#"abhiapi_jobs_in_memory{state="ended"} 1"#)
    })
    .await;
    let metrics = metrics(&server).await;
    let line = metrics
        .lines()
        .find(|l| l.contains(r#"state="ended""#))
        .unwrap_or_default()
        .to_owned();
    assert!(capped, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_journal_and_lock_are_readable_by_their_owner_only() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 10_000);
    // A billed call: a hold in the journal, a charge in the WAL.
    let resp = call(&server, &key, "/mock/echo", "{}").await;
    assert_eq!(resp.status(), 200);
    body(resp).await;
    assert!(
        books_close(&server, &[("acme", 2)]).await,
        "{}",
        server.stderr_log()
    );

    let mode = |p: &std::path::Path| {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        format!("{mode:o}")
    };
    let dir = server.dir.path();
    for name in [
        "abhiapi.db",
        "abhiapi.db-wal",
        "abhiapi.db-shm",
        "abhiapi.db.lock",
    ] {
        assert_eq!(mode(&dir.join(name)), "600", "{name}");
    }
    let journal = dir.join("abhiapi.db.holds");
    assert_eq!(mode(&journal), "700", "the journal's folder");
    let segments: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segments.is_empty());
    for segment in segments {
        assert_eq!(mode(&segment), "600", "{}", segment.display());
    }
}
