//! People sign in by a link sent to their email (here: the log, as with no
//! mail server configured) and use the dashboard's API by session: a link
//! works once and for 15 minutes, a session's changes must come from this
//! site with its CSRF token, and signing out ends it.

mod support;

use http::{Method, Request};
use http_body_util::Full;
use simd_json::prelude::*;
use simd_json::OwnedValue;
use support::*;

struct Answer {
    status: u16,
    location: Option<String>,
    cookie: Option<String>,
    body: OwnedValue,
}

async fn send(
    server: &Server,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    sent: &str,
) -> Answer {
    let mut req = Request::builder().method(method).uri(server.url(path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(sent.to_owned())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let header = |name| {
        resp.headers()
            .get(name)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let (status, location, cookie, kind) = (
        resp.status().as_u16(),
        header("location"),
        header("set-cookie"),
        header("content-type").unwrap_or_default(),
    );
    let bytes = body(resp).await;
    let body = match (bytes.is_empty(), kind.starts_with("application/json")) {
        (true, _) => OwnedValue::null(),
        (false, true) => json(&bytes),
        (false, false) => OwnedValue::from(String::from_utf8_lossy(&bytes).into_owned()),
    };
    Answer {
        status,
        location,
        cookie,
        body,
    }
}

async fn ask_link(server: &Server, email: &str) -> Answer {
    send(
        server,
        Method::POST,
        "/v1/auth/email",
        &[("content-type", "application/json")],
        &format!(r#"{{"email":"{email}"}}"#),
    )
    .await
}

/// The sign-in links the server wrote to its log for `email`, oldest first.
fn links_for(server: &Server, email: &str) -> Vec<String> {
    server
        .stderr_log()
        .lines()
        .filter(|l| l.contains("sign-in link") && l.contains(&format!("email={email} ")))
        .map(|l| {
            let link = l.split("link=").nth(1).unwrap();
            link.split_whitespace().next().unwrap().to_owned()
        })
        .collect()
}

/// The `n`th link sent to `email` (the log is written by its own thread).
async fn link_for(server: &Server, email: &str, n: usize) -> String {
    let written = eventually(std::time::Duration::from_secs(5), || async {
        links_for(server, email).len() >= n
    })
    .await;
    assert!(
        written,
        "no link {n} for {email} in:\n{}",
        server.stderr_log()
    );
    links_for(server, email)[n - 1].clone()
}

/// The path and query of `link`, which must point at this server.
fn path_of(server: &Server, link: &str) -> String {
    let base = server.url("");
    link.strip_prefix(base.trim_end_matches('/'))
        .unwrap_or_else(|| panic!("{link} is not on {base}"))
        .to_owned()
}

/// Follows an emailed link as a browser does: the page, then its button,
/// which posts the token back from this site.
async fn follow(server: &Server, link: &str) -> Answer {
    let page = send(server, Method::GET, &path_of(server, link), &[], "").await;
    if page.status != 200 {
        return page;
    }
    let token = link.split("token=").nth(1).unwrap();
    send(
        server,
        Method::POST,
        "/v1/auth/link",
        &[
            ("origin", &origin(server)),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &format!("token={token}"),
    )
    .await
}

/// `GET /v1/account` by session.
async fn account_by(server: &Server, cookie: &str) -> Answer {
    send(
        server,
        Method::GET,
        "/v1/account",
        &[("cookie", cookie)],
        "",
    )
    .await
}

/// `abhiapi_session=…`, as the browser would send it back.
fn session_of(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

fn origin(server: &Server) -> String {
    server.url("").trim_end_matches('/').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_by_email_link_and_uses_the_dashboard_by_session() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));

    let asked = ask_link(&server, " Ada@Example.com ").await;
    assert_eq!(asked.status, 202, "{:?}", asked.body);
    let link = link_for(&server, "ada@example.com", 1).await;
    let token = link.split("token=").nth(1).unwrap().to_owned();

    let followed = follow(&server, &link).await;
    assert_eq!(followed.status, 303);
    assert_eq!(followed.location.as_deref(), Some("/dashboard"));
    let set_cookie = followed.cookie.expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=2592000"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = session_of(&set_cookie);

    // The account exists now, empty, and the session reads it.
    let account = account_by(&server, &cookie).await;
    assert_eq!(account.status, 200, "{:?}", account.body);
    assert_eq!(account.body.get_str("account"), Some("ada@example.com"));
    assert_eq!(account.body.get_str("email"), Some("ada@example.com"));
    assert_eq!(account.body.get_i64("balance"), Some(0));
    let csrf = account.body.get_str("csrf_token").unwrap().to_owned();

    // A change needs this site's Origin and the session's token.
    let o = origin(&server);
    for (why, headers) in [
        ("neither", vec![("cookie", cookie.as_str())]),
        (
            "no token",
            vec![("cookie", cookie.as_str()), ("origin", o.as_str())],
        ),
        (
            "a wrong token",
            vec![
                ("cookie", cookie.as_str()),
                ("origin", o.as_str()),
                ("x-csrf-token", "0"),
            ],
        ),
        (
            "another site",
            vec![
                ("cookie", cookie.as_str()),
                ("origin", "https://evil.example"),
                ("x-csrf-token", csrf.as_str()),
            ],
        ),
    ] {
        let refused = send(&server, Method::POST, "/v1/keys", &headers, "").await;
        assert_eq!(
            (refused.status, refused.body.get_str("error_type")),
            (403, Some("csrf_rejected")),
            "{why}"
        );
    }
    let same_site = [
        ("cookie", cookie.as_str()),
        ("origin", o.as_str()),
        ("x-csrf-token", csrf.as_str()),
    ];
    let created = send(&server, Method::POST, "/v1/keys", &same_site, "").await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let key = created.body.get_str("key").unwrap().to_owned();
    // The new key is the account's: it works, and the account has no credits yet.
    let resp = call(&server, &key, "/fal-ai/flux/dev", r#"{"prompt":"a"}"#).await;
    assert_error(resp, 402, "insufficient_credits").await;

    // A link works once.
    let page = send(&server, Method::GET, &path_of(&server, &link), &[], "").await;
    assert_eq!(page.status, 200);
    let again = follow(&server, &link).await;
    assert_eq!(again.status, 303);
    assert_eq!(again.location.as_deref(), Some("/dashboard?signin=expired"));
    assert!(again.cookie.is_none());

    // Signing in again is the same account.
    assert_eq!(ask_link(&server, "ada@example.com").await.status, 202);
    let second = link_for(&server, "ada@example.com", 2).await;
    assert_ne!(second, link);
    let followed = follow(&server, &second).await;
    let other_session = session_of(&followed.cookie.unwrap());
    let account = account_by(&server, &other_session).await;
    assert_eq!(account.body.get_str("account"), Some("ada@example.com"));
    let accounts: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(accounts, 1);

    // Signing out ends that session, not the other one.
    let out = send(&server, Method::POST, "/v1/auth/signout", &same_site, "").await;
    assert_eq!(out.status, 200, "{:?}", out.body);
    assert!(out.cookie.unwrap().contains("Max-Age=0"));
    let after = account_by(&server, &cookie).await;
    assert_eq!(after.status, 401);
    let still = account_by(&server, &other_session).await;
    assert_eq!(still.status, 200);

    // Links and sessions are stored by their hash only.
    let db = server.db();
    let session_secret = cookie.split('=').nth(1).unwrap().to_owned();
    for (table, secret) in [("sign_in_links", &token), ("sessions", &session_secret)] {
        let plain: i64 = db
            .query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE hash = ?1 OR hash = CAST(?1 AS BLOB)"),
                [secret],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(plain, 0, "{table} keeps the secret itself");
    }
    assert!(books_close(&server, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_site_cannot_sign_a_browser_in_with_its_own_link() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));
    assert_eq!(ask_link(&server, "mallory@example.com").await.status, 202);
    let link = link_for(&server, "mallory@example.com", 1).await;
    let token = link.split("token=").nth(1).unwrap();

    // Fetching the link (a mail scanner, a preview) shows a page and signs nobody in.
    let page = send(&server, Method::GET, &path_of(&server, &link), &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.cookie.is_none());
    assert!(page.body.as_str().unwrap().contains(r#"method="post""#));
    // A page of another site posting the token: refused, and the link is not used up.
    for origin in [Some("https://evil.example"), Some("null"), None] {
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(o) = origin {
            headers.push(("origin", o));
        }
        let posted = send(
            &server,
            Method::POST,
            "/v1/auth/link",
            &headers,
            &format!("token={token}"),
        )
        .await;
        assert_eq!(
            (posted.status, posted.body.get_str("error_type")),
            (403, Some("csrf_rejected")),
            "{origin:?}"
        );
        assert!(posted.cookie.is_none());
    }
    let followed = follow(&server, &link).await;
    assert_eq!(followed.location.as_deref(), Some("/dashboard"));
    assert!(followed.cookie.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_or_forged_links_and_sessions_sign_nobody_in() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));
    assert_eq!(ask_link(&server, "bob@example.com").await.status, 202);
    let link = link_for(&server, "bob@example.com", 1).await;
    // Sixteen minutes later.
    server
        .db()
        .execute(
            "UPDATE sign_in_links SET expires_at_ms = expires_at_ms - 16 * 60000",
            [],
        )
        .unwrap();
    let expired = follow(&server, &link).await;
    assert_eq!(
        expired.location.as_deref(),
        Some("/dashboard?signin=expired")
    );
    assert!(expired.cookie.is_none());
    for forged in [
        "",
        "abc",
        &"0".repeat(64),
        &format!("{}'--", "a".repeat(60)),
    ] {
        let answer = follow(
            &server,
            &format!("{}/v1/auth/link?token={forged}", origin(&server)),
        )
        .await;
        assert_eq!(
            answer.location.as_deref(),
            Some("/dashboard?signin=expired"),
            "{forged}"
        );
        assert!(answer.cookie.is_none());
    }
    for cookie in [
        "abhiapi_session=",
        "abhiapi_session=abc",
        &format!("abhiapi_session={}", "f".repeat(64)),
    ] {
        let answer = account_by(&server, cookie).await;
        assert_eq!(answer.status, 401, "{cookie}");
    }
    let accounts: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(accounts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_links_are_limited_per_email_and_per_client() {
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options::new(mock.url(false)));
    for bad in ["", "nobody", "a@b", "a b@example.com"] {
        let answer = ask_link(&server, bad).await;
        assert_eq!(
            (answer.status, answer.body.get_str("error_type")),
            (400, Some("invalid_input")),
            "{bad}"
        );
    }
    for _ in 0..3 {
        assert_eq!(ask_link(&server, "carol@example.com").await.status, 202);
    }
    let limited = ask_link(&server, "CAROL@example.com").await;
    assert_eq!(
        (limited.status, limited.body.get_str("error_type")),
        (429, Some("sign_in_rate_limited"))
    );
    // The same client, other addresses: a few more, then refused too.
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(
            ask_link(&server, &format!("user{i}@example.com"))
                .await
                .status,
        );
    }
    assert!(
        statuses.contains(&202) && statuses.ends_with(&[429]),
        "{statuses:?}"
    );
    let want = 3 + statuses.iter().filter(|s| **s == 202).count();
    let sent = || {
        server
            .stderr_log()
            .lines()
            .filter(|l| l.contains("sign-in link") && l.contains(" link="))
            .count()
    };
    eventually(std::time::Duration::from_secs(5), || async {
        sent() >= want
    })
    .await;
    assert_eq!(sent(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_mail_server_the_link_is_mailed_and_not_logged() {
    let mut sink = MailSink::start();
    let mock = MockFal::start(None).await.unwrap();
    let server = Server::start(Options {
        smtp_url: Some(format!("smtp://127.0.0.1:{}", sink.port)),
        ..Options::new(mock.url(false))
    });
    let asked = ask_link(&server, "Dan@Example.com").await;
    assert_eq!(asked.status, 202, "{:?}", asked.body);
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let mail = &messages[0];
    assert_eq!(mail.get_str("from"), Some("signin@example.com"));
    assert_eq!(
        mail.get("to").and_then(|t| t.as_array()).map(|t| t.len()),
        Some(1)
    );
    assert_eq!(
        mail.get("to").unwrap().as_array().unwrap()[0].as_str(),
        Some("dan@example.com")
    );
    assert_eq!(mail.get_str("subject"), Some("Your sign-in link"));
    let body = mail.get_str("body").unwrap();
    let link = body
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no link in {body}"))
        .to_owned();
    assert!(
        !server.stderr_log().contains(&link),
        "the link was logged too"
    );

    let followed = follow(&server, &link).await;
    assert_eq!(followed.location.as_deref(), Some("/dashboard"));
    let cookie = session_of(&followed.cookie.unwrap());
    let account = account_by(&server, &cookie).await;
    assert_eq!(account.body.get_str("account"), Some("dan@example.com"));

    // The mail server gone: a clear error, and no session for anyone.
    let _ = sink.child.kill();
    let _ = sink.child.wait();
    let failed = ask_link(&server, "erin@example.com").await;
    assert_eq!(
        (failed.status, failed.body.get_str("error_type")),
        (502, Some("mail_failed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_signing_in_with_an_operator_account_s_name_gets_a_new_account_and_forged_origins_change_nothing(
) {
    let mock = MockFal::start(None).await.unwrap();
    // The operator's account is named like an address, with credits and a key.
    let (server, operator_key) =
        Server::start_with_key(Options::new(mock.url(false)), "eve@example.com", 1_000);

    assert_eq!(ask_link(&server, "EVE@example.com").await.status, 202);
    let link = link_for(&server, "eve@example.com", 1).await;
    let followed = follow(&server, &link).await;
    let cookie = session_of(&followed.cookie.expect("a session"));
    let account = account_by(&server, &cookie).await;
    assert_eq!(account.status, 200, "{:?}", account.body);
    assert_eq!(account.body.get_str("account"), Some("eve@example.com-2"));
    assert_eq!(account.body.get_i64("balance"), Some(0));
    assert_eq!(
        account
            .body
            .get("keys")
            .and_then(|k| k.as_array())
            .map(Vec::len),
        Some(0)
    );
    let csrf = account.body.get_str("csrf_token").unwrap().to_owned();

    // The operator's key is not the stranger's to revoke.
    let operator_key_id: i64 = server
        .db()
        .query_row("SELECT id FROM api_keys", [], |r| r.get(0))
        .unwrap();
    let o = origin(&server);
    let same_site = [
        ("cookie", cookie.as_str()),
        ("origin", o.as_str()),
        ("x-csrf-token", csrf.as_str()),
    ];
    let revoke = send(
        &server,
        Method::DELETE,
        &format!("/v1/keys/{operator_key_id}"),
        &same_site,
        "",
    )
    .await;
    assert_eq!(revoke.status, 404, "{:?}", revoke.body);
    let resp = call(
        &server,
        &operator_key,
        "/fal-ai/flux/dev",
        r#"{"prompt":"a"}"#,
    )
    .await;
    assert_ne!(resp.status(), 403, "the operator's key was disabled");

    // Origins that are not exactly this site's, or none, are refused.
    let port = o.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let other_port = format!("http://127.0.0.1:{}", port.wrapping_add(1));
    let slash = format!("{o}/");
    let https = o.replace("http://", "https://");
    for bad in [
        "null",
        slash.as_str(),
        other_port.as_str(),
        https.as_str(),
        "",
    ] {
        let mut headers = vec![("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())];
        if !bad.is_empty() {
            headers.push(("origin", bad));
        } else {
            headers.push(("referer", slash.as_str()));
        }
        let refused = send(&server, Method::POST, "/v1/keys", &headers, "").await;
        assert_eq!(
            (refused.status, refused.body.get_str("error_type")),
            (403, Some("csrf_rejected")),
            "origin {bad:?}"
        );
        assert!(refused.cookie.is_none());
    }
    // A cookie of another name ending in ours, or ours twice (a forged one
    // first), signs nobody in as someone else.
    let secret = cookie.split('=').nth(1).unwrap();
    for forged in [
        format!("x_abhiapi_session={secret}"),
        format!("abhiapi_session={}; {cookie}", "0".repeat(64)),
    ] {
        let answer = send(
            &server,
            Method::GET,
            "/v1/account",
            &[("cookie", forged.as_str())],
            "",
        )
        .await;
        assert_eq!(answer.status, 401, "{forged}");
    }
    // Without trust in forwarded headers, X-Forwarded-For is no new client.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let answer = send(
            &server,
            Method::POST,
            "/v1/auth/email",
            &[
                ("content-type", "application/json"),
                ("x-forwarded-for", &format!("10.0.0.{i}")),
            ],
            &format!(r#"{{"email":"xff{i}@example.com"}}"#),
        )
        .await;
        statuses.push(answer.status);
    }
    assert!(statuses.ends_with(&[429]), "{statuses:?}");
}
