//! The agent's connection to an egress destination. It is made from the
//! pod's network namespace, so its source is the pod's address. Its socket
//! belongs to the agent's cgroup and carries the agent's mark, so the
//! egress programs leave it alone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

use crate::netns::PodNetns;
use crate::proxy::Upstream;

/// Connects from inside one pod's namespace with a fixed socket mark.
pub struct EgressUpstream {
    netns: Arc<PodNetns>,
    mark: u32,
}

impl EgressUpstream {
    pub fn new(netns: Arc<PodNetns>, mark: u32) -> Self {
        Self { netns, mark }
    }
}

impl Upstream for EgressUpstream {
    fn connect(
        &self,
        destination: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let netns = Arc::clone(&self.netns);
        let mark = self.mark;
        async move {
            // Only `socket()` depends on the thread's namespace; the source
            // address is left to the pod's routing, as for the pod's own
            // connections.
            let socket = netns
                .run(move || {
                    let socket = Socket::new(
                        Domain::for_address(destination),
                        Type::STREAM,
                        Some(Protocol::TCP),
                    )?;
                    socket.set_mark(mark)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
                .await?;
            tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(destination)
                .await
        }
    }
}
