//! The Unix socket on which the CNI plugin reaches the agent: one request
//! line and one response line per connection, from peers with the agent's
//! own user id only.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::kube::KubeClient;
use super::{NamespaceFilter, PodRequest};
use crate::cni::protocol::{AgentRequest, AgentResponse, Operation, Outcome, MAX_MESSAGE_BYTES};

/// Mode of the socket: only the agent's user (root) may enrol or release
/// pods.
const SOCKET_MODE: u32 = 0o600;

/// Mode of a socket directory that the agent creates.
const SOCKET_DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to create the socket directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} exists and is not a socket; remove it or set enrollment.socket to another path"
    )]
    NotASocket { path: PathBuf },
    #[error("failed to remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to set mode 0600 on {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates the socket at `path` with mode 0600, replacing a stale socket
/// that a previous agent left.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(SOCKET_DIR_MODE)
            .create(parent)
            .map_err(|source| ServerError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(_) => {}
    }

    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // The directory is 0700 when the agent made it, so no one else could
    // connect in the moment before this.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
        |source| ServerError::Chmod {
            path: path.to_owned(),
            source,
        },
    )?;
    Ok(listener)
}

/// Accepts plugin connections on `listener` until the task is aborted,
/// serving each on its own task. Only peers with user id `owner_uid`, the
/// owner of the socket file and so the agent's own, are served. `requests`
/// leads to the agent's main task, which enrols and releases pods.
pub async fn serve(
    listener: UnixListener,
    owner_uid: u32,
    kube: KubeClient,
    namespaces: watch::Receiver<NamespaceFilter>,
    requests: mpsc::Sender<PodRequest>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "failed to accept a CNI plugin connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(credentials) if credentials.uid() == owner_uid => {}
            Ok(credentials) => {
                tracing::warn!(
                    peer.uid = credentials.uid(),
                    "CNI socket connection from another user rejected"
                );
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "failed to read the CNI peer's credentials, connection rejected");
                continue;
            }
        }
        tokio::spawn(handle(
            stream,
            kube.clone(),
            namespaces.clone(),
            requests.clone(),
        ));
    }
}

async fn handle(
    stream: UnixStream,
    kube: KubeClient,
    namespaces: watch::Receiver<NamespaceFilter>,
    requests: mpsc::Sender<PodRequest>,
) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let limit = u64::try_from(MAX_MESSAGE_BYTES).unwrap_or(u64::MAX);
    let response = match BufReader::new(reader.take(limit))
        .read_line(&mut line)
        .await
    {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<AgentRequest>(&line) {
            Ok(request) => respond(request, &kube, &namespaces, &requests).await,
            Err(error) => AgentResponse::failed(format!("invalid request: {error}")),
        },
        Err(error) => AgentResponse::failed(format!("failed to read the request: {error}")),
    };

    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    if let Err(error) = writer.write_all(text.as_bytes()).await {
        // The plugin timed out or was killed; the runtime retries.
        tracing::warn!(%error, outcome = ?response.outcome, "failed to send the response to the CNI plugin");
    }
}

/// Looks the pod up (ADD, CHECK), hands the request to the agent and
/// returns its response.
async fn respond(
    request: AgentRequest,
    kube: &KubeClient,
    namespaces: &watch::Receiver<NamespaceFilter>,
    requests: &mpsc::Sender<PodRequest>,
) -> AgentResponse {
    if request.operation == Operation::Status {
        return AgentResponse::done("agent running");
    }

    let mut pod = None;
    if matches!(request.operation, Operation::Add | Operation::Check) {
        let Some(reference) = request.pod.as_ref().filter(|pod| pod.is_valid()) else {
            return AgentResponse::failed("request without a valid pod namespace and name");
        };
        let selectable = namespaces
            .borrow()
            .as_ref()
            .is_none_or(|selectable| selectable.contains(&reference.namespace));
        if !selectable {
            tracing::debug!(pod.namespace = %reference.namespace, pod.name = %reference.name, "no selector lists the pod's namespace, not enrolled");
            return AgentResponse {
                outcome: Outcome::NotSelected,
                workload: None,
                selector: None,
                message: format!("no selector lists namespace {}", reference.namespace),
            };
        }
        let found = match kube.get_pod(&reference.namespace, &reference.name).await {
            Ok(found) => found,
            Err(error) => {
                let message = crate::error_chain(&error);
                tracing::warn!(pod.namespace = %reference.namespace, pod.name = %reference.name, error = %message, "pod lookup failed");
                return AgentResponse::failed(message);
            }
        };
        // A pod deleted and created again under the same name has a new
        // uid; the runtime's request belongs to one of them only.
        if let Some(uid) = &reference.uid {
            if *uid != found.metadata.uid {
                return AgentResponse::failed(format!(
                    "pod {}/{} has uid {} in the API, the runtime sent {uid}",
                    reference.namespace, reference.name, found.metadata.uid
                ));
            }
        }
        pod = Some(found);
    }

    let (reply, answer) = oneshot::channel();
    let operation = request.operation;
    if requests
        .send(PodRequest {
            request,
            pod,
            reply,
        })
        .await
        .is_err()
    {
        return AgentResponse::failed("agent is shutting down");
    }
    answer.await.unwrap_or_else(|_| {
        AgentResponse::failed(format!("agent dropped the {operation:?} request"))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[tokio::test]
    async fn bind_creates_private_socket_and_replaces_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("cni.sock");

        let first = bind(&path).unwrap();
        drop(first);
        let second = bind(&path).unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        let parent_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(parent_mode & 0o777, SOCKET_DIR_MODE);
        drop(second);
    }

    #[tokio::test]
    async fn bind_keeps_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        std::fs::write(&path, b"data").unwrap();

        let result = bind(&path);

        assert!(matches!(result, Err(ServerError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
