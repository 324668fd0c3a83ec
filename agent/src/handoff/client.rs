//! The new agent's side: connect to the running agent, receive its
//! sockets, and tell it when they are served here.

use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::protocol::{self, Message, PROTOCOL_VERSION};
use super::sockets::{AdminSocket, Inherited, WorkloadSockets};
use super::HandoffError;

/// Result of looking for a running agent to take over from.
pub enum Outcome {
    /// The sockets arrived; confirm with [`Takeover::confirm`] once they
    /// are served.
    Taken(Takeover),
    /// No hand-off: the agent starts fresh.
    Fresh {
        /// Whether this agent may bind the hand-off socket path: true unless
        /// an agent with other pins listens there.
        may_bind: bool,
    },
}

/// An accepted hand-off, open until confirmed.
pub struct Takeover {
    stream: UnixStream,
    pub inherited: Arc<Inherited>,
    pub previous_pid: u32,
}

/// Connects to the agent at `path`, which must serve the pins at
/// `pin_path`, and receives its sockets. Every failure is logged and
/// returns [`Outcome::Fresh`]: a fresh start is always possible.
pub fn take_over(path: &Path, pin_path: &Path, timeout: Duration) -> Outcome {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            info!(path = %path.display(), "no running agent to take over from, starting fresh");
            return Outcome::Fresh { may_bind: true };
        }
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "hand-off socket is stale (no agent listens), starting fresh");
            return Outcome::Fresh { may_bind: true };
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "failed to connect to the hand-off socket, starting fresh");
            return Outcome::Fresh { may_bind: true };
        }
    };

    match receive_sockets(&stream, pin_path, timeout) {
        Ok(Received::Sockets {
            inherited,
            previous_pid,
        }) => Outcome::Taken(Takeover {
            stream,
            inherited: Arc::new(inherited),
            previous_pid,
        }),
        Ok(Received::Refused { reason, may_bind }) => {
            warn!(path = %path.display(), reason = %reason, "running agent rejected the hand-off, starting fresh");
            Outcome::Fresh { may_bind }
        }
        Err(error) => {
            warn!(
                path = %path.display(),
                error = %crate::error_chain(&error),
                "hand-off failed, starting fresh; the running agent keeps its sockets"
            );
            Outcome::Fresh { may_bind: true }
        }
    }
}

enum Received {
    Sockets {
        inherited: Inherited,
        previous_pid: u32,
    },
    Refused {
        reason: String,
        may_bind: bool,
    },
}

fn receive_sockets(
    stream: &UnixStream,
    pin_path: &Path,
    timeout: Duration,
) -> Result<Received, HandoffError> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|source| HandoffError::Io {
            action: "configure",
            source,
        })?;
    protocol::send(
        stream,
        &Message::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            pin_path: pin_path.to_owned(),
        },
        &[],
    )?;

    let (welcome, _) = protocol::receive(stream)?;
    let (peer_protocol, peer_version, previous_pid, workloads) = match welcome {
        Message::Welcome {
            protocol,
            agent_version,
            pid,
            workloads,
            ..
        } => (protocol, agent_version, pid, workloads),
        Message::Refuse { reason } => {
            // Only an agent of the same pins is this agent's predecessor.
            let may_bind = !reason.starts_with("pin path");
            return Ok(Received::Refused { reason, may_bind });
        }
        other => {
            return Err(HandoffError::Unexpected {
                expected: "welcome",
                received: other.kind(),
            })
        }
    };
    if peer_protocol != PROTOCOL_VERSION {
        // Closing the connection ends the old agent's side of it.
        return Ok(Received::Refused {
            reason: format!(
                "running agent speaks hand-off protocol {peer_protocol}, this agent speaks {PROTOCOL_VERSION}"
            ),
            may_bind: true,
        });
    }
    info!(previous.pid = previous_pid, previous.version = %peer_version, workloads = ?workloads, "taking over from the running agent");

    let inherited = Inherited::default();
    loop {
        protocol::send(stream, &Message::Next, &[])?;
        let (message, fds) = protocol::receive(stream)?;
        match message {
            Message::Admin { configured } => {
                let [listener] = expect_fds::<1>(fds, "admin")?;
                inherited.set_admin(AdminSocket {
                    configured,
                    listener: TcpListener::from(listener),
                });
            }
            Message::Workload { name, netns, ipv6 } => {
                let sockets = if ipv6 {
                    let [netns_fd, v4, v6] = expect_fds::<3>(fds, "workload")?;
                    (netns_fd, v4, Some(v6))
                } else {
                    let [netns_fd, v4] = expect_fds::<2>(fds, "workload")?;
                    (netns_fd, v4, None)
                };
                let (netns_fd, v4, v6) = sockets;
                inherited.add_workload(
                    name,
                    WorkloadSockets {
                        netns_path: netns,
                        netns: File::from(netns_fd),
                        listener_v4: TcpListener::from(v4),
                        listener_v6: v6.map(TcpListener::from),
                    },
                );
            }
            Message::End => break,
            other => {
                return Err(HandoffError::Unexpected {
                    expected: "admin, workload or end",
                    received: other.kind(),
                })
            }
        }
    }
    Ok(Received::Sockets {
        inherited,
        previous_pid,
    })
}

