//! Wiring: builds every part from the configuration, starts them, and
//! stops them on SIGTERM or SIGINT.
//!
//! [`Core`] is the part that needs no privileges (metrics, audit, key
//! stores, verifier, readiness); in-process tests start it as the agent
//! does. [`run`] adds the admin listener, the eBPF steering and one proxy per
//! workload inside its pod's network namespace.

mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, Readiness};
use crate::audit::{AuditSink, AuditWriter};
use crate::bpf::Steering;
use crate::config::{Config, WorkloadConfig};
use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::proxy::{DrainController, Shared, WorkloadProxy};
use crate::verify::Verifier;

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
    pub issuers: Vec<Arc<IssuerKeys>>,
    pub shared: Shared,
    pub readiness: Arc<Readiness>,
    audit_writer: AuditWriter,
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

        let issuers: Vec<Arc<IssuerKeys>> = config
            .issuers
            .iter()
            .map(|issuer| Arc::new(IssuerKeys::new(issuer.clone())))
            .collect();
        let (stop_refresh, refresh_stopped) = watch::channel(false);
        let refresh_tasks = issuers
            .iter()
            .map(|keys| tokio::spawn(Arc::clone(keys).run(refresh_stopped.clone())))
            .collect();
        metrics
            .register_issuers(issuers.clone())
            .context("while registering the JWKS metrics")?;

        let verifier = Arc::new(Verifier::new(issuers.clone()));
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
        };

        Ok(Self {
            metrics,
            issuers,
            shared,
            readiness,
            audit_writer,
            stop_refresh,
            refresh_tasks,
        })
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
            stop_refresh,
            refresh_tasks,
            ..
        } = self;
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

/// Runs the agent until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first, so a signal during startup still drains cleanly.
    let mut terminate =
        signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.redacted_summary(),
        "tokengate starting"
    );

    let core = Core::start(&config, None).await?;
    let admin_drain = DrainController::new();
    let admin_listener = bind_admin(config.admin.listen).await?;
    tokio::spawn(admin::serve(
        admin_listener,
        core.admin_state(),
        admin_drain.handle(),
    ));

    let steering =
        Steering::new(&config.interception).context("while preparing the eBPF steering program")?;
    let proxy_drain = DrainController::new();
    let mut running = Vec::new();
    for workload in &config.workloads {
        match workload::start(&config, workload, &core, &steering, &proxy_drain).await {
            Ok(started) => running.push(started),
            // NOTE: a workload that fails here (its namespace not created
            // yet, say) is not retried; `/readyz` keeps reporting it.
            Err(error) => {
                tracing::error!(workload = %workload.name, error = format!("{error:#}"), "failed to protect workload");
            }
        }
    }
    tracing::info!(
        protected = running.len(),
        configured = config.workloads.len(),
        "tokengate running"
    );

    let received = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(
        signal = received,
        drain_seconds = config.drain_seconds,
        "shutting down, draining connections"
    );

    let drained = proxy_drain
        .drain(Duration::from_secs(config.drain_seconds))
        .await;
    if drained {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!(
            drain_seconds = config.drain_seconds,
            "drain deadline passed, closing remaining connections"
        );
    }
    for started in running {
        started.stop();
    }

    admin_drain.drain(ADMIN_DRAIN_TIMEOUT).await;
    core.stop().await;
    tracing::info!("tokengate stopped");
    Ok(())
}
