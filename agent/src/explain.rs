//! `tokengate explain`: the decision the agent would make for one request,
//! with the rule that matched and why.
//!
//! Builds the workload's request path from the configuration and decides
//! through [`WorkloadProxy::authorize_at`], the function the proxy calls, so
//! the two cannot disagree. Loads keys like the agent (or from a JWKS file),
//! but opens no listener and touches no namespace. The token is never
//! printed, only its fingerprint.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::HeaderMap;

use crate::audit::AuditSink;
use crate::cache::TokenCache;
use crate::config::{CacheConfig, Config, RuleConfig, WorkloadConfig};
use crate::decision::Reason;
use crate::jwks::{IssuerKeys, KeySet, KeySetError};
use crate::metrics::Metrics;
use crate::proxy::{Authorization, Shared, WorkloadProxy};
use crate::revocation::RevocationPoller;
use crate::verify::Verifier;

/// The request to explain: one request to one workload.
#[derive(Clone, Debug, Default)]
pub struct ExplainRequest {
    /// Workload name; may be left out when the configuration has one.
    pub workload: Option<String>,
    /// The token, placed where the workload reads tokens: its first header
    /// source, else its first cookie, else `Authorization: Bearer`.
    pub token: Option<String>,
    pub method: String,
    /// Request path, with or without the query.
    pub path: String,
    /// Further request headers, each as `Name: value`.
    pub headers: Vec<String>,
    /// JWKS document used for every issuer in place of fetching keys.
    pub jwks_file: Option<PathBuf>,
    /// Time of the decision in Unix seconds; now when absent.
    pub now_unix: Option<u64>,
}

/// Error of preparing an explanation.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("the configuration has several workloads ({known}); choose one with --workload NAME")]
    WorkloadRequired { known: String },
    #[error("the configuration has no workload {name:?}; configured workloads: {known}")]
    UnknownWorkload { name: String, known: String },
    #[error(
        "invalid header {header:?}; write it as 'Name: value' with a valid header name and value"
    )]
    InvalidHeader { header: String },
    #[error("the token cannot be placed in header {header}; it contains characters a header value cannot hold")]
    InvalidToken { header: String },
    #[error("failed to read JWKS file {path}")]
    ReadJwks {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JWKS file {path} holds no usable key set")]
    ParseJwks {
        path: PathBuf,
        #[source]
        source: KeySetError,
    },
    #[error("failed to create the metrics registry")]
    Metrics {
        #[source]
        source: crate::metrics::MetricsError,
    },
}

/// The decision with what explains it.
#[derive(Debug)]
pub struct Explanation {
    pub workload: String,
    pub method: String,
    pub path: String,
    pub authorization: Authorization,
    /// The matched rule: its index and its configuration.
    pub rule: Option<(usize, RuleConfig)>,
    /// Issuers whose keys could not be loaded, with the error.
    pub key_failures: Vec<(String, String)>,
}

/// Loads keys for the configured issuers and decides `request`.
pub async fn explain(
    config: &Config,
    request: &ExplainRequest,
) -> Result<Explanation, ExplainError> {
    let workload = choose_workload(config, request.workload.as_deref())?;
    let headers = build_headers(workload, request)?;

    let issuers: Vec<Arc<IssuerKeys>> = config
        .issuers
        .iter()
        .map(|issuer| Arc::new(IssuerKeys::new(issuer.clone())))
        .collect();
    let key_failures = match &request.jwks_file {
        Some(path) => {
            install_file_keys(&issuers, path)?;
            Vec::new()
        }
        None => load_keys(&issuers).await,
    };

    let metrics = Metrics::new().map_err(|source| ExplainError::Metrics { source })?;
    let (audit, _audit_writer) =
        AuditSink::spawn(Box::new(tokio::io::sink()), metrics.audit_events_dropped());
    // One read of the configured revocation list, so `explain` reports
    // `revoked` as the agent would. The cache is off, so every run verifies.
    let (mut revocation_poller, revocations) =
        RevocationPoller::new(&config.revocation, &config.issuers);
    revocation_poller.refresh().await;
    let no_cache = CacheConfig {
        enabled: false,
        ..CacheConfig::default()
    };
    let shared = Shared {
        verifier: Arc::new(Verifier::new(issuers.clone())),
        token_cache: Arc::new(TokenCache::new(&no_cache, issuers.clone())),
        issuers,
        audit,
        metrics,
        revocations,
    };
    let proxy = WorkloadProxy::new(workload, shared);

    let now = request.now_unix.unwrap_or_else(unix_now);
    let authorization = proxy
        .authorize_at(&request.method, &request.path, &headers, now)
        .await;
    let rule = authorization
        .rule
        .and_then(|index| workload.rules.get(index).map(|rule| (index, rule.clone())));

    Ok(Explanation {
        workload: workload.name.clone(),
        method: request.method.clone(),
        path: request.path.clone(),
        authorization,
        rule,
        key_failures,
    })
}

