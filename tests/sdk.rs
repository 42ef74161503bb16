//! fal's own SDKs, the real packages from the registries and unmodified,
//! against the real binary and the mock fal: the JavaScript client through
//! `proxyUrl`, the Python client through its host variables over TLS.
//! The pinned packages are installed on first use (tests/sdk/js/package-lock.json,
//! tests/sdk/py/requirements.txt).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use simd_json::prelude::*;
use support::*;

fn sdk_dir(lang: &str) -> PathBuf {
    repo_path(&format!("tests/sdk/{lang}"))
}

fn js_ready() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = sdk_dir("js");
    installed(
        &DONE,
        dir.join("node_modules/@fal-ai/client/package.json"),
        || {
            let mut c = Command::new("npm");
            c.args(["ci", "--no-audit", "--no-fund", "--prefix"])
                .arg(&dir);
            c
        },
    );
}

fn py_ready() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = sdk_dir("py");
    installed(&DONE, dir.join(".deps/fal_client/__init__.py"), || {
        let mut c = Command::new("python3");
        c.args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(dir.join(".deps"))
            .arg("-r")
            .arg(dir.join("requirements.txt"));
        c
    });
}

async fn js(server: &Server, key: &str, scenario: &str) -> simd_json::OwnedValue {
    js_ready();
    let mut cmd = Command::new("node");
    cmd.current_dir(sdk_dir("js"))
        .arg("sdk.mjs")
        .arg(server.url("/api/fal/proxy"))
        .arg(key)
        .arg(scenario);
    drive(cmd).await
}

async fn py(server: &Server, key: &str, scenario: &str) -> simd_json::OwnedValue {
    py_ready();
    let host = format!("localhost:{}", server.tls.port());
    let mut cmd = Command::new("python3");
    cmd.current_dir(sdk_dir("py"))
        .arg("sdk.py")
        .arg(scenario)
        .env("PYTHONPATH", sdk_dir("py").join(".deps"))
        .env("FAL_KEY", key)
        .env("FAL_RUN_HOST", &host)
        .env("FAL_QUEUE_RUN_HOST", format!("{host}/queue"))
        .env("SSL_CERT_FILE", repo_path("certs/dev-ca.pem"));
    drive(cmd).await
}

fn credits_used(result: &simd_json::OwnedValue) -> Option<i64> {
    assert_eq!(result.get_bool("ok"), Some(true), "{result}");
    let data = result.get("data").unwrap();
    assert_eq!(
        data.get_array("images").unwrap()[0].get_u64("width"),
        Some(1024)
    );
    data.get("_billing")?.get_i64("credits_used")
}

async fn balance_settles(server: &Server, want: i64) -> bool {
    eventually(Duration::from_secs(5), || async {
        let shown = String::from_utf8(server.cli(&["accounts", "show", "acme"]).stdout).unwrap();
        shown.contains(&format!("balance   {want} credits"))
            && shown.contains("held      0 credits")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_runs_and_subscribes_through_proxy_url() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    assert_eq!(credits_used(&js(&server, &key, "run").await), Some(28));
    assert_eq!(
        credits_used(&js(&server, &key, "subscribe").await),
        Some(28)
    );
    assert!(balance_settles(&server, 1000 - 56).await);
    // The client's key never reached fal; the SDK's calls went to the hosts they name.
    let seen = mock.seen();
    assert!(seen
        .iter()
        .all(|s| s.headers["authorization"] == format!("Key {FAL_KEY}")));
    assert!(seen.iter().any(|s| s.target == "/fal-ai/flux/dev"));
    assert!(seen.iter().any(|s| s.target == "/_queue/fal-ai/flux/dev"));
    assert!(seen
        .iter()
        .any(|s| s.target.starts_with("/_queue/fal-ai/flux/requests/")
            && s.target.contains("/status")));
    assert!(seen
        .iter()
        .all(|s| s.headers.get("x-fal-target-url").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_uploads_through_the_proxy_unbilled() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let result = js(&server, &key, "upload").await;
    assert_eq!(result.get_bool("ok"), Some(true), "{result}");
    assert!(result
        .get_str("url")
        .unwrap()
        .starts_with("https://v3.fal.media/files/mock/"));
    let seen = mock.seen();
    let initiate = seen
        .iter()
        .find(|s| s.target.starts_with("/_rest/storage/upload/initiate"))
        .expect("the upload was never initiated at fal's storage host");
    assert_eq!(initiate.headers["authorization"], format!("Key {FAL_KEY}"));
    let put = seen
        .iter()
        .find(|s| s.target.starts_with("/mock/upload/"))
        .expect("no file upload");
    assert_eq!(put.body.as_ref(), b"hello from the sdk");
    assert!(balance_settles(&server, 1000).await, "an upload was billed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_route_refuses_hosts_other_than_fals() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    for target in [
        "https://evil.example/fal-ai/flux/dev",
        &format!("http://{}/fal-ai/flux/dev", mock.addr),
        "https://rest.fal.ai/tokens/",
    ] {
        let req = http::Request::post(server.url("/api/fal/proxy"))
            .header("authorization", format!("Key {key}"))
            .header("x-fal-target-url", target)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_error(resp, 400, "invalid_target_url").await;
    }
    assert!(mock.seen().is_empty(), "a refused target was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_raises_the_javascript_clients_own_error() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, _key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    let wrong = format!("sk-fal-{}", "A".repeat(32));
    let result = js(&server, &wrong, "run").await;
    assert_eq!(result.get_bool("ok"), Some(false), "{result}");
    assert_eq!(result.get_str("name"), Some("ApiError"));
    assert_eq!(result.get_u64("status"), Some(401));
    let body = result.get("body").unwrap();
    assert_eq!(body.get_str("error_type"), Some("invalid_api_key"));
    assert_eq!(body.get_str("detail"), Some("Invalid API key."));
    assert!(mock.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_runs_and_subscribes_over_tls() {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    assert_eq!(credits_used(&py(&server, &key, "run").await), Some(28));
    assert_eq!(
        credits_used(&py(&server, &key, "subscribe").await),
        Some(28)
    );
    assert!(balance_settles(&server, 1000 - 56).await);
    let seen = mock.seen();
    assert!(seen.iter().any(|s| s.target == "/_queue/fal-ai/flux/dev"));
    assert!(seen
        .iter()
        .all(|s| s.headers["authorization"] == format!("Key {FAL_KEY}")));

    // A wrong key: the SDK's own error type, with our detail and error_type.
    let wrong = format!("sk-fal-{}", "B".repeat(32));
    let result = py(&server, &wrong, "run").await;
    assert_eq!(result.get_bool("ok"), Some(false), "{result}");
    assert_eq!(result.get_str("name"), Some("FalClientHTTPError"));
    assert_eq!(result.get_u64("status"), Some(401));
    assert_eq!(result.get_str("error_type"), Some("invalid_api_key"));
    assert_eq!(result.get_str("message"), Some("Invalid API key."));
}
