//! Prometheus series of the agent, in one registry that the app owns.
//!
//! Owns the series names, labels and buckets. The proxy records verification
//! times and decisions here; JWKS and steering counters are read from their
//! owners at scrape time by the collectors in `metrics/`. Labels are bounded
//! sets (configured issuers and workloads, `Reason` names), never a path or a
//! subject. Nothing decides through this module.

mod collectors;
mod verification;

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use crate::bpf::PodSteering;
use crate::cache::TokenCache;
use crate::decision::Reason;
use crate::jwks::IssuerKeys;
use crate::revocation::Revocations;

use self::collectors::{IssuerCollector, SteeringCollector};
use self::verification::{CacheCollector, RevocationCollector};

/// Namespace of every series: the `tokengate_` prefix.
pub const NAMESPACE: &str = "tokengate";

/// Buckets of the verification-duration histogram, in seconds. An RS256 or
/// ES256 check takes tens of microseconds; 100 ms catches a stalled one.
pub const VERIFICATION_BUCKETS: [f64; 13] = [
    0.000_010, 0.000_025, 0.000_050, 0.000_100, 0.000_250, 0.000_500, 0.001, 0.002_5, 0.005, 0.010,
    0.025, 0.050, 0.100,
];

/// `result` label of a verification that succeeded; failures carry the
/// `Reason` name instead.
pub const RESULT_VALID: &str = "valid";

/// `issuer` label for a token whose `iss` names no configured issuer. The raw
/// value comes from the caller and would make the label set unbounded.
pub const ISSUER_UNKNOWN: &str = "unknown";

/// `algorithm` label for a token whose `alg` could not be read or is not a
/// JWS algorithm that jsonwebtoken supports.
pub const ALGORITHM_UNKNOWN: &str = "unknown";

/// `cache` label of a verification served from the verified-token cache.
pub const CACHE_HIT: &str = "hit";

/// `cache` label of a verification that checked the signature (the cache
/// missed or is disabled).
pub const CACHE_MISS: &str = "miss";

/// Failure to create or register a series.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("failed to register metric {name}")]
    Register {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
}

/// The agent's series and the registry they live in. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    verification_duration: HistogramVec,
    decisions: IntCounterVec,
    audit_events_dropped: IntCounter,
    steering: SteeringCollector,
}

impl Metrics {
    /// Creates the registry and registers every series that does not depend
    /// on configuration.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();

        let verification_duration = HistogramVec::new(
            HistogramOpts::new(
                "verification_duration_seconds",
                "Time spent verifying one token (cache lookup, signature and claims, \
                 revocation), by issuer, algorithm, cache hit or miss, and result.",
            )
            .namespace(NAMESPACE)
            .buckets(VERIFICATION_BUCKETS.to_vec()),
            &["issuer", "algorithm", "cache", "result"],
        )
        .map_err(|source| MetricsError::Register {
            name: "verification_duration_seconds",
            source,
        })?;
        register(
            &registry,
            "verification_duration_seconds",
            verification_duration.clone(),
        )?;

        let decisions = IntCounterVec::new(
            Opts::new(
                "decisions_total",
                "Requests and connections decided, by workload, decision and reason.",
            )
            .namespace(NAMESPACE),
            &["workload", "decision", "reason"],
        )
        .map_err(|source| MetricsError::Register {
            name: "decisions_total",
            source,
        })?;
        register(&registry, "decisions_total", decisions.clone())?;

        let audit_events_dropped = IntCounter::with_opts(
            Opts::new(
                "audit_events_dropped_total",
                "Audit events dropped because the audit queue was full.",
            )
            .namespace(NAMESPACE),
        )
        .map_err(|source| MetricsError::Register {
            name: "audit_events_dropped_total",
            source,
        })?;
        register(
            &registry,
            "audit_events_dropped_total",
            audit_events_dropped.clone(),
        )?;

        let steering = SteeringCollector::new();
        register(&registry, "steering_connections_total", steering.clone())?;

