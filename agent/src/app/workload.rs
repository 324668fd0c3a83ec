//! Protecting one workload: listeners inside its pod, the steering program
//! attached to its namespace, and the proxy serving the listeners.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;

use super::Core;
use crate::bpf::{PodSteering, Steering};
use crate::config::{Config, WorkloadConfig};
use crate::netns::PodNetns;
use crate::proxy::{self, DrainController, NetnsUpstream};

/// Listen address inside the pod. The address only has to exist there,
/// because the `sk_lookup` program hands the listener every connection to a
/// protected port whatever address the caller used. Loopback keeps the
/// listener unreachable from outside the pod by any other route.
const LISTEN_V4: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// IPv6 counterpart of [`LISTEN_V4`].
const LISTEN_V6: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 0);

/// A protected workload. Dropping it leaves the steering program attached
/// and pinned, so the pod's protected ports stay closed while no agent
/// serves them.
pub(super) struct RunningWorkload {
    name: String,
    _netns: Arc<PodNetns>,
    _steering: Arc<PodSteering>,
}

impl RunningWorkload {
    pub(super) fn stop(self) {
        tracing::info!(
            workload = %self.name,
            "workload no longer served; its steering program stays attached and drops new connections"
        );
    }
}

/// Creates the pod's listeners, attaches the steering program to them and
/// starts the proxy on each.
pub(super) async fn start(
    config: &Config,
    workload: &WorkloadConfig,
    core: &Core,
    steering: &Steering,
    drain: &DrainController,
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
            tracing::info!(workload = %name, %error, "no IPv6 listener in the pod; IPv6 connections are not steered");
            None
        }
    };

    let pod_steering = steering
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

    let proxy = core.workload_proxy(workload);
    let upstream = Arc::new(NetnsUpstream::new(
        Arc::clone(&netns),
        config.interception.reserved_source_v4,
        config.interception.reserved_source_v6,
    ));
    for listener in std::iter::once(listener_v4).chain(listener_v6) {
        let listener = into_tokio(listener)?;
        tokio::spawn(proxy::serve(
            listener,
            Arc::clone(&upstream),
            Arc::clone(&proxy),
            drain.handle(),
        ));
    }
    core.readiness.set_attached(name, true);

    Ok(RunningWorkload {
        name: name.clone(),
        _netns: netns,
        _steering: pod_steering,
    })
}

fn into_tokio(listener: std::net::TcpListener) -> anyhow::Result<tokio::net::TcpListener> {
    listener
        .set_nonblocking(true)
        .context("while making the pod listener non-blocking")?;
    tokio::net::TcpListener::from_std(listener)
        .context("while registering the pod listener with tokio")
}
