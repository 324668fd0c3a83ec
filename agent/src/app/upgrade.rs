//! The agent's part in an upgrade hand-off: the sockets each workload
//! offers to a successor, and the sockets inherited from a predecessor,
//! which enrolment uses before it makes new ones.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::Signal;

use super::workload::{LISTEN_V4, LISTEN_V6};
use super::Core;
use crate::config::{Config, WorkloadConfig};
use crate::handoff::{
    self, AdminSocket, HandoffServer, Inherited, Offered, Outcome, Takeover, WorkloadSockets,
};
use crate::netns::PodNetns;
use crate::proxy::DrainController;

/// Hand-off state shared by every enrolment path (configured workloads and
/// pods enrolled through the CNI plugin).
#[derive(Clone, Default)]
pub(super) struct HandoffSockets {
    /// Sockets of the workloads this agent serves, for a successor.
    pub(super) offered: Arc<Offered>,
    /// Sockets received from the predecessor, by workload name.
    pub(super) inherited: Option<Arc<Inherited>>,
}

/// A pod's namespace and listeners, ready to attach and serve.
pub(super) struct PodSockets {
    pub(super) netns: Arc<PodNetns>,
    pub(super) listener_v4: TcpListener,
    pub(super) listener_v6: Option<TcpListener>,
}

impl HandoffSockets {
    /// Returns the sockets of `workload`: those the previous agent handed
    /// over when they belong to the pod's current namespace, else a new
    /// namespace handle and new listeners.
    pub(super) async fn pod_sockets(
        &self,
        workload: &WorkloadConfig,
    ) -> anyhow::Result<PodSockets> {
        let name = &workload.name;
        let inherited = self
            .inherited
            .as_ref()
            .and_then(|inherited| inherited.take_workload(name, &workload.netns));
        if let Some(sockets) = inherited {
            let WorkloadSockets {
                netns,
                listener_v4,
                listener_v6,
                ..
            } = sockets;
            let netns = PodNetns::from_file(&workload.netns, netns).with_context(|| {
                format!(
                    "while entering the inherited network namespace {}",
                    workload.netns.display()
                )
            })?;
            tracing::info!(workload = %name, "serving the listeners inherited from the previous agent");
            return Ok(PodSockets {
                netns: Arc::new(netns),
                listener_v4,
                listener_v6,
            });
        }

        let netns = PodNetns::open(&workload.netns).with_context(|| {
            format!(
                "while opening network namespace {}",
                workload.netns.display()
            )
        })?;
        let listener_v4 = netns.listen(LISTEN_V4).await.with_context(|| {
            format!(
                "while creating the IPv4 listener in {}",
                workload.netns.display()
            )
        })?;
        let listener_v6 = match netns.listen(LISTEN_V6).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::info!(workload = %name, %error, "no IPv6 listener in the pod; IPv6 connections to protected ports are dropped");
                None
            }
        };
        Ok(PodSockets {
            netns: Arc::new(netns),
            listener_v4,
            listener_v6,
        })
    }

    /// Offers the sockets of a workload that is now served to a successor.
    /// A failure only makes a later hand-off create new sockets for it.
    pub(super) fn offer(&self, workload: &WorkloadConfig, sockets: &PodSockets) {
        let copy = (|| -> std::io::Result<WorkloadSockets> {
            Ok(WorkloadSockets {
                netns_path: workload.netns.clone(),
                netns: sockets.netns.file().try_clone()?,
                listener_v4: sockets.listener_v4.try_clone()?,
                listener_v6: sockets
                    .listener_v6
                    .as_ref()
                    .map(TcpListener::try_clone)
                    .transpose()?,
            })
        })();
        match copy {
            Ok(copy) => self.offered.add_workload(&workload.name, copy),
            Err(error) => tracing::warn!(
                workload = %workload.name,
                %error,
                "failed to keep the workload's sockets for a hand-off; a successor creates new ones"
            ),
        }
    }

    /// Withdraws the sockets of a workload that is no longer served.
    pub(super) fn withdraw(&self, workload: &str) {
        self.offered.remove_workload(workload);
    }
}

/// The upgrade side of a start: sockets inherited from a running agent (if
/// it handed them over), and whether this agent may bind the hand-off
/// socket for its own successor.
pub(super) struct Start {
    pub(super) sockets: HandoffSockets,
    pub(super) takeover: Option<Takeover>,
    may_bind: bool,
}

/// Asks a running agent of the same pins for its sockets.
pub(super) async fn take_over(config: &Config) -> Start {
    let path = config
        .interception
        .handoff
        .socket_path(&config.interception.pin_path);
    let pin_path = config.interception.pin_path.clone();
    let timeout = Duration::from_secs(config.interception.handoff.timeout_seconds);

    let outcome =
        tokio::task::spawn_blocking(move || handoff::take_over(&path, &pin_path, timeout)).await;
    let outcome = outcome.unwrap_or_else(|error| {
        tracing::warn!(%error, "hand-off task failed, starting fresh");
        Outcome::Fresh { may_bind: true }
    });
    match outcome {
        Outcome::Taken(takeover) => Start {
            sockets: HandoffSockets {
                offered: Arc::default(),
                inherited: Some(Arc::clone(&takeover.inherited)),
            },
            takeover: Some(takeover),
            may_bind: true,
        },
        Outcome::Fresh { may_bind } => Start {
            sockets: HandoffSockets::default(),
            takeover: None,
            may_bind,
        },
    }
}

