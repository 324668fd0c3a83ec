//! Connectors for the proxy's own connections to the service.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use tokengate_common::{RESERVED_PORT_FIRST_V6, RESERVED_PORT_LAST_V6};
use tokio::net::TcpStream;

use crate::netns::PodNetns;

/// Opens a TCP connection to the service behind a steered connection.
pub trait Upstream: Send + Sync + 'static {
    /// Connects to the service at `destination`, the original destination of
    /// the caller's connection.
    fn connect(
        &self,
        destination: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

/// Connects from inside the pod's network namespace, from the reserved
/// source address that the pod's `sk_lookup` program lets through.
pub struct NetnsUpstream {
    netns: Arc<PodNetns>,
    source_v4: Ipv4Addr,
    source_v6: Ipv6Addr,
}

impl NetnsUpstream {
    pub fn new(netns: Arc<PodNetns>, source_v4: Ipv4Addr, source_v6: Ipv6Addr) -> Self {
        Self {
            netns,
            source_v4,
            source_v6,
        }
    }
}

impl Upstream for NetnsUpstream {
    fn connect(
        &self,
        destination: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let netns = Arc::clone(&self.netns);
        let source_v4 = self.source_v4;
        let source_v6 = self.source_v6;
        async move {
            match destination {
                SocketAddr::V4(_) => netns.connect(IpAddr::V4(source_v4), destination).await,
                // Only the source port distinguishes the agent's IPv6
                // connections from in-pod loopback callers, which share `::1`.
                SocketAddr::V6(v6) => {
                    let ports = RESERVED_PORT_FIRST_V6..=RESERVED_PORT_LAST_V6;
                    let destination = reachable_from_loopback(v6);
                    netns
                        .connect_from_ports(IpAddr::V6(source_v6), ports, destination)
                        .await
                }
            }
        }
    }
}

/// Returns the address to connect to from the reserved source `::1` for
/// the original destination `destination`. A connection from `::1` to the
/// pod's own link-local address never completes, so a link-local
/// destination becomes `::1` with the same port.
///
/// NOTE: a service that listens on its link-local address alone, not on
/// `[::]` or `::1`, is then not reached, and the caller receives 502.
fn reachable_from_loopback(destination: SocketAddrV6) -> SocketAddr {
    if destination.ip().is_unicast_link_local() {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), destination.port())
    } else {
        SocketAddr::V6(destination)
    }
}

/// Connects to one fixed service address in the agent's own namespace,
/// whatever the original destination was. It serves the proxy without eBPF
/// steering, where the listener's own address is the destination and
/// connecting to it would loop back into the proxy (tests, local runs).
pub struct LoopbackUpstream {
    service: SocketAddr,
}

impl LoopbackUpstream {
    pub fn new(service: SocketAddr) -> Self {
        Self { service }
    }
}

impl Upstream for LoopbackUpstream {
    fn connect(
        &self,
        _destination: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        TcpStream::connect(self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_destination_becomes_loopback() {
        let link_local = SocketAddrV6::new("fe80::1".parse().unwrap(), 8080, 0, 7);
        let global = SocketAddrV6::new("fd54:6f6b:656e::a".parse().unwrap(), 8080, 0, 0);

        assert_eq!(
            reachable_from_loopback(link_local),
            "[::1]:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(reachable_from_loopback(global), SocketAddr::V6(global));
    }
}
