//! Configuration file schema, defaults and validation.
//!
//! Owns the YAML format and its checks; it does not open sockets or fetch
//! keys. Unknown fields are rejected so that a misspelt option fails at load
//! time instead of silently doing nothing.

mod egress;
mod enrollment;
mod error;
mod handoff;
mod locate;
mod path;
mod rule;
mod summary;
mod validate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use egress::{Cidr, EgressConfig, EgressDestination, EgressPodConfig, DEFAULT_EGRESS_MARK};
pub use enrollment::{
    EnrollmentConfig, KubernetesConfig, SelectorConfig, DEFAULT_CNI_SOCKET, DEFAULT_STATE_DIR,
    PROTECT_ANNOTATION,
};
pub use error::{ConfigError, Problem};
pub use handoff::{HandoffConfig, DEFAULT_HANDOFF_DIR, DEFAULT_HANDOFF_TIMEOUT_SECONDS};
pub use rule::{
    ClaimHeader, ClaimRequirement, CorsPreflight, ForwardMode, Requirement, RuleConfig,
    SegmentClaim,
};
pub(crate) use summary::redact_url;

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

/// The sockmap fast path on the agent's hop to the service is off unless
/// requested. It saves only the loopback TCP/IP stack traversal of one hop,
/// while a redirect bug in the kernel would break connections that the
/// stack carries correctly.
pub const DEFAULT_SOCKMAP: bool = false;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds. Envoy's
/// `clock_skew_seconds` defaults to 60 as well.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// Period of the background JWKS refresh, in seconds. Envoy caches a JWKS for
/// 10 minutes; 5 minutes halves the time a rotated key goes unnoticed.
pub const DEFAULT_JWKS_REFRESH_SECONDS: u64 = 300;

/// Lower bound on the lifetime taken from `Cache-Control: max-age`, in
/// seconds. An issuer that sends `max-age=0` would otherwise be fetched
/// without pause; one minute keeps each agent at one request per minute.
pub const DEFAULT_JWKS_MIN_REFRESH_SECONDS: u64 = 60;

/// Upper bound on the lifetime taken from `Cache-Control: max-age`, in
/// seconds. A `max-age` of a day would leave a newly published key unseen
/// that long, except through unknown-`kid` refetches; one hour bounds it.
pub const DEFAULT_JWKS_MAX_REFRESH_SECONDS: u64 = 3600;

/// How long past its lifetime a key set stays in use while the issuer is
/// down, slow or returning invalid responses, in seconds. One day rides out
/// an outage over a night or a weekend day, and bounds how long a key the
/// issuer withdrew during the outage is still trusted.
pub const DEFAULT_JWKS_MAX_STALE_SECONDS: u64 = 86_400;

/// Maximum token size in bytes, unless the issuer sets its own
/// `max_token_bytes`. nginx rejects request header lines over 8 KiB by
/// default (`large_client_header_buffers 4 8k`), so tokens that work
/// behind common proxies stay below this.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;

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

/// Signature algorithms an issuer may list: the asymmetric JWS algorithms
/// of RFC 7518 §3.1 that jsonwebtoken verifies. `none` is left out on
/// purpose, see `validate::check_algorithms`; the HMAC algorithms are in
/// [`HMAC_ALGORITHMS`] because they need `hmac_secret_file`.
pub const ACCEPTED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// HMAC algorithms (RFC 7518 §3.2), accepted only from an issuer with
/// `hmac_secret_file`.
pub const HMAC_ALGORITHMS: [&str; 3] = ["HS256", "HS384", "HS512"];

/// Period of the revocation list refresh, in seconds: the longest a
/// forced logout waits to take effect. One small request per node every
/// 10 s is cheap for any static file server.
pub const DEFAULT_REVOCATION_REFRESH_SECONDS: u64 = 10;

/// Timeout of one revocation list request, in seconds. Shorter than the
/// refresh period, so a hanging server does not delay the next refresh.
pub const DEFAULT_REVOCATION_TIMEOUT_SECONDS: u64 = 5;

