//! The operator's CLI and its effect on a running server.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn is_key(s: &str) -> bool {
    s.len() == 39 && s.starts_with("sk-fal-") && s[7..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[test]
fn cli_creates_lists_and_shows_without_ever_storing_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let db = dir.path().join("abhiapi.db");
    std::fs::write(
        &config,
        format!(
            "[server]\nplain_listen = \"127.0.0.1:0\"\n[store]\npath = {:?}\n",
            db.display().to_string()
        ),
    )
    .unwrap();

    let first = stdout(&cli(
        &config,
        &["keys", "create", "--account", "acme", "--credits", "500"],
    ));
    let key1 = first.lines().last().unwrap();
    assert!(is_key(key1), "{first}");
    assert!(first.contains("created account acme"), "{first}");
    let second = stdout(&cli(&config, &["keys", "create", "--account", "acme"]));
    let key2 = second.lines().last().unwrap();
    assert!(is_key(key2) && key1 != key2);
    assert!(!second.contains("created account"), "{second}");
    stdout(&cli(
        &config,
        &["keys", "create", "--account", "other", "--plan", "pro"],
    ));

    let list = stdout(&cli(&config, &["keys", "list", "--account", "acme"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(
        list.contains(&key1[..11]) && list.contains(&key2[..11]),
        "{list}"
    );
    assert!(
        !list.contains(key1) && !list.contains(&key1[..16]),
        "keys list shows the secret"
    );
    assert!(!list.contains("other"), "{list}");
    assert_eq!(stdout(&cli(&config, &["keys", "list"])).lines().count(), 4);

    assert!(stdout(&cli(&config, &["accounts", "show", "acme"])).contains("balance   500 credits"));
    let topped = stdout(&cli(
        &config,
        &["accounts", "topup", "acme", "--credits", "250"],
    ));
    assert!(topped.contains("balance 750"), "{topped}");
    let shown = stdout(&cli(&config, &["accounts", "show", "acme"]));
    assert!(
        shown.contains("balance   750 credits") && shown.contains("state     active"),
        "{shown}"
    );
    assert!(
        shown.contains("held      0 credits") && shown.contains("available 750 credits"),
        "{shown}"
    );
    stdout(&cli(&config, &["accounts", "suspend", "acme"]));
    assert!(stdout(&cli(&config, &["accounts", "show", "acme"])).contains("suspended"));

    for bad in [
        &["accounts", "show", "nobody"][..],
        &["accounts", "topup", "acme", "--credits", "-5"],
        &["accounts", "topup", "acme", "--credits", "0"],
        &["keys", "disable", "999"],
        &["keys", "create", "--account", "neg", "--credits", "-1"],
    ] {
        let out = cli(&config, bad);
        assert!(!out.status.success(), "{bad:?} succeeded");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("abhiapi: "),
            "{bad:?}"
        );
    }

    // Only hashes are stored: no trace of either secret in the database files.
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        for key in [key1, key2] {
            let secret_part = &key.as_bytes()[11..];
            assert!(
                !bytes.windows(secret_part.len()).any(|w| w == secret_part),
                "a key secret is stored in plain text"
            );
        }
    }
}

/// Sends one request with `key`; counts the ones that were let through.
async fn status(server: &Server, key: &str, passed: &AtomicUsize) -> u16 {
    let resp = client()
        .request(get(&server.url("/mock/echo"), Some(key)))
        .await
        .unwrap();
    let code = resp.status().as_u16();
    if code == 200 {
        passed.fetch_add(1, Ordering::SeqCst);
    }
    code
}

async fn becomes(server: &Server, key: &str, want: u16, passed: &AtomicUsize) -> bool {
    eventually(Duration::from_secs(1), || async {
        status(server, key, passed).await == want
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_sees_cli_changes_within_a_second() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 100_000);
    let passed = AtomicUsize::new(0);
    let s = &server;
    assert_eq!(status(s, &key, &passed).await, 200);

    // A key created now works within a second.
    let other = server.create_key("acme", 0);
    assert!(
        becomes(s, &other, 200, &passed).await,
        "new key not live within 1 s"
    );

    let id = key_id(&server, &key);
    stdout(&server.cli(&["keys", "disable", &id]));
    assert!(
        becomes(s, &key, 403, &passed).await,
        "disabled key still accepted after 1 s"
    );
    let resp = client()
        .request(get(&server.url("/mock/echo"), Some(&key)))
        .await
        .unwrap();
    assert_error(resp, 403, "key_disabled").await;
    assert_eq!(
        status(s, &other, &passed).await,
        200,
        "disabling one key affected another"
    );

    stdout(&server.cli(&["keys", "enable", &id]));
    assert!(
        becomes(s, &key, 200, &passed).await,
        "re-enabled key still refused after 1 s"
    );

    stdout(&server.cli(&["accounts", "suspend", "acme"]));
    assert!(
        becomes(s, &other, 403, &passed).await,
        "suspension not applied within 1 s"
    );
    let resp = client()
        .request(get(&server.url("/mock/echo"), Some(&key)))
        .await
        .unwrap();
    assert_error(resp, 403, "account_suspended").await;
    stdout(&server.cli(&["accounts", "resume", "acme"]));
    assert!(
        becomes(s, &key, 200, &passed).await,
        "resume not applied within 1 s"
    );

    // Refused requests never reached fal: it saw exactly the ones let through.
    assert_eq!(mock.seen().len(), passed.load(Ordering::SeqCst));

    // The server records last use; `keys list` reads it from the database.
    let used = eventually(Duration::from_secs(3), || async {
        let list = stdout(&server.cli(&["keys", "list"]));
        list.lines().skip(1).all(|l| !l.ends_with("never"))
    })
    .await;
    assert!(used, "last use never recorded");
}

/// The id of `key`, found by its display prefix in `keys list`.
fn key_id(server: &Server, key: &str) -> String {
    let list = stdout(&server.cli(&["keys", "list"]));
    let line = list
        .lines()
        .find(|l| l.contains(&key[..11]))
        .unwrap_or_else(|| panic!("{key} not listed:\n{list}"));
    line.split_whitespace().next().unwrap().to_owned()
}