        Ok(Self {
            registry,
            verification_duration,
            decisions,
            audit_events_dropped,
            steering,
        })
    }

    /// Returns the registry that `/metrics` encodes.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers the JWKS series, read from `issuers` at every scrape.
    pub fn register_issuers(&self, issuers: Vec<Arc<IssuerKeys>>) -> Result<(), MetricsError> {
        register(&self.registry, "jwks_*", IssuerCollector::new(issuers))
    }

    /// Exports the JWKS series of `issuers` in place of the registered
    /// ones, after a configuration reload changed the issuers.
    pub fn replace_issuers(&self, issuers: Vec<Arc<IssuerKeys>>) -> Result<(), MetricsError> {
        // The registry identifies a collector by its series descriptions,
        // so an empty collector of the same kind unregisters the old one.
        // An error means none was registered, which is fine here.
        let _ = self
            .registry
            .unregister(Box::new(IssuerCollector::new(Vec::new())));
        self.register_issuers(issuers)
    }

    /// Creates the decision series of `workload` at zero, so that rates exist
    /// before the first request.
    pub fn register_workload(&self, workload: &str) {
        for reason in Reason::ALL {
            self.decisions.with_label_values(&[
                workload,
                reason.decision().as_str(),
                reason.as_str(),
            ]);
        }
    }

    /// Removes the decision series of a workload that is gone, so that pods
    /// coming and going do not grow the label set without bound.
    pub fn forget_workload(&self, workload: &str) {
        for reason in Reason::ALL {
            // An error means the series did not exist, which is fine here.
            let _ = self.decisions.remove_label_values(&[
                workload,
                reason.decision().as_str(),
                reason.as_str(),
            ]);
        }
    }

    /// Exports the steering counters of `workload`, read at every scrape.
    pub fn add_steering(&self, workload: &str, steering: Arc<PodSteering>) {
        self.steering.add(workload, steering);
    }

    /// Stops exporting the steering counters of a detached workload.
    pub fn remove_steering(&self, workload: &str) {
        self.steering.remove(workload);
    }

    /// Exports the verified-token cache series, read at every scrape.
    pub fn register_token_cache(&self, cache: Arc<TokenCache>) -> Result<(), MetricsError> {
        register(&self.registry, "token_cache_*", CacheCollector::new(cache))
    }

    /// Exports the revocation list series, read at every scrape.
    pub fn register_revocation(&self, revocations: Arc<Revocations>) -> Result<(), MetricsError> {
        register(
            &self.registry,
            "revocation_*",
            RevocationCollector::new(revocations),
        )
    }

    /// Records one verification. `issuer` must be a configured issuer or
    /// [`ISSUER_UNKNOWN`]; `algorithm` comes from [`algorithm_label`];
    /// `cache` is [`CACHE_HIT`] or [`CACHE_MISS`]; `result` is
    /// [`RESULT_VALID`] or a `Reason` name.
    pub fn observe_verification(
        &self,
        issuer: &str,
        algorithm: &str,
        cache: &str,
        result: &str,
        seconds: f64,
    ) {
        self.verification_duration
            .with_label_values(&[issuer, algorithm, cache, result])
            .observe(seconds);
    }

    /// Counts one decision.
    pub fn record_decision(&self, workload: &str, reason: Reason) {
        self.decisions
            .with_label_values(&[workload, reason.decision().as_str(), reason.as_str()])
            .inc();
    }

    /// Returns the counter of audit events lost to a full queue.
    pub fn audit_events_dropped(&self) -> IntCounter {
        self.audit_events_dropped.clone()
    }
}

/// Returns the `algorithm` label of a token's `alg` header value: the JWS
/// name for an algorithm that jsonwebtoken supports, else
/// [`ALGORITHM_UNKNOWN`], so a caller cannot add label values.
pub fn algorithm_label(alg: &str) -> &'static str {
    alg.parse::<Algorithm>()
        .map_or(ALGORITHM_UNKNOWN, algorithm_name)
}

/// Returns the JWS name (RFC 7518 §3.1, RFC 8037 §3.1) of `alg`, or
/// [`ALGORITHM_UNKNOWN`] for a variant this function does not list.
pub fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // `Algorithm` is non-exhaustive; a variant added later is unknown
        // here until it is listed.
        _ => ALGORITHM_UNKNOWN,
    }
}