/// Maximum entries of the verified-token cache. With a claims set of about
/// 2 KiB per entry this caps the cache near 20 MiB, and it still fits every
/// live token of a node whose callers present 10 000 distinct tokens per
/// token lifetime.
pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 10_000;

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
    /// Static workloads; may be empty when `enrollment` selects pods.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Pods enrolled through the CNI plugin; off when absent.
    #[serde(default)]
    pub enrollment: Option<EnrollmentConfig>,
    /// Egress mode: pods whose outgoing calls are verified at the source;
    /// off when absent.
    #[serde(default)]
    pub egress: EgressConfig,
    #[serde(default)]
    pub revocation: RevocationConfig,
    #[serde(default)]
    pub cache: CacheConfig,
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
        Self {
            listen: DEFAULT_ADMIN_LISTEN,
        }
    }
}

/// Destination of audit events, written as one JSON object per line.
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
    /// Move the payload of the agent's connections to the service between
    /// the two sockets with `sk_msg` (sockmap), past the loopback TCP/IP
    /// stack. Needs Linux 5.15 and cgroup v2; without them the agent warns
    /// and forwards through the stack.
    #[serde(default = "default_sockmap")]
    pub sockmap: bool,
    /// Upgrade hand-off of the listening sockets to a new agent process.
    #[serde(default)]
    pub handoff: HandoffConfig,
}

impl Default for InterceptionConfig {
    fn default() -> Self {
        Self {
            pin_path: default_pin_path(),
            reserved_source_v4: DEFAULT_RESERVED_SOURCE_V4,
            reserved_source_v6: DEFAULT_RESERVED_SOURCE_V6,
            loopback_exempt: true,
            sockmap: DEFAULT_SOCKMAP,
            handoff: HandoffConfig::default(),
        }
    }
}

/// Sources of the revocation list. With both `file` and `url` the list in
/// force is the union of the two. With neither, nothing is revoked.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// Local JSON file, read again whenever its modification time, size or
    /// content changes.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// HTTP or HTTPS URL polled for the list.
    #[serde(default)]
    pub url: Option<String>,
    /// Period of the file check and of the URL poll, in seconds.
    #[serde(default = "default_revocation_refresh_seconds")]
    pub refresh_seconds: u64,
    /// Timeout of one request to `url`, in seconds.
    #[serde(default = "default_revocation_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            file: None,
            url: None,
            refresh_seconds: DEFAULT_REVOCATION_REFRESH_SECONDS,
            timeout_seconds: DEFAULT_REVOCATION_TIMEOUT_SECONDS,
        }
    }
}

/// The verified-token cache, which saves the signature check of a token
/// seen before.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Maximum number of cached tokens; the least recently used one (by the
    /// CLOCK approximation) is evicted beyond it.
    #[serde(default = "default_cache_max_entries")]
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: DEFAULT_CACHE_MAX_ENTRIES,
        }
    }
}

