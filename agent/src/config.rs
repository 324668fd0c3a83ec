//! Configuration file schema, defaults and validation.
//!
//! Owns the YAML format and its checks; it does not open sockets or fetch
//! keys. Unknown fields are rejected so that a misspelt option fails at load
//! time instead of silently doing nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

/// Admin listener address. Port 15021 is where Istio's sidecars and ztunnel
/// serve health checks, so operators find it where they expect.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);

/// Root of the agent's pins in bpffs.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/tokengate";

/// Source address of the agent's own connections to a pod's service. It is a
/// loopback address of the pod itself, which no caller from outside the pod
/// can use; Istio uses the same address for its inbound passthrough.
pub const DEFAULT_RESERVED_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// IPv6 counterpart of [`DEFAULT_RESERVED_SOURCE_V4`]: the pod's `::1`,
/// because IPv6 has one loopback address.
pub const DEFAULT_RESERVED_SOURCE_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds. Envoy's
/// `clock_skew_seconds` defaults to 60 as well.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// Period of the background JWKS refresh, in seconds. Envoy caches a JWKS for
/// 10 minutes; 5 minutes halves the time a rotated key goes unnoticed.
pub const DEFAULT_JWKS_REFRESH_SECONDS: u64 = 300;

/// Minimum time between two refetches caused by an unknown `kid`, in
/// seconds, so a flood of random `kid`s cannot become a flood on the issuer.
pub const DEFAULT_UNKNOWN_KID_REFETCH_SECONDS: u64 = 30;

/// Timeout of one JWKS fetch, in seconds.
pub const DEFAULT_JWKS_TIMEOUT_SECONDS: u64 = 5;

/// Time given to in-flight requests after SIGTERM or SIGINT, in seconds.
/// Kubernetes waits 30 seconds before SIGKILL by default.
pub const DEFAULT_DRAIN_SECONDS: u64 = 20;

/// Name of the claim that holds roles when a rule lists `roles`. Keycloak's
/// `realm_access.roles` is reachable with a dotted path.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub interception: InterceptionConfig,
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
    pub issuers: Vec<IssuerConfig>,
    pub workloads: Vec<WorkloadConfig>,
}

/// The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: DEFAULT_ADMIN_LISTEN }
    }
}

/// Where audit events go: one JSON object per line.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Append to this file; standard output when absent.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// eBPF steering settings shared by every workload.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptionConfig {
    /// Directory in bpffs that holds the agent's pinned links and maps.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Source address of the agent's own IPv4 upstream connections.
    #[serde(default = "default_reserved_source_v4")]
    pub reserved_source_v4: Ipv4Addr,
    /// Source address of the agent's own IPv6 upstream connections.
    #[serde(default = "default_reserved_source_v6")]
    pub reserved_source_v6: Ipv6Addr,
    /// Let connections from the pod's own loopback reach its service
    /// without a token. Such callers run inside the pod, the trust boundary
    /// tokengate protects, and health checks that exec into the pod use it.
    #[serde(default = "default_true")]
    pub loopback_exempt: bool,
}

impl Default for InterceptionConfig {
    fn default() -> Self {
        Self {
            pin_path: default_pin_path(),
            reserved_source_v4: DEFAULT_RESERVED_SOURCE_V4,
            reserved_source_v6: DEFAULT_RESERVED_SOURCE_V6,
            loopback_exempt: true,
        }
    }
}

/// One token issuer, as in Envoy's `JwtProvider` or Istio's `JWTRule`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Exact `iss` value of this issuer's tokens.
    pub issuer: String,
    /// HTTP or HTTPS URL of the issuer's JWKS.
    pub jwks_uri: String,
    /// Accepted `aud` values; a token must carry at least one. Empty means
    /// the audience is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted `alg` values, for example `RS256`, `ES256`, `EdDSA`.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_clock_skew_seconds")]
    pub clock_skew_seconds: u64,
    /// Period of the background JWKS refresh, in seconds.
    #[serde(default = "default_jwks_refresh_seconds")]
    pub jwks_refresh_seconds: u64,
    /// Minimum time between refetches caused by an unknown `kid`, in seconds.
    #[serde(default = "default_unknown_kid_refetch_seconds")]
    pub unknown_kid_refetch_seconds: u64,
    /// Timeout of one JWKS fetch, in seconds.
    #[serde(default = "default_jwks_timeout_seconds")]
    pub jwks_timeout_seconds: u64,
    /// Claim that holds the caller's roles (dotted path for nested objects).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

/// One protected pod: its network namespace, ports, token sources and rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Name used in audit events, metrics and logs.
    pub name: String,
    /// Network namespace of the pod: `/var/run/netns/NAME` or
    /// `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// TCP ports whose every new connection is steered into the agent.
    pub ports: Vec<u16>,
    /// Headers that carry the token; `Authorization` with the `Bearer`
    /// scheme when both this and `from_cookies` are empty.
    #[serde(default)]
    pub from_headers: Vec<HeaderSource>,
    /// Names of cookies that carry the token.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Ordered rules; the first rule whose path and method match decides.
    /// A request that no rule matches is denied.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// A request header that carries the token, as Envoy's `from_headers`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSource {
    /// Header name, matched case-insensitively.
    pub name: String,
    /// Text before the token, for example `"Bearer "`; matched
    /// case-insensitively because RFC 9110 §11.1 makes schemes so.
    #[serde(default)]
    pub value_prefix: String,
}

/// One authorization rule: which requests it matches and what it requires.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Matches when the normalised request path starts with this prefix at a
    /// segment boundary (`/orders` matches `/orders` and `/orders/7`, not
    /// `/ordersX`).
    pub path_prefix: String,
    /// Matching methods; any method when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Claim path to accepted values; each listed claim must equal one of
    /// its values (for an array claim, contain one of them).
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
    /// The caller must hold at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The caller must hold every one of these scopes (`scope` or `scp`).
    #[serde(default)]
    pub scopes: Vec<String>,
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
}
fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}
fn default_reserved_source_v4() -> Ipv4Addr {
    DEFAULT_RESERVED_SOURCE_V4
}
fn default_reserved_source_v6() -> Ipv6Addr {
    DEFAULT_RESERVED_SOURCE_V6
}
fn default_true() -> bool {
    true
}
fn default_drain_seconds() -> u64 {
    DEFAULT_DRAIN_SECONDS
}
fn default_clock_skew_seconds() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}
fn default_jwks_refresh_seconds() -> u64 {
    DEFAULT_JWKS_REFRESH_SECONDS
}
fn default_unknown_kid_refetch_seconds() -> u64 {
    DEFAULT_UNKNOWN_KID_REFETCH_SECONDS
}
fn default_jwks_timeout_seconds() -> u64 {
    DEFAULT_JWKS_TIMEOUT_SECONDS
}
fn default_roles_claim() -> String {
    DEFAULT_ROLES_CLAIM.to_owned()
}