fn choose_workload<'c>(
    config: &'c Config,
    name: Option<&str>,
) -> Result<&'c WorkloadConfig, ExplainError> {
    let known = || {
        config
            .workloads
            .iter()
            .map(|workload| workload.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(name) => config
            .workloads
            .iter()
            .find(|workload| workload.name == name)
            .ok_or_else(|| ExplainError::UnknownWorkload {
                name: name.to_owned(),
                known: known(),
            }),
        None => match config.workloads.as_slice() {
            [only] => Ok(only),
            _ => Err(ExplainError::WorkloadRequired { known: known() }),
        },
    }
}

/// Builds the request headers: the `--header` values, then the token where
/// the workload reads it. A token given twice (in `--header` too) stays
/// twice, and extraction rejects it as the proxy would.
fn build_headers(
    workload: &WorkloadConfig,
    request: &ExplainRequest,
) -> Result<HeaderMap, ExplainError> {
    let mut headers = HeaderMap::new();
    for header in &request.headers {
        let invalid = || ExplainError::InvalidHeader {
            header: header.clone(),
        };
        let (name, value) = header.split_once(':').ok_or_else(invalid)?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| invalid())?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| invalid())?;
        headers.append(name, value);
    }

    let Some(token) = &request.token else {
        return Ok(headers);
    };
    let (name, text) = if let Some(source) = workload.from_headers.first() {
        let name = HeaderName::from_bytes(source.name.as_bytes()).map_err(|_| {
            ExplainError::InvalidHeader {
                header: source.name.clone(),
            }
        })?;
        (name, format!("{}{token}", source.value_prefix))
    } else if let Some(cookie) = workload.from_cookies.first() {
        (COOKIE, format!("{cookie}={token}"))
    } else {
        (AUTHORIZATION, format!("Bearer {token}"))
    };
    let value = HeaderValue::from_str(&text).map_err(|_| ExplainError::InvalidToken {
        header: name.to_string(),
    })?;
    headers.append(name, value);
    Ok(headers)
}

fn install_file_keys(issuers: &[Arc<IssuerKeys>], path: &Path) -> Result<(), ExplainError> {
    let document = std::fs::read(path).map_err(|source| ExplainError::ReadJwks {
        path: path.to_owned(),
        source,
    })?;
    for keys in issuers {
        let (set, _skipped) =
            KeySet::from_jwks_json(&document).map_err(|source| ExplainError::ParseJwks {
                path: path.to_owned(),
                source,
            })?;
        keys.replace_keys(set);
    }
    Ok(())
}