/// One token issuer, as in Envoy's `JwtProvider` or Istio's `JWTRule`.
///
/// Keys come from exactly one of `jwks_uri`, `discovery`/`discovery_uri`,
/// `jwks_file` and `jwks`. An issuer with `hmac_secret_file` may have none
/// of them when it only signs with HMAC.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Exact `iss` value of this issuer's tokens.
    pub issuer: String,
    /// HTTP or HTTPS URL of the issuer's JWKS.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Find the JWKS through OIDC discovery at
    /// `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery: bool,
    /// OIDC discovery document at another URL than the one derived from
    /// `issuer`; implies discovery.
    #[serde(default)]
    pub discovery_uri: Option<String>,
    /// Local JWKS file, read at start and again at every refresh.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS written into the configuration, as a YAML mapping or a JSON
    /// string. Kept as JSON; `jwks::KeySet` parses it.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// File whose whole content, byte for byte, is the HMAC secret shared
    /// with the issuer. Required for HS256/384/512 and never logged.
    #[serde(default)]
    pub hmac_secret_file: Option<PathBuf>,
    /// Accepted `aud` values; a token must carry at least one. Empty means
    /// the audience is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted `alg` values, for example `RS256`, `ES256`, `EdDSA`.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_clock_skew_seconds")]
    pub clock_skew_seconds: u64,
    /// Lifetime of a fetched key set when the response has no
    /// `Cache-Control: max-age`, and of a set read from `jwks_file`, in
    /// seconds. Used as written, because the operator chose it.
    #[serde(default = "default_jwks_refresh_seconds")]
    pub jwks_refresh_seconds: u64,
    /// Lower bound on the lifetime taken from `max-age`, in seconds.
    #[serde(default = "default_jwks_min_refresh_seconds")]
    pub jwks_min_refresh_seconds: u64,
    /// Upper bound on the lifetime taken from `max-age`, in seconds.
    #[serde(default = "default_jwks_max_refresh_seconds")]
    pub jwks_max_refresh_seconds: u64,
    /// How long past its lifetime a key set stays in use while refreshes
    /// fail, in seconds. After that its keys are dropped.
    #[serde(default = "default_jwks_max_stale_seconds")]
    pub jwks_max_stale_seconds: u64,
    /// Minimum time between refetches caused by an unknown `kid`, in seconds.
    #[serde(default = "default_unknown_kid_refetch_seconds")]
    pub unknown_kid_refetch_seconds: u64,
    /// Timeout of one JWKS fetch, in seconds.
    #[serde(default = "default_jwks_timeout_seconds")]
    pub jwks_timeout_seconds: u64,
    /// Claim that holds the caller's roles (dotted path for nested objects).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Reject tokens without `exp` (RFC 7519 §4.1.4).
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// When not empty, `sub` must start with one of these, for example
    /// `spiffe://cluster.local/ns/`.
    #[serde(default)]
    pub subject_prefixes: Vec<String>,
    /// Required header `typ`, for example `at+jwt` (RFC 9068 §2.1);
    /// compared case-insensitively, with or without `application/`.
    #[serde(default)]
    pub required_typ: Option<String>,
    /// Maximum token size from this issuer, in bytes.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Longest accepted lifetime, `exp - iat` (or `exp - now` without
    /// `iat`), in seconds; no limit when absent.
    #[serde(default)]
    pub max_lifetime_seconds: Option<u64>,
}

