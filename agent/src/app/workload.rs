//! Protecting one workload: listeners inside its pod, the steering program
//! attached to its namespace, and the proxy serving the listeners.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;

use super::{Core, Enroll};
use crate::bpf::{remove_pins, PodSteering, Steering};
use crate::config::{InterceptionConfig, WorkloadConfig};
use crate::netns::PodNetns;
use crate::proxy::{self, NetnsUpstream, ProxySlot, Shutdown};

/// Listen address inside the pod. The address only has to exist there,
/// because the `sk_lookup` program hands the listener every connection to a
/// protected port whatever address the caller used. Loopback keeps the
/// listener unreachable from outside the pod by any other route.
const LISTEN_V4: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// IPv6 counterpart of [`LISTEN_V4`].
const LISTEN_V6: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 0);

/// Protects workloads through their pods' network namespaces and the
/// eBPF steering program.
pub(super) struct NetnsEnroll {
    steering: Steering,
    reserved_source_v4: Ipv4Addr,
    reserved_source_v6: Ipv6Addr,
}

impl NetnsEnroll {
    /// Uses the interception settings of the start: a reload does not
    /// change them.
    pub(super) fn new(steering: Steering, interception: &InterceptionConfig) -> Self {
        Self {
            steering,
            reserved_source_v4: interception.reserved_source_v4,
            reserved_source_v6: interception.reserved_source_v6,
        }
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
        let RunningWorkload { name, steering, .. } = enrolled;
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
    let netns = PodNetns::open(&workload.netns).with_context(|| {
        format!(
            "while opening network namespace {}",
            workload.netns.display()
        )
    })?;
    let netns = Arc::new(netns);

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

    Ok(RunningWorkload {
        name: name.clone(),
        netns,
        steering: pod_steering,
        listener_v4: kept_v4,
        listener_v6: kept_v6,
    })
}

fn into_tokio(listener: std::net::TcpListener) -> anyhow::Result<tokio::net::TcpListener> {
    listener
        .set_nonblocking(true)
        .context("while making the pod listener non-blocking")?;
    tokio::net::TcpListener::from_std(listener)
        .context("while registering the pod listener with tokio")
}