/// Loads every issuer's keys once, as the agent's first fetch does, and
/// returns the issuers that failed with their errors.
async fn load_keys(issuers: &[Arc<IssuerKeys>]) -> Vec<(String, String)> {
    let mut tasks = tokio::task::JoinSet::new();
    for keys in issuers {
        let keys = Arc::clone(keys);
        tasks.spawn(async move {
            let outcome = keys.refresh_now().await;
            (
                keys.config.issuer.clone(),
                outcome.err().map(|error| crate::error_chain(&error)),
            )
        });
    }

    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((issuer, Some(error))) = joined {
            failures.push((issuer, error));
        }
    }
    failures.sort();
    failures
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authorization = &self.authorization;
        let reason = authorization.reason;

        writeln!(f, "workload:    {}", self.workload)?;
        writeln!(f, "request:     {} {}", self.method, self.path)?;
        if let Some(path) = &authorization.normalized_path {
            writeln!(f, "normalised:  {path}")?;
        }
        match &authorization.token_fingerprint {
            Some(fingerprint) => writeln!(f, "token:       fingerprint {fingerprint}")?,
            None => writeln!(f, "token:       none read")?,
        }
        for (issuer, error) in &self.key_failures {
            writeln!(f, "keys:        failed to load keys of {issuer}: {error}")?;
        }
        writeln!(f, "decision:    {}", reason.decision().as_str())?;
        writeln!(
            f,
            "reason:      {} ({})",
            reason.as_str(),
            reason.description()
        )?;
        writeln!(f, "status:      {}", reason.status())?;
        writeln!(
            f,
            "issuer:      {}",
            authorization.issuer.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "subject:     {}",
            authorization.subject.as_deref().unwrap_or("-")
        )?;
        match &self.rule {
            Some((index, rule)) => writeln!(f, "rule:        #{index} {}", describe_rule(rule))?,
            None => writeln!(f, "rule:        none matched")?,
        }
        writeln!(f, "why:         {}", why(reason, self.rule.is_some()))
    }
}

/// Explains `reason` in terms of the rule: which requirement failed, or
/// that all held.
fn why(reason: Reason, rule_matched: bool) -> String {
    match reason {
        Reason::Allowed => "every requirement of the rule held".to_owned(),
        Reason::Public => "the rule is public, or the request is a CORS preflight the workload passes; no token is checked".to_owned(),
        Reason::Anonymous => "the rule passes callers without a valid token on, with no identity headers".to_owned(),
        Reason::NoRuleMatched => "no rule matches this method and path, so the request is denied by default".to_owned(),
        Reason::ClaimMismatch
        | Reason::MissingRole
        | Reason::MissingScope => format!("requirement not met: {}", reason.description()),
        _ if rule_matched => format!("the token was not accepted before the rule's requirements were checked: {}", reason.description()),
        _ => format!("the token was not accepted: {}", reason.description()),
    }
}

/// Describes a rule's matcher: methods and path.
fn describe_rule(rule: &RuleConfig) -> String {
    let methods = if rule.methods.is_empty() {
        "any method".to_owned()
    } else {
        rule.methods.join(",")
    };
    let path = if let Some(path) = &rule.path {
        format!("path = {path}")
    } else if let Some(prefix) = &rule.path_prefix {
        format!("path_prefix = {prefix}")
    } else if let Some(template) = &rule.path_template {
        format!("path_template = {template}")
    } else {
        "any path".to_owned()
    };
    let mut requirements = Vec::new();
    if rule.public {
        requirements.push("public".to_owned());
    }
    if rule.allow_missing_or_failed {
        requirements.push("allow_missing_or_failed".to_owned());
    } else if rule.allow_missing {
        requirements.push("allow_missing".to_owned());
    }
    for (claim, values) in &rule.claims {
        requirements.push(format!("claim {claim} one of [{}]", values.join(",")));
    }
    if !rule.roles.is_empty() {
        requirements.push(format!("a role of [{}]", rule.roles.join(",")));
    }
    if !rule.scopes.is_empty() {
        requirements.push(format!("every scope of [{}]", rule.scopes.join(",")));
    }
    if let Some(requires) = &rule.requires {
        requirements.push(format!("requires {requires:?}"));
    }
    if requirements.is_empty() {
        format!("{methods} {path}, any valid token")
    } else {
        format!("{methods} {path}, {}", requirements.join("; "))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
