//! The running agent: the core plus the protected workloads, and the
//! configuration reload that changes both while requests keep flowing.
//!
//! A reload parses and validates the file first and changes nothing when
//! it is invalid. A valid one updates the issuers, then stores a new
//! request path in every workload's [`ProxySlot`], enrols added workloads,
//! re-attaches those whose ports changed and detaches removed ones. A
//! request in flight keeps the request path it loaded at its start.

mod pods;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::Core;
use crate::config::{Config, WorkloadConfig};
use crate::proxy::{DrainController, ProxySlot, Shutdown};
use crate::reload::{ConfigChanges, ConfigFile, LoadedConfig, ReloadError, CONFIG_POLL_INTERVAL};

/// Protection of one workload, as the agent does it. The agent enters the pod's network
/// namespace and attaches the eBPF steering program; in-process tests serve
/// loopback listeners.
pub trait Enroll: Send + Sync + 'static {
    /// State kept alive while the workload is protected.
    type Enrolled: Send + Sync + 'static;

    /// Starts protecting `workload`: listeners serving requests with the
    /// request path in `slot` until `shutdown` is signalled.
    fn enroll(
        &self,
        core: &Core,
        workload: &WorkloadConfig,
        slot: Arc<ProxySlot>,
        shutdown: Shutdown,
    ) -> impl Future<Output = anyhow::Result<Self::Enrolled>> + Send;

    /// Protects the ports `workload` lists from now on, and no others.
    fn set_ports(
        &self,
        core: &Core,
        enrolled: &mut Self::Enrolled,
        workload: &WorkloadConfig,
    ) -> anyhow::Result<()>;

    /// Stops protecting a workload that left the configuration: afterwards
    /// its ports reach the pod's own sockets.
    fn detach(&self, core: &Core, enrolled: Self::Enrolled) -> anyhow::Result<()>;

    /// Lets go of a workload at exit, leaving its ports closed while no
    /// agent serves them.
    fn release(&self, enrolled: Self::Enrolled);

    /// Removes what a previous agent left for workload `name`, which this
    /// agent does not serve, so that its ports reach the pod's own sockets.
    fn forget(&self, _name: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

/// One protected workload.
struct Protected<T> {
    config: WorkloadConfig,
    slot: Arc<ProxySlot>,
    drain: DrainController,
    enrolled: T,
}

/// The core, the protected workloads and the configuration in force.
pub struct Agent<E: Enroll> {
    core: Core,
    enroll: E,
    file: ConfigFile,
    /// The document the agent started with: fields that only a restart
    /// applies are compared with it.
    started: serde_yaml::Value,
    running: LoadedConfig,
    /// In configuration order. A workload that failed to enrol is missing
    /// here, and the next reload tries it again.
    workloads: Vec<Protected<E::Enrolled>>,
    /// Pods enrolled through the CNI plugin, apart from `workloads` because
    /// the configuration does not list them.
    pods: pods::Pods<E::Enrolled>,
}

impl<E: Enroll> Agent<E> {
    /// Takes over `core`, started from `loaded`, which was read from `file`.
    pub fn new(core: Core, enroll: E, file: ConfigFile, loaded: LoadedConfig) -> Self {
        Self {
            core,
            enroll,
            file,
            started: loaded.document.clone(),
            running: loaded,
            workloads: Vec::new(),
            pods: pods::Pods::default(),
        }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Returns the configuration in force. Fields that need a restart hold
    /// the values of the file's last valid version, not the values in use.
    pub fn running_config(&self) -> &Config {
        &self.running.config
    }

    /// Enrols every configured workload that is not protected yet and
    /// returns how many are protected.
    pub async fn protect_all(&mut self) -> usize {
        let configured = self.running.config.workloads.clone();
        for workload in &configured {
            if !self.is_protected(&workload.name) {
                self.protect(workload).await;
            }
        }
        self.workloads.len()
    }

    /// Reads the configuration file again and applies it. An invalid file
    /// is logged and counted, and changes nothing.
    pub async fn reload(&mut self) -> Result<ConfigChanges, ReloadError> {
        let loaded = match self.file.load() {
            Ok(loaded) => loaded,
            Err(error) => {
                self.core.reload_metrics.record_failure();
                tracing::error!(
                    path = %self.file.path().display(),
                    error = crate::error_chain(&error),
                    "configuration reload failed, the previous configuration stays in force"
                );
                return Err(error);
            }
        };

        let changes = ConfigChanges::between(&self.running, &self.started, &loaded);
        for field in &changes.restart_required {
            tracing::warn!(
                field = %field,
                "configuration field changed; a restart is needed to apply it, the running value stays in force"
            );
        }

        let issuers_changed = !changes.issuers_added.is_empty()
            || !changes.issuers_removed.is_empty()
            || !changes.issuers_changed.is_empty();
        if issuers_changed {
            self.core
                .update_issuers(&loaded.config.issuers, &changes.issuers_changed)
                .await;
        }
        self.running = loaded;
        self.apply_workloads().await;
        self.apply_pods();

        self.core.reload_metrics.record_success();
        tracing::info!(
            issuers.added = ?changes.issuers_added,
            issuers.removed = ?changes.issuers_removed,
            issuers.changed = ?changes.issuers_changed,
            workloads.added = ?changes.workloads_added,
            workloads.removed = ?changes.workloads_removed,
            workloads.changed = ?changes.workloads_changed,
            drain_seconds = self.running.config.drain_seconds,
            protected = self.workloads.len(),
            "configuration reloaded"
        );
        Ok(changes)
    }

    /// Reloads when the file's content differs from the content last read.
    /// Returns `None` when it does not.
    pub async fn reload_if_changed(&mut self) -> Option<Result<ConfigChanges, ReloadError>> {
        if !self.file.changed() {
            return None;
        }
        tracing::info!(path = %self.file.path().display(), "configuration file changed, reloading");
        Some(self.reload().await)
    }

    /// Reloads on each message from `requests` (the agent sends one per
    /// SIGHUP) and when the file changes, checked every
    /// [`CONFIG_POLL_INTERVAL`], until `stop` completes; returns its output.
    pub async fn watch<T>(
        &mut self,
        requests: &mut mpsc::UnboundedReceiver<()>,
        stop: impl Future<Output = T>,
    ) -> T {
        let mut poll = tokio::time::interval(CONFIG_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut requests_open = true;
        let mut pod_requests = self.pods.take_requests();
        let mut sweep = pods::sweep_interval(self.running.config.enrollment.as_ref());

        loop {
            tokio::select! {
                output = &mut stop => {
                    self.pods.restore_requests(pod_requests);
                    return output;
                }
                Some(request) = pods::next_request(&mut pod_requests) => {
                    self.handle_pod_request(request).await;
                }
                _ = sweep.tick() => self.sweep_pods().await,
                request = requests.recv(), if requests_open => {
                    if request.is_some() {
                        // The error is logged and counted by `reload`.
                        let _ = self.reload().await;
                    } else {
                        requests_open = false;
                    }
                }
                _ = poll.tick() => {
                    let _ = self.reload_if_changed().await;
                }
            }
        }
    }

    /// Drains every workload's connections for up to `drain_seconds` of the
    /// configuration in force, releases the workloads and returns the core,
    /// which the caller stops once nothing else uses it.
    pub async fn shutdown(self) -> Core {
        self.drain_and_release(false).await
    }

    /// Like [`Agent::shutdown`] after a successor took over the listeners.
    /// Idle keep-alive connections stay open until their next request, whose
    /// response carries `Connection: close`, so callers move to the
    /// successor without meeting a closed connection.
    pub async fn shutdown_after_handoff(self) -> Core {
        self.drain_and_release(true).await
    }

    async fn drain_and_release(self, keep_idle: bool) -> Core {
        let Self {
            core,
            enroll,
            running,
            mut workloads,
            pods,
            ..
        } = self;
        workloads.extend(pods.into_protected());
        let deadline = Duration::from_secs(running.config.drain_seconds);

        let mut drains = JoinSet::new();
        let mut held = Vec::new();
        for protected in workloads {
            if keep_idle {
                drains.spawn(protected.drain.drain_keeping_idle(deadline));
            } else {
                drains.spawn(protected.drain.drain(deadline));
            }
            held.push(protected.enrolled);
        }
        let mut drained = true;
        while let Some(result) = drains.join_next().await {
            drained &= result.unwrap_or(false);
        }
        if drained {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!(
                drain_seconds = running.config.drain_seconds,
                "drain deadline passed, closing remaining connections"
            );
        }

        for enrolled in held {
            enroll.release(enrolled);
        }
        core
    }

    fn is_protected(&self, name: &str) -> bool {
        self.workloads
            .iter()
            .any(|protected| protected.config.name == name)
    }

    /// Enrols `workload`; a failure is logged, and `/readyz` keeps reporting
    /// the workload as not attached.
    async fn protect(&mut self, workload: &WorkloadConfig) {
        self.core.readiness.add_workload(&workload.name);
        let slot = Arc::new(ProxySlot::new(self.core.workload_proxy(workload)));
        let drain = DrainController::new();

        let enrolled = self
            .enroll
            .enroll(&self.core, workload, Arc::clone(&slot), drain.handle())
            .await;
        match enrolled {
            Ok(enrolled) => {
                self.core.readiness.set_attached(&workload.name, true);
                self.workloads.push(Protected {
                    config: workload.clone(),
                    slot,
                    drain,
                    enrolled,
                });
            }
            Err(error) => {
                tracing::error!(workload = %workload.name, error = format!("{error:#}"), "failed to protect workload");
            }
        }
    }

    /// Makes the protected workloads match the configuration in force.
    async fn apply_workloads(&mut self) {
        let configured = self.running.config.workloads.clone();

        // A workload that left the configuration, or moved to another
        // namespace, is detached; a moved one is enrolled again below.
        let mut kept = Vec::new();
        for protected in std::mem::take(&mut self.workloads) {
            let still = configured.iter().find(|workload| {
                workload.name == protected.config.name && workload.netns == protected.config.netns
            });
            if still.is_some() {
                kept.push(protected);
            } else {
                self.unprotect(protected);
            }
        }
        self.workloads = kept;

        for workload in &configured {
            let Some(index) = self
                .workloads
                .iter()
                .position(|protected| protected.config.name == workload.name)
            else {
                self.protect(workload).await;
                continue;
            };

            let protected = &mut self.workloads[index];
            let mut applied = workload.clone();
            if protected.config.ports != workload.ports {
                let changed = self
                    .enroll
                    .set_ports(&self.core, &mut protected.enrolled, workload);
                if let Err(error) = changed {
                    tracing::error!(
                        workload = %workload.name,
                        ports = ?workload.ports,
                        error = format!("{error:#}"),
                        "failed to change the protected ports, the previous ports stay steered"
                    );
                    // Recorded as still in force, so the next reload retries.
                    applied.ports.clone_from(&protected.config.ports);
                } else {
                    tracing::info!(workload = %workload.name, ports = ?workload.ports, "protected ports changed");
                }
            }
            // Every workload gets a new request path, because it also contains
            // the verifier of the issuers now in force.
            protected.slot.store(self.core.workload_proxy(&applied));
            protected.config = applied;
        }

        // Keep configuration order, which `/readyz` and logs follow.
        self.workloads.sort_by_key(|protected| {
            configured
                .iter()
                .position(|workload| workload.name == protected.config.name)
        });
    }

    /// Detaches a workload and drains its connections in the background.
    fn unprotect(&mut self, protected: Protected<E::Enrolled>) {
        let Protected {
            config,
            drain,
            enrolled,
            ..
        } = protected;
        self.core.readiness.remove_workload(&config.name);
        if let Err(error) = self.enroll.detach(&self.core, enrolled) {
            tracing::error!(workload = %config.name, error = format!("{error:#}"), "failed to detach workload");
        }

        tracing::info!(workload = %config.name, "workload no longer protected");
        let deadline = Duration::from_secs(self.running.config.drain_seconds);
        let name = config.name;
        let metrics = self.core.metrics.clone();
        tokio::spawn(async move {
            if !drain.drain(deadline).await {
                tracing::warn!(workload = %name, "drain deadline passed for a removed workload, closing its remaining connections");
            }
            metrics.forget_workload(&name);
        });
    }
}
