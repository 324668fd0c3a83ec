//! Graceful shutdown: one signal to stop, and a wait until every task that
//! holds a handle has finished.
//!
//! Each accept loop and each connection holds a [`Shutdown`] handle. The
//! handle carries a clone of a channel sender that nobody sends on, so the
//! controller knows every handle is gone when its receiver reports that all
//! senders are closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// The owner's side: signals shutdown and waits for the handles to go.
pub struct DrainController {
    signal: watch::Sender<bool>,
    guard: mpsc::Sender<()>,
    released: mpsc::Receiver<()>,
    idle_kept: Arc<AtomicBool>,
}

/// A task's side: signals the task to stop, and keeps the controller waiting
/// while the task holds it.
#[derive(Clone)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
    _guard: mpsc::Sender<()>,
    idle_kept: Arc<AtomicBool>,
}

impl DrainController {
    pub fn new() -> Self {
        let (signal, _) = watch::channel(false);
        let (guard, released) = mpsc::channel(1);
        Self {
            signal,
            guard,
            released,
            idle_kept: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Creates a handle for one more task.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
            _guard: self.guard.clone(),
            idle_kept: Arc::clone(&self.idle_kept),
        }
    }

    /// Like [`DrainController::drain`], but an idle keep-alive connection
    /// stays open until its next request (whose response carries
    /// `Connection: close`) or until the deadline. Used after a hand-off,
    /// when the new agent already accepts, so a caller's next request goes
    /// to it without meeting a connection closed under it.
    pub async fn drain_keeping_idle(self, deadline: Duration) -> bool {
        self.idle_kept.store(true, Ordering::Release);
        self.drain(deadline).await
    }

    /// Signals every handle and waits up to `deadline` for all of them to be
    /// dropped. Returns false when the deadline passed first.
    pub async fn drain(self, deadline: Duration) -> bool {
        let Self {
            signal,
            guard,
            mut released,
            ..
        } = self;
        signal.send_replace(true);
        drop(guard);

        // `recv` returns `None` once every sender clone is dropped.
        tokio::time::timeout(deadline, released.recv())
            .await
            .is_ok()
    }
}

impl Default for DrainController {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Completes once shutdown has been signalled (at once if it already
    /// was, or if the controller is gone).
    pub async fn signalled(&mut self) {
        // An error means the controller was dropped, which also means stop.
        let _ = self.signal.wait_for(|stop| *stop).await;
    }

    /// True once shutdown has been signalled.
    pub fn is_signalled(&self) -> bool {
        *self.signal.borrow()
    }

    /// True when the drain keeps idle connections open until their next
    /// request (see [`DrainController::drain_keeping_idle`]).
    pub fn keeps_idle(&self) -> bool {
        self.idle_kept.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_handles() {
        let controller = DrainController::new();
        let mut handle = controller.handle();
        let task = tokio::spawn(async move {
            handle.signalled().await;
            // Holding the handle past the signal keeps the drain waiting.
            assert!(handle.is_signalled());
        });

        assert!(controller.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_times_out_on_stuck_handle() {
        let controller = DrainController::new();
        let stuck = controller.handle();

        let drained = controller.drain(Duration::from_millis(50)).await;

        assert!(!drained);
        assert!(stuck.is_signalled());
    }

    #[tokio::test]
    async fn drain_keeping_idle_is_seen_by_handles() {
        let controller = DrainController::new();
        let handle = controller.handle();
        let task = tokio::spawn(async move {
            let mut handle = handle;
            handle.signalled().await;
            handle.keeps_idle()
        });

        assert!(controller.drain_keeping_idle(Duration::from_secs(5)).await);
        assert!(task.await.unwrap());
    }

    #[tokio::test]
    async fn drain_without_handles_returns_at_once() {
        let controller = DrainController::new();

        assert!(controller.drain(Duration::from_secs(5)).await);
    }
}
