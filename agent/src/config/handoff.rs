//! Schema of the upgrade hand-off: the Unix socket on which a running agent
//! passes its listening sockets to the agent that replaces it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Directory of the hand-off socket when `socket` is not set. `/run` is a
/// tmpfs, so a socket file left by a killed agent never outlives a reboot.
pub const DEFAULT_HANDOFF_DIR: &str = "/run/tokengate";

/// Time the old agent waits for the new one to confirm that it serves the
/// handed-over sockets, and the time the new agent waits for its issuers'
/// keys before it starts accepting, in seconds. Loading a program takes
/// milliseconds and a JWKS fetch is bounded by its own 5 s timeout, so 30 s
/// covers a slow start without leaving a stuck hand-off open for long.
pub const DEFAULT_HANDOFF_TIMEOUT_SECONDS: u64 = 30;

/// The upgrade hand-off between two agents on one node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffConfig {
    /// Unix socket of the hand-off. When absent it is
    /// `/run/tokengate/<last component of pin_path>.sock`, so two agents
    /// share a socket exactly when they share their pins.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Exit once the handed-over connections are drained. When false the
    /// old agent waits for SIGTERM after the drain, as a Kubernetes
    /// container must: a container that exits on its own is restarted.
    #[serde(default)]
    pub exit_after_handoff: bool,
    /// See [`DEFAULT_HANDOFF_TIMEOUT_SECONDS`].
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            socket: None,
            exit_after_handoff: false,
            timeout_seconds: DEFAULT_HANDOFF_TIMEOUT_SECONDS,
        }
    }
}

impl HandoffConfig {
    /// Returns the socket path in force for the pins at `pin_path`.
    pub fn socket_path(&self, pin_path: &Path) -> PathBuf {
        if let Some(socket) = &self.socket {
            return socket.clone();
        }
        let name = pin_path
            .file_name()
            .map_or_else(|| "tokengate".into(), |name| name.to_string_lossy());
        Path::new(DEFAULT_HANDOFF_DIR).join(format!("{name}.sock"))
    }
}

fn default_timeout_seconds() -> u64 {
    DEFAULT_HANDOFF_TIMEOUT_SECONDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_socket_follows_pin_path() {
        let config = HandoffConfig::default();

        assert_eq!(
            config.socket_path(Path::new("/sys/fs/bpf/tokengate")),
            Path::new("/run/tokengate/tokengate.sock")
        );
        assert_eq!(
            config.socket_path(Path::new("/sys/fs/bpf/tg-test-7")),
            Path::new("/run/tokengate/tg-test-7.sock")
        );
    }

    #[test]
    fn configured_socket_wins() {
        let config = HandoffConfig {
            socket: Some(PathBuf::from("/tmp/h.sock")),
            ..HandoffConfig::default()
        };

        assert_eq!(
            config.socket_path(Path::new("/sys/fs/bpf/tokengate")),
            Path::new("/tmp/h.sock")
        );
    }
}
