//! `tokengate uninstall`: removes every link, pin and map the agent owns
//! under its pin path, its hand-off socket and, when enrolment is
//! configured, the enrolment state directory and the CNI socket.
//!
//! It rejects the request while an agent responds on the hand-off socket,
//! unless forced, because removing the pins under a running agent opens its
//! protected ports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::bpf::uninstall::{remove_all, RemovedPins};
use crate::bpf::BpfError;
use crate::config::{Config, HandoffConfig};
use crate::handoff::{self, HandoffError};

/// Time a running agent gets to reply to the ping on its hand-off socket.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Paths that uninstall removes.
#[derive(Clone, Debug)]
pub struct Target {
    pub pin_path: PathBuf,
    pub handoff_socket: PathBuf,
    /// Enrolment state directory, when enrolment is configured.
    pub state_dir: Option<PathBuf>,
    /// CNI plugin socket, when enrolment is configured.
    pub cni_socket: Option<PathBuf>,
}

impl Target {
    pub fn from_config(config: &Config) -> Self {
        let interception = &config.interception;
        Self {
            pin_path: interception.pin_path.clone(),
            handoff_socket: interception.handoff.socket_path(&interception.pin_path),
            state_dir: config
                .enrollment
                .as_ref()
                .map(|enrollment| enrollment.state_dir.clone()),
            cni_socket: config
                .enrollment
                .as_ref()
                .map(|enrollment| enrollment.socket.clone()),
        }
    }

    /// Targets the pins at `pin_path` and the default hand-off socket of
    /// those pins; state configured elsewhere is left alone.
    pub fn from_pin_path(pin_path: &Path) -> Self {
        Self {
            pin_path: pin_path.to_owned(),
            handoff_socket: HandoffConfig::default().socket_path(pin_path),
            state_dir: None,
            cni_socket: None,
        }
    }
}

/// Summary of the removed pins and files.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub pins: RemovedPins,
    /// Files and directories outside bpffs that were removed.
    pub files: Vec<PathBuf>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty() && self.files.is_empty()
    }
}

/// Errors of `tokengate uninstall`.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("agent pid {pid} is running on {socket}; stop it first, or pass --force to remove its pins anyway (its protected ports then reach the pods' own sockets)")]
    AgentRunning { pid: u32, socket: PathBuf },
    #[error(
        "failed to ask whether an agent runs on {socket}; pass --force to uninstall regardless"
    )]
    Ping {
        socket: PathBuf,
        #[source]
        source: HandoffError,
    },
    #[error("failed to remove the pins under {pin_path}")]
    Pins {
        pin_path: PathBuf,
        // Boxed: `BpfError` is large and would make every result large.
        #[source]
        source: Box<BpfError>,
    },
    #[error("failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Removes what `target` names. Running it twice is safe: the second run
/// finds nothing and reports an empty [`Report`].
pub fn uninstall(target: &Target, force: bool) -> Result<Report, UninstallError> {
    match handoff::ping(&target.handoff_socket, PING_TIMEOUT) {
        Ok(Some(agent)) if !force => {
            return Err(UninstallError::AgentRunning {
                pid: agent.pid,
                socket: target.handoff_socket.clone(),
            })
        }
        Err(source) if !force => {
            return Err(UninstallError::Ping {
                socket: target.handoff_socket.clone(),
                source,
            })
        }
        Ok(_) | Err(_) => {}
    }

    let pins = remove_all(&target.pin_path).map_err(|source| UninstallError::Pins {
        pin_path: target.pin_path.clone(),
        source: Box::new(source),
    })?;

    let mut files = Vec::new();
    for socket in std::iter::once(&target.handoff_socket).chain(&target.cni_socket) {
        if remove_path(socket, false)? {
            files.push(socket.clone());
        }
    }
    if let Some(state_dir) = &target.state_dir {
        if remove_path(state_dir, true)? {
            files.push(state_dir.clone());
        }
    }
    Ok(Report { pins, files })
}

/// Removes a file, or a directory tree when `tree`; returns whether it
/// existed.
fn remove_path(path: &Path, tree: bool) -> Result<bool, UninstallError> {
    let result = if tree {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(UninstallError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_in(dir: &Path) -> Target {
        Target {
            pin_path: dir.join("pins-absent"),
            handoff_socket: dir.join("handoff.sock"),
            state_dir: Some(dir.join("state")),
            cni_socket: Some(dir.join("cni.sock")),
        }
    }

    #[test]
    fn removes_state_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let target = target_in(dir.path());
        std::fs::create_dir(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state/pod.json"), b"{}").unwrap();
        // A socket file with no listener, as a killed agent leaves it.
        drop(std::os::unix::net::UnixListener::bind(&target.handoff_socket).unwrap());

        let first = uninstall(&target, false).unwrap();
        let second = uninstall(&target, false).unwrap();

        assert_eq!(
            first.files,
            vec![dir.path().join("handoff.sock"), dir.path().join("state")]
        );
        assert!(second.is_empty());
    }

    #[test]
    fn refuses_while_agent_answers() {
        let dir = tempfile::tempdir().unwrap();
        let target = target_in(dir.path());
        let _server = crate::handoff::HandoffServer::start(
            &target.handoff_socket,
            &target.pin_path,
            std::sync::Arc::default(),
            PING_TIMEOUT,
        )
        .unwrap();

        let error = uninstall(&target, false).unwrap_err();

        assert!(
            matches!(error, UninstallError::AgentRunning { .. }),
            "{error}"
        );
        assert!(target.handoff_socket.exists());
    }
}
