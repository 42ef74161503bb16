//! Accepting connections: TCP, then TLS where configured, then HTTP/1.1 or
//! HTTP/2 (ALPN, or h2c prior knowledge on the plain listener), and a
//! bounded drain on shutdown.

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

#[derive(Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub tls_handshake: Duration,
    pub grace: Duration,
}

impl From<&ServerConfig> for Timeouts {
    fn from(c: &ServerConfig) -> Self {
        Self {
            header_read: Duration::from_secs(c.header_read_timeout_secs),
            tls_handshake: Duration::from_secs(c.tls_handshake_timeout_secs),
            grace: Duration::from_secs(c.shutdown_grace_secs),
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `timeouts.grace` to finish. True when every
/// connection finished within the grace period.
pub async fn run<H: Handler>(
    listeners: Vec<Listener>,
    handler: Arc<H>,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    builder.http2().timer(TokioTimer::new());
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
                timeouts,
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
    let drained = tokio::time::timeout(timeouts.grace, graceful.shutdown())
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
    timeouts: Timeouts,
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
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            listener.tls.as_ref().map(|t| t.load_full()),
            Arc::clone(&handler),
            Arc::clone(&builder),
            graceful.watcher(),
            timeouts,
            peer,
        ));
    }
}

async fn connection<H: Handler>(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    timeouts: Timeouts,
    peer: std::net::SocketAddr,
) {
    let conn = Conn { tls: tls.is_some() };
    let service = service_fn(move |req| {
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.handle(req, conn).await) }
    });
    let result = match tls {
        None => {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(conn).await
        }
        Some(config) => {
            let acceptor = TlsAcceptor::from(config);
            let tls_stream =
                match tokio::time::timeout(timeouts.tls_handshake, acceptor.accept(stream)).await {
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
            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
            watcher.watch(conn).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
