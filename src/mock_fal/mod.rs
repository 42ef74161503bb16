//! A stand-in for fal on loopback: `serve --demo` runs against it, and so do
//! the integration tests and benches. Model paths answer the way fal's models
//! do, each with fal's request id, and are billed in fal's books; paths
//! under `/_queue/` are fal's queue host (see [`queue`]), `/_rest/` its
//! storage host and `/_api/` its Platform API ([`platform`]); paths under `/mock/` give the tests the
//! upstream failures they need. The latest requests it received are
//! recorded, so a test can see exactly what reached "fal".
//!
//! Like fal, it decodes percent-escapes before routing, and reads any body
//! as JSON whatever its content type, with pydantic's lax coercions
//! ([`Input`]): a proxy that prices a request differently from how fal runs
//! it shows up in the tests as images or seconds served but not paid for.
//! An input with `"mock_result_bytes": N` gets an answer of about N bytes,
//! streamed (see [`model_output`]). Like any server in front of fal's
//! apps, it may close a keep-alive connection that has been idle a while
//! ([`MockFal::close_idle_after`]); it counts the connections it accepts.

mod input;
pub mod platform;
mod queue;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use simd_json::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_rustls::TlsAcceptor;

use crate::proxy::path::percent_decoded;
use crate::upstream::ServeInMemory;

pub use input::Input;

/// How many of the latest requests [`MockFal::seen`] keeps.
const SEEN_KEPT: usize = 1024;

type MockBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A request as the mock received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub version: http::Version,
    /// Path and query, exactly as they arrived.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct State {
    /// `http://127.0.0.1:PORT` (or `https://localhost:PORT`), for the URLs the queue hands out.
    base: String,
    /// The latest [`SEEN_KEPT`] requests: `serve --demo` and the benches run for long.
    seen: Mutex<VecDeque<Seen>>,
    /// Holds `/mock/gated` (and a gated status stream) until a test opens it.
    gate: Notify,
    queue: queue::Queue,
    /// fal's prices and its billing records of the calls served.
    books: platform::Books,
    /// Milliseconds an HTTP/1.1 connection may wait for its next request; 0 for ever.
    keep_alive_ms: AtomicU64,
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// A running mock; it stops when the runtime that started it does.
#[derive(Clone)]
pub struct MockFal {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl MockFal {
    /// Starts on 127.0.0.1 port 0, over TLS when `tls` is given.
    pub async fn start(tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = State {
            base: base_url(addr, tls.is_some()),
            seen: Mutex::default(),
            gate: Notify::new(),
            queue: queue::Queue::default(),
            books: platform::Books::default(),
            keep_alive_ms: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        };
        let mock = Self {
            addr,
            state: Arc::new(state),
        };
        let state = Arc::clone(&mock.state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(state, stream).await,
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                serve(state, s).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(mock)
    }

    /// The mock served over pipes in memory instead of its socket, for
    /// [`Upstream::in_memory`](crate::upstream::Upstream::in_memory).
    pub fn in_memory(&self) -> ServeInMemory {
        let state = Arc::clone(&self.state);
        Arc::new(move |pipe| {
            tokio::spawn(serve(Arc::clone(&state), pipe));
        })
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` for a TLS mock
    /// (the name its certificate is for).
    pub fn url(&self, tls: bool) -> String {
        base_url(self.addr, tls)
    }

    /// The base of the mock's storage host, for `[upstream] storage`.
    pub fn storage_url(&self, tls: bool) -> String {
        format!("{}/_rest", self.url(tls))
    }

    /// The base of the mock's queue host, for `[upstream] queue`.
    pub fn queue_url(&self, tls: bool) -> String {
        format!("{}/{}", self.url(tls), queue::PREFIX)
    }

    /// The base of the mock's Platform API, for `[upstream] api`.
    pub fn api_url(&self, tls: bool) -> String {
        format!("{}/_api", self.url(tls))
    }

    /// fal's prices and billing records.
    pub fn books(&self) -> &platform::Books {
        &self.state.books
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().iter().cloned().collect()
    }

    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }

    /// From now on, closes an HTTP/1.1 connection that has waited this long
    /// for its next request.
    pub fn close_idle_after(&self, idle: Duration) {
        let ms = idle.as_millis().max(1) as u64;
        self.state.keep_alive_ms.store(ms, Ordering::Relaxed);
    }

    /// Connections accepted so far, and those still open.
    pub fn connections(&self) -> (usize, usize) {
        let s = &self.state;
        (
            s.accepted.load(Ordering::Relaxed),
            s.open.load(Ordering::Relaxed),
        )
    }
}

/// Counts one open connection while it lives.
struct Counted(Arc<State>);

impl Counted {
    fn new(state: &Arc<State>) -> Self {
        state.accepted.fetch_add(1, Ordering::Relaxed);
        state.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(state))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// HTTP/1.1 or h2 on one connection, until it closes.
async fn serve<IO>(state: Arc<State>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _counted = Counted::new(&state);
    let keep_alive = state.keep_alive_ms.load(Ordering::Relaxed);
    let svc = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(answer(state, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if keep_alive > 0 {
        // hyper's wait for a request head starts when a keep-alive
        // connection goes idle: the keep-alive timeout of a front server.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(keep_alive));
    }
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

fn base_url(addr: SocketAddr, tls: bool) -> String {
    if tls {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

async fn answer(state: Arc<State>, req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let path = percent_decoded(parts.uri.path());
    // A sink counts bytes without keeping them, for uploads too big to record.
    let body = if is_sink(&path, &parts.headers) {
        let mut n = 0u64;
        let mut body = body;
        while let Some(Ok(frame)) = body.frame().await {
            n += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        Bytes::from(format!("{{\"received\":{n}}}"))
    } else {
        match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status_json(StatusCode::BAD_REQUEST, "body broke off"),
        }
    };
    record(
        &state,
        Seen {
            method: parts.method.clone(),
            version: parts.version,
            target,
            headers: parts.headers.clone(),
            // A copy: a slice would keep the whole read buffer it came in alive.
            body: Bytes::copy_from_slice(&body),
        },
    );

    let mut segments = path.trim_start_matches('/').split('/');
    match segments.next() {
        Some("mock") => test_route(state, segments.collect(), &parts.headers, body).await,
        Some(queue::PREFIX) => {
            let query = parts.uri.query().unwrap_or("");
            queue::answer(&state, &parts.method, segments.collect(), query, body).await
        }
        Some("_rest") if is_sink(&path, &parts.headers) => json_response(StatusCode::OK, body),
        Some("_rest") if path.starts_with("/_rest/storage/upload/initiate") => {
            initiate_upload(&state, &body)
        }
        Some("_api") => {
            let query = parts.uri.query().unwrap_or("");
            let rest: Vec<&str> = segments.collect();
            state
                .books
                .answer(&parts.method, &rest, query, &parts.headers)
        }
        _ => served(&state, &path, &body),
    }
}

/// Bodies counted, not kept: the sink, and file bytes sent to storage
/// (the streaming tests' uploads, up to gigabytes).
fn is_sink(path: &str, headers: &HeaderMap) -> bool {
    let octets = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(b"application/octet-stream")
    });
    path == "/mock/sink" || (path.starts_with("/_rest/storage/upload/") && octets)
}

fn record(state: &State, request: Seen) {
    let mut seen = state.seen.lock();
    if seen.len() == SEEN_KEPT {
        seen.pop_front();
    }
    seen.push_back(request);
}

/// Failure modes and shapes the proxy must cope with.
async fn test_route(
    state: Arc<State>,
    rest: Vec<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<MockBody> {
    match rest.as_slice() {
        ["echo"] => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            let mut resp = Response::new(full(body));
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            resp.headers_mut()
                .insert("x-fal-mock", HeaderValue::from_static("echo"));
            resp
        }
        ["sink"] => json_response(StatusCode::OK, body),
        // A fixed flux answer, no parsing: the load benchmark's upstream.
        // With a receipt, as fal's answers have, so that the proxy's
        // reading of it is measured (one fixed id: not for reconciling).
        ["canned"] => {
            let mut resp = json_response(StatusCode::OK, Bytes::from_static(CANNED));
            receipt(&mut resp, CANNED_ID, Some(1000));
            resp
        }
        // Where `initiate_upload` sends the SDK's file bytes (recorded like any request).
        ["upload", _name] => Response::new(full(Bytes::new())),
        ["status", code] => {
            let code = failing(code);
            status_json(code, &format!("mock {}", code.as_u16()))
        }
        ["slow", ms] => {
            let ms = ms.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            status_json(StatusCode::OK, &format!("slept {ms} ms"))
        }
        // Slow, then failing: fal did no billable work.
        ["slow", ms, code] => {
            let ms = ms.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            status_json(failing(code), &format!("slept {ms} ms, then failed"))
        }
        ["hang"] => std::future::pending().await,
        // A JSON answer whose app hangs after its first bytes: the body
        // never ends, and never fails either.
        ["stalled"] => {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Bytes::from_static(br#"{"images":["#));
            tokio::spawn(async move {
                let _open = tx;
                std::future::pending::<()>().await
            });
            stream_from(rx, "application/json")
        }
        ["stream", bytes] => stream_bytes(bytes.parse().unwrap_or(0)),
        ["gated"] => {
            let (tx, rx) = mpsc::channel(2);
            let _ = tx.try_send(Bytes::from_static(b"first;"));
            tokio::spawn(async move {
                state.gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"last")).await;
            });
            stream_from(rx, "text/plain")
        }
        _ => status_json(StatusCode::NOT_FOUND, "no such mock route"),
    }
}

/// The status a route's path names, 500 if it names none.
fn failing(code: &str) -> StatusCode {
    code.parse()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

const CANNED_ID: &str = "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";

/// What `fal-ai/flux/dev` answers for one 1024×1024 image.
const CANNED: &[u8] = br#"{"images":[{"url":"https://v3.fal.media/files/mock/0.jpg","width":1024,"height":1024,"content_type":"image/jpeg"}],"timings":{"inference":0.42},"seed":42,"has_nsfw_concepts":[false],"prompt":"a red fox"}"#;

/// fal's storage: where to PUT a file, and the URL it will have.
fn initiate_upload(state: &State, request: &[u8]) -> Response<MockBody> {
    let mut copy = request.to_vec();
    let name = simd_json::to_owned_value(&mut copy)
        .ok()
        .and_then(|v| v.get_str("file_name").map(str::to_owned))
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .unwrap_or_else(|| "upload.bin".into());
    let body = format!(
        r#"{{"upload_url":"{}/mock/upload/{name}","file_url":"https://v3.fal.media/files/mock/{name}"}}"#,
        state.base
    );
    json_response(StatusCode::OK, Bytes::from(body))
}

/// A sync call, answered by fal's app: with its request id, and, when it
/// succeeds, billed and with the units billed.
fn served(state: &State, path: &str, body: &[u8]) -> Response<MockBody> {
    let id = state.books.request_id();
    let (mut resp, units) = match Input::read(body) {
        Ok(input) => {
            let units = state.books.bill(&id, path, &input);
            (output(path, &input, body), Some(units))
        }
        Err(why) => (status_json(StatusCode::UNPROCESSABLE_ENTITY, &why), None),
    };
    receipt(&mut resp, &id, units);
    resp
}

/// fal's request id, and the units it billed, on an answer of fal's app.
fn receipt(resp: &mut Response<MockBody>, id: &str, units_milli: Option<u64>) {
    use crate::billing::receipt::{BILLABLE_UNITS, REQUEST_ID};
    if let Ok(id) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, id);
    }
    if let Some(units) = units_milli {
        let text = crate::billing::decimal::format_scaled(u128::from(units), 3);
        if let Ok(units) = HeaderValue::from_str(&text) {
            resp.headers_mut().insert(BILLABLE_UNITS, units);
        }
    }
}

/// What a fal model returns, shaped by the request as fal's would be; 422
/// for an input fal would refuse. With `"mock_result_bytes": N` in the
/// input, every file object of the answer carries a base64 `"data"` string
/// (as `sync_mode` answers do) that brings the answer to about N bytes, sent
/// in chunks without a `content-length`, as a large answer streams. Sync
/// calls and queue results alike.
fn model_output(path: &str, request: &[u8]) -> Response<MockBody> {
    match Input::read(request) {
        Ok(input) => output(path, &input, request),
        Err(why) => status_json(StatusCode::UNPROCESSABLE_ENTITY, &why),
    }
}

/// The answer to a valid input.
fn output(path: &str, input: &Input, request: &[u8]) -> Response<MockBody> {
    match result_bytes(request) {
        None => json_response(StatusCode::OK, model_json(path, input, 0)),
        Some(size) => chunked_json(model_json(path, input, size)),
    }
}

/// The input's `mock_result_bytes`, if it asks for a large answer.
fn result_bytes(request: &[u8]) -> Option<u64> {
    let mut copy = request.to_vec();
    simd_json::to_owned_value(&mut copy)
        .ok()?
        .get_u64("mock_result_bytes")
}

/// The answer, with its file objects padded to bring it to about `size` bytes.
fn model_json(path: &str, input: &Input, size: u64) -> Bytes {
    let (plain, files) = render_output(path, input, "");
    let room = usize::try_from(size)
        .unwrap_or(usize::MAX)
        .saturating_sub(plain.len());
    if room == 0 || files == 0 {
        return Bytes::from(plain);
    }
    let each = (room / files).saturating_sub(r#","data":"""#.len());
    let data = format!(r#","data":"{}""#, base64_like(each));
    Bytes::from(render_output(path, input, &data).0)
}

/// The answer's JSON with `extra` at the end of each file object, and how many there are.
fn render_output(path: &str, input: &Input, extra: &str) -> (String, usize) {
    if path.contains("video") {
        let body = format!(
            r#"{{"video":{{"url":"https://v3.fal.media/files/mock/output.mp4","content_type":"video/mp4","file_name":"output.mp4","file_size":1048576{extra}}},"seed":42}}"#
        );
        return (body, 1);
    }
    if path.contains("upscale") {
        let body = format!(
            r#"{{"image":{{"url":"https://v3.fal.media/files/mock/upscaled.png","width":2048,"height":2048,"content_type":"image/png"{extra}}},"seed":42}}"#
        );
        return (body, 1);
    }
    let (w, h) = input.image_size;
    let images: Vec<String> = (0..input.num_images)
        .map(|i| format!(r#"{{"url":"https://v3.fal.media/files/mock/{i}.jpg","width":{w},"height":{h},"content_type":"image/jpeg"{extra}}}"#))
        .collect();
    let nsfw = vec!["false"; images.len()].join(",");
    let body = format!(
        r#"{{"images":[{}],"timings":{{"inference":0.42}},"seed":42,"has_nsfw_concepts":[{nsfw}],"prompt":"mock"}}"#,
        images.join(",")
    );
    (body, images.len())
}

/// `n` characters of base64's alphabet, standing in for an encoded image.
fn base64_like(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n)
        .map(|i| ALPHABET[i % ALPHABET.len()] as char)
        .collect()
}

/// A JSON body sent in 64 KiB chunks, with no `content-length`.
fn chunked_json(body: Bytes) -> Response<MockBody> {
    const CHUNK: usize = 64 * 1024;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for at in (0..body.len()).step_by(CHUNK) {
            let chunk = body.slice(at..(at + CHUNK).min(body.len()));
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    stream_from(rx, "application/json")
}

fn full(bytes: Bytes) -> MockBody {
    http_body_util::Full::new(bytes).boxed()
}

fn json_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_json(status: StatusCode, detail: &str) -> Response<MockBody> {
    let mut body = String::from("{\"detail\":");
    crate::error::push_json_string(&mut body, detail);
    body.push('}');
    json_response(status, Bytes::from(body))
}

/// `n` bytes of a repeating pattern, in 64 KiB chunks, generated as they are sent.
fn stream_bytes(n: u64) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let chunk = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let mut left = n;
        while left > 0 {
            let take = left.min(chunk.len() as u64) as usize;
            if tx.send(chunk.slice(..take)).await.is_err() {
                return;
            }
            left -= take as u64;
        }
    });
    let mut resp = stream_from(rx, "application/octet-stream");
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    resp
}

fn stream_from(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response<MockBody> {
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A body fed chunk by chunk from a channel; it ends when the sender is dropped.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_paths_as_fal_routes_them() {
        assert_eq!(percent_decoded("/fal-ai/x/%70ro"), "/fal-ai/x/pro");
        assert_eq!(percent_decoded("/a%2Fb%5c%2e%2E"), "/a/b\\..");
        assert_eq!(percent_decoded("/100%/%zz/%4/%+1"), "/100%/%zz/%4/%+1");
    }
}
