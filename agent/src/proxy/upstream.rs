//! Connectors for the proxy's own connections to the service.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

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
        let source = match destination {
            SocketAddr::V4(_) => IpAddr::V4(self.source_v4),
            SocketAddr::V6(_) => IpAddr::V6(self.source_v6),
        };
        self.netns.connect(source, destination)
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
