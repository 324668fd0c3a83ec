//! Schema of pod enrolment: the socket the `tokengate-cni` plugin reaches,
//! the Kubernetes API that describes each pod, and the selectors that
//! decide which pods are protected and how.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::rule::{ClaimHeader, CorsPreflight, ForwardMode, RuleConfig};
use super::{default_true, HeaderSource, WorkloadConfig};

/// Unix socket on which the agent takes requests from the CNI plugin. It is
/// under `/run`, a tmpfs, so a stale socket never outlives a reboot.
pub const DEFAULT_CNI_SOCKET: &str = "/run/tokengate/cni.sock";

/// Directory with one JSON file per enrolled pod. It must survive an agent
/// restart but not a node reboot (every pod gets a new sandbox then), so it
/// is under `/run` too.
pub const DEFAULT_STATE_DIR: &str = "/run/tokengate/pods";

/// Service-account token that a pod's process finds at this path (mounted
/// by the kubelet).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// CA bundle of the API server, mounted beside the token.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Timeout of one pod lookup in the Kubernetes API, in seconds. A CNI ADD
/// waits for it, and 5 s is well inside the runtime's own CNI timeout.
pub const DEFAULT_API_TIMEOUT_SECONDS: u64 = 5;

/// Period of the check for enrolled pods whose network namespace is gone
/// (the runtime never sent DEL), in seconds. A leftover pod only keeps a
/// listener and a few map entries, so a minute is soon enough.
pub const DEFAULT_SWEEP_SECONDS: u64 = 60;

/// Annotation by which a pod opts in to a selector with
/// `require_annotation: true`; its value must be `"true"`.
pub const PROTECT_ANNOTATION: &str = "tokengate.io/protect";

/// Pod enrolment through the `tokengate-cni` plugin.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// Unix socket the agent creates (mode 0600) for the CNI plugin.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
    /// Directory of the per-pod state files that a restarted agent adopts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Period of the check for pods whose network namespace is gone, in
    /// seconds.
    #[serde(default = "default_sweep_seconds")]
    pub sweep_seconds: u64,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Tried in order; the first selector that matches a pod decides how it
    /// is protected. A pod that none matches is left alone.
    pub selectors: Vec<SelectorConfig>,
}

/// Access to the Kubernetes API, which returns each pod's labels,
/// annotations and probes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Base URL such as `https://10.96.0.1:443`. When absent, it is built
    /// from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`, which
    /// the kubelet sets in every pod.
    #[serde(default)]
    pub api_server: Option<String>,
    /// File with the bearer token, read again for every request because
    /// bound service-account tokens rotate.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// PEM bundle that verifies the API server's certificate (HTTPS only).
    #[serde(default = "default_ca_file")]
    pub ca_file: PathBuf,
    /// Timeout of one pod lookup, in seconds.
    #[serde(default = "default_api_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_server: None,
            token_file: default_token_file(),
            ca_file: default_ca_file(),
            timeout_seconds: DEFAULT_API_TIMEOUT_SECONDS,
        }
    }
}

impl KubernetesConfig {
    /// Returns `api_server`, or the in-cluster address from `host` and
    /// `port` (the values of `KUBERNETES_SERVICE_HOST` and `_PORT`).
    pub fn api_server_url(&self, host: Option<&str>, port: Option<&str>) -> Option<String> {
        if let Some(url) = &self.api_server {
            return Some(url.trim_end_matches('/').to_owned());
        }
        let host = host.filter(|host| !host.is_empty())?;
        let port = port.filter(|port| !port.is_empty()).unwrap_or("443");
        // An IPv6 address needs brackets in a URL (RFC 3986 §3.2.2).
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(address)) => format!("[{address}]"),
            _ => host.to_owned(),
        };
        Some(format!("https://{host}:{port}"))
    }
}

