//! The per-request service: authenticate, route, forward, respond. Every
//! failure becomes a response in [`Proxy::handle`], nowhere else.

pub mod body;
mod credentials;
pub mod headers;
pub mod json_body;
mod path;
mod request_id;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use self::body::Body;
use self::request_id::RequestIds;
use crate::config::LimitsConfig;
use crate::error::{ApiError, Error};
use crate::keys::{ApiKey, Registry};
use crate::store::{now_secs, writer::StoreWriter};
use crate::upstream::Upstream;

pub struct Proxy {
    registry: Arc<Registry>,
    upstream: Upstream,
    writer: StoreWriter,
    limits: LimitsConfig,
    ids: RequestIds,
}

/// What the request log line reports beyond method, path and status.
#[derive(Default)]
struct Trace {
    key_id: Option<i64>,
    upstream: Option<Duration>,
}

impl Proxy {
    pub fn new(
        registry: Arc<Registry>,
        upstream: Upstream,
        writer: StoreWriter,
        limits: LimitsConfig,
    ) -> Result<Self, Error> {
        let ids = RequestIds::new().map_err(|e| Error::Usage(format!("no OS randomness: {e}")))?;
        Ok(Self {
            registry,
            upstream,
            writer,
            limits,
            ids,
        })
    }

    /// Answers one request; never fails (an `Err` would drop the connection).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let request_id = self.ids.next();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut trace = Trace::default();
        let mut resp = match self.route(req, &mut trace).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", id);
        }
        tracing::info!(
            %method,
            %path,
            status = resp.status().as_u16(),
            key_id = trace.key_id,
            upstream_ms = trace.upstream.map(|d| d.as_secs_f64() * 1e3),
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            %request_id,
            "request"
        );
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        if req.uri().path() == "/healthz" && req.method() == Method::GET {
            return Ok(json(StatusCode::OK, r#"{"status":"ok"}"#));
        }
        let key = self.authenticate(&req)?;
        trace.key_id = Some(key.id);
        self.forward_sync(req, trace).await
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Arc<ApiKey>, ApiError> {
        let key = self
            .registry
            .authenticate(credentials::presented_key(req.headers())?)?;
        let now = now_secs();
        if key.touch(now) {
            self.writer.key_used(key.id, now);
        }
        Ok(key)
    }

    /// A synchronous call: the same method, path, query and body to fal's run host.
    async fn forward_sync(
        &self,
        req: Request<Incoming>,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let uri = self.upstream.run.uri(path::forwardable(req.uri())?)?;
        let (mut parts, incoming) = req.into_parts();
        let body = if json_body::is_json(&parts.headers) {
            let limit = self.limits.max_json_body_bytes;
            Body::full(json_body::read(incoming, &parts.headers, limit).await?)
        } else {
            Body::Stream(incoming)
        };
        headers::to_upstream(&mut parts.headers);
        parts.uri = uri;

        let sent = Instant::now();
        let result = self.upstream.send(Request::from_parts(parts, body)).await;
        trace.upstream = Some(sent.elapsed());
        let resp = result?;

        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            tracing::error!(status = status.as_u16(), "fal refused the operator's key");
            return Err(ApiError::UpstreamAuth);
        }
        if status.is_server_error() {
            return Err(ApiError::UpstreamFailed(status));
        }
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::Stream(incoming)))
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
