//! The parts of a Kubernetes Pod object that enrolment reads: labels,
//! annotations, uid and the containers' probes, and the workload name
//! derived from the pod's namespace and name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::config::RuleConfig;
use crate::policy::normalize_path;

/// Maximum length of a pod's workload name: the limit of a Kubernetes
/// object name, which workload names share.
const MAX_WORKLOAD_NAME_LEN: usize = 253;

/// Hex characters of the SHA-256 suffix that keeps a shortened workload
/// name unique.
const NAME_HASH_HEX: usize = 16;

/// Methods a probe route is open to: the kubelet sends GET, and HEAD
/// returns the same status without a body.
pub const PROBE_METHODS: [&str; 2] = ["GET", "HEAD"];

/// A Pod as the API server returns it, reduced to the fields used here.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: PodMetadata,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodMetadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub startup_probe: Option<Probe>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub http_get: Option<HttpGetAction>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpGetAction {
    #[serde(default)]
    pub path: Option<String>,
    /// A number, or the name of one of the container's ports.
    pub port: PortRef,
    /// `HTTP` (the default) or `HTTPS`.
    #[serde(default)]
    pub scheme: Option<String>,
}

/// A port given by number or by name (Kubernetes `IntOrString`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl Default for PortRef {
    fn default() -> Self {
        Self::Number(0)
    }
}

/// An `httpGet` probe on a protected port: the normalised path it requests.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct ProbeRoute {
    pub port: u16,
    pub path: String,
}

impl Pod {
    /// Returns the `httpGet` probes of every container that target one of
    /// `protected` ports over plain HTTP, one entry per port and path.
    /// Probes that name an unknown port, use HTTPS (the agent serves plain
    /// HTTP on a protected port) or request a path that no request could
    /// match after normalisation are left out and logged.
    ///
    /// NOTE: `tcpSocket` probes need no route, because the agent's listener
    /// accepts the connection. They report that the agent serves the port,
    /// not that the service does.
    pub fn probe_routes(&self, protected: &[u16]) -> Vec<ProbeRoute> {
        let mut routes = BTreeSet::new();
        for container in &self.spec.containers {
            let probes = [
                &container.liveness_probe,
                &container.readiness_probe,
                &container.startup_probe,
            ];
            for action in probes
                .into_iter()
                .flatten()
                .filter_map(|probe| probe.http_get.as_ref())
            {
                let Some(port) = container.resolve_port(&action.port) else {
                    tracing::warn!(pod = %self.metadata.name, container = %container.name, port = ?action.port, "probe names no port of its container, left protected");
                    continue;
                };
                if !protected.contains(&port) {
                    continue;
                }
                if action
                    .scheme
                    .as_deref()
                    .is_some_and(|scheme| !scheme.eq_ignore_ascii_case("HTTP"))
                {
                    tracing::warn!(pod = %self.metadata.name, container = %container.name, port, "HTTPS probe on a protected port, left protected");
                    continue;
                }
                let raw = action
                    .path
                    .as_deref()
                    .filter(|path| !path.is_empty())
                    .unwrap_or("/");
                let Some(path) = normalize_path(raw) else {
                    tracing::warn!(pod = %self.metadata.name, container = %container.name, path = raw, "probe path cannot match any request, left protected");
                    continue;
                };
                routes.insert(ProbeRoute { port, path });
            }
        }
        routes.into_iter().collect()
    }
}

impl Container {
    fn resolve_port(&self, port: &PortRef) -> Option<u16> {
        match port {
            PortRef::Number(0) => None,
            PortRef::Number(number) => Some(*number),
            PortRef::Name(name) => self
                .ports
                .iter()
                .find(|port| port.name.as_deref() == Some(name.as_str()))
                .map(|port| port.container_port),
        }
    }
}

/// Builds the public rules for `routes`: GET and HEAD on exactly each path.
/// NOTE: rules do not match on the port, so a probe path is open on every
/// protected port of the pod, not only on the probed one.
pub fn probe_rules(routes: &[ProbeRoute]) -> Vec<RuleConfig> {
    let paths: BTreeSet<&str> = routes.iter().map(|route| route.path.as_str()).collect();
    paths
        .into_iter()
        .map(|path| RuleConfig {
            path: Some(path.to_owned()),
            methods: PROBE_METHODS
                .iter()
                .map(|method| (*method).to_owned())
                .collect(),
            public: true,
            ..RuleConfig::default()
        })
        .collect()
}

/// Derives the workload name of a pod: `<namespace>_<name>` with each `.`
/// of the pod name as `_`. Namespace names have no `_` and pod names have
/// no `_`, so distinct pods get distinct names, which bpffs accepts as pin
/// directories. A name over the length limit is cut and ends in a hash of
/// the full name.
pub fn workload_name(namespace: &str, pod: &str) -> String {
    let full: String = format!("{namespace}_{pod}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if full.len() <= MAX_WORKLOAD_NAME_LEN {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes())
        .iter()
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        });
    let keep = MAX_WORKLOAD_NAME_LEN - NAME_HASH_HEX - 1;
    format!("{}-{}", &full[..keep], &digest[..NAME_HASH_HEX])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn probe_routes_resolve_named_ports() {
        let pod = pod(serde_json::json!({
            "metadata": {"name": "orders-1", "namespace": "shop"},
            "spec": {"containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"path": "/healthz?verbose=1", "port": "http"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}},
                "startupProbe": {"tcpSocket": {"port": 8080}}
            }]}
        }));

        let routes = pod.probe_routes(&[8080]);

        assert_eq!(
            routes,
            [
                ProbeRoute {
                    port: 8080,
                    path: "/healthz".to_owned()
                },
                ProbeRoute {
                    port: 8080,
                    path: "/ready".to_owned()
                },
            ]
        );
    }

    #[test]
    fn probe_routes_skip_unusable_probes() {
        let pod = pod(serde_json::json!({
            "spec": {"containers": [{
                "livenessProbe": {"httpGet": {"path": "/live", "port": 9090}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS"}},
                "startupProbe": {"httpGet": {"path": "/start", "port": "missing"}}
            }]}
        }));

        assert!(pod.probe_routes(&[8080]).is_empty());
    }

    #[test]
    fn probe_route_without_path_is_root() {
        let pod = pod(serde_json::json!({
            "spec": {"containers": [{"livenessProbe": {"httpGet": {"port": 8080}}}]}
        }));

        assert_eq!(pod.probe_routes(&[8080])[0].path, "/");
    }

    #[test]
    fn probe_rules_are_public_get_and_head() {
        let routes = [
            ProbeRoute {
                port: 8080,
                path: "/healthz".to_owned(),
            },
            ProbeRoute {
                port: 8443,
                path: "/healthz".to_owned(),
            },
        ];

        let rules = probe_rules(&routes);

        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].path.as_deref(), Some("/healthz"));
        assert_eq!(rules[0].methods, ["GET", "HEAD"]);
        assert!(rules[0].public);
    }

    #[test]
    fn workload_name_is_distinct_and_bounded() {
        assert_eq!(
            workload_name("shop", "orders-7d9f.v2"),
            "shop_orders-7d9f_v2"
        );
        assert_ne!(workload_name("a", "b.c"), workload_name("a", "b-c"));

        let long = "p".repeat(253);
        let name = workload_name("shop", &long);
        assert_eq!(name.len(), MAX_WORKLOAD_NAME_LEN);
        assert_ne!(name, workload_name("shop", &format!("{long}q")));
    }
}
