//! Sockets created inside a pod's network namespace.
//!
//! A helper thread per pod enters the namespace once (`setns`) and creates
//! sockets there on request; a socket stays in the namespace it was created
//! in, so tokio can use it from any thread afterwards. This module does not
//! attach programs (see `bpf`) or serve connections (see `proxy`).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, warn};

mod port_range;

/// Backlog of the listeners made in pods; tokio's `TcpListener::bind` uses
/// the same value, and the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Errors of entering a namespace and making sockets in it. The public
/// functions return them inside an [`io::Error`] of the same kind, so
/// callers can match on `io::ErrorKind` or downcast for the details.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("failed to open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to enter network namespace {path}; check that it is a network namespace (/var/run/netns/NAME or /proc/PID/ns/net) and that the agent has CAP_SYS_ADMIN")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("helper thread of network namespace {path} is gone")]
    HelperGone { path: PathBuf },
    #[error("failed to listen on {addr} in network namespace {path}")]
    Listen {
        path: PathBuf,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to connect from {source_addr} to {destination} in network namespace {path}")]
    Connect {
        path: PathBuf,
        source_addr: IpAddr,
        destination: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "source {source_addr} and destination {destination} are of different address families"
    )]
    FamilyMismatch {
        source_addr: IpAddr,
        destination: SocketAddr,
    },
}

impl From<NetnsError> for io::Error {
    fn from(error: NetnsError) -> Self {
        let kind = match &error {
            NetnsError::Open { source, .. }
            | NetnsError::Enter { source, .. }
            | NetnsError::Listen { source, .. }
            | NetnsError::Connect { source, .. } => source.kind(),
            NetnsError::HelperGone { .. } => io::ErrorKind::BrokenPipe,
            NetnsError::FamilyMismatch { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, error)
    }
}

/// A request run on the helper thread, inside the namespace.
type Job = Box<dyn FnOnce() + Send>;

/// A handle on one pod's network namespace.
///
/// Dropping it ends the helper thread once its current request, if any,
/// returns; the thread keeps the namespace alive until then.
pub struct PodNetns {
    path: PathBuf,
    file: File,
    requests: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Opens the namespace at `path` and starts its helper thread.
    ///
    /// Blocks until the thread has entered the namespace, so an invalid path
    /// fails here and not on the first socket.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(path, file)
    }

    /// Like [`PodNetns::open`] with the namespace already open as `file`,
    /// such as a namespace fd handed over by another agent. `path` names it
    /// in messages.
    pub fn from_file(path: &Path, file: File) -> io::Result<Self> {
        let helper_file = file.try_clone().map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;

        let (requests, jobs) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        thread::Builder::new()
            .name("tokengate-netns".to_owned())
            .spawn(move || serve(&helper_file, &entered_tx, &jobs))?;

        let entered = entered_rx.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "helper thread ended before entering the namespace",
            ))
        });
        entered.map_err(|source| NetnsError::Enter {
            path: path.to_owned(),
            source,
        })?;

        debug!(netns = %path.display(), "network namespace helper started");
        Ok(Self {
            path: path.to_owned(),
            file,
            requests,
        })
    }

    /// Returns the namespace file, for attaching programs to it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Returns the path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `job` on the helper thread, inside the namespace, and returns
    /// its result. Sockets made by `job` belong to the namespace.
    ///
    /// The helper runs one job at a time, so a job that blocks delays every
    /// other request for this pod. A job that panics returns an error of
    /// kind `Other` and leaves the helper running.
    pub async fn run<T, F>(&self, job: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        let wrapped: Job = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(job))
                .unwrap_or_else(|_| Err(io::Error::other("job panicked in the namespace helper")));
            // The caller may have gone away; nothing waits for the result then.
            let _ = reply.send(outcome);
        });

        let gone = || NetnsError::HelperGone {
            path: self.path.clone(),
        };
        self.requests.send(wrapped).map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }

    /// Creates a TCP listener bound to `addr` inside the namespace.
    ///
    /// The listener is non-blocking (ready for tokio), has `SO_REUSEADDR`
    /// so a restarted agent can bind the same address while old connections
    /// linger, and an IPv6 listener is IPv6-only so that it never takes IPv4
    /// connections meant for the IPv4 listener.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let result = self
            .run(move || {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                if addr.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                socket.listen(LISTEN_BACKLOG)?;
                socket.set_nonblocking(true)?;
                Ok(std::net::TcpListener::from(socket))
            })
            .await;
        result.map_err(|source| {
            NetnsError::Listen {
                path: self.path.clone(),
                addr,
                source,
            }
            .into()
        })
    }

    /// Checks that `source` and `dst` are of one family, and returns the
    /// function that turns a failed connect between them into an error
    /// naming the namespace and both addresses.
    fn connect_error(
        &self,
        source: IpAddr,
        dst: SocketAddr,
    ) -> io::Result<impl Fn(io::Error) -> io::Error + Copy + '_> {
        if source.is_ipv4() != dst.is_ipv4() {
            return Err(NetnsError::FamilyMismatch {
                source_addr: source,
                destination: dst,
            }
            .into());
        }
        Ok(move |error: io::Error| -> io::Error {
            NetnsError::Connect {
                path: self.path.clone(),
                source_addr: source,
                destination: dst,
                source: error,
            }
            .into()
        })
    }

    /// Connects to `dst` from inside the namespace, with the source address
    /// bound to `source` (the reserved address the `sk_lookup` program lets
    /// through).
    ///
    /// The source port is chosen at connect time (`IP_BIND_ADDRESS_NO_PORT`),
    /// so ports are shared across destinations instead of being reserved by
    /// `bind` for every connection.
    pub async fn connect(
        &self,
        source: IpAddr,
        dst: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let connect_error = self.connect_error(source, dst)?;

        // Only `socket()` depends on the calling thread's namespace; bind and
        // connect act on the socket's own namespace from any thread.
        let socket = self
            .run(move || {
                let socket =
                    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .await
            .map_err(connect_error)?;

        if let Err(error) = set_bind_address_no_port(&socket) {
            // Connecting still works, but each connection then keeps its port from bind on.
            warn!(netns = %self.path.display(), error = %error, "IP_BIND_ADDRESS_NO_PORT not set");
        }
        socket
            .bind(&SockAddr::from(SocketAddr::new(source, 0)))
            .map_err(connect_error)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(dst).await.map_err(connect_error)
    }

    /// Tells whether the namespace has IPv6 loopback (`::1` can be bound),
    /// which an IPv6 listener and the IPv6 reserved source need. It is
    /// missing when IPv6 is disabled in the pod.
    pub async fn has_ipv6_loopback(&self) -> io::Result<bool> {
        self.run(|| {
            let socket = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
                Ok(socket) => socket,
                Err(error) if error.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(false),
                Err(error) => return Err(error),
            };
            match socket.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0).into()) {
                Ok(()) => Ok(true),
                Err(error) if error.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
                Err(error) => Err(error),
            }
        })
        .await
    }
}

