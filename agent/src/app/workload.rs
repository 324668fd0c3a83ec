//! Protecting one workload: listeners inside its pod, the steering program
//! attached to its namespace, and the proxy serving the listeners.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;

use super::upgrade::HandoffSockets;
use super::{Core, Enroll};
use crate::bpf::{remove_pins, PodSteering, Steering};
use crate::config::{InterceptionConfig, WorkloadConfig};
use crate::netns::PodNetns;
use crate::proxy::{self, NetnsUpstream, ProxySlot, Shutdown};
use crate::sockmap::Sockmap;

/// Listen address inside the pod. The address only has to exist there,
/// because the `sk_lookup` program hands the listener every connection to a
/// protected port whatever address the caller used. Loopback keeps the
/// listener unreachable from outside the pod by any other route.
pub(super) const LISTEN_V4: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// IPv6 counterpart of [`LISTEN_V4`].
pub(super) const LISTEN_V6: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 0);

/// Protects workloads through their pods' network namespaces and the
/// eBPF steering program.
pub(super) struct NetnsEnroll {
    steering: Steering,
    reserved_source_v4: Ipv4Addr,
    reserved_source_v6: Ipv6Addr,
    /// The sockmap fast path, when it is on and attached.
    sockmap: Option<Arc<Sockmap>>,
    /// Sockets offered to a successor and inherited from a predecessor.
    handoff: HandoffSockets,
}

impl NetnsEnroll {
    /// Uses the interception settings of the start: a reload does not
    /// change them.
    pub(super) fn new(steering: Steering, interception: &InterceptionConfig) -> Self {
        Self {
            steering,
            reserved_source_v4: interception.reserved_source_v4,
            reserved_source_v6: interception.reserved_source_v6,
            sockmap: None,
            handoff: HandoffSockets::default(),
        }
    }

    /// Takes part in upgrade hand-offs: enrolment uses the sockets in
    /// `handoff.inherited` first and offers what it serves in
    /// `handoff.offered`.
    pub(super) fn with_handoff(mut self, handoff: HandoffSockets) -> Self {
        self.handoff = handoff;
        self
    }

    /// Registers every workload enrolled from now on with the sockmap fast
    /// path, when `sockmap` is set.
    pub(super) fn with_sockmap(mut self, sockmap: Option<Arc<Sockmap>>) -> Self {
        self.sockmap = sockmap;
        self
    }
}

/// A protected workload. Dropping it leaves the steering program attached
/// and pinned, so the pod's protected ports stay closed while no agent
/// serves them.
pub(super) struct RunningWorkload {
    name: String,
    netns: Arc<PodNetns>,
    steering: Arc<PodSteering>,
    /// Duplicates of the listeners the proxy serves, so that a change of
    /// ports can attach the program anew with the same sockets.
    listener_v4: std::net::TcpListener,
    listener_v6: Option<std::net::TcpListener>,
    /// Netns cookie registered with the sockmap fast path.
    sockmap_cookie: Option<u64>,
}

impl Enroll for NetnsEnroll {
    type Enrolled = RunningWorkload;

    async fn enroll(
        &self,
        core: &Core,
        workload: &WorkloadConfig,
        slot: Arc<ProxySlot>,
        shutdown: Shutdown,
    ) -> anyhow::Result<RunningWorkload> {
        start(self, workload, core, slot, shutdown).await
    }

    fn set_ports(
        &self,
        core: &Core,
        enrolled: &mut RunningWorkload,
        workload: &WorkloadConfig,
    ) -> anyhow::Result<()> {
        // Attaching again reuses the pinned maps, rewrites the ports map to
        // exactly the new ports and swaps the pinned link atomically.
        let steering = self
            .steering
            .attach(
                workload,
                enrolled.netns.file(),
                &enrolled.listener_v4,
                enrolled.listener_v6.as_ref(),
            )
            .context("while attaching the steering program with the new ports")?;
        let steering = Arc::new(steering);
        core.metrics
            .add_steering(&workload.name, Arc::clone(&steering));
        enrolled.steering = steering;
        Ok(())
    }

