//! What reaches fal and what comes back: bytes, headers, credentials, paths,
//! and every error a request can meet on the way.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use simd_json::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup() -> (MockFal, Server, String) {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    (mock, server, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_bytes_and_headers_unchanged_with_the_operator_key() {
    let (mock, server, key) = setup().await;
    // Any content type: the body is JSON to fal (and to us), and goes as sent.
    let text = "a \\\" é漢字🦊\\n ".repeat(800);
    let payload = format!("{{\"data\": \"{text}\"}}").into_bytes();
    let req = Request::post(server.url("/mock/echo?x=1&y=%2F&z"))
        .header("content-type", "application/x-custom")
        .header("x-api-key", &key)
        .header("x-fal-thing", "kept")
        .body(Full::new(bytes::Bytes::from(payload.clone())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-custom");
    // fal's answer is not JSON: streamed untouched, with the figures in headers (catch-all: 2 credits).
    assert_eq!(resp.headers()["x-billing-credits-used"], "2");
    assert_eq!(resp.headers()["x-billing-balance-remaining"], "998");
    assert_eq!(resp.headers()["x-fal-mock"], "echo");
    assert!(resp.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(body(resp).await.as_ref(), payload.as_slice());

    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.target, "/mock/echo?x=1&y=%2F&z");
    assert_eq!(s.body.as_ref(), payload.as_slice());
    assert_eq!(s.headers["authorization"], format!("Key {FAL_KEY}"));
    assert_eq!(s.headers["host"], mock.addr.to_string());
    assert_eq!(s.headers["x-fal-thing"], "kept");
    assert!(s.headers.get("x-api-key").is_none());
    // `_billing` is spliced into fal's bytes, so they must come uncompressed.
    assert_eq!(s.headers["accept-encoding"], "identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_the_sdk_authorization_header_and_never_forwards_it() {
    let (mock, server, key) = setup().await;
    let req = Request::get(server.url("/mock/echo"))
        .header("authorization", format!("Key {key}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    let seen = mock.seen();
    let auth: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [&format!("Key {FAL_KEY}")]);
    let all_headers = format!("{:?}", seen[0].headers);
    assert!(
        !all_headers.contains(&key),
        "client key leaked upstream: {all_headers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_validated_and_forwarded_as_sent() {
    let (mock, server, key) = setup().await;
    // Odd spacing, escapes and non-ASCII must survive: we forward bytes, not a re-serialization.
    let sent =
        "{ \"prompt\" : \"a fox \\u00e9 ünïcode\",\n\t\"num_images\":1 , \"x\": [1.50, 2e3] }";
    let resp = client()
        .request(post(
            &server.url("/mock/echo"),
            Some(&key),
            "application/json",
            sent,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // fal's answer (here: our own bytes echoed) comes back with only `_billing` added.
    let (original, billing) = unsplice(&body(resp).await);
    assert_eq!(original, sent.as_bytes());
    assert_eq!(billing.get_u64("credits_used"), Some(2));
    assert_eq!(mock.seen()[0].body.as_ref(), sent.as_bytes());

    for bad in ["{\"prompt\": ", "{'a': 1}", "[1, 2,]", "nul"] {
        let resp = client()
            .request(post(
                &server.url("/fal-ai/flux/dev"),
                Some(&key),
                "application/json; charset=utf-8",
                bad,
            ))
            .await
            .unwrap();
        assert_error(resp, 400, "malformed_json").await;
    }
    assert_eq!(mock.seen().len(), 1, "malformed JSON reached fal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_json_gets_413_whether_declared_or_chunked() {
    let (mock, server, key) = setup().await;
    let big = format!("{{\"prompt\":\"{}\"}}", "a".repeat(70 * 1024));
    let resp = client()
        .request(post(
            &server.url("/fal-ai/flux/dev"),
            Some(&key),
            "application/json",
            big.clone(),
        ))
        .await
        .unwrap();
    assert_error(resp, 413, "body_too_large").await;

    // Without a content-length the limit is enforced while reading.
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    let head = format!(
        "POST /fal-ai/flux/dev HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in big.as_bytes().chunks(8192) {
        let framed = format!("{:x}\r\n", chunk.len());
        if stream.write_all(framed.as_bytes()).await.is_err()
            || stream.write_all(chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break; // the proxy may answer and close before we finish
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error_type\":\"body_too_large\""),
        "{answer}"
    );
    assert!(mock.seen().is_empty(), "an oversized body reached fal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_get_401_with_distinct_error_types() {
    let (mock, server, key) = setup().await;
    let url = server.url("/fal-ai/flux/dev");
    let unknown = format!("sk-fal-{}", "A".repeat(32));
    let cases: [(Option<&str>, &str); 5] = [
        (None, "missing_api_key"),
        (Some("sk-fal-short"), "malformed_api_key"),
        (Some(&key[..key.len() - 1]), "malformed_api_key"),
        (
            Some("not-a-key-at-all-but-long-enough-to-be-39"),
            "malformed_api_key",
        ),
        (Some(&unknown), "invalid_api_key"),
    ];
    for (k, error_type) in cases {
        let resp = client()
            .request(post(&url, k, "application/json", "{}"))
            .await
            .unwrap();
        assert_error(resp, 401, error_type).await;
    }
    let req = Request::get(&url)
        .header("authorization", "Bearer whatever")
        .body(Full::default())
        .unwrap();
    assert_error(
        client().request(req).await.unwrap(),
        401,
        "malformed_api_key",
    )
    .await;
    assert!(mock.seen().is_empty());

    let health = client()
        .request(get(&server.url("/healthz"), None))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_errors_map_to_gateway_errors_and_4xx_passes_through() {
    let (mock, server, key) = setup().await;
    let send = |path: &str| {
        client().request(post(
            &server.url(path),
            Some(&key),
            "application/json",
            "{}",
        ))
    };

    let resp = send("/mock/status/422").await.unwrap();
    assert_eq!(resp.status(), 422);
    let (original, billing) = unsplice(&body(resp).await);
    assert_eq!(original, b"{\"detail\":\"mock 422\"}");
    assert_eq!(billing.get_u64("credits_used"), Some(0));

    for code in ["500", "503"] {
        let detail = assert_error(
            send(&format!("/mock/status/{code}")).await.unwrap(),
            502,
            "upstream_error",
        )
        .await;
        assert!(detail.contains(code), "{detail}");
    }
    // fal refusing our own key is the operator's problem: 502, and fal's body is not shown.
    for code in ["401", "403"] {
        let resp = send(&format!("/mock/status/{code}")).await.unwrap();
        assert_eq!(resp.status(), 502);
        let text = String::from_utf8(body(resp).await.to_vec()).unwrap();
        assert!(!text.contains("mock"), "{text}");
        assert!(text.contains("upstream_auth_failed"), "{text}");
    }
    assert_eq!(mock.seen().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fal_gets_504_and_an_unreachable_one_502() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.timeout_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = client()
        .request(post(
            &server.url("/mock/hang"),
            Some(&key),
            "application/json",
            "{}",
        ))
        .await
        .unwrap();
    assert_error(resp, 504, "upstream_timeout").await;

    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (server, key) =
        Server::start_with_key(Options::new(format!("http://{closed}")), "acme", 1000);
    let resp = client()
        .request(post(
            &server.url("/fal-ai/flux/dev"),
            Some(&key),
            "application/json",
            "{}",
        ))
        .await
        .unwrap();
    assert_error(resp, 502, "upstream_unreachable").await;
}

/// Sends a raw HTTP/1.1 request line and returns the whole answer.
async fn raw(server: &Server, target: &str, key: &str) -> String {
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nhost: evil.example\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_can_change_the_upstream_host() {
    let (mock, server, key) = setup().await;
    // Each of these reaches the mock (the one configured host), with the mock's own Host header.
    for (target, seen_as) in [
        ("http://evil.example/mock/echo?q=1", "/mock/echo?q=1"),
        ("/@evil.example/x", "/@evil.example/x"),
        ("/%6Dock/%65cho?q=%2F", "/mock/echo?q=%2F"),
    ] {
        let answer = raw(&server, target, &key).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{target}: {answer}");
        let seen = mock.seen();
        let last = seen
            .last()
            .unwrap_or_else(|| panic!("{target} never reached the mock"));
        assert_eq!(last.target, seen_as);
        assert_eq!(last.headers["host"], mock.addr.to_string());
    }
    let forwarded = mock.seen().len();
    // Dot segments, and what a server might read as a separator or a host.
    for target in [
        "/fal-ai/../../etc/passwd",
        "/a/%2e%2e/b",
        "/./x",
        "//evil.example/x",
        "/mock%2F..%2Fecho",
        "/mock\\..\\echo",
    ] {
        let answer = raw(&server, target, &key).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("invalid_path"), "{answer}");
    }
    assert_eq!(mock.seen().len(), forwarded, "a refused path reached fal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_answer_comes_back_as_fal_sent_it() {
    let (_mock, server, key) = setup().await;
    let resp = client()
        .request(post(
            &server.url("/fal-ai/flux/dev"),
            Some(&key),
            "application/json",
            r#"{"prompt":"a fox","image_size":"square_hd","num_images":2}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = json(&body(resp).await);
    let images = v.get_array("images").unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].get_u64("width"), Some(1024));
}
