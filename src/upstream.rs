//! How requests reach fal: on each thread's own connections (see [`pool`]),
//! and only ever to a host configured in `[upstream]`.

mod connector;
mod fal_body;
mod pool;

use std::error::Error as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::connector::Connector;
pub use self::connector::ServeInMemory;
pub use self::fal_body::FalBody;
use self::pool::{Conn, Host, Lease, Usage};
use crate::config::UpstreamConfig;
use crate::error::{ApiError, Error};
use crate::proxy::body::Body;
use crate::tls;

/// A configured fal base URL, split so that a request path can only ever
/// be appended to it, never change its scheme or host.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let scheme = uri.scheme().cloned().ok_or("needs http:// or https://")?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("{url:?}: only http and https are supported"));
        }
        let authority = uri.authority().cloned().ok_or("needs a host")?;
        if uri.query().is_some() {
            return Err(format!("{url:?}: a base URL takes no query"));
        }
        Ok(Self {
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `path_and_query` must start with `/`; it is appended, never interpreted.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, ApiError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.prefix, path_and_query))
            .build()
            .map_err(|_| ApiError::InvalidPath)
    }
}

/// Connections to the hosts of one configured service, sending the
/// credentials that service takes: fal's (in [`Upstream`]) or Stripe's.
pub struct Client {
    /// Tells this client's connections from another's in a thread's idle list.
    id: u64,
    connector: Connector,
    /// The `authorization` value, marked sensitive so it never reaches a log.
    auth: HeaderValue,
    timeout: Duration,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// How long a [`Client`] waits: for an answer's headers (and each part of
/// its body), for a connection, and before closing an idle one.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub answer: Duration,
    pub connect: Duration,
    pub idle: Duration,
}

pub struct Upstream {
    client: Client,
    pub run: Target,
    pub queue: Target,
    pub storage: Target,
    /// fal's Platform API: prices and billing records.
    pub api: Target,
    /// `[upstream] queue` as configured, without a trailing slash: the start
    /// of the queue URLs fal hands out.
    queue_base: String,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, fal_key: &str) -> Result<Self, Error> {
        let tls = tls::client_config(cfg.ca_file.as_deref())?;
        Self::build(cfg, fal_key, Connector::network(Arc::unwrap_or_clone(tls)))
    }

    /// Every connection is a pipe to `serve`, in this process; the
    /// configured URLs still name the host in each request. For the
    /// in-process request-path bench.
    pub fn in_memory(
        cfg: &UpstreamConfig,
        fal_key: &str,
        serve: ServeInMemory,
    ) -> Result<Self, Error> {
        Self::build(cfg, fal_key, Connector::Memory(serve))
    }

    fn build(cfg: &UpstreamConfig, fal_key: &str, connector: Connector) -> Result<Self, Error> {
        let timeouts = Timeouts {
            answer: Duration::from_secs(cfg.timeout_secs),
            connect: Duration::from_secs(cfg.connect_timeout_secs),
            idle: Duration::from_secs(cfg.idle_timeout_secs),
        };
        Ok(Self {
            client: Client::build(connector, &format!("Key {fal_key}"), timeouts)
                .map_err(|_| Error::Config("the fal key is not a valid header value".into()))?,
            run: Target::parse(&cfg.run).map_err(Error::Config)?,
            queue: Target::parse(&cfg.queue).map_err(Error::Config)?,
            queue_base: cfg.queue.trim_end_matches('/').to_owned(),
            storage: Target::parse(&cfg.storage).map_err(Error::Config)?,
            api: Target::parse(&cfg.api).map_err(Error::Config)?,
        })
    }

    /// The longest wait for fal: for its headers, and for each part of a body it streams.
    pub fn timeout(&self) -> Duration {
        self.client.timeout
    }

    /// Sends `req` (its URI already built from a [`Target`]) with the
    /// operator's key, and waits at most `timeout` for fal's response headers.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<FalBody>, ApiError> {
        self.client.send(req).await
    }
}

impl Client {
    /// A client of hosts on the network, sending `auth` as `authorization`.
    pub fn new(tls: rustls::ClientConfig, auth: &str, timeouts: Timeouts) -> Result<Self, Error> {
        Self::build(Connector::network(tls), auth, timeouts)
            .map_err(|_| Error::Config("a credential is not a valid header value".into()))
    }

