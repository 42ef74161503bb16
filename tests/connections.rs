//! Hostile clients (issue 16): connections that say nothing, heads and
//! bodies that trickle or stall, floods beyond the connection cap, and
//! bodies from accounts that cannot pay. The server keeps serving, and its
//! descriptors and memory stay bounded. Deadlines are configured small;
//! the bounds asserted are generous, as the machine is noisy.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what an h2c client sends after the preface.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until the server closes the connection; what it sent, if it did
/// so within `within`. A reset counts as closed.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()?;
    Some(seen)
}

/// A raw HTTP/1.1 POST's head, with the body left to the caller.
fn post_head(path: &str, key: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

fn status_of(answer: &[u8]) -> Option<u16> {
    std::str::from_utf8(answer.get(9..12)?).ok()?.parse().ok()
}

async fn healthz(server: &Server) -> bool {
    let get = client().request(get(&server.url("/healthz"), None));
    matches!(
        tokio::time::timeout(Duration::from_secs(5), get).await,
        Ok(Ok(resp)) if resp.status() == 200
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_idle_deadline() {
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.idle_timeout_secs = 1;
    let server = Server::start(opts);
    let bound = Duration::from_secs(15);

    // Plain TCP, not a byte sent.
    let mut plain = TcpStream::connect(server.plain).await.unwrap();
    // h2c: the preface and SETTINGS, then nothing.
    let mut h2c = TcpStream::connect(server.plain).await.unwrap();
    h2c.write_all(H2_PREFACE).await.unwrap();
    h2c.write_all(H2_SETTINGS).await.unwrap();
    // TLS: a completed handshake, then nothing.
    let tls = abhiapi::tls::client_config(Some(&repo_path("certs/dev-ca.pem"))).unwrap();
    let tcp = TcpStream::connect(server.tls).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the handshake completes");

    let started = Instant::now();
    assert!(
        closed_within(&mut plain, bound).await.is_some(),
        "a silent plain connection was kept"
    );
    assert!(
        closed_within(&mut h2c, bound).await.is_some(),
        "a silent h2c connection was kept"
    );
    assert!(
        closed_within(&mut tls, bound).await.is_some(),
        "a silent connection after its TLS handshake was kept"
    );
    // Not at once either: the deadline is one second.
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(healthz(&server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_heads_are_cut_off() {
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.idle_timeout_secs = 1;
    opts.header_read_timeout_secs = 1;
    let server = Server::start(opts);

    // One byte every 300 ms: an HTTP/1.1 head, and an h2c preface (which
    // the server reads before it knows which protocol it is serving).
    for head in [
        &b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"[..],
        H2_PREFACE,
    ] {
        let mut stream = TcpStream::connect(server.plain).await.unwrap();
        let started = Instant::now();
        let mut cut = false;
        for byte in head {
            if stream.write_all(&[*byte]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if !cut {
            cut = closed_within(&mut stream, Duration::from_secs(10))
                .await
                .is_some();
        }
        assert!(cut, "a head trickled a byte at a time was served");
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "a trickled head was kept for {:?}",
            started.elapsed()
        );
    }
    assert!(healthz(&server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickled_bodies_are_cut_off() {
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.body_timeout_secs = 1;
    opts.min_body_bytes_per_sec = 1000;
    let (server, key) = Server::start_with_key(opts, "acme", 1_000_000);

    // A body that stops after its first bytes, and one that trickles a
    // byte every 200 ms: both far below 1000 bytes a second.
    for trickle in [false, true] {
        let mut stream = TcpStream::connect(server.plain).await.unwrap();
        let head = post_head("/fal-ai/flux/dev", &key, 1000);
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"{\"prompt\": \"").await.unwrap();
        let started = Instant::now();
        let (mut reader, mut writer) = stream.into_split();
        let trickling = tokio::spawn(async move {
            while trickle && writer.write_all(b"a").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            writer
        });
        let answer = closed_within(&mut reader, Duration::from_secs(15)).await;
        let answer = answer.expect("a slow body kept its connection");
        assert_eq!(
            status_of(&answer),
            Some(408),
            "trickle={trickle}: {}",
            String::from_utf8_lossy(&answer)
        );
        assert!(String::from_utf8_lossy(&answer).contains("request_body_timeout"));
        assert!(started.elapsed() < Duration::from_secs(12));
        trickling.abort();
    }
    // Nothing reached fal, nothing was held or charged.
    assert!(mock.seen().is_empty());
    assert!(books_close(&server, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_healthz_still_answers() {
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.max_connections = 50;
    let server = Server::start(opts);
    let before = server.open_fds();

    // 300 silent connections: six times the cap, and well inside the idle deadline.
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(TcpStream::connect(server.plain).await.unwrap());
    }
    // While they are all still open on our side, new clients are served...
    for _ in 0..5 {
        assert!(healthz(&server).await, "/healthz failed during the flood");
    }
    // ...and the server holds no more than its cap.
    let during = server.open_fds();
    assert!(
        during <= before + 50 + 10,
        "{during} descriptors open during the flood ({before} before, cap 50)"
    );
    let mut closed = 0;
    for stream in &mut flood {
        if closed_within(stream, Duration::from_millis(10))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 240,
        "only {closed} of 300 flood connections were closed"
    );
    drop(flood);
    assert!(healthz(&server).await, "/healthz failed after the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_credits_is_refused_before_its_body() {
    let mock = MockFal::start(None).await.unwrap();
    let opts = Options::new(mock.url(false));
    let (server, key) = Server::start_with_key(opts, "broke", 0);

    // A head that promises 60,000 bytes, and not one of them.
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    let head = post_head("/fal-ai/flux/dev", &key, 60_000);
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("no answer without the body");
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), Some(402), "{text}");
    assert!(text.contains("insufficient_credits"), "{text}");
    // The queue's submissions are refused the same way.
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    let head = post_head("/queue/fal-ai/flux/dev", &key, 60_000);
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("no answer without the body");
    assert_eq!(status_of(&answer), Some(402));
    assert!(mock.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_leave_memory_flat() {
    const MIB: usize = 1024 * 1024;
    let mock = MockFal::start(None).await.unwrap();
    let mut opts = Options::new(mock.url(false));
    opts.max_json_body_bytes = 2 * MIB;
    // Stalled bodies are kept, for this test, until their clients leave.
    opts.body_timeout_secs = 600;
    let (server, key) = Server::start_with_key(opts, "funded", 1_000_000_000);
    // Warm up: one real request, so the baseline has the buffers a request needs.
    let resp = call(&server, &key, "/fal-ai/flux/dev", r#"{"prompt": "a fox"}"#).await;
    assert_eq!(resp.status(), 200);
    body(resp).await;
    let before = server.rss_kib();

    // 40 bodies of 2 MiB (half declared, half chunked), each stalled after
    // 1.5 MiB: 60 MiB if they were all kept.
    let part = vec![b' '; 3 * MIB / 2];
    let mut stalled = Vec::new();
    for i in 0..40 {
        let mut stream = TcpStream::connect(server.plain).await.unwrap();
        let head = if i % 2 == 0 {
            post_head("/fal-ai/flux/dev", &key, 2 * MIB)
        } else {
            post_head("/fal-ai/flux/dev", &key, 0)
                .replace("content-length: 0", "transfer-encoding: chunked")
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = if i % 2 == 0 {
            stream.write_all(&part).await
        } else {
            let chunk = format!("{:x}\r\n", part.len());
            match stream.write_all(chunk.as_bytes()).await {
                Ok(()) => stream.write_all(&part).await,
                Err(e) => Err(e),
            }
        };
        // Refused from its head, over the account's allowance, the
        // server may have closed before all of it was written.
        let _ = sent;
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = server.rss_kib();
    // Those refused were refused for the account's allowance, and nothing else.
    for stream in &mut stalled {
        if let Some(answer) = closed_within(stream, Duration::from_millis(50)).await {
            let status = status_of(&answer);
            assert!(
                matches!(status, None | Some(429)),
                "refused with {status:?}"
            );
        }
    }
    // The account may buffer 4 × 2 MiB: that, and some slack, is all the growth.
    let grown = during.saturating_sub(before);
    assert!(
        grown < 24 * 1024,
        "RSS grew {grown} KiB with 40 stalled bodies ({before} KiB before)"
    );

    drop(stalled);
    let returned = eventually(Duration::from_secs(10), || async {
        server.rss_kib() < before + 4 * 1024
    })
    .await;
    eprintln!(
        "RSS: {before} KiB before, {during} KiB with 40 stalled bodies, {} KiB after they left",
        server.rss_kib()
    );
    assert!(
        returned,
        "memory not returned after the clients left: {} KiB, {before} KiB before",
        server.rss_kib()
    );
    // The account can still be served, its allowance whole again.
    let resp = call(&server, &key, "/fal-ai/flux/dev", r#"{"prompt": "a fox"}"#).await;
    assert_eq!(resp.status(), 200);
    assert!(mock.seen().len() == 2);
}

/// `[server] idle_timeout_secs` is how long a kept connection may wait for
/// its next request; the head deadline counts from that request's first
/// byte, not from the end of the last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_waits_its_idle_deadline_not_its_head_deadline() {
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.header_read_timeout_secs = 1;
    opts.idle_timeout_secs = 30;
    let server = Server::start(opts);
    let mut stream = TcpStream::connect(server.plain).await.unwrap();
    let get = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
    stream.write_all(get).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&buf[..n]), Some(200));
    // Three head deadlines later, well inside the idle one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stream.write_all(get).await.unwrap();
    let n = stream.read(&mut buf).await.unwrap_or(0);
    assert_eq!(
        status_of(&buf[..n]),
        Some(200),
        "the kept connection was closed after {} bytes",
        n
    );
}
