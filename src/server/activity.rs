//! What each open connection is doing, and the cap on how many may be open.
//!
//! A connection is *busy* while a request on it is being handled or its
//! response is still being written, and *idle* otherwise. Only an idle
//! connection is ever closed by a deadline or to make room: a request in
//! progress is never cut by this module (its body has deadlines of its own).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The open connections of one server, and the idle ones oldest first, so
/// that a new connection beyond the cap can close the one idle the longest.
pub struct Connections {
    max: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    idle: Mutex<BTreeMap<(Instant, u64), Weak<Activity>>>,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            idle: Mutex::new(BTreeMap::new()),
        })
    }

    /// Room for one more connection: within the cap, or by closing the one
    /// idle the longest. `None` when every connection is busy: the new one
    /// is refused, and the requests in progress keep their descriptors.
    pub fn admit(self: &Arc<Self>) -> Option<Arc<Activity>> {
        if self.open.load(Ordering::Acquire) >= self.max && !self.evict_oldest_idle() {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        let now = Instant::now();
        let activity = Arc::new_cyclic(|me| Activity {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            me: me.clone(),
            connections: Arc::clone(self),
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: now,
                first_byte: None,
            }),
            awaiting_byte: AtomicBool::new(true),
            evicted: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            eviction: Notify::new(),
        });
        self.idle
            .lock()
            .insert((now, activity.id), Arc::downgrade(&activity));
        Some(activity)
    }

    fn evict_oldest_idle(&self) -> bool {
        loop {
            // The lock is released before the connection's own is taken:
            // the connection takes its own first, then this one.
            let Some((_, oldest)) = self.idle.lock().pop_first() else {
                return false;
            };
            if oldest.upgrade().is_some_and(|a| a.evict()) {
                return true;
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One connection's state, shared by its I/O, its requests and its watchdog.
pub struct Activity {
    id: u64,
    /// Itself, for the idle index (which must not keep it alive).
    me: Weak<Activity>,
    connections: Arc<Connections>,
    state: Mutex<State>,
    /// Idle and no byte since: the one case a read has to report, checked
    /// without the lock on every read.
    awaiting_byte: AtomicBool,
    /// Closed to make room for a new connection.
    evicted: AtomicBool,
    /// HTTP/2: frames other than requests (a window update, a ping) arrive
    /// while it is idle, so a first byte does not start a head deadline
    /// shorter than the idle one.
    http2: AtomicBool,
    /// The watchdog's wake-up when the connection is evicted.
    eviction: Notify,
}

struct State {
    /// Requests being handled or answered.
    in_flight: usize,
    /// When the connection was accepted, finished its handshake, or ended
    /// its last response.
    idle_since: Instant,
    /// The first byte read since `idle_since`: a request's head has begun.
    first_byte: Option<Instant>,
}

/// The deadlines that apply to an idle connection.
#[derive(Debug, Clone, Copy)]
pub struct IdleDeadlines {
    /// For the first byte of the next request.
    pub idle: Duration,
    /// From that first byte, for the request to arrive whole.
    pub head: Duration,
}

impl Activity {
    /// The connection speaks HTTP/2 (its preface, or ALPN).
    pub fn speaks_http2(&self) {
        self.http2.store(true, Ordering::Release);
    }

    /// The connection is idle from now (its TLS handshake just finished).
    pub fn restart_idle(&self) {
        let mut state = self.state.lock();
        if state.in_flight == 0 {
            self.go_idle(&mut state);
        }
    }

    /// A request arrived; the returned guard ends it when dropped, which the
    /// server arranges to happen once its response has been written.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.state.lock();
        state.in_flight += 1;
        if state.in_flight == 1 {
            self.awaiting_byte.store(false, Ordering::Release);
            self.connections
                .idle
                .lock()
                .remove(&(state.idle_since, self.id));
        }
        InFlight(Arc::clone(self))
    }

    fn request_ended(&self) {
        let mut state = self.state.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            // The watchdog is not woken: it finds the new deadline when it
            // next looks (a wake-up and a timer per request were 2% of the
            // proxy's CPU under load).
            self.go_idle(&mut state);
            // Evicted while a request slipped in: closed now it is answered.
            if self.evicted.load(Ordering::Acquire) {
                self.eviction.notify_one();
            }
        }
    }

    fn go_idle(&self, state: &mut State) {
        let mut idle = self.connections.idle.lock();
        idle.remove(&(state.idle_since, self.id));
        state.idle_since = Instant::now();
        state.first_byte = None;
        idle.insert((state.idle_since, self.id), self.me.clone());
        self.awaiting_byte.store(true, Ordering::Release);
    }

    fn byte_arrived(&self) {
        if !self.awaiting_byte.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = self.state.lock();
        if state.in_flight == 0 && state.first_byte.is_none() {
            state.first_byte = Some(Instant::now());
        }
    }

    /// Closes the connection if it is still idle.
    fn evict(&self) -> bool {
        let state = self.state.lock();
        if state.in_flight > 0 {
            return false;
        }
        self.evicted.store(true, Ordering::Release);
        self.eviction.notify_one();
        true
    }

    /// When an idle connection is closed: its idle deadline or, once a
    /// request has begun to arrive, the head deadline from its first byte
    /// (over HTTP/2, whichever is later); at once if it was evicted. Only
    /// the first byte counts, so a client cannot keep a connection by
    /// sending a byte now and then. `None` while busy.
    fn deadline(&self, limits: IdleDeadlines) -> Option<Instant> {
        let state = self.state.lock();
        if state.in_flight > 0 {
            return None;
        }
        // Evicted, then a request slipped in: closed once it is answered.
        if self.evicted.load(Ordering::Acquire) {
            return Some(state.idle_since);
        }
        let idle = state.idle_since + limits.idle;
        Some(match state.first_byte {
            None => idle,
            Some(b) if self.http2.load(Ordering::Acquire) => idle.max(b + limits.head),
            Some(b) => b + limits.head,
        })
    }

    /// Resolves when the connection should be closed: idle past its
    /// deadline, or evicted to make room. Woken only by an eviction or its
    /// own timer, never by the requests: it looks again at least every
    /// `head`, so a head that begins (the one change that can bring the
    /// deadline nearer) is seen in time to be cut exactly at its deadline.
    pub async fn expired(&self, limits: IdleDeadlines) {
        loop {
            let evicted = self.eviction.notified();
            tokio::pin!(evicted);
            evicted.as_mut().enable();
            let next_look = Instant::now() + limits.head;
            let at = match self.deadline(limits) {
                None => next_look,
                Some(at) if at <= Instant::now() => return,
                Some(at) => at.min(next_look),
            };
            tokio::select! {
                _ = evicted => {}
                _ = tokio::time::sleep_until(at) => {}
            }
        }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        let idle_since = self.state.get_mut().idle_since;
        self.connections.idle.lock().remove(&(idle_since, self.id));
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in progress on a connection; dropping it ends the request.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A connection's socket, reporting the first byte of each request's head,
/// and an h2c preface.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    read_any: bool,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            read_any: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if !self.read_any {
                self.read_any = true;
                // No HTTP/1.1 method is PRI: this is HTTP/2's preface.
                if read.starts_with(b"PRI") {
                    self.activity.speaks_http2();
                }
            }
            if self.activity.awaiting_byte.load(Ordering::Acquire) {
                self.activity.byte_arrived();
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: IdleDeadlines = IdleDeadlines {
        idle: Duration::from_secs(30),
        head: Duration::from_secs(10),
    };

    #[test]
    fn beyond_the_cap_the_longest_idle_goes_and_busy_ones_stay() {
        let conns = Connections::new(2);
        let oldest = conns.admit().unwrap();
        let busy = conns.admit().unwrap();
        let _request = busy.request_started();
        // At the cap: the idle one is evicted, the busy one never is.
        let third = conns.admit().unwrap();
        assert!(oldest.evicted.load(Ordering::Acquire));
        assert!(!busy.evicted.load(Ordering::Acquire));
        drop(oldest);
        // Now every other connection is busy or newer: the third goes next,
        // and once nothing is idle a new connection is refused.
        let _also_busy = third.request_started();
        assert!(conns.admit().is_none());
        assert_eq!(conns.open(), 2);
    }

    #[test]
    fn an_idle_deadline_then_a_head_deadline_from_the_first_byte() {
        let conns = Connections::new(10);
        let a = conns.admit().unwrap();
        let since = a.state.lock().idle_since;
        assert_eq!(a.deadline(LIMITS), Some(since + LIMITS.idle));
        // A head begins: its deadline counts from its first byte, and later
        // bytes do not move it again.
        a.byte_arrived();
        let first = a.state.lock().first_byte.unwrap();
        let head = first + LIMITS.head;
        assert_eq!(a.deadline(LIMITS), Some(head));
        a.byte_arrived();
        assert_eq!(a.deadline(LIMITS), Some(head));
        // Busy: no deadline; answered: idle again, from then.
        let request = a.request_started();
        assert_eq!(a.deadline(LIMITS), None);
        drop(request);
        let state = a.state.lock();
        assert!(state.idle_since >= since && state.first_byte.is_none());
    }

    #[test]
    fn over_http2_a_first_byte_never_brings_the_idle_deadline_nearer() {
        let conns = Connections::new(10);
        let a = conns.admit().unwrap();
        a.speaks_http2();
        let since = a.state.lock().idle_since;
        // A window update or a ping while idle: still the idle deadline.
        a.byte_arrived();
        let first = a.state.lock().first_byte.unwrap();
        let idle = since + LIMITS.idle;
        assert_eq!(a.deadline(LIMITS), Some(idle.max(first + LIMITS.head)));
        assert!(a.deadline(LIMITS).unwrap() >= idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_closes_once_the_request_that_slipped_in_ends() {
        let conns = Connections::new(10);
        let a = conns.admit().unwrap();
        assert!(a.evict());
        let request = a.request_started();
        let started = Instant::now();
        let watchdog = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.expired(LIMITS).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!watchdog.is_finished(), "closed while its request runs");
        drop(request);
        watchdog.await.unwrap();
        assert!(started.elapsed() < LIMITS.idle, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_deadline_counts_from_the_last_answer() {
        let conns = Connections::new(10);
        let a = conns.admit().unwrap();
        let watchdog = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.expired(LIMITS).await }
        });
        // A request 20 s in, answered 5 s later: idle from then.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let request = a.request_started();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let answered = Instant::now();
        drop(request);
        watchdog.await.unwrap();
        assert_eq!(answered.elapsed(), LIMITS.idle);
    }
}
