//! The server on a bad day: a log pipe nobody drains, and files other users
//! of the machine must not read.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use support::*;

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
