//! Agent configuration for pods of a test node, with the same issuer,
//! token locations and rules as the standard testbed.

use crate::agent::{AgentConfig, HeaderSpec, IssuerSpec, RuleSpec, WorkloadSpec};
use crate::issuer::{Issuer, ISSUER};
use crate::testbed::{ALGORITHMS, AUDIENCE, ORDERS_ROLE, REPORTS_SCOPE, TOKEN_COOKIE};

use super::Pod;

/// Drain time of agents on a test node, in seconds: short, so a stop does
/// not wait the agent's production default.
const DRAIN_SECONDS: u64 = 5;

/// Builds a workload named `name` that protects `ports` of `pod`. The token
/// is read from `Authorization: Bearer` or the [`TOKEN_COOKIE`] cookie.
/// `/orders` (GET, POST) needs [`ORDERS_ROLE`], `/reports` (GET) needs
/// [`REPORTS_SCOPE`], and everything else is denied.
pub fn pod_workload(pod: &Pod, name: &str, ports: &[u16]) -> WorkloadSpec {
    WorkloadSpec {
        name: name.to_owned(),
        netns: pod.netns_path(),
        ports: ports.to_vec(),
        from_headers: vec![HeaderSpec {
            name: "Authorization".to_owned(),
            value_prefix: "Bearer ".to_owned(),
        }],
        from_cookies: vec![TOKEN_COOKIE.to_owned()],
        rules: vec![
            RuleSpec {
                path_prefix: "/orders".to_owned(),
                methods: vec!["GET".to_owned(), "POST".to_owned()],
                roles: vec![ORDERS_ROLE.to_owned()],
                ..RuleSpec::default()
            },
            RuleSpec {
                path_prefix: "/reports".to_owned(),
                methods: vec!["GET".to_owned()],
                scopes: vec![REPORTS_SCOPE.to_owned()],
                ..RuleSpec::default()
            },
        ],
    }
}

/// Builds an agent config with `issuer` (audience [`AUDIENCE`]) and
/// `workloads`, with loopback callers exempt as in the agent's default.
pub fn node_agent_config(issuer: &Issuer, workloads: Vec<WorkloadSpec>) -> AgentConfig {
    AgentConfig {
        issuers: vec![IssuerSpec {
            issuer: ISSUER.to_owned(),
            jwks_uri: issuer.jwks_uri(),
            audiences: vec![AUDIENCE.to_owned()],
            algorithms: ALGORITHMS.iter().map(|alg| (*alg).to_owned()).collect(),
            unknown_kid_refetch_seconds: None,
            jwks_refresh_seconds: None,
        }],
        workloads,
        loopback_exempt: true,
        drain_seconds: DRAIN_SECONDS,
    }
}