    fn build(
        connector: Connector,
        auth: &str,
        timeouts: Timeouts,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let mut auth = HeaderValue::from_str(auth)?;
        auth.set_sensitive(true);
        Ok(Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            connector,
            auth,
            timeout: timeouts.answer,
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.idle,
        })
    }

    /// The longest wait for an answer's headers, and for each part of its body.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` (its URI already built from a [`Target`]) with the
    /// client's credentials, and waits at most `timeout` for the response headers.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<FalBody>, ApiError> {
        req.headers_mut()
            .insert(header::AUTHORIZATION, self.auth.clone());
        // A wait that ran out before any connection took the request (it
        // was still connecting) did not reach fal: a webhook submission
        // pays its hold only when fal may have it.
        let handed = AtomicBool::new(false);
        match tokio::time::timeout(self.timeout, self.exchange(req, &handed)).await {
            Err(_) => Err(ApiError::UpstreamTimeout {
                reached: handed.load(Ordering::Relaxed),
            }),
            Ok(answered) => answered,
        }
    }

    /// One request on a connection of this thread's: an idle one if there
    /// is one, else a new one. A request an idle connection turned out too
    /// stale to write goes again, on the next idle one or a new one: hyper
    /// hands a request back only when it wrote none of it, so going again
    /// never sends a billed call to fal twice. One that a new connection
    /// hands back is not tried again, so that a fal dropping every new
    /// connection cannot keep this loop going.
    async fn exchange(
        &self,
        mut req: Request<Body>,
        handed: &AtomicBool,
    ) -> Result<Response<FalBody>, ApiError> {
        let uri = req.uri().clone();
        let host = Host {
            upstream: self.id,
            https: uri.scheme() == Some(&Scheme::HTTPS),
            authority: uri.authority().cloned().ok_or(ApiError::InvalidPath)?,
        };
        loop {
            let mut lease = match pool::checkout(&host) {
                Some(lease) => lease,
                None => self.connect(&host).await?,
            };
            prepare(&mut req, &host, lease.is_h2());
            handed.store(true, Ordering::Relaxed);
            match lease.send(req).await {
                Ok(resp) => return Ok(resp.map(|body| FalBody::new(body, lease))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if lease.reused => {
                        handed.store(false, Ordering::Relaxed);
                        req = unsent;
                        *req.uri_mut() = uri.clone();
                    }
                    _ => {
                        let e = e.into_error();
                        // hyper's message leaves out its cause (the I/O or h2 error).
                        tracing::warn!(error = %e, source = ?e.source(), "upstream request failed");
                        return Err(ApiError::UpstreamUnreachable);
                    }
                },
            }
        }
    }

    /// A new connection to `host`, driven on this thread until it closes or
    /// has been idle for `[upstream] idle_timeout_secs`.
    async fn connect(&self, host: &Host) -> Result<Lease, ApiError> {
        let connected = tokio::time::timeout(
            self.connect_timeout,
            self.connector
                .connect(host.https, &host.authority, self.connect_timeout),
        )
        .await
        .map_err(|_| ApiError::UpstreamTimeout { reached: false })?
        .map_err(|e| {
            tracing::warn!(error = %e, host = %host.authority, "cannot connect upstream");
            match e.kind() {
                std::io::ErrorKind::TimedOut => ApiError::UpstreamTimeout { reached: false },
                _ => ApiError::UpstreamUnreachable,
            }
        })?;
        let usage = Usage::new();
        let idle = self.idle_timeout;
        let handshake_failed = |e: hyper::Error| {
            tracing::warn!(error = %e, source = ?e.source(), host = %host.authority, "upstream handshake failed");
            ApiError::UpstreamUnreachable
        };
        let conn = if connected.h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(connected.io)
                .await
                .map_err(handshake_failed)?;
            drive(conn, Arc::clone(&usage), idle);
            Conn::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(connected.io)
                .await
                .map_err(handshake_failed)?;
            drive(conn, Arc::clone(&usage), idle);
            Conn::H1(sender)
        };
        Ok(Lease::new(conn, usage, host.clone()))
    }
}

impl Upstream {
    pub fn queue_base(&self) -> &str {
        &self.queue_base
    }

    /// A GET of our own (the reconciler's), not on behalf of a client request.
    pub async fn get(&self, uri: Uri) -> Result<Response<FalBody>, ApiError> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        self.send(req).await
    }
}

/// Runs a connection on this thread's runtime until it closes, or until
/// it has carried nothing for `idle`.
fn drive<C: Future + Send + 'static>(conn: C, usage: Arc<Usage>, idle: Duration) {
    tokio::spawn(async move {
        tokio::select! {
            _ = conn => {}
            () = usage.idle_for(idle) => {}
        }
    });
}

/// The request as the connection's protocol wants it. HTTP/1.1 takes the
/// path alone and the host in `Host`; h2 takes the whole URI (its
/// `:authority`) and, whatever the client spoke, the version of the
/// connection, so an h2 client's request cannot force h2 onto a plain-HTTP
/// upstream.
fn prepare(req: &mut Request<Body>, host: &Host, h2: bool) {
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        return;
    }
    *req.version_mut() = Version::HTTP_11;
    let default_port = if host.https { 443 } else { 80 };
    let value = match host.authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(host.authority.as_str()),
        _ => HeaderValue::from_str(host.authority.host()),
    };
    if let Ok(value) = value {
        req.headers_mut().insert(header::HOST, value);
    }
    let origin = req
        .uri()
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    *req.uri_mut() = origin;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_appended_never_reinterpreted() {
        let t = Target::parse("https://fal.run").unwrap();
        for (path, host) in [
            ("//evil.example/x", "fal.run"),
            ("/@evil.example/x", "fal.run"),
            ("/fal-ai/flux/dev?x=1", "fal.run"),
        ] {
            let uri = t.uri(path).unwrap();
            assert_eq!(uri.host(), Some(host), "{path}");
            assert_eq!(uri.path_and_query().unwrap().as_str(), path);
        }
        let prefixed = Target::parse("http://127.0.0.1:9/base/").unwrap();
        assert_eq!(
            prefixed.uri("/a").unwrap().to_string(),
            "http://127.0.0.1:9/base/a"
        );
    }
}
