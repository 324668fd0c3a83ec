//! The part of the agent config that a test chooses, rendered as YAML with
//! the field names of the agent's `config::Config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// One issuer entry of the agent config.
#[derive(Clone, Debug)]
pub struct IssuerSpec {
    pub issuer: String,
    pub jwks_uri: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    /// `unknown_kid_refetch_seconds`; the agent's default when `None`.
    pub unknown_kid_refetch_seconds: Option<u64>,
    /// `jwks_refresh_seconds`; the agent's default when `None`.
    pub jwks_refresh_seconds: Option<u64>,
}

/// One header that carries the token.
#[derive(Clone, Debug)]
pub struct HeaderSpec {
    pub name: String,
    pub value_prefix: String,
}

/// One rule of a workload.
#[derive(Clone, Debug, Default)]
pub struct RuleSpec {
    pub path_prefix: String,
    pub methods: Vec<String>,
    pub claims: BTreeMap<String, Vec<String>>,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
}

/// One protected workload.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub netns: PathBuf,
    pub ports: Vec<u16>,
    pub from_headers: Vec<HeaderSpec>,
    pub from_cookies: Vec<String>,
    pub rules: Vec<RuleSpec>,
}

/// The parts of the agent config a test chooses; the runner fills in the
/// admin address, the audit file and the pin path.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub issuers: Vec<IssuerSpec>,
    pub workloads: Vec<WorkloadSpec>,
    pub loopback_exempt: bool,
    pub drain_seconds: u64,
}

impl AgentConfig {
    /// Renders the config file. Keys are the field names of the agent's
    /// `config::Config`.
    pub fn to_yaml(&self, audit_file: &Path, pin_path: &Path) -> Result<String> {
        let config = self.to_value(audit_file, pin_path);
        serde_yaml::to_string(&config).context("failed to render the agent config")
    }

    /// Builds the config as a JSON value with the field names of the
    /// agent's `config::Config`, for a test to add fields that this struct
    /// does not model before it is rendered.
    pub fn to_value(&self, audit_file: &Path, pin_path: &Path) -> Value {
        let issuers: Vec<Value> = self
            .issuers
            .iter()
            .map(|issuer| {
                let mut entry = json!({
                    "issuer": issuer.issuer,
                    "jwks_uri": issuer.jwks_uri,
                    "audiences": issuer.audiences,
                    "algorithms": issuer.algorithms,
                });
                if let Some(seconds) = issuer.unknown_kid_refetch_seconds {
                    entry["unknown_kid_refetch_seconds"] = json!(seconds);
                }
                if let Some(seconds) = issuer.jwks_refresh_seconds {
                    entry["jwks_refresh_seconds"] = json!(seconds);
                }
                entry
            })
            .collect();
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|workload| {
                json!({
                    "name": workload.name,
                    "netns": workload.netns,
                    "ports": workload.ports,
                    "from_headers": workload.from_headers.iter().map(|header| json!({
                        "name": header.name,
                        "value_prefix": header.value_prefix,
                    })).collect::<Vec<_>>(),
                    "from_cookies": workload.from_cookies,
                    "rules": workload.rules.iter().map(|rule| json!({
                        "path_prefix": rule.path_prefix,
                        "methods": rule.methods,
                        "claims": rule.claims,
                        "roles": rule.roles,
                        "scopes": rule.scopes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let config = json!({
            "admin": { "listen": "127.0.0.1:0" },
            "audit": { "file": audit_file },
            "interception": {
                "pin_path": pin_path,
                "loopback_exempt": self.loopback_exempt,
            },
            "drain_seconds": self.drain_seconds,
            "issuers": issuers,
            "workloads": workloads,
        });
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_renders_agent_field_names() {
        let config = AgentConfig {
            issuers: vec![IssuerSpec {
                issuer: "https://issuer.test".to_owned(),
                jwks_uri: "http://127.0.0.1:1/jwks.json".to_owned(),
                audiences: vec!["orders".to_owned()],
                algorithms: vec!["RS256".to_owned()],
                unknown_kid_refetch_seconds: Some(1),
                jwks_refresh_seconds: None,
            }],
            workloads: vec![WorkloadSpec {
                name: "orders".to_owned(),
                netns: PathBuf::from("/var/run/netns/x"),
                ports: vec![8080],
                from_headers: vec![HeaderSpec {
                    name: "Authorization".to_owned(),
                    value_prefix: "Bearer ".to_owned(),
                }],
                from_cookies: vec!["tg_token".to_owned()],
                rules: vec![RuleSpec {
                    path_prefix: "/orders".to_owned(),
                    methods: vec!["GET".to_owned()],
                    roles: vec!["orders.read".to_owned()],
                    ..RuleSpec::default()
                }],
            }],
            loopback_exempt: false,
            drain_seconds: 3,
        };

        let yaml = config
            .to_yaml(Path::new("/tmp/a.log"), Path::new("/sys/fs/bpf/t"))
            .expect("yaml");
        let parsed: Value = serde_yaml::from_str(&yaml).expect("parse back");

        assert_eq!(parsed["admin"]["listen"], "127.0.0.1:0");
        assert_eq!(parsed["interception"]["loopback_exempt"], false);
        assert_eq!(parsed["issuers"][0]["unknown_kid_refetch_seconds"], 1);
        assert!(parsed["issuers"][0].get("jwks_refresh_seconds").is_none());
        assert_eq!(
            parsed["workloads"][0]["from_headers"][0]["value_prefix"],
            "Bearer "
        );
        assert_eq!(
            parsed["workloads"][0]["rules"][0]["roles"][0],
            "orders.read"
        );
    }
}
