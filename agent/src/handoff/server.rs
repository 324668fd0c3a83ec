//! The running agent's side: a Unix socket on which a new agent requests
//! the listening sockets, and the signal that the hand-off is done.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::protocol::{self, Message, PROTOCOL_VERSION};
use super::sockets::Offered;
use super::HandoffError;

/// Mode of the hand-off socket: only root may connect, because any client
/// that connects receives the listening sockets of every protected pod.
const SOCKET_MODE: u32 = 0o600;

/// Mode of the socket's directory when the agent creates it.
const SOCKET_DIR_MODE: u32 = 0o700;

/// Progress of the hand-off to a successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffState {
    /// No successor is taking over.
    Idle,
    /// A successor passed the checks and is receiving the sockets.
    InProgress,
    /// A successor serves the sockets.
    Done,
}

/// The hand-off socket of the running agent.
pub struct HandoffServer {
    path: PathBuf,
    inode: u64,
    state: watch::Receiver<HandoffState>,
}

impl HandoffServer {
    /// Binds the socket at `path`, replacing a file left there, and serves
    /// hand-off requests on a thread of its own until one succeeds.
    pub fn start(
        path: &Path,
        pin_path: &Path,
        offered: Arc<Offered>,
        timeout: Duration,
    ) -> Result<Self, HandoffError> {
        let bind_error = |source: io::Error| HandoffError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent).map_err(bind_error)?;
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(SOCKET_DIR_MODE))
                    .map_err(bind_error)?;
            }
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(bind_error(error)),
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(bind_error)?;
        let inode = std::fs::metadata(path).map_err(bind_error)?.ino();

        let (signal, state) = watch::channel(HandoffState::Idle);
        let pin_path = pin_path.to_owned();
        std::thread::Builder::new()
            .name("tokengate-handoff".to_owned())
            .spawn(move || serve(&listener, &pin_path, &offered, timeout, &signal))
            .map_err(bind_error)?;
        info!(path = %path.display(), "hand-off socket listening");
        Ok(Self {
            path: path.to_owned(),
            inode,
            state,
        })
    }

    /// Completes once a new agent has taken over the sockets.
    pub async fn handed_off(&mut self) {
        // An error means the thread is gone, which never hands off.
        let done = self
            .state
            .wait_for(|state| *state == HandoffState::Done)
            .await;
        if done.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits up to `timeout` for a hand-off that is under way to end, so
    /// that a stop signal does not cut it in half. Returns true when a
    /// successor serves the sockets.
    pub async fn finish_in_progress(&mut self, timeout: Duration) -> bool {
        let ended = self
            .state
            .wait_for(|state| *state != HandoffState::InProgress);
        matches!(
            tokio::time::timeout(timeout, ended).await,
            Ok(Ok(state)) if *state == HandoffState::Done
        )
    }

    /// Removes the socket file unless another agent has bound the path
    /// since.
    pub fn remove(&self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|metadata| metadata.ino() == self.inode);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), %error, "failed to remove the hand-off socket");
            }
        }
    }
}

/// Accepts requests one at a time until a hand-off succeeds.
fn serve(
    listener: &UnixListener,
    pin_path: &Path,
    offered: &Offered,
    timeout: Duration,
    signal: &watch::Sender<HandoffState>,
) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%error, "failed to accept a hand-off connection");
                std::thread::sleep(crate::proxy::ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        match hand_off(&stream, pin_path, offered, timeout, signal) {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => warn!(
                error = %crate::error_chain(&error),
                "hand-off to a new agent failed, this agent keeps serving"
            ),
        }
        signal.send_replace(HandoffState::Idle);
    }
}

