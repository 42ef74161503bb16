//! The server on a bad day: files other users of the machine must not read.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::*;

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
