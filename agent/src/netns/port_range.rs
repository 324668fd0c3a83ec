//! Connections from a source port in a fixed range, for the agent's IPv6
//! upstream connections. Their reserved source `::1` is also the source of
//! every in-pod loopback caller, so the `sk_lookup` program lets a `::1`
//! connection through unverified only when its source port is in the range.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::PodNetns;

/// Number of ports tried before a connect fails. Each attempt that fails
/// on a taken port moves to the next port, so this bounds the work when
/// most of the range is in use.
const MAX_PORT_ATTEMPTS: u32 = 64;

/// Spreads successive connections over the range, so that a port in
/// `TIME_WAIT` from a recent connection is rarely tried first.
static NEXT_PORT_OFFSET: AtomicU32 = AtomicU32::new(0);

impl PodNetns {
    /// Connects to `dst` from inside the namespace, with the source address
    /// `source` and a source port from `ports`.
    ///
    /// The socket has `SO_REUSEADDR`, so a port whose earlier connection is
    /// in `TIME_WAIT` can be bound again. A port whose connection to the same
    /// destination still exists fails the connect with `EADDRNOTAVAIL`. Then
    /// the next port is tried, at most [`MAX_PORT_ATTEMPTS`] ports in all.
    pub async fn connect_from_ports(
        &self,
        source: IpAddr,
        ports: RangeInclusive<u16>,
        dst: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let connect_error = self.connect_error(source, dst)?;

        let first = u32::from(*ports.start());
        let size = u32::from(*ports.end()).saturating_sub(first) + 1;
        let offset = NEXT_PORT_OFFSET.fetch_add(1, Ordering::Relaxed);
        for attempt in 0..MAX_PORT_ATTEMPTS.min(size) {
            let port = (first + (offset.wrapping_add(attempt) % size)) as u16;
            let socket = self
                .run(move || {
                    let socket =
                        Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                    socket.set_nonblocking(true)?;
                    socket.set_reuse_address(true)?;
                    Ok(socket)
                })
                .await
                .map_err(connect_error)?;

            match socket.bind(&SockAddr::from(SocketAddr::new(source, port))) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => continue,
                Err(error) => return Err(connect_error(error)),
            }
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            // A taken 4-tuple fails with `EADDRNOTAVAIL`; the loop then
            // tries the next port.
            match socket.connect(dst).await {
                Ok(stream) => return Ok(stream),
                Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => {}
                Err(error) => return Err(connect_error(error)),
            }
        }

        Err(connect_error(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "no free source port in {}-{} after {} attempts",
                ports.start(),
                ports.end(),
                MAX_PORT_ATTEMPTS.min(size)
            ),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// Port range of these tests: a few ports far from the reserved range.
    const TEST_PORTS: RangeInclusive<u16> = 47000..=47003;

    /// Opens the test's own namespace, or returns `None` with a `SKIP` line
    /// when `setns` is not permitted (no `CAP_SYS_ADMIN`) outside CI.
    fn own_netns() -> Option<PodNetns> {
        match PodNetns::open(std::path::Path::new("/proc/self/ns/net")) {
            Ok(netns) => Some(netns),
            Err(error)
                if error.kind() == io::ErrorKind::PermissionDenied
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                println!("SKIP: {error}");
                None
            }
            Err(error) => panic!("failed to open the own namespace: {error}"),
        }
    }

    #[tokio::test]
    async fn source_port_in_range() {
        let Some(netns) = own_netns() else { return };
        let listener = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("listener");
        let dst = listener.local_addr().expect("addr");

        let stream = netns
            .connect_from_ports(IpAddr::V6(Ipv6Addr::LOCALHOST), TEST_PORTS, dst)
            .await
            .expect("connect");

        let local = stream.local_addr().expect("local addr");
        assert_eq!(local.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(TEST_PORTS.contains(&local.port()), "port {}", local.port());
    }

    #[tokio::test]
    async fn taken_ports_skipped_until_range_exhausted() {
        let Some(netns) = own_netns() else { return };
        let listener = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("listener");
        let dst = listener.local_addr().expect("addr");
        let source = IpAddr::V6(Ipv6Addr::LOCALHOST);

        let mut streams = Vec::new();
        for _ in TEST_PORTS {
            streams.push(
                netns
                    .connect_from_ports(source, TEST_PORTS, dst)
                    .await
                    .expect("a free port"),
            );
        }
        let exhausted = netns.connect_from_ports(source, TEST_PORTS, dst).await;

        let mut ports: Vec<u16> = streams
            .iter()
            .map(|stream| stream.local_addr().expect("addr").port())
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, TEST_PORTS.collect::<Vec<_>>());
        let error = exhausted.expect_err("every port is taken");
        assert_eq!(error.kind(), io::ErrorKind::AddrNotAvailable, "{error}");
    }
}
