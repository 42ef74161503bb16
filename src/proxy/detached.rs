//! Billed work that runs on by itself once its hold is taken, so that a
//! client who hangs up cannot cancel fal's call: counted, so that shutdown
//! waits for it (its settlement is money) the way it waits for connections.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

impl Detached {
    /// Runs `work` on a task of its own and waits for it; dropping the
    /// returned future leaves the work running. A panic in it is the caller's.
    pub async fn run<F>(self: &Arc<Self>, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.spawn(work).await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
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
            async move { detached.run(async move { rx.await.is_ok() }).await }
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(!detached.settled(Duration::from_millis(50)).await);
        tx.send(()).unwrap();
        assert!(detached.settled(Duration::from_secs(5)).await);
    }
}
