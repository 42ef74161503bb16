//! Billed work that runs on by itself once its hold is taken, so that a
//! client who hangs up cannot cancel fal's call: counted, so that shutdown
//! waits for it (its settlement is money) the way it waits for connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Detached {
    running: AtomicUsize,
    idle: Notify,
}

/// Counts one piece of work while it lives.
struct Running(Arc<Detached>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Work run by [`Detached::run`], counted until it ends.
pub struct Attached<F: Future + Unpin + Send + 'static>
where
    F::Output: Send + 'static,
{
    work: Option<(F, Running)>,
}

impl<F> Future for Attached<F>
where
    F: Future + Unpin + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let (work, _) = self.work.as_mut().expect("polled after it ended");
        let out = std::task::ready!(Pin::new(work).poll(cx));
        self.work = None;
        Poll::Ready(out)
    }
}

impl<F> Drop for Attached<F>
where
    F: Future + Unpin + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // A panic in the work unwinds through here: it is not polled again.
        let Some((work, running)) = self.work.take().filter(|_| !std::thread::panicking()) else {
            return;
        };
        // Without a runtime (a drop at shutdown) the work goes with the
        // caller, as a task of the runtime would.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _running = running;
                work.await
            });
        }
    }
}

impl Detached {
    /// Runs `work` as part of the caller's future, polled where the caller
    /// is: if the caller drops it unfinished (its client left), the rest of
    /// it runs on a task of its own. (A task per call, and its wake-ups,
    /// cost what the work itself cost.) A panic in it is the caller's.
    pub fn run<F>(self: &Arc<Self>, work: F) -> Attached<F>
    where
        F: Future + Unpin + Send + 'static,
        F::Output: Send + 'static,
    {
        self.running.fetch_add(1, Ordering::AcqRel);
        Attached {
            work: Some((work, Running(Arc::clone(self)))),
        }
    }

    /// Runs `work` on a task of its own, counted until it ends.
    pub fn spawn<F>(self: &Arc<Self>, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(self));
        tokio::spawn(async move {
            let _running = running;
            work.await
        })
    }

    /// Waits until no work runs, for at most `within`; true if none does.
    pub async fn settled(&self, within: Duration) -> bool {
        let all_done = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(within, all_done).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_left_by_its_caller_runs_on_and_is_waited_for() {
        let detached = Arc::new(Detached::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn({
            let detached = Arc::clone(&detached);
            async move {
                detached
                    .run(Box::pin(async move { rx.await.is_ok() }))
                    .await
            }
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(!detached.settled(Duration::from_millis(50)).await);
        tx.send(()).unwrap();
        assert!(detached.settled(Duration::from_secs(5)).await);
    }
}
