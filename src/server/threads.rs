//! The request threads, in nginx's model: one single-threaded runtime per
//! core, each accepting on a socket of its own (`SO_REUSEPORT`: the kernel
//! spreads new connections over them) and serving every connection it
//! accepted to the end, with upstream connections of its own. Nothing moves
//! between threads on the hot path; what is shared (keys, accounts, the
//! ledger's queue) is shared through atomics and maps made for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::activity::Connections;
use super::{ConnectionLimits, Handler, Listener};

/// `[server] workers`, with 0 for one per core.
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// How deep each socket's queue of connections not yet accepted may grow.
const BACKLOG: i32 = 1024;

/// `addr` bound `n` times with `SO_REUSEPORT`; port 0 is chosen once, by the
/// first socket, and shared by the others. A port another process listens
/// on is refused as in use, as without `SO_REUSEPORT`, rather than shared:
/// a second server started on it by mistake must not take half the traffic.
pub fn bind(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        bound = listener.local_addr()?;
        sockets.push(listener);
    }
    Ok((bound, sockets))
}

/// A bound socket for one thread, with its TLS settings if it speaks TLS.
pub struct Socketed {
    pub tcp: std::net::TcpListener,
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// The running request threads.
pub struct Threads {
    threads: Vec<JoinHandle<()>>,
    drained: Vec<oneshot::Receiver<bool>>,
    release: watch::Sender<bool>,
}

impl Threads {
    /// Starts one thread per entry of `sockets`, each serving its own until
    /// `stop` turns true. All share `connections`, the cap on open ones.
    pub fn spawn<H: Handler>(
        sockets: Vec<Vec<Socketed>>,
        handler: Arc<H>,
        limits: ConnectionLimits,
        connections: Arc<Connections>,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let (release, released) = watch::channel(false);
        let mut threads = Vec::with_capacity(sockets.len());
        let mut drained = Vec::with_capacity(sockets.len());
        for (index, own) in sockets.into_iter().enumerate() {
            let (done, done_rx) = oneshot::channel();
            drained.push(done_rx);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (handler, connections) = (Arc::clone(&handler), Arc::clone(&connections));
            let (mut stop, mut released) = (stop.clone(), released.clone());
            let thread = std::thread::Builder::new()
                .name(format!("request-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listeners = own
                            .into_iter()
                            .map(|s| {
                                Ok(Listener {
                                    tcp: TcpListener::from_std(s.tcp)?,
                                    tls: s.tls,
                                })
                            })
                            .collect::<std::io::Result<Vec<_>>>();
                        let stopped = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        let all_drained = match listeners {
                            Ok(listeners) => {
                                super::run(listeners, handler, limits, connections, stopped).await
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "a request thread cannot listen");
                                true
                            }
                        };
                        let _ = done.send(all_drained);
                        // Billed work left running by clients who hung up runs
                        // on this thread's runtime: it stays up until told.
                        let _ = released.wait_for(|r| *r).await;
                    });
                    // Its tasks are dropped here as by a drop of the runtime,
                    // but its blocking threads (a store call waiting on a
                    // locked SQLite, a DNS lookup) are not waited for: they
                    // would hold the stop, and the ledger writer's close
                    // behind it, past the grace.
                    runtime.shutdown_background();
                })?;
            threads.push(thread);
        }
        Ok(Self {
            threads,
            drained,
            release,
        })
    }

    /// Waits until every thread has stopped accepting and drained (or given
    /// up on) its connections; true if every connection finished in time.
    pub async fn drained(&mut self) -> bool {
        let mut all = true;
        for done in self.drained.drain(..) {
            all &= done.await.unwrap_or(false);
        }
        all
    }

    /// Lets the threads end their runtimes (cutting whatever still runs on
    /// them) and waits for them.
    pub async fn end(self) {
        let _ = self.release.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}