fn register<C>(registry: &Registry, name: &'static str, collector: C) -> Result<(), MetricsError>
where
    C: prometheus::core::Collector + 'static,
{
    registry
        .register(Box::new(collector))
        .map_err(|source| MetricsError::Register { name, source })
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};

    use super::*;

    fn encode(metrics: &Metrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&metrics.registry().gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn decision_counter_has_labels() {
        let metrics = Metrics::new().unwrap();

        metrics.record_decision("orders", Reason::Expired);
        metrics.record_decision("orders", Reason::Expired);

        let text = encode(&metrics);
        assert!(
            text.contains(
                r#"tokengate_decisions_total{decision="deny",reason="expired",workload="orders"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn workload_series_start_at_zero() {
        let metrics = Metrics::new().unwrap();

        metrics.register_workload("orders");

        let text = encode(&metrics);
        assert!(
            text.contains(r#"tokengate_decisions_total{decision="allow",reason="allowed",workload="orders"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tokengate_decisions_total{decision="deny",reason="missing_token",workload="orders"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn forgotten_workload_series_leave_the_scrape() {
        let metrics = Metrics::new().unwrap();
        metrics.register_workload("orders");
        metrics.register_workload("shop_cart-7d9f");
        metrics.record_decision("shop_cart-7d9f", Reason::Expired);

        metrics.forget_workload("shop_cart-7d9f");

        let text = encode(&metrics);
        assert!(!text.contains("shop_cart-7d9f"), "{text}");
        assert!(text.contains(r#"workload="orders""#), "{text}");
    }

    #[test]
    fn histogram_uses_explicit_buckets() {
        let metrics = Metrics::new().unwrap();

        metrics.observe_verification(
            "https://issuer.test",
            "ES256",
            CACHE_MISS,
            RESULT_VALID,
            0.000_04,
        );

        let text = encode(&metrics);
        assert!(
            text.contains(
                r#"tokengate_verification_duration_seconds_bucket{algorithm="ES256",cache="miss",issuer="https://issuer.test",result="valid",le="0.00001"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tokengate_verification_duration_seconds_bucket{algorithm="ES256",cache="miss",issuer="https://issuer.test",result="valid",le="0.00005"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn algorithm_labels_are_bounded() {
        let cases = [
            ("RS256", "RS256"),
            ("EdDSA", "EdDSA"),
            ("HS512", "HS512"),
            ("rs256", ALGORITHM_UNKNOWN),
            ("none", ALGORITHM_UNKNOWN),
            ("x-made-up", ALGORITHM_UNKNOWN),
        ];

        for (alg, expected) in cases {
            assert_eq!(algorithm_label(alg), expected, "{alg}");
        }
    }

    #[test]
    fn cache_and_revocation_series_are_exported() {
        use crate::config::{CacheConfig, RevocationConfig};
        use crate::revocation::RevocationPoller;

        let metrics = Metrics::new().unwrap();
        let cache = Arc::new(TokenCache::new(&CacheConfig::default(), Vec::new()));
        let (_, unconfigured) = RevocationPoller::new(&RevocationConfig::default(), &[]);
        let configured = RevocationConfig {
            url: Some("http://127.0.0.1:9/revoked.json".to_owned()),
            ..RevocationConfig::default()
        };
        let (_, revocations) = RevocationPoller::new(&configured, &[]);
        cache.lookup("token", 0);

        metrics.register_token_cache(Arc::clone(&cache)).unwrap();
        metrics.register_revocation(revocations).unwrap();

        let text = encode(&metrics);
        for expected in [
            "tokengate_token_cache_entries 0",
            "tokengate_token_cache_hits_total 0",
            "tokengate_token_cache_misses_total 1",
            r#"tokengate_revocation_entries{kind="jti"} 0"#,
            r#"tokengate_revocation_entries{kind="subject"} 0"#,
            "tokengate_revocation_list_age_seconds ",
            r#"tokengate_revocation_refreshes_total{result="failure"} 0"#,
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }

        let other = Metrics::new().unwrap();
        other.register_revocation(unconfigured).unwrap();
        assert!(
            !encode(&other).contains("tokengate_revocation_list_age_seconds"),
            "no age without a source"
        );
    }

    #[test]
    fn dropped_audit_counter_is_exported() {
        let metrics = Metrics::new().unwrap();

        metrics.audit_events_dropped().inc_by(3);

        assert!(encode(&metrics).contains("tokengate_audit_events_dropped_total 3"));
    }
}