impl IssuerConfig {
    /// Describes where the keys come from, for logs: URLs without
    /// credentials, file paths, and never the HMAC secret itself.
    pub fn key_source_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(uri) = &self.jwks_uri {
            parts.push(format!("jwks_uri:{}", redact_url(uri)));
        }
        if let Some(uri) = &self.discovery_uri {
            parts.push(format!("discovery:{}", redact_url(uri)));
        } else if self.discovery {
            parts.push("discovery:issuer".to_owned());
        }
        if let Some(file) = &self.jwks_file {
            parts.push(format!("jwks_file:{}", file.display()));
        }
        if self.jwks.is_some() {
            parts.push("inline".to_owned());
        }
        if self.hmac_secret_file.is_some() {
            parts.push("hmac_secret_file".to_owned());
        }
        parts.join("+")
    }
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
    /// Forwarding mode of the verified token: as sent, moved to `Authorization`, or removed.
    #[serde(default)]
    pub forward: ForwardMode,
    /// Verified claims copied into request headers for the service. Every
    /// incoming header of these names is removed from every forwarded
    /// request, so a caller cannot forge them.
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimHeader>,
    /// Whether CORS preflight requests pass without a token.
    #[serde(default)]
    pub cors_preflight: CorsPreflight,
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
fn default_sockmap() -> bool {
    DEFAULT_SOCKMAP
}
fn default_true() -> bool {
    true
}
fn default_revocation_refresh_seconds() -> u64 {
    DEFAULT_REVOCATION_REFRESH_SECONDS
}
fn default_revocation_timeout_seconds() -> u64 {
    DEFAULT_REVOCATION_TIMEOUT_SECONDS
}
fn default_cache_max_entries() -> usize {
    DEFAULT_CACHE_MAX_ENTRIES
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
fn default_jwks_min_refresh_seconds() -> u64 {
    DEFAULT_JWKS_MIN_REFRESH_SECONDS
}
fn default_jwks_max_refresh_seconds() -> u64 {
    DEFAULT_JWKS_MAX_REFRESH_SECONDS
}
fn default_jwks_max_stale_seconds() -> u64 {
    DEFAULT_JWKS_MAX_STALE_SECONDS
}
fn default_max_token_bytes() -> usize {
    DEFAULT_MAX_TOKEN_BYTES
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

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates configuration `text`. `origin` names the text in
/// errors, usually the file path.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config: Config =
        serde_yaml::from_str(text).map_err(|error| syntax_error(&error, origin))?;

    let lines = locate::LineIndex::build(text);
    let mut problems: Vec<Problem> = lines
        .duplicate_keys()
        .iter()
        .map(|(field, line)| Problem {
            field: field.to_string(),
            line: Some(*line),
            value: "(second occurrence)".to_owned(),
            message: "duplicate key; only one of the two values would take effect, so list the key once with every value"
                .to_owned(),
        })
        .collect();
    problems.extend(
        validate::validate(&config)
            .into_iter()
            .map(|finding| Problem {
                line: lines.line_of(&finding.field),
                field: finding.field.to_string(),
                value: finding.value,
                message: finding.message,
            }),
    );

    if problems.is_empty() {
        return Ok(config);
    }
    Err(ConfigError::Invalid {
        origin: origin.to_owned(),
        problems,
    })
}

fn syntax_error(error: &serde_yaml::Error, origin: &str) -> ConfigError {
    let location = error.location();
    let line = location.as_ref().map(serde_yaml::Location::line);
    let column = location.as_ref().map(serde_yaml::Location::column);

    // serde_yaml ends most messages with the location, which the error
    // already shows in front; drop the repeat when it is exactly that.
    let mut detail = error.to_string();
    if let (Some(line), Some(column)) = (line, column) {
        let suffix = format!(" at line {line} column {column}");
        if let Some(stripped) = detail.strip_suffix(&suffix) {
            detail = stripped.to_owned();
        }
    }

    ConfigError::Syntax {
        origin: origin.to_owned(),
        line,
        column,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const VALID: &str = "\
admin:
  listen: 127.0.0.1:15021
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    audiences: [orders]
    algorithms: [RS256, ES256, EdDSA]
workloads:
  - name: orders
    netns: /var/run/netns/orders
    ports: [8080]
    rules:
      - path_prefix: /orders
        methods: [GET]
        roles: [reader]
";

    #[test]
    fn parse_valid_config_with_defaults() {
        let config = parse(VALID, "valid.yaml").expect("valid config");

        assert_eq!(config.issuers.len(), 1);
        assert_eq!(
            config.issuers[0].clock_skew_seconds,
            DEFAULT_CLOCK_SKEW_SECONDS
        );
        assert_eq!(config.issuers[0].roles_claim, DEFAULT_ROLES_CLAIM);
        assert_eq!(config.workloads[0].ports, vec![8080]);
        assert_eq!(
            config.interception.reserved_source_v4,
            DEFAULT_RESERVED_SOURCE_V4
        );
        assert_eq!(config.drain_seconds, DEFAULT_DRAIN_SECONDS);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = VALID.replace("    ports: [8080]", "    prots: [8080]");

        let error = parse(&text, "typo.yaml").expect_err("unknown field");

        let ConfigError::Syntax { line, detail, .. } = &error else {
            panic!("{error}")
        };
        assert_eq!(*line, Some(11));
        assert!(detail.contains("workloads[0]"), "{detail}");
        assert!(detail.contains("unknown field `prots`"), "{detail}");
        let message = error.to_string();
        assert!(message.starts_with("typo.yaml:11:"), "{message}");
        assert_eq!(
            message.matches("line 11").count(),
            0,
            "location repeated: {message}"
        );
    }

    #[test]
    fn wrong_type_names_value_and_line() {
        let text = VALID.replace("    ports: [8080]", "    ports: [8080, http]");

        let error = parse(&text, "type.yaml").expect_err("bad port");

        let ConfigError::Syntax { line, detail, .. } = &error else {
            panic!("{error}")
        };
        assert_eq!(*line, Some(11));
        assert!(detail.contains("workloads[0].ports[1]"), "{detail}");
        assert!(detail.contains("http"), "{detail}");
    }

    #[test]
    fn out_of_range_port_is_type_error() {
        let text = VALID.replace("    ports: [8080]", "    ports:\n      - 70000");

        let error = parse(&text, "range.yaml").expect_err("port too large");

        let ConfigError::Syntax { line, detail, .. } = &error else {
            panic!("{error}")
        };
        assert_eq!(*line, Some(12));
        assert!(detail.contains("70000"), "{detail}");
    }

    #[test]
    fn yaml_syntax_error_has_line() {
        let text = VALID.replace("    ports: [8080]", "    ports: [8080");

        let error = parse(&text, "syntax.yaml").expect_err("unclosed flow sequence");

        let ConfigError::Syntax { line, .. } = &error else {
            panic!("{error}")
        };
        assert!(line.is_some_and(|line| line >= 11), "{error}");
    }

    #[test]
    fn missing_required_field_is_reported() {
        let text = VALID.replace("    netns: /var/run/netns/orders\n", "");

        let error = parse(&text, "missing.yaml").expect_err("netns missing");

        assert!(
            error.to_string().contains("missing field `netns`"),
            "{error}"
        );
    }

    #[test]
    fn validation_error_names_field_value_file_and_line() {
        let text = VALID.replace("    ports: [8080]", "    ports:\n      - 8080\n      - 0");

        let error = parse(&text, "zero.yaml").expect_err("port 0");

        let ConfigError::Invalid { origin, problems } = &error else {
            panic!("{error}")
        };
        assert_eq!(origin, "zero.yaml");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "workloads[0].ports[1]");
        assert_eq!(problems[0].line, Some(13));
        assert_eq!(problems[0].value, "0");
        let message = error.to_string();
        assert!(message.contains("zero.yaml"), "{message}");
        assert!(
            message.contains("line 13: workloads[0].ports[1] = 0: port 0"),
            "{message}"
        );
    }

    #[test]
    fn validation_lists_every_problem() {
        let text = VALID
            .replace("[RS256, ES256, EdDSA]", "[none, HS256]")
            .replace("[8080]", "[]");

        let error = parse(&text, "many.yaml").expect_err("three problems");

        let ConfigError::Invalid { problems, .. } = &error else {
            panic!("{error}")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "issuers[0].algorithms[0]",
                "issuers[0].algorithms[1]",
                "workloads[0].ports"
            ]
        );
        assert!(problems.iter().all(|p| p.line.is_some()), "{problems:?}");
    }

    #[test]
    fn load_reads_file_and_names_it() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(VALID.replace("[8080]", "[0]").as_bytes())
            .expect("write");

        let error = load(file.path()).expect_err("port 0");

        let ConfigError::Invalid { origin, .. } = &error else {
            panic!("{error}")
        };
        assert_eq!(origin, &file.path().display().to_string());
    }

    #[test]
    fn load_missing_file_is_read_error() {
        let dir = tempfile::tempdir().expect("temp dir");

        let error = load(&dir.path().join("absent.yaml")).expect_err("no file");

        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
        assert!(error.to_string().contains("absent.yaml"), "{error}");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let field = VALID.replace("    ports: [8080]", "    ports: [8080]\n    ports: [9090]");
        let claim = VALID.replace(
            "        roles: [reader]",
            "        claims:\n          tenant: [a]\n          tenant: [b]\n        roles: [reader]",
        );

        for text in [field, claim] {
            let error = parse(&text, "dup.yaml").expect_err("duplicate key");

            assert!(error.to_string().contains("duplicate"), "{error}");
        }
    }

    #[test]
    fn empty_text_is_syntax_error() {
        let error = parse("", "empty.yaml").expect_err("empty");

        assert!(matches!(error, ConfigError::Syntax { .. }), "{error}");
    }
}