impl Start {
    /// Returns the admin listener: the inherited one when the previous agent
    /// was configured with the same address, else a new one. Either way a
    /// duplicate is offered to a successor.
    pub(super) async fn admin_listener(
        &self,
        configured: SocketAddr,
    ) -> anyhow::Result<tokio::net::TcpListener> {
        let inherited = self
            .sockets
            .inherited
            .as_ref()
            .and_then(|inherited| inherited.take_admin(configured));
        let listener = match inherited {
            Some(listener) => {
                listener
                    .set_nonblocking(true)
                    .context("while making the inherited admin listener non-blocking")?;
                let listener = tokio::net::TcpListener::from_std(listener)
                    .context("while registering the inherited admin listener with tokio")?;
                let bound = listener
                    .local_addr()
                    .context("while reading the admin listener's address")?;
                tracing::info!(addr = %bound, inherited = true, "admin listener started");
                listener
            }
            None => super::bind_admin(configured).await?,
        };

        match duplicate(&listener) {
            Ok(copy) => self.sockets.offered.set_admin(AdminSocket {
                configured,
                listener: copy,
            }),
            Err(error) => {
                tracing::warn!(%error, "failed to keep the admin listener for a hand-off; a successor binds its own");
            }
        }
        Ok(listener)
    }

    /// Waits until every issuer has keys, or `timeout`, before a taken-over
    /// agent serves: the previous agent serves requests meanwhile, so a request
    /// never meets an agent without keys.
    pub(super) async fn wait_for_keys(&self, core: &Core, timeout: Duration) {
        if self.takeover.is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while !core.issuers.iter().all(|keys| keys.is_ready()) {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    timeout_seconds = timeout.as_secs(),
                    "issuer keys still missing, taking over anyway; requests fail until they arrive"
                );
                return;
            }
            tokio::time::sleep(KEYS_POLL_INTERVAL).await;
        }
    }

    /// Tells the previous agent to stop accepting, then binds the hand-off
    /// socket for the next upgrade. Returns the server, or `None` when the
    /// socket belongs to an agent of other pins or cannot be bound.
    pub(super) async fn finish(self, config: &Config) -> Option<HandoffServer> {
        let Self {
            sockets,
            takeover,
            may_bind,
        } = self;
        if let Some(takeover) = takeover {
            if let Err(error) = tokio::task::spawn_blocking(move || takeover.confirm()).await {
                tracing::warn!(%error, "hand-off confirmation task failed");
            }
        }

        let interception = &config.interception;
        let path = interception.handoff.socket_path(&interception.pin_path);
        if !may_bind {
            tracing::warn!(
                path = %path.display(),
                "hand-off socket belongs to an agent with other pins; set interception.handoff.socket to upgrade this agent without a gap"
            );
            return None;
        }
        let timeout = Duration::from_secs(interception.handoff.timeout_seconds);
        match HandoffServer::start(&path, &interception.pin_path, sockets.offered, timeout) {
            Ok(server) => Some(server),
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "upgrades of this agent start fresh instead of taking over its sockets"
                );
                None
            }
        }
    }
}

/// Interval between two checks for issuer keys during a takeover.
const KEYS_POLL_INTERVAL: Duration = Duration::from_millis(50);

fn duplicate(listener: &tokio::net::TcpListener) -> std::io::Result<TcpListener> {
    let fd = std::os::fd::AsFd::as_fd(listener).try_clone_to_owned()?;
    Ok(TcpListener::from(fd))
}

/// Stop reason that `run` logs when a successor took over.
pub(super) const HANDED_OFF: &str = "hand-off";

/// Completes when `server` has handed the sockets to a successor; never
/// without a server.
pub(super) async fn handed_off(server: Option<&mut HandoffServer>) {
    match server {
        Some(server) => server.handed_off().await,
        None => std::future::pending().await,
    }
}

/// Handles the admin listener and the hand-off socket once the agent stops
/// for `reason`, and returns whether a successor took over. A signal that
/// arrives while a successor is receiving the sockets waits for it, up to
/// `timeout`. After a hand-off the admin listener stops at once, because
/// the successor serves it, and `None` is returned. Otherwise the hand-off
/// socket is removed and `admin_drain` is returned for the end of the drain.
pub(super) async fn after_stop(
    reason: &str,
    admin_drain: DrainController,
    server: Option<&mut HandoffServer>,
    timeout: Duration,
) -> (bool, Option<DrainController>) {
    let mut handed_off = reason == HANDED_OFF;
    if let Some(server) = server {
        if !handed_off && server.finish_in_progress(timeout).await {
            tracing::info!(
                signal = reason,
                "stop signal arrived during a hand-off, the successor took over"
            );
            handed_off = true;
        }
        if !handed_off {
            server.remove();
        }
    }
    if handed_off {
        admin_drain.drain(super::ADMIN_DRAIN_TIMEOUT).await;
        return (true, None);
    }
    (false, Some(admin_drain))
}

/// Waits for SIGTERM or SIGINT after a hand-off and drain. In Kubernetes
/// the old pod is deleted once the new one is ready; a container that
/// exited on its own would be restarted instead.
pub(super) async fn linger(terminate: &mut Signal, interrupt: &mut Signal) {
    tracing::info!("handed off and drained, waiting for SIGTERM or SIGINT to exit");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
