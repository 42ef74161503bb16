//! Each thread's idle connections to fal. A request thread's connections
//! are opened, driven and reused on that thread alone, so the idle ones
//! live in a thread-local list: checking one out takes no lock and spawns
//! nothing. An HTTP/1.1 connection comes back to the list when its answer
//! has been read to the end; an HTTP/2 one is shared by every request to
//! its host from the moment it is open.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};

use crate::proxy::body::Body;

/// Where a connection goes.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// Which [`Upstream`](super::Upstream): tests and benches run several
    /// in one process, and one must not reuse another's connections.
    pub upstream: u64,
    pub https: bool,
    pub authority: Authority,
}

/// Idle HTTP/1.1 connections kept per host on each thread; one more is closed.
const MAX_IDLE: usize = 128;

pub enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

struct Parked {
    host: Host,
    h1: Vec<(http1::SendRequest<Body>, Arc<Usage>)>,
    h2: Option<(http2::SendRequest<Body>, Arc<Usage>)>,
}

thread_local! {
    static PARKED: RefCell<Vec<Parked>> = const { RefCell::new(Vec::new()) };
}

/// A connection in use by one request.
pub struct Lease {
    /// `None` once an HTTP/1.1 connection has gone back to the idle list.
    conn: Option<Conn>,
    usage: Arc<Usage>,
    host: Host,
    /// It carried a request before: if it turns out closed before this one
    /// was written, the request may go again on a new connection.
    pub reused: bool,
}

impl Lease {
    /// A new connection's first request.
    pub fn new(conn: Conn, usage: Arc<Usage>, host: Host) -> Self {
        if let Conn::H2(sender) = &conn {
            share_h2(&host, sender.clone(), Arc::clone(&usage));
        }
        usage.acquire();
        Self {
            conn: Some(conn),
            usage,
            host,
            reused: false,
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self.conn, Some(Conn::H2(_)))
    }

    /// Sends `req`; a request the connection never wrote comes back in the error.
    pub async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self
            .conn
            .as_mut()
            .expect("a lease is used before it is given back")
        {
            Conn::H1(sender) => sender.try_send_request(req).await,
            Conn::H2(sender) => sender.try_send_request(req).await,
        }
    }

    /// The answer has been read to its end: an HTTP/1.1 connection can carry
    /// the next request.
    pub fn give_back(&mut self) {
        if let Some(Conn::H1(sender)) = self.conn.take() {
            park_h1(&self.host, sender, Arc::clone(&self.usage));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.usage.release();
    }
}

/// A ready connection to `host` from this thread's idle list, if it has one.
pub fn checkout(host: &Host) -> Option<Lease> {
    let (conn, usage) = PARKED.with_borrow_mut(|all| {
        let parked = all.iter_mut().find(|p| p.host == *host)?;
        if let Some((sender, usage)) = &parked.h2 {
            if sender.is_ready() {
                return Some((Conn::H2(sender.clone()), Arc::clone(usage)));
            }
            parked.h2 = None;
        }
        // Newest first: the connection least likely to have been closed
        // by fal while it sat idle. One not ready yet (its driver has not
        // run since its answer ended) is left for the next request.
        let mut i = parked.h1.len();
        while i > 0 {
            i -= 1;
            let sender = &parked.h1[i].0;
            if sender.is_ready() {
                let (sender, usage) = parked.h1.swap_remove(i);
                return Some((Conn::H1(sender), usage));
            }
            if sender.is_closed() {
                parked.h1.swap_remove(i);
            }
        }
        None
    })?;
    usage.acquire();
    Some(Lease {
        conn: Some(conn),
        usage,
        host: host.clone(),
        reused: true,
    })
}

fn with_parked<R>(host: &Host, f: impl FnOnce(&mut Parked) -> R) -> R {
    PARKED.with_borrow_mut(|all| {
        let i = match all.iter().position(|p| p.host == *host) {
            Some(i) => i,
            None => {
                all.push(Parked {
                    host: host.clone(),
                    h1: Vec::new(),
                    h2: None,
                });
                all.len() - 1
            }
        };
        f(&mut all[i])
    })
}

fn park_h1(host: &Host, sender: http1::SendRequest<Body>, usage: Arc<Usage>) {
    with_parked(host, |p| {
        if p.h1.len() < MAX_IDLE {
            p.h1.push((sender, usage));
        }
    });
}

fn share_h2(host: &Host, sender: http2::SendRequest<Body>, usage: Arc<Usage>) {
    with_parked(host, |p| p.h2 = Some((sender, usage)));
}

/// How busy one connection is, for its idle deadline.
pub struct Usage {
    in_use: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Usage {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_use: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
        })
    }

    fn acquire(&self) {
        self.in_use.fetch_add(1, Ordering::AcqRel);
    }

    fn release(&self) {
        self.idle_since_ms.store(now_ms(), Ordering::Release);
        self.in_use.fetch_sub(1, Ordering::AcqRel);
    }

    /// Returns once the connection has carried nothing for `timeout`; its
    /// driver then ends, closing it (and marking it closed in the list).
    pub async fn idle_for(&self, timeout: Duration) {
        let limit = timeout.as_millis() as u64;
        loop {
            let wait = if self.in_use.load(Ordering::Acquire) > 0 {
                limit
            } else {
                let idle = now_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
                if idle >= limit {
                    return;
                }
                limit - idle
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
