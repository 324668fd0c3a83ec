//! Sockets created inside a pod's network namespace.
//!
//! A helper thread per pod enters the namespace once (`setns`) and creates
//! sockets there on request; a socket stays in the namespace it was created
//! in, so tokio can use it from any thread afterwards.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

/// A handle on one pod's network namespace.
pub struct PodNetns {
    _private: (),
}

impl PodNetns {
    /// Opens the namespace at `path` and starts its helper thread.
    pub fn open(_path: &Path) -> io::Result<Self> {
        todo!()
    }

    /// The namespace file, for attaching programs to it.
    pub fn file(&self) -> &std::fs::File {
        todo!()
    }

    /// Creates a TCP listener bound to `addr` inside the namespace.
    pub async fn listen(&self, _addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        todo!()
    }

    /// Connects to `dst` from inside the namespace, with the source address
    /// bound to `source` (the reserved address the `sk_lookup` program lets
    /// through).
    pub async fn connect(
        &self,
        _source: std::net::IpAddr,
        _dst: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        todo!()
    }
}
