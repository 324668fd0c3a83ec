//! Wiring: builds every part from the configuration, starts them, and
//! stops them on SIGTERM or SIGINT.
//!
//! [`Core`] is the part that needs no privileges (metrics, audit, key
//! stores, verifier, readiness); in-process tests start it as the agent
//! does. [`Agent`] adds the protected workloads and applies configuration
//! reloads to both. [`run`] adds the admin listener, the eBPF steering and
//! one proxy per workload inside its pod's network namespace.

mod agent;
mod issuers;
mod upgrade;
mod workload;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::issuers::IssuerSet;
use self::workload::NetnsEnroll;
use crate::admin::{self, AdminState, Readiness};
use crate::audit::{AuditSink, AuditWriter};
use crate::bpf::Steering;
use crate::cache::TokenCache;
use crate::config::{Config, IssuerConfig, WorkloadConfig};
use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::proxy::{DrainController, Shared, WorkloadProxy};
use crate::reload::{ConfigFile, ReloadMetrics};
use crate::revocation::RevocationPoller;
use crate::verify::Verifier;

pub use self::agent::{Agent, Enroll};

/// Time the audit writer gets to write out its queue at exit. Connections
/// still open after the drain deadline keep their audit handles, so the wait
/// needs its own bound.
pub const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Time admin connections get to finish after the proxies have drained: a
/// scrape or probe takes milliseconds.
pub const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a key refresh task gets to notice the stop signal. It only waits
/// when a fetch is in flight, which exit need not finish.
pub const REFRESH_STOP_TIMEOUT: Duration = Duration::from_millis(500);

/// The unprivileged parts of the agent, shared by every workload.
pub struct Core {
    pub metrics: Metrics,
    /// Key stores of the issuers in force; a reload replaces the list.
    pub issuers: Vec<Arc<IssuerKeys>>,
    /// The parts that a proxy built now gets; a reload replaces them.
    pub shared: Shared,
    pub readiness: Arc<Readiness>,
    pub reload_metrics: ReloadMetrics,
    audit_writer: AuditWriter,
    issuer_set: IssuerSet,
    /// Stops the background tasks in `refresh_tasks` at exit. The issuers'
    /// key refreshes are not among them: `issuer_set` stops those.
    stop_refresh: watch::Sender<bool>,
    refresh_tasks: Vec<JoinHandle<()>>,
}

impl Core {
    /// Builds the metrics registry, the audit sink (to `audit_output`, or as
    /// configured when `None`), one key store per issuer with its refresh
    /// task, and the verifier.
    pub async fn start(
        config: &Config,
        audit_output: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new().context("while creating the metrics registry")?;

        let dropped = metrics.audit_events_dropped();
        let (audit, audit_writer) = match audit_output {
            Some(output) => AuditSink::spawn(output, dropped),
            None => AuditSink::open(&config.audit, dropped)
                .await
                .context("while opening the audit output")?,
        };

        let reload_metrics = ReloadMetrics::register(metrics.registry())
            .context("while registering the reload metrics")?;
        reload_metrics.record_initial_load();

        let issuer_set = IssuerSet::start(&config.issuers);
        let issuers = issuer_set.keys();
        let (stop_refresh, refresh_stopped) = watch::channel(false);
        let mut refresh_tasks = Vec::new();
        metrics
            .register_issuers(issuers.clone())
            .context("while registering the JWKS metrics")?;

        // The first revocation refresh completes before any request is
        // served, so a reachable list is in force from the start.
        let (mut revocation_poller, revocations) =
            RevocationPoller::new(&config.revocation, &config.issuers);
        revocation_poller.refresh().await;
        refresh_tasks.push(tokio::spawn(revocation_poller.run(refresh_stopped)));
        let token_cache = Arc::new(TokenCache::new(&config.cache, issuers.clone()));
        metrics
            .register_token_cache(Arc::clone(&token_cache))
            .context("while registering the token cache metrics")?;
        metrics
            .register_revocation(Arc::clone(&revocations))
            .context("while registering the revocation metrics")?;

        let verifier = build_verifier(&issuers);
        let readiness = Arc::new(Readiness::new(
            issuers.clone(),
            config
                .workloads
                .iter()
                .map(|workload| workload.name.clone()),
        ));
        let shared = Shared {
            verifier,
            issuers: issuers.clone(),
            audit,
            metrics: metrics.clone(),
            token_cache,
            revocations,
        };

        Ok(Self {
            metrics,
            issuers,
            shared,
            readiness,
            reload_metrics,
            audit_writer,
            issuer_set,
            stop_refresh,
            refresh_tasks,
        })
    }

