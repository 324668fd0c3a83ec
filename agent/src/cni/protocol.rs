//! Messages between the `tokengate-cni` plugin and the agent: one JSON
//! request line and one JSON response line per Unix socket connection.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Maximum size of one message, in bytes. A GC request lists every pod
/// sandbox of the node; 1 MiB fits several thousand 64-character ids.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Maximum length of a namespace name (RFC 1123 label).
const MAX_NAMESPACE_LEN: usize = 63;

/// Maximum length of a pod name (RFC 1123 subdomain).
const MAX_POD_NAME_LEN: usize = 253;

/// The CNI operation the plugin forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// Enrol the pod if a selector matches. The response comes once its
    /// protected ports are steered.
    Add,
    /// Release the pod's listeners, map entries, link, pins and state file.
    Del,
    /// Report an error if the pod should be enrolled and is not.
    Check,
    /// Release every pod whose container id is not in `valid_container_ids`.
    Gc,
    /// Report whether the agent takes requests.
    Status,
}

/// The pod as the runtime names it in `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`; older runtimes do not send it.
    #[serde(default)]
    pub uid: Option<String>,
}

impl PodRef {
    /// Returns whether the names have the form Kubernetes allows, so that
    /// they are safe in an API URL path.
    pub fn is_valid(&self) -> bool {
        let namespace_valid = !self.namespace.is_empty()
            && self.namespace.len() <= MAX_NAMESPACE_LEN
            && self
                .namespace
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
        let name_valid = !self.name.is_empty()
            && self.name.len() <= MAX_POD_NAME_LEN
            && !self.name.starts_with('.')
            && self.name.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
            });
        namespace_valid && name_valid
    }
}

/// A request from the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRequest {
    pub operation: Operation,
    /// `CNI_CONTAINERID`; empty for STATUS and GC.
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come without one.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// Pod of ADD, DEL and CHECK.
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// Container ids of the attachments the runtime still has (GC only).
    #[serde(default)]
    pub valid_container_ids: Vec<String>,
}

/// Result of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The pod is protected: its ports are steered into the agent.
    Enrolled,
    /// No selector matched; the pod is left alone.
    NotSelected,
    /// The request is done and changed nothing that the caller must know.
    Done,
    /// The request failed, and `message` contains the reason.
    Failed,
}

/// The agent's response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentResponse {
    pub outcome: Outcome,
    /// Workload name of an enrolled pod.
    #[serde(default)]
    pub workload: Option<String>,
    /// Selector that matched.
    #[serde(default)]
    pub selector: Option<String>,
    /// Error text for [`Outcome::Failed`], a note otherwise.
    #[serde(default)]
    pub message: String,
}

impl AgentResponse {
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed,
            workload: None,
            selector: None,
            message: message.into(),
        }
    }

    pub fn done(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Done,
            workload: None,
            selector: None,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_as_one_line() {
        let request = AgentRequest {
            operation: Operation::Add,
            container_id: "abc".to_owned(),
            netns: Some(PathBuf::from("/var/run/netns/cni-1")),
            ifname: "eth0".to_owned(),
            pod: Some(PodRef {
                namespace: "shop".to_owned(),
                name: "orders-1".to_owned(),
                uid: None,
            }),
            valid_container_ids: Vec::new(),
        };

        let line = serde_json::to_string(&request).unwrap();

        assert!(!line.contains('\n'));
        assert!(line.contains("\"operation\":\"ADD\""), "{line}");
        assert_eq!(
            serde_json::from_str::<AgentRequest>(&line).unwrap(),
            request
        );
    }

    #[test]
    fn pod_ref_rejects_names_unsafe_in_urls() {
        let valid = PodRef {
            namespace: "shop".to_owned(),
            name: "orders-1.v2".to_owned(),
            uid: None,
        };
        assert!(valid.is_valid());

        for (namespace, name) in [
            ("shop", "../x"),
            ("shop", "a/b"),
            ("Shop", "a"),
            ("", "a"),
            ("shop", "a?b"),
        ] {
            let pod = PodRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: None,
            };
            assert!(!pod.is_valid(), "accepted {namespace}/{name}");
        }
    }
}
