//! The running key stores: one per configured issuer, each with its own
//! refresh task, so that a reload can stop one issuer and start another
//! while the rest keep their fetched keys.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::REFRESH_STOP_TIMEOUT;
use crate::config::IssuerConfig;
use crate::jwks::IssuerKeys;

/// Key stores in configuration order.
pub(super) struct IssuerSet {
    running: Vec<RunningIssuer>,
}

struct RunningIssuer {
    keys: Arc<IssuerKeys>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningIssuer {
    fn start(config: &IssuerConfig) -> Self {
        let keys = Arc::new(IssuerKeys::new(config.clone()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&keys).run(stopped));
        Self { keys, stop, task }
    }

    fn name(&self) -> &str {
        &self.keys.config.issuer
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        // A fetch in flight ends at its timeout; nothing waits for it.
        if tokio::time::timeout(REFRESH_STOP_TIMEOUT, self.task)
            .await
            .is_err()
        {
            tracing::debug!(jwt.iss = %self.keys.config.issuer, "key refresh still fetching when stopped");
        }
    }
}

impl IssuerSet {
    /// Starts a key store and its refresh task for each issuer.
    pub(super) fn start(issuers: &[IssuerConfig]) -> Self {
        Self {
            running: issuers.iter().map(RunningIssuer::start).collect(),
        }
    }

    /// Returns the key stores in configuration order.
    pub(super) fn keys(&self) -> Vec<Arc<IssuerKeys>> {
        self.running
            .iter()
            .map(|issuer| Arc::clone(&issuer.keys))
            .collect()
    }

    /// Makes the set match `issuers`. An issuer named in `replace` or not
    /// running gets a new key store, which starts fetching. An issuer no
    /// longer configured, or replaced, has its refresh stopped. Every other issuer
    /// keeps its key store and the keys it fetched.
    pub(super) async fn update(&mut self, issuers: &[IssuerConfig], replace: &[String]) {
        let mut old = std::mem::take(&mut self.running);
        let mut retired = Vec::new();

        for config in issuers {
            let kept = old.iter().position(|running| {
                running.name() == config.issuer && !replace.contains(&config.issuer)
            });
            match kept {
                Some(index) => self.running.push(old.swap_remove(index)),
                None => self.running.push(RunningIssuer::start(config)),
            }
        }
        retired.append(&mut old);

        for issuer in retired {
            issuer.stop().await;
        }
    }

    /// Stops every refresh task.
    pub(super) async fn stop(self) {
        for issuer in self.running {
            issuer.stop().await;
        }
    }
}