/// The helper thread: enters the namespace, reports the outcome, then runs
/// jobs until every sender is gone.
fn serve(netns: &File, entered: &mpsc::SyncSender<io::Result<()>>, jobs: &mpsc::Receiver<Job>) {
    let result = setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
    let ok = result.is_ok();
    // `open` blocks until this message arrives, so the send cannot fail
    // while anyone needs the result.
    let _ = entered.send(result);
    if !ok {
        return;
    }
    while let Ok(job) = jobs.recv() {
        job();
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2), which socket2 0.5 and the
/// enabled nix features do not offer.
#[expect(
    unsafe_code,
    reason = "setsockopt has no safe wrapper for IP_BIND_ADDRESS_NO_PORT here"
)]
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // SAFETY: the fd is a valid open socket owned by `socket` for the whole
    // call, and the option value points to a live `c_int` whose size is
    // passed as the option length.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&enable).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The agent's own namespace serves as the "pod": these tests need no
    /// root, and the privileged ones with real pod namespaces are in
    /// `tests/steering.rs`.
    const OWN_NETNS: &str = "/proc/self/ns/net";

    /// Opens the test's own namespace, or returns `None` with a `SKIP` line
    /// when `setns` is not permitted (no `CAP_SYS_ADMIN`) outside CI.
    fn open_own() -> Option<PodNetns> {
        match PodNetns::open(Path::new(OWN_NETNS)) {
            Ok(netns) => Some(netns),
            Err(error)
                if error.kind() == io::ErrorKind::PermissionDenied
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                println!("SKIP: {error}");
                None
            }
            Err(error) => panic!("{error}"),
        }
    }

    #[tokio::test]
    async fn listen_and_connect_from_source() {
        let Some(netns) = open_own() else { return };
        let listener = netns
            .listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();

        let stream = netns
            .connect(IpAddr::V4(Ipv4Addr::LOCALHOST), addr)
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();

        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert_eq!(peer, stream.local_addr().unwrap());
        assert_eq!(accepted.local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn connect_rejects_family_mismatch() {
        let Some(netns) = open_own() else { return };
        let dst = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 9);

        let error = netns
            .connect(IpAddr::V4(Ipv4Addr::LOCALHOST), dst)
            .await
            .unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn listen_error_names_address() {
        let Some(netns) = open_own() else { return };
        let taken = netns
            .listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
            .await
            .unwrap();

        let error = netns.listen(taken.local_addr().unwrap()).await.unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        assert!(
            error
                .to_string()
                .contains(&taken.local_addr().unwrap().to_string()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn panicking_job_keeps_helper() {
        let Some(netns) = open_own() else { return };

        let error = netns
            .run(|| -> io::Result<()> { panic!("job failure") })
            .await
            .unwrap_err();
        let value = netns.run(|| Ok(7)).await.unwrap();

        assert_eq!(error.kind(), io::ErrorKind::Other);
        assert_eq!(value, 7);
    }

    #[test]
    fn open_missing_path_fails() {
        let error = PodNetns::open(Path::new("/nonexistent/tokengate/netns"))
            .err()
            .unwrap();

        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains("/nonexistent/tokengate/netns"),
            "{error}"
        );
    }

    #[test]
    fn open_non_namespace_fails() {
        let file = tempfile::NamedTempFile::new().unwrap();

        let error = PodNetns::open(file.path()).err().unwrap();

        assert!(error.to_string().contains("failed to enter"), "{error}");
    }
}
