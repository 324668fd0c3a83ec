//! Upgrade hand-off: a new agent process takes over the listening sockets
//! of the running one, so no connection waits in a queue that no
//! process serves.
//!
//! The running agent listens on a Unix socket. A new agent that starts
//! while it runs connects, receives the admin listener and, per workload,
//! the pod's namespace and listeners (`SCM_RIGHTS`), serves them, and sends
//! `ready`. The old agent then stops accepting and drains. The steering
//! maps keep pointing at the very same sockets throughout. Both sides
//! check the protocol version and the pin path; on any mismatch or error
//! the new agent starts fresh. This module does not create listeners (see
//! `app::workload`) or attach programs (see `bpf`).

mod client;
mod fds;
mod protocol;
mod server;
mod sockets;

pub use client::{ping, take_over, Outcome, RunningAgent, Takeover};
pub use protocol::PROTOCOL_VERSION;
pub use server::{HandoffServer, HandoffState};
pub use sockets::{AdminSocket, Inherited, Offered, WorkloadSockets};

use std::path::PathBuf;

/// Errors of one hand-off conversation.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("failed to bind the hand-off socket {path}; check that its directory is writable, or set interception.handoff.socket")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {action} on the hand-off connection")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("hand-off peer closed the connection")]
    Closed,
    #[error("hand-off message of {bytes} bytes exceeds the limit")]
    TooLarge { bytes: usize },
    #[error("hand-off message carried more than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("hand-off message {message} carried {received} descriptors, expected {expected}")]
    DescriptorCount {
        message: &'static str,
        expected: usize,
        received: usize,
    },
    #[error("failed to encode a hand-off message")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to decode a hand-off message; the peer may speak another protocol version")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
    #[error("expected hand-off message {expected}, received {received}")]
    Unexpected {
        expected: &'static str,
        received: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::net::TcpListener;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn offered_with_workload(listener: &TcpListener) -> Arc<Offered> {
        let offered = Arc::new(Offered::default());
        offered.add_workload(
            "orders",
            WorkloadSockets {
                netns_path: PathBuf::from("/proc/self/ns/net"),
                netns: File::open("/proc/self/ns/net").unwrap(),
                listener_v4: listener.try_clone().unwrap(),
                listener_v6: None,
            },
        );
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        offered.set_admin(AdminSocket {
            configured: "127.0.0.1:0".parse().unwrap(),
            listener: admin,
        });
        offered
    }

    #[tokio::test]
    async fn hand_off_passes_the_same_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let pins = Path::new("/sys/fs/bpf/tokengate-unit");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server =
            HandoffServer::start(&path, pins, offered_with_workload(&listener), TIMEOUT).unwrap();

        let outcome = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || take_over(&path, pins, TIMEOUT))
                .await
                .unwrap()
        };
        let Outcome::Taken(takeover) = outcome else {
            panic!("hand-off did not happen");
        };
        let sockets = takeover
            .inherited
            .take_workload("orders", Path::new("/proc/self/ns/net"))
            .unwrap();
        let admin = takeover
            .inherited
            .take_admin("127.0.0.1:0".parse().unwrap());
        tokio::task::spawn_blocking(move || takeover.confirm())
            .await
            .unwrap();
        tokio::time::timeout(TIMEOUT, server.handed_off())
            .await
            .unwrap();

        assert_eq!(
            sockets.listener_v4.local_addr().unwrap(),
            listener.local_addr().unwrap()
        );
        assert!(sockets.listener_v6.is_none());
        assert!(admin.is_some());
    }

    #[tokio::test]
    async fn stop_waits_for_hand_off_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let pins = Path::new("/sys/fs/bpf/tokengate-unit");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server =
            HandoffServer::start(&path, pins, offered_with_workload(&listener), TIMEOUT).unwrap();
        let outcome = tokio::task::spawn_blocking(move || take_over(&path, pins, TIMEOUT))
            .await
            .unwrap();
        let Outcome::Taken(takeover) = outcome else {
            panic!("hand-off did not happen");
        };

        let before_ready = server.finish_in_progress(Duration::from_millis(100)).await;
        let confirm = tokio::task::spawn_blocking(move || takeover.confirm());
        let after_ready = server.finish_in_progress(TIMEOUT).await;
        confirm.await.unwrap();

        assert!(!before_ready, "the hand-off ended before ready was sent");
        assert!(after_ready);
    }

    #[tokio::test]
    async fn other_pin_path_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _server = HandoffServer::start(
            &path,
            Path::new("/sys/fs/bpf/a"),
            offered_with_workload(&listener),
            TIMEOUT,
        )
        .unwrap();

        let outcome = tokio::task::spawn_blocking(move || {
            take_over(&path, Path::new("/sys/fs/bpf/b"), TIMEOUT)
        })
        .await
        .unwrap();

        assert!(matches!(outcome, Outcome::Fresh { may_bind: false }));
    }

    #[tokio::test]
    async fn ping_reports_the_running_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let offered = offered_with_workload(&listener);
        let admin = offered
            .clone_admin()
            .unwrap()
            .unwrap()
            .listener
            .local_addr()
            .unwrap();
        let _server = HandoffServer::start(&path, Path::new("/p"), offered, TIMEOUT).unwrap();

        let running = tokio::task::spawn_blocking(move || ping(&path, TIMEOUT))
            .await
            .unwrap()
            .unwrap()
            .unwrap();

        assert_eq!(running.pid, std::process::id());
        assert_eq!(running.admin, Some(admin));
    }

    #[test]
    fn ping_without_agent_returns_none() {
        let dir = tempfile::tempdir().unwrap();

        assert!(ping(&dir.path().join("absent.sock"), TIMEOUT)
            .unwrap()
            .is_none());
    }

    #[test]
    fn stale_socket_file_means_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());

        let outcome = take_over(&path, Path::new("/sys/fs/bpf/a"), TIMEOUT);

        assert!(matches!(outcome, Outcome::Fresh { may_bind: true }));
    }

    #[test]
    fn missing_socket_means_fresh_start() {
        let dir = tempfile::tempdir().unwrap();

        let outcome = take_over(&dir.path().join("absent.sock"), Path::new("/p"), TIMEOUT);

        assert!(matches!(outcome, Outcome::Fresh { may_bind: true }));
    }

    #[test]
    fn other_protocol_version_is_rejected() {
        let (new_side, old_side) = std::os::unix::net::UnixStream::pair().unwrap();
        let offered = Offered::default();
        let (signal, _) = tokio::sync::watch::channel(HandoffState::Idle);
        protocol::send(
            &new_side,
            &protocol::Message::Hello {
                protocol: PROTOCOL_VERSION + 1,
                agent_version: "9.9.9".to_owned(),
                pid: 1,
                pin_path: PathBuf::from("/p"),
            },
            &[],
        )
        .unwrap();

        let handed =
            server::hand_off(&old_side, Path::new("/p"), &offered, TIMEOUT, &signal).unwrap();
        let (reply, _) = protocol::receive(&new_side).unwrap();

        assert!(!handed);
        assert!(matches!(reply, protocol::Message::Refuse { .. }));
        assert_eq!(*signal.borrow(), HandoffState::Idle);
    }
}