    fn detach(&self, core: &Core, enrolled: RunningWorkload) -> anyhow::Result<()> {
        let RunningWorkload {
            name,
            steering,
            sockmap_cookie,
            ..
        } = enrolled;
        self.handoff.withdraw(&name);
        if let (Some(sockmap), Some(cookie)) = (&self.sockmap, sockmap_cookie) {
            sockmap.unregister_pod(&name, cookie)?;
        }
        core.metrics.remove_steering(&name);

        // A scrape may hold the program for a moment; removing the pins by
        // path detaches the link all the same.
        match Arc::try_unwrap(steering) {
            Ok(steering) => steering.detach()?,
            Err(_shared) => {
                remove_pins(self.steering.pin_path(), &name)?;
            }
        }
        Ok(())
    }

    fn forget(&self, name: &str) -> anyhow::Result<()> {
        remove_pins(self.steering.pin_path(), name)?;
        Ok(())
    }

    fn release(&self, enrolled: RunningWorkload) {
        tracing::info!(
            workload = %enrolled.name,
            "workload no longer served; its steering program stays attached and drops new connections"
        );
    }
}

/// Creates the pod's listeners, attaches the steering program to them and
/// starts the proxy on each.
async fn start(
    enroll: &NetnsEnroll,
    workload: &WorkloadConfig,
    core: &Core,
    slot: Arc<ProxySlot>,
    shutdown: Shutdown,
) -> anyhow::Result<RunningWorkload> {
    let name = &workload.name;
    // Inherited sockets are the ones the steering maps already hold.
    let sockets = enroll.handoff.pod_sockets(workload).await?;
    let netns = Arc::clone(&sockets.netns);
    let listener_v4 = sockets
        .listener_v4
        .try_clone()
        .context("while duplicating the IPv4 pod listener")?;
    let listener_v6 = sockets
        .listener_v6
        .as_ref()
        .map(std::net::TcpListener::try_clone)
        .transpose()
        .context("while duplicating the IPv6 pod listener")?;

    let pod_steering = enroll
        .steering
        .attach(workload, netns.file(), &listener_v4, listener_v6.as_ref())
        .context("while attaching the steering program")?;
    let pod_steering = Arc::new(pod_steering);
    tracing::info!(
        workload = %name,
        netns = %workload.netns.display(),
        ports = ?workload.ports,
        listener.v4 = ?listener_v4.local_addr().ok(),
        listener.v6 = ?listener_v6.as_ref().and_then(|listener| listener.local_addr().ok()),
        "steering program attached"
    );
    core.metrics.add_steering(name, Arc::clone(&pod_steering));
    // Before the proxy serves, so that the first upstream connection can
    // already take the fast path.
    let sockmap_cookie = register_sockmap(enroll.sockmap.as_deref(), name, &listener_v4);

    let kept_v4 = listener_v4
        .try_clone()
        .context("while duplicating the IPv4 pod listener")?;
    let kept_v6 = listener_v6
        .as_ref()
        .map(std::net::TcpListener::try_clone)
        .transpose()
        .context("while duplicating the IPv6 pod listener")?;

    let upstream = Arc::new(NetnsUpstream::new(
        Arc::clone(&netns),
        enroll.reserved_source_v4,
        enroll.reserved_source_v6,
    ));
    for listener in std::iter::once(listener_v4).chain(listener_v6) {
        let listener = into_tokio(listener)?;
        tokio::spawn(proxy::serve_slot(
            listener,
            Arc::clone(&upstream),
            Arc::clone(&slot),
            shutdown.clone(),
        ));
    }
    enroll.handoff.offer(workload, &sockets);

    Ok(RunningWorkload {
        name: name.clone(),
        netns,
        steering: pod_steering,
        listener_v4: kept_v4,
        listener_v6: kept_v6,
        sockmap_cookie,
    })
}

fn into_tokio(listener: std::net::TcpListener) -> anyhow::Result<tokio::net::TcpListener> {
    listener
        .set_nonblocking(true)
        .context("while making the pod listener non-blocking")?;
    tokio::net::TcpListener::from_std(listener)
        .context("while registering the pod listener with tokio")
}

/// Registers the pod of `listener` with the sockmap fast path and returns
/// its netns cookie. A failure is logged: the pod's traffic then takes the
/// TCP/IP stack, which is slower but equally correct.
fn register_sockmap(
    sockmap: Option<&Sockmap>,
    workload: &str,
    listener: &std::net::TcpListener,
) -> Option<u64> {
    let sockmap = sockmap?;
    match sockmap.register_pod(workload, listener) {
        Ok(cookie) => Some(cookie),
        Err(error) => {
            tracing::warn!(
                workload,
                error = format!("{:#}", anyhow::Error::from(error)),
                "failed to register the pod for the sockmap fast path"
            );
            None
        }
    }
}