fn expect_fds<const N: usize>(
    fds: Vec<OwnedFd>,
    message: &'static str,
) -> Result<[OwnedFd; N], HandoffError> {
    let count = fds.len();
    fds.try_into().map_err(|_| HandoffError::DescriptorCount {
        message,
        expected: N,
        received: count,
    })
}

impl Takeover {
    /// Tells the previous agent that this agent accepts on the inherited
    /// sockets now, and waits for it to stop accepting.
    pub fn confirm(self) {
        let taken = self.inherited.taken();
        let waiting = self.inherited.waiting();
        if !waiting.is_empty() {
            // NOTE: these listeners stay in the steering maps and queue
            // connections until their workloads are enrolled (for example
            // from the CNI state) or the agent exits.
            warn!(workloads = ?waiting, "inherited sockets not yet served by any workload");
        }
        let result = protocol::send(
            &self.stream,
            &Message::Ready {
                taken: taken.clone(),
            },
            &[],
        )
        .and_then(|()| protocol::receive(&self.stream));
        match result {
            Ok((Message::Released, _)) => {
                info!(previous.pid = self.previous_pid, taken = ?taken, "previous agent stopped accepting, hand-off complete");
            }
            Ok((other, _)) => warn!(
                received = other.kind(),
                "unexpected reply to ready, hand-off assumed complete"
            ),
            Err(error) => warn!(
                error = %crate::error_chain(&error),
                "no confirmation from the previous agent; both agents may accept until it exits"
            ),
        }
    }
}

/// A running agent, as it replied to a ping on its hand-off socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RunningAgent {
    pub pid: u32,
    pub version: String,
    /// Bound address of its admin listener.
    pub admin: Option<std::net::SocketAddr>,
}

/// Asks whether an agent listens on the hand-off socket at `path`. Returns
/// `None` when no socket exists there or no process listens on it.
pub fn ping(path: &Path, timeout: Duration) -> Result<Option<RunningAgent>, HandoffError> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(HandoffError::Io {
                action: "connect",
                source,
            })
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|source| HandoffError::Io {
            action: "configure",
            source,
        })?;
    protocol::send(&stream, &Message::Ping, &[])?;
    match protocol::receive(&stream)? {
        (
            Message::Pong {
                pid,
                agent_version,
                admin,
            },
            _,
        ) => Ok(Some(RunningAgent {
            pid,
            version: agent_version,
            admin,
        })),
        (other, _) => Err(HandoffError::Unexpected {
            expected: "pong",
            received: other.kind(),
        }),
    }
}