/// A pod selector and the workload settings of the pods it matches. The
/// conditions combine with AND, so a selector without any matches every pod
/// that the plugin reports.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    /// Name in logs and state files. A pod keeps the selector it was
    /// enrolled by: a reload applies that selector's new settings, and a
    /// removed selector releases its pods.
    pub name: String,
    /// Kubernetes namespaces whose pods match; any namespace when empty.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Labels that a pod must all carry with these values, as Istio's
    /// `selector.matchLabels`.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// The pod must also carry the annotation `tokengate.io/protect: "true"`.
    #[serde(default)]
    pub require_annotation: bool,
    /// Open `httpGet` liveness, readiness and startup probes on protected
    /// ports to GET and HEAD without a token, on exactly the probe paths.
    #[serde(default = "default_true")]
    pub allow_probes: bool,
    /// The fields below are those of a workload, without `name` and `netns`.
    pub ports: Vec<u16>,
    #[serde(default)]
    pub from_headers: Vec<HeaderSource>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub forward: ForwardMode,
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimHeader>,
    #[serde(default)]
    pub cors_preflight: CorsPreflight,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

impl SelectorConfig {
    /// Builds the workload of one pod from this template: its name, its
    /// network namespace, and `extra_rules` placed before the template's
    /// rules so that they decide first.
    pub fn workload(
        &self,
        name: String,
        netns: PathBuf,
        extra_rules: Vec<RuleConfig>,
    ) -> WorkloadConfig {
        let mut rules = extra_rules;
        rules.extend(self.rules.iter().cloned());
        WorkloadConfig {
            name,
            netns,
            ports: self.ports.clone(),
            from_headers: self.from_headers.clone(),
            from_cookies: self.from_cookies.clone(),
            forward: self.forward,
            claim_to_headers: self.claim_to_headers.clone(),
            cors_preflight: self.cors_preflight,
            rules,
        }
    }
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CNI_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_sweep_seconds() -> u64 {
    DEFAULT_SWEEP_SECONDS
}
fn default_token_file() -> PathBuf {
    PathBuf::from(DEFAULT_TOKEN_FILE)
}
fn default_ca_file() -> PathBuf {
    PathBuf::from(DEFAULT_CA_FILE)
}
fn default_api_timeout_seconds() -> u64 {
    DEFAULT_API_TIMEOUT_SECONDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_from_environment() {
        let config = KubernetesConfig::default();

        assert_eq!(
            config.api_server_url(Some("10.96.0.1"), Some("6443")),
            Some("https://10.96.0.1:6443".to_owned())
        );
        assert_eq!(
            config.api_server_url(Some("fd00::1"), None),
            Some("https://[fd00::1]:443".to_owned())
        );
        assert_eq!(config.api_server_url(None, Some("443")), None);
    }

    #[test]
    fn api_server_from_config_wins() {
        let config = KubernetesConfig {
            api_server: Some("http://127.0.0.1:8001/".to_owned()),
            ..KubernetesConfig::default()
        };

        assert_eq!(
            config.api_server_url(Some("10.96.0.1"), Some("443")),
            Some("http://127.0.0.1:8001".to_owned())
        );
    }

    #[test]
    fn workload_puts_extra_rules_first() {
        let selector: SelectorConfig =
            serde_yaml::from_str("name: shop\nports: [8080]\nrules:\n  - path_prefix: /orders\n")
                .unwrap();
        let probe = RuleConfig {
            path: Some("/healthz".to_owned()),
            public: true,
            ..RuleConfig::default()
        };

        let workload = selector.workload(
            "shop_orders".to_owned(),
            "/proc/1/ns/net".into(),
            vec![probe],
        );

        assert_eq!(workload.name, "shop_orders");
        assert_eq!(workload.ports, vec![8080]);
        assert_eq!(workload.rules.len(), 2);
        assert_eq!(workload.rules[0].path.as_deref(), Some("/healthz"));
        assert_eq!(workload.rules[1].path_prefix.as_deref(), Some("/orders"));
    }
}
