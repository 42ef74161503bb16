//! Accepting connections: TCP, then TLS where configured, then HTTP/1.1 or
//! HTTP/2 (ALPN, or h2c prior knowledge on the plain listener), and a
//! bounded drain on shutdown. Every connection is watched from accept
//! ([`activity`]): closed when idle past its deadline, or to make room
//! beyond the cap. The proxy's listeners run on the request [`threads`].

mod activity;
mod descriptors;
pub mod threads;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub use self::activity::Connections;
use self::activity::{Activity, IdleDeadlines, InFlight, Watched};
use crate::config::ServerConfig;
use crate::proxy::body::Body;
use crate::proxy::{Conn, Proxy};

/// What answers requests on a listener: the proxy, or the admin API.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        conn: Conn,
    ) -> impl Future<Output = hyper::Response<Body>> + Send;
}

impl Handler for Proxy {
    fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        conn: Conn,
    ) -> impl Future<Output = hyper::Response<Body>> + Send {
        Proxy::handle(self, req, conn)
    }
}

/// A bound socket, with its TLS settings if it speaks TLS. The settings
/// can be replaced while it runs (a reload): each handshake takes the
/// certificate in force, connections already open keep theirs.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// What bounds a connection: its deadlines and how many may be open.
#[derive(Clone, Copy)]
pub struct ConnectionLimits {
    pub idle: IdleDeadlines,
    pub tls_handshake: Duration,
    pub grace: Duration,
    pub max_connections: usize,
    pub http2_keepalive: Duration,
    pub http2_max_streams: u32,
}

impl From<&ServerConfig> for ConnectionLimits {
    fn from(c: &ServerConfig) -> Self {
        Self {
            idle: IdleDeadlines {
                idle: Duration::from_secs(c.idle_timeout_secs),
                head: Duration::from_secs(c.header_read_timeout_secs),
            },
            tls_handshake: Duration::from_secs(c.tls_handshake_timeout_secs),
            grace: Duration::from_secs(c.shutdown_grace_secs),
            max_connections: c.max_connections,
            http2_keepalive: Duration::from_secs(c.http2_keepalive_interval_secs),
            http2_max_streams: c.http2_max_concurrent_streams,
        }
    }
}

/// The cap on open connections that `limits` sets, for the listeners that share it.
pub fn connections(limits: &ConnectionLimits) -> Arc<Connections> {
    Connections::new(descriptors::cap(limits.max_connections))
}

/// Serves until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `limits.grace` to finish. True when every
/// connection finished within the grace period.
pub async fn run<H: Handler>(
    listeners: Vec<Listener>,
    handler: Arc<H>,
    limits: ConnectionLimits,
    connections: Arc<Connections>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The head deadline is the connection watchdog's, from the request's
    // first byte: hyper's own would count from the end of the last answer
    // (closing kept connections at the head deadline, not the idle one)
    // and set a timer per request.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive)
        .keep_alive_timeout(limits.http2_keepalive)
        .max_concurrent_streams(limits.http2_max_streams);
    let builder = Arc::new(builder);

    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            tokio::spawn(accept_loop(
                l,
                Arc::clone(&handler),
                Arc::clone(&builder),
                Arc::clone(&graceful),
                Arc::clone(&connections),
                limits,
                stop_rx.clone(),
            ))
        })
        .collect();

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    let _ = stop_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    // The accept loops are done, so this is the last handle.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        unreachable!("accept loops hold no graceful handle after they end")
    };
    let drained = tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_ok();
    if !drained {
        tracing::warn!("grace period over: closing the remaining connections");
    }
    drained
}

async fn accept_loop<H: Handler>(
    listener: Listener,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<GracefulShutdown>,
    connections: Arc<Connections>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap with every connection busy: closing this one at once
        // keeps descriptors for the requests in progress.
        let Some(activity) = connections.admit() else {
            tracing::debug!(%peer, open = connections.open(), "connection refused: at the cap, none idle");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serve = connection(
            stream,
            listener.tls.as_ref().map(|t| t.load_full()),
            Arc::clone(&handler),
            Arc::clone(&builder),
            graceful.watcher(),
            Arc::clone(&activity),
            limits,
            peer,
        );
        tokio::spawn(async move {
            tokio::select! {
                () = serve => {}
                () = activity.expired(limits.idle) => {
                    tracing::debug!(%peer, "closing an idle connection");
                }
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<H: Handler>(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    peer: std::net::SocketAddr,
) {
    let conn = Conn {
        tls: tls.is_some(),
        peer: peer.ip(),
    };
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req| {
            let handler = Arc::clone(&handler);
            // Taken before the handler runs, so that a request cut off
            // midway ends too; released once its response is written.
            let in_flight = activity.request_started();
            async move {
                let resp = handler.handle(req, conn).await;
                Ok::<_, Infallible>(resp.map(|body| Answer {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let stream = Watched::new(stream, Arc::clone(&activity));
    let result = match tls {
        None => {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(conn).await
        }
        Some(config) => {
            let acceptor = TlsAcceptor::from(config);
            let tls_stream =
                match tokio::time::timeout(limits.tls_handshake, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "tls handshake timed out");
                        return;
                    }
                };
            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                activity.speaks_http2();
            }
            activity.restart_idle();
            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
            watcher.watch(conn).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A response body that keeps its request counted as in progress until
/// hyper has written it (or dropped it with the connection).
struct Answer {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