/// Runs one hand-off conversation. Returns true once the new agent serves
/// the sockets and `signal` has been sent.
pub(super) fn hand_off(
    stream: &UnixStream,
    pin_path: &Path,
    offered: &Offered,
    timeout: Duration,
    signal: &watch::Sender<HandoffState>,
) -> Result<bool, HandoffError> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|source| HandoffError::Io {
            action: "configure",
            source,
        })?;

    let (hello, _) = protocol::receive(stream)?;
    if hello == Message::Ping {
        let admin = offered
            .clone_admin()
            .and_then(|admin| admin.ok()?.listener.local_addr().ok());
        let pong = Message::Pong {
            pid: std::process::id(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            admin,
        };
        protocol::send(stream, &pong, &[])?;
        return Ok(false);
    }
    let Message::Hello {
        protocol: peer_protocol,
        agent_version,
        pid,
        pin_path: peer_pins,
    } = hello
    else {
        return Err(HandoffError::Unexpected {
            expected: "hello",
            received: hello.kind(),
        });
    };
    if let Some(reason) = rejection_reason(peer_protocol, &peer_pins, pin_path) {
        warn!(peer.pid = pid, peer.version = %agent_version, reason = %reason, "hand-off rejected");
        protocol::send(stream, &Message::Refuse { reason }, &[])?;
        return Ok(false);
    }

    signal.send_replace(HandoffState::InProgress);
    let workloads = offered.workload_names();
    info!(peer.pid = pid, peer.version = %agent_version, workloads = ?workloads, "handing the listening sockets to a new agent");
    protocol::send(
        stream,
        &Message::Welcome {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            workloads: workloads.clone(),
            admin: offered.admin_address(),
        },
        &[],
    )?;

    let mut pending = workloads.into_iter();
    let mut admin_sent = false;
    loop {
        let (request, _) = protocol::receive(stream)?;
        match request {
            Message::Next => {
                let admin = if admin_sent {
                    None
                } else {
                    offered.clone_admin()
                };
                admin_sent = true;
                match admin {
                    Some(admin) => send_admin(stream, admin)?,
                    None => send_next_workload(stream, offered, &mut pending)?,
                }
            }
            Message::Ready { taken } => {
                signal.send_replace(HandoffState::Done);
                info!(peer.pid = pid, taken = ?taken, "new agent serves the sockets, this agent stops accepting");
                // The new agent only logs a missing confirmation.
                let _ = protocol::send(stream, &Message::Released, &[]);
                return Ok(true);
            }
            other => {
                return Err(HandoffError::Unexpected {
                    expected: "next or ready",
                    received: other.kind(),
                })
            }
        }
    }
}

/// Returns why a hand-off to a peer that speaks `protocol` and pins at
/// `peer_pins` is refused, or `None` when it may go ahead.
fn rejection_reason(protocol: u32, peer_pins: &Path, own_pins: &Path) -> Option<String> {
    if protocol != PROTOCOL_VERSION {
        return Some(format!(
            "hand-off protocol {protocol} requested, this agent speaks {PROTOCOL_VERSION}"
        ));
    }
    if peer_pins != own_pins {
        return Some(format!(
            "pin path {} requested, this agent pins at {}",
            peer_pins.display(),
            own_pins.display()
        ));
    }
    None
}

fn send_admin(
    stream: &UnixStream,
    admin: io::Result<super::sockets::AdminSocket>,
) -> Result<(), HandoffError> {
    let admin = admin.map_err(|source| HandoffError::Io {
        action: "duplicate the admin listener",
        source,
    })?;
    protocol::send(
        stream,
        &Message::Admin {
            configured: admin.configured,
        },
        &[admin.listener.as_fd().as_raw_fd()],
    )
}

fn send_next_workload(
    stream: &UnixStream,
    offered: &Offered,
    pending: &mut impl Iterator<Item = String>,
) -> Result<(), HandoffError> {
    for name in pending.by_ref() {
        // A workload detached since the welcome is skipped.
        let Some(sockets) = offered.clone_workload(&name) else {
            continue;
        };
        let sockets = sockets.map_err(|source| HandoffError::Io {
            action: "duplicate the workload sockets",
            source,
        })?;
        let mut fds: Vec<RawFd> = vec![sockets.netns.as_raw_fd(), sockets.listener_v4.as_raw_fd()];
        if let Some(listener) = &sockets.listener_v6 {
            fds.push(listener.as_raw_fd());
        }
        return protocol::send(
            stream,
            &Message::Workload {
                name,
                netns: sockets.netns_path.clone(),
                ipv6: sockets.listener_v6.is_some(),
            },
            &fds,
        );
    }
    protocol::send(stream, &Message::End, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_names_both_versions() {
        let reason = rejection_reason(
            PROTOCOL_VERSION + 1,
            Path::new("/sys/fs/bpf/tg"),
            Path::new("/sys/fs/bpf/tg"),
        )
        .unwrap();

        assert!(
            reason.contains(&(PROTOCOL_VERSION + 1).to_string()),
            "{reason}"
        );
        assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
    }

    #[test]
    fn rejection_of_other_pin_path() {
        let reason = rejection_reason(
            PROTOCOL_VERSION,
            Path::new("/sys/fs/bpf/a"),
            Path::new("/sys/fs/bpf/b"),
        );

        assert!(reason.is_some());
        assert!(rejection_reason(PROTOCOL_VERSION, Path::new("/p"), Path::new("/p")).is_none());
    }
}
