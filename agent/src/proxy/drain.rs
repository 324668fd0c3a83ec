//! Graceful shutdown: one signal to stop, and a wait until every task that
//! holds a handle has finished.
//!
//! Each accept loop and each connection holds a [`Shutdown`] handle. The
//! handle carries a clone of a channel sender that nobody sends on, so the
//! controller knows every handle is gone when its receiver reports that all
//! senders are closed.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// The owner's side: signals shutdown and waits for the handles to go.
pub struct DrainController {
    signal: watch::Sender<bool>,
    guard: mpsc::Sender<()>,
    released: mpsc::Receiver<()>,
}

/// A task's side: signals the task to stop, and keeps the controller waiting
/// while the task holds it.
#[derive(Clone)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
    _guard: mpsc::Sender<()>,
}

impl DrainController {
    pub fn new() -> Self {
        let (signal, _) = watch::channel(false);
        let (guard, released) = mpsc::channel(1);
        Self {
            signal,
            guard,
            released,
        }
    }

    /// Creates a handle for one more task.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
            _guard: self.guard.clone(),
        }
    }

    /// Signals every handle and waits up to `deadline` for all of them to be
    /// dropped. Returns false when the deadline passed first.
    pub async fn drain(self, deadline: Duration) -> bool {
        let Self {
            signal,
            guard,
            mut released,
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
    async fn drain_without_handles_returns_at_once() {
        let controller = DrainController::new();

        assert!(controller.drain(Duration::from_secs(5)).await);
    }
}