    /// Applies a reloaded issuer list: issuers named in `replace` and new
    /// ones get new key stores, removed ones stop refreshing, the rest keep
    /// their keys. Builds a new verifier over the result; proxies built
    /// afterwards use it, proxies built before keep the old one.
    pub(crate) async fn update_issuers(&mut self, issuers: &[IssuerConfig], replace: &[String]) {
        self.issuer_set.update(issuers, replace).await;
        self.issuers = self.issuer_set.keys();

        self.shared = Shared {
            verifier: build_verifier(&self.issuers),
            issuers: self.issuers.clone(),
            ..self.shared.clone()
        };
        self.shared
            .token_cache
            .replace_issuers(self.issuers.clone());
        if let Err(error) = self.metrics.replace_issuers(self.issuers.clone()) {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "failed to export the JWKS series of the reloaded issuers"
            );
        }
        self.readiness.set_issuers(self.issuers.clone());
    }

    /// Builds the request path of `workload` and creates its decision
    /// series.
    pub fn workload_proxy(&self, workload: &WorkloadConfig) -> Arc<WorkloadProxy> {
        self.metrics.register_workload(&workload.name);
        Arc::new(WorkloadProxy::new(workload, self.shared.clone()))
    }

    /// Builds the state that the admin listener serves.
    pub fn admin_state(&self) -> Arc<AdminState> {
        Arc::new(AdminState {
            metrics: self.metrics.clone(),
            readiness: Arc::clone(&self.readiness),
        })
    }

    /// Stops the key refreshes and writes out the audit queue. Proxies built
    /// from this core should be gone first; events they still queue after
    /// [`AUDIT_FLUSH_TIMEOUT`] are lost.
    pub async fn stop(self) {
        let Self {
            shared,
            audit_writer,
            issuer_set,
            stop_refresh,
            refresh_tasks,
            ..
        } = self;
        issuer_set.stop().await;
        stop_refresh.send_replace(true);
        for task in refresh_tasks {
            // A fetch in flight ends at its timeout; exit does not wait for it.
            if tokio::time::timeout(REFRESH_STOP_TIMEOUT, task)
                .await
                .is_err()
            {
                tracing::debug!("key refresh still fetching at exit");
            }
        }

        drop(shared);
        if tokio::time::timeout(AUDIT_FLUSH_TIMEOUT, audit_writer.finish())
            .await
            .is_err()
        {
            tracing::warn!(
                "audit queue not written out before exit; open connections still hold it"
            );
        }
    }
}

/// Builds the verifier over the issuers' key stores; the start and every
/// reload use this, so both verify alike.
fn build_verifier(issuers: &[Arc<IssuerKeys>]) -> Arc<Verifier> {
    Arc::new(Verifier::new(issuers.to_vec()))
}

/// Binds the admin listener on `address` and logs the bound address, which
/// differs from `address` when it has port 0.
pub async fn bind_admin(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("while binding the admin listener to {address}"))?;
    let bound = listener
        .local_addr()
        .context("while reading the admin listener's address")?;
    tracing::info!(addr = %bound, "admin listener started");
    Ok(listener)
}

/// Turns each SIGHUP into a reload request on the returned channel.
fn reload_on_sighup(mut hangup: Signal) -> mpsc::UnboundedReceiver<()> {
    let (reload_requests, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received, reloading the configuration");
            if reload_requests.send(()).is_err() {
                break;
            }
        }
    });
    requests
}

/// Runs the agent with the configuration file at `path` until SIGTERM or
/// SIGINT, then drains and returns. A changed file or SIGHUP reloads the
/// configuration.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    // Installed first, so a signal during startup still drains cleanly, and
    // SIGHUP, whose default action ends the process, cannot stop it.
    let mut terminate =
        signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
    let hangup = signal(SignalKind::hangup()).context("while installing the SIGHUP handler")?;

    let mut file = ConfigFile::new(path);
    let loaded = file.load()?;
    let config = &loaded.config;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.redacted_summary(),
        "tokengate starting"
    );

    let core = Core::start(config, None).await?;
    let upgrade = upgrade::take_over(config).await;
    let admin_drain = DrainController::new();
    let admin_listener = upgrade.admin_listener(config.admin.listen).await?;
    tokio::spawn(admin::serve(
        admin_listener,
        core.admin_state(),
        admin_drain.handle(),
    ));

    let steering =
        Steering::new(&config.interception).context("while preparing the eBPF steering program")?;
    let sockmap = crate::sockmap::start(&config.interception, core.metrics.registry())
        .context("while registering the sockmap metrics")?;
    let enroll = NetnsEnroll::new(steering, &config.interception)
        .with_sockmap(sockmap)
        .with_handoff(upgrade.sockets.clone());
    let handoff_timeout = Duration::from_secs(config.interception.handoff.timeout_seconds);
    upgrade.wait_for_keys(&core, handoff_timeout).await;
    let mut agent = Agent::new(core, enroll, file, loaded);
    // Before the workloads, so that `/readyz`, which waits for them, only
    // reports ready once egress steering is attached too.
    let egress = crate::egress::Egress::start(agent.running_config(), agent.core())
        .await
        .context("while starting egress mode")?;
    let protected = agent.protect_all().await;
    agent
        .start_enrollment()
        .await
        .context("while starting pod enrolment")?;
    let mut handoff_server = upgrade.finish(agent.running_config()).await;
    tracing::info!(
        protected,
        configured = agent.running_config().workloads.len(),
        "tokengate running"
    );

    let mut requests = reload_on_sighup(hangup);
    let received = agent
        .watch(&mut requests, async {
            tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
                () = upgrade::handed_off(handoff_server.as_mut()) => upgrade::HANDED_OFF,
            }
        })
        .await;
    let (handed_off, admin_drain) = upgrade::after_stop(
        received,
        admin_drain,
        handoff_server.as_mut(),
        handoff_timeout,
    )
    .await;

    let drain_seconds = agent.running_config().drain_seconds;
    tracing::info!(
        signal = received,
        drain_seconds,
        "shutting down, draining connections"
    );
    let egress_drain =
        egress.map(|egress| tokio::spawn(egress.shutdown(Duration::from_secs(drain_seconds))));
    let exit_after_handoff = agent
        .running_config()
        .interception
        .handoff
        .exit_after_handoff;
    let core = if handed_off {
        agent.shutdown_after_handoff().await
    } else {
        agent.shutdown().await
    };
    if let Some(task) = egress_drain {
        let _ = task.await;
    }

    if let Some(admin_drain) = admin_drain {
        admin_drain.drain(ADMIN_DRAIN_TIMEOUT).await;
    }
    core.stop().await;
    if handed_off && !exit_after_handoff {
        upgrade::linger(&mut terminate, &mut interrupt).await;
    }
    tracing::info!("tokengate stopped");
    Ok(())
}
