//! The pooled clients that talk to fal, one per request thread (and one for
//! the work off them), and the only place that decides which host a request
//! goes to: always one configured in `[upstream]`.

mod connector;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::connector::Connector;
pub use self::connector::ServeInMemory;
use crate::config::UpstreamConfig;
use crate::error::{ApiError, Error};
use crate::proxy::body::Body;
use crate::server::threads;
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

type Pooled = Client<HttpsConnector<Connector>, Body>;

pub struct Upstream {
    /// One per request thread, then one for the work off them: a thread's
    /// connections are opened, driven and reused on its own runtime only.
    clients: Vec<Pooled>,
    pub run: Target,
    pub queue: Target,
    pub storage: Target,
    /// `[upstream] queue` as configured, without a trailing slash: the start
    /// of the queue URLs fal hands out.
    queue_base: String,
    /// `Key <operator's fal key>`, marked sensitive so it never reaches a log.
    auth: HeaderValue,
    timeout: Duration,
}

impl Upstream {
    /// For `threads` request threads.
    pub fn new(cfg: &UpstreamConfig, fal_key: &str, threads: usize) -> Result<Self, Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(cfg.connect_timeout_secs)));
        Self::build(cfg, fal_key, Connector::Tcp(http), threads)
    }

    /// Every connection is a pipe to `serve`, in this process; the
    /// configured URLs still name the host in each request. For the
    /// in-process request-path bench.
    pub fn in_memory(
        cfg: &UpstreamConfig,
        fal_key: &str,
        serve: ServeInMemory,
    ) -> Result<Self, Error> {
        Self::build(cfg, fal_key, Connector::Memory(serve), 0)
    }

    fn build(
        cfg: &UpstreamConfig,
        fal_key: &str,
        inner: Connector,
        threads: usize,
    ) -> Result<Self, Error> {
        let mut auth = HeaderValue::from_str(&format!("Key {fal_key}"))
            .map_err(|_| Error::Config("the fal key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let tls = tls::client_config(cfg.ca_file.as_deref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(tls))
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(inner);
        let clients = (0..=threads)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(connector.clone())
            })
            .collect();

        Ok(Self {
            clients,
            run: Target::parse(&cfg.run).map_err(Error::Config)?,
            queue: Target::parse(&cfg.queue).map_err(Error::Config)?,
            queue_base: cfg.queue.trim_end_matches('/').to_owned(),
            storage: Target::parse(&cfg.storage).map_err(Error::Config)?,
            auth,
            timeout: Duration::from_secs(cfg.timeout_secs),
        })
    }

    /// The longest wait for fal: for its headers, and for each part of a body it streams.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` (its URI already built from a [`Target`]) with the
    /// operator's key, and waits at most `timeout` for fal's response headers.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, ApiError> {
        req.headers_mut()
            .insert(header::AUTHORIZATION, self.auth.clone());
        // ALPN still picks h2 where fal offers it; this only stops an h2
        // client's version from forcing h2 onto a plain-HTTP upstream.
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.timeout, self.client().request(req)).await {
            Err(_) => Err(ApiError::UpstreamTimeout { reached: true }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if timed_out(&e) => Err(ApiError::UpstreamTimeout {
                reached: !e.is_connect(),
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, source = ?e.source(), "upstream request failed");
                Err(ApiError::UpstreamUnreachable)
            }
        }
    }
}

impl Upstream {
    /// The calling thread's own client.
    fn client(&self) -> &Pooled {
        let off_threads = self.clients.len() - 1;
        let i = threads::current()
            .filter(|&i| i < off_threads)
            .unwrap_or(off_threads);
        &self.clients[i]
    }

    pub fn queue_base(&self) -> &str {
        &self.queue_base
    }

    /// A GET of our own (the reconciler's), not on behalf of a client request.
    pub async fn get(&self, uri: Uri) -> Result<Response<Incoming>, ApiError> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        self.send(req).await
    }
}

fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    false
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
