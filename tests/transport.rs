//! The connection layer: TLS, HTTP/2, streaming in both directions, slow
//! clients, and a graceful stop.

mod support;

use std::time::Duration;

use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use simd_json::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup() -> (MockFal, Server, String) {
    let mock = MockFal::start(None).await.unwrap();
    let (server, key) = Server::start_with_key(Options::new(mock.url(false)), "acme", 1000);
    (mock, server, key)
}

fn flux(url: &str, key: &str) -> Request<Full<bytes::Bytes>> {
    post(url, Some(key), "application/json", r#"{"prompt":"a fox"}"#)
}

/// One plain HTTP/1.1 connection to the proxy, so that all its requests
/// are served by one request thread, on that thread's connections to fal:
/// a pooled client may open a second connection (while the first is on
/// its way back to its pool), which another request thread could accept.
async fn one_connection(
    server: &Server,
) -> hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>> {
    let stream = TcpStream::connect(server.plain).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_dev_certificate_over_http1_and_http2() {
    let (_mock, server, key) = setup().await;
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{}/fal-ai/flux/dev", server.tls.port());
        for h2 in [false, true] {
            let resp = tls_client(h2).request(flux(&url, &key)).await.unwrap();
            assert_eq!(resp.status(), 200, "{host} h2={h2}");
            let expected = if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            assert_eq!(resp.version(), expected);
            assert!(json(&body(resp).await).get_array("images").is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_speaks_h2c_with_prior_knowledge() {
    let (mock, server, key) = setup().await;
    let resp = h2c_client()
        .request(flux(&server.url("/fal-ai/flux/dev"), &key))
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    body(resp).await;
    // The upstream leg is its own connection: plain HTTP/1.1 to a plain mock.
    assert_eq!(mock.seen()[0].version, Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_trusts_ca_file_and_uses_http2_when_offered() {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(abhiapi::tls::server_config(None, None).unwrap());
    let mock = MockFal::start(Some(acceptor)).await.unwrap();
    let mut opts = Options::new(mock.url(true));
    opts.ca_file = Some(repo_path("certs/dev-ca.pem"));
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let mut same = one_connection(&server).await;
    for _ in 0..2 {
        same.ready().await.unwrap();
        let resp = same
            .send_request(flux(&server.url("/fal-ai/flux/dev"), &key))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        body(resp).await;
    }
    // The h2 connection is shared by the requests that follow.
    assert_eq!(mock.connections().0, 1);
    let seen = mock.seen();
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Key {FAL_KEY}")
    );

    // Without the CA the same upstream is not trusted: 502, never a silent plain fallback.
    let (server, key) = Server::start_with_key(Options::new(mock.url(true)), "acme", 1000);
    let resp = client()
        .request(flux(&server.url("/fal-ai/flux/dev"), &key))
        .await
        .unwrap();
    assert_error(resp, 502, "upstream_unreachable").await;
    assert_eq!(mock.seen().len(), 2);
}

/// One client connection is served by one request thread, which keeps its
/// connection to fal between requests: after an answer read whole, after
/// one streamed past the JSON bound or not JSON, and after fal's 4xx. (An
/// answer we drop unread, such as fal's 5xx, closes its connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_fal_are_kept_and_reused() {
    let (mock, server, key) = setup().await;
    let mut client = one_connection(&server).await;
    let fox = r#"{"prompt":"a fox"}"#;
    for (path, input, status) in [
        ("/fal-ai/flux/dev", fox, 200),
        (
            "/fal-ai/flux/dev",
            r#"{"prompt":"a fox","mock_result_bytes":300000}"#,
            200,
        ),
        ("/mock/stream/300000", fox, 200),
        ("/mock/status/404", fox, 404),
        ("/fal-ai/flux/dev", fox, 200),
    ] {
        client.ready().await.unwrap();
        let resp = client
            .send_request(post(
                &server.url(path),
                Some(&key),
                "application/json",
                input,
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path} {input}");
        body(resp).await;
    }
    assert_eq!(mock.connections().0, 1);
}

/// fal's front closes keep-alive connections that idle a while: the next
/// request goes on a new connection instead of failing on the closed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_fal_closed_while_idle_is_not_used_again() {
    let (mock, server, key) = setup().await;
    mock.close_idle_after(Duration::from_millis(100));
    let client = client();
    for n in 1..=3 {
        let resp = client
            .request(flux(&server.url("/fal-ai/flux/dev"), &key))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {n}");
        body(resp).await;
        assert!(
            eventually(Duration::from_secs(10), || async {
                mock.connections().1 == 0
            })
            .await,
            "the mock never closed its idle connection"
        );
    }
    assert_eq!(mock.connections().0, 3);
}

/// Requests that arrive just as fal closes its idle connection: one the
/// closing connection handed back unsent goes again on a new one, and none
/// reaches fal twice. (One written just before fal's close fails with 502:
/// hyper cannot know whether fal read it, so it is never sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_fals_idle_close_are_never_sent_twice() {
    let (mock, server, key) = setup().await;
    mock.close_idle_after(Duration::from_millis(40));
    let mut client = one_connection(&server).await;
    let mut answered = 0;
    for n in 0..40 {
        // Around the mock's idle close, on both sides of it.
        tokio::time::sleep(Duration::from_millis(30 + n % 20)).await;
        client.ready().await.unwrap();
        // The catch-all price: 40 flux images would spend more than the key holds.
        let resp = client
            .send_request(flux(&server.url("/mock/canned"), &key))
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => {
                answered += 1;
                body(resp).await;
            }
            _ => {
                assert_error(resp, 502, "upstream_unreachable").await;
            }
        }
    }
    assert!(answered > 20, "only {answered} of 40 answered");
    assert_eq!(mock.seen().len(), answered, "a request reached fal twice");
    assert!(mock.connections().0 > 1, "fal never closed a connection");
}

/// `[upstream] idle_timeout_secs`: a connection to fal that carries nothing
/// for that long is closed by us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_fal_are_closed_after_the_idle_timeout() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.upstream_idle_timeout_secs = 1;
    let (server, key) = Server::start_with_key(opts, "acme", 1000);
    let resp = client()
        .request(flux(&server.url("/fal-ai/flux/dev"), &key))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body(resp).await;
    assert_eq!(mock.connections(), (1, 1));
    assert!(
        eventually(Duration::from_secs(10), || async {
            mock.connections().1 == 0
        })
        .await,
        "the idle connection to fal was never closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_before_fal_has_finished() {
    let (mock, server, key) = setup().await;
    let resp = client()
        .request(get(&server.url("/mock/gated"), Some(&key)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The mock holds back its last chunk until the gate opens: the first
    // one can only be here if the proxy passed it on without buffering.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk never arrived: the proxy buffers")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first.as_ref(), b"first;");
    mock.open_gate();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    let (mock, server, key) = setup().await;
    const SIZE: u64 = 256 * 1024 * 1024;
    let resp = client()
        .request(get(
            &server.url(&format!("/mock/stream/{SIZE}")),
            Some(&key),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], SIZE.to_string());
    let mut body = resp.into_body();
    let (mut n, mut sum) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            sum = data.iter().fold(sum, |s, &b| s.wrapping_add(b as u64));
            n += data.len() as u64;
        }
    }
    assert_eq!(n, SIZE);
    let expected: u64 = (0..SIZE).map(|i| (i % 65536) % 251).sum();
    assert_eq!(
        sum, expected,
        "streamed bytes differ from what the mock sent"
    );

    // Upload: a file sent to fal's storage (unbilled) streams without being read into memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..(SIZE >> 20) {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let upload = abhiapi::mock_fal::ChannelBody(rx);
    let req = Request::post(server.url("/api/fal/proxy"))
        .header("x-api-key", &key)
        .header(
            "x-fal-target-url",
            "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        )
        .header("content-type", "application/octet-stream")
        .body(upload)
        .unwrap();
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = json(&body_of(resp).await);
    assert_eq!(v.get_u64("received"), Some(SIZE));
    assert_eq!(mock.seen().len(), 2);

    // 256 MiB went each way; had either been buffered, the peak would show it.
    let peak = proc_status_kib(server.pid(), "VmHWM:");
    assert!(
        peak < 96 * 1024,
        "proxy peak RSS {peak} KiB: bodies are being buffered"
    );
}

async fn body_of(resp: http::Response<hyper::body::Incoming>) -> bytes::Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.header_read_timeout_secs = 1;
    opts.tls_handshake_timeout_secs = 1;
    let server = Server::start(opts);

    // Headers that never finish: the connection is closed by the server.
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a client that never finished its headers was kept"
    );

    // A TLS handshake that never starts: closed too.
    let mut stream = TcpStream::connect(server.tls).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a client that never started TLS was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let (mock, server, key) = setup().await;
    let url = server.url("/mock/slow/1500");
    let in_flight = tokio::spawn({
        let key = key.clone();
        async move {
            client()
                .request(post(&url, Some(&key), "application/json", "{}"))
                .await
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async { !mock.seen().is_empty() }).await,
        "the request never reached the mock"
    );
    server.signal("TERM");
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        json(&body(resp).await).get_str("detail"),
        Some("slept 1500 ms")
    );
    let status = server.exited().await;
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(
        TcpStream::connect(status.1.plain).await.is_err(),
        "still accepting after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_fal_key_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[server]\nplain_listen = \"127.0.0.1:0\"\n[upstream]\nfal_key_env = \"ABHIAPI_UNSET_FAL_KEY\"\n[store]\npath = {:?}\n", dir.path().join("db").display().to_string())).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("ABHIAPI_UNSET_FAL_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ABHIAPI_UNSET_FAL_KEY"), "{stderr}");
}
