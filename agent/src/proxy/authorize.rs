//! The decision for one request: token, verification, rules.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use super::WorkloadProxy;
use crate::decision::Reason;
use crate::jwks::IssuerKeys;
use crate::metrics::{ISSUER_UNKNOWN, RESULT_VALID};
use crate::verify::{self, VerifiedToken, VerifyFailure};

/// The outcome of authorizing one request, with what the audit event needs.
#[derive(Debug)]
pub(super) struct Authorization {
    pub reason: Reason,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub token_fingerprint: Option<String>,
    pub verification_seconds: Option<f64>,
    pub rule: Option<usize>,
}

impl Authorization {
    fn denied(reason: Reason) -> Self {
        Self {
            reason,
            issuer: None,
            subject: None,
            token_fingerprint: None,
            verification_seconds: None,
            rule: None,
        }
    }
}

impl WorkloadProxy {
    /// Decides whether the request with `method`, `path` (without query) and
    /// `headers` may reach the service.
    pub(super) async fn authorize(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Authorization {
        let token = match self.sources.extract(headers) {
            Ok(Some(token)) => token,
            Ok(None) => return Authorization::denied(Reason::MissingToken),
            Err(reason) => return Authorization::denied(reason),
        };

        let mut authorization = Authorization::denied(Reason::MalformedToken);
        authorization.token_fingerprint = Some(verify::fingerprint(token));

        let (result, elapsed) = self.verify_with_refetch(token).await;
        let seconds = elapsed.as_secs_f64();
        authorization.verification_seconds = Some(seconds);

        let verified = match result {
            Ok(verified) => verified,
            Err(failure) => {
                let label = self.issuer_label(failure.issuer.as_deref());
                self.shared
                    .metrics
                    .observe_verification(label, failure.reason.as_str(), seconds);
                tracing::debug!(
                    workload = %self.name,
                    reason = failure.reason.as_str(),
                    jwt.iss = failure.issuer.as_deref(),
                    jwt.kid = failure.kid.as_deref(),
                    "token rejected"
                );
                authorization.reason = failure.reason;
                authorization.issuer = failure.issuer;
                return authorization;
            }
        };
        let label = self.issuer_label(Some(&verified.issuer));
        self.shared
            .metrics
            .observe_verification(label, RESULT_VALID, seconds);

        let outcome = self.policy.evaluate(method, path, &verified);
        authorization.reason = outcome.reason;
        authorization.rule = outcome.rule;
        authorization.issuer = Some(verified.issuer);
        authorization.subject = verified.subject;
        authorization
    }

    /// Verifies `token`. On an unknown `kid` it requests a rate-limited
    /// refetch from the issuer's key store and, when the key set changed,
    /// verifies once more. Returns the result and the time spent verifying, which
    /// excludes the refetch itself.
    async fn verify_with_refetch(
        &self,
        token: &str,
    ) -> (Result<VerifiedToken, VerifyFailure>, Duration) {
        let verifier = &self.shared.verifier;
        let started = Instant::now();
        let first = verifier.verify(token, unix_now());
        let mut elapsed = started.elapsed();

        let failure = match first {
            Err(failure) if failure.reason == Reason::UnknownKey => failure,
            other => return (other, elapsed),
        };
        let (Some(keys), Some(kid)) = (
            self.issuer_keys(failure.issuer.as_deref()),
            failure.kid.as_deref(),
        ) else {
            return (Err(failure), elapsed);
        };
        if !keys.refetch_for_unknown_kid(kid).await {
            return (Err(failure), elapsed);
        }

        tracing::debug!(workload = %self.name, jwt.iss = %keys.config.issuer, jwt.kid = kid, "retrying after refetch");
        let started = Instant::now();
        let second = verifier.verify(token, unix_now());
        elapsed += started.elapsed();
        (second, elapsed)
    }

    fn issuer_keys(&self, issuer: Option<&str>) -> Option<&Arc<IssuerKeys>> {
        let issuer = issuer?;
        self.shared
            .issuers
            .iter()
            .find(|keys| keys.config.issuer == issuer)
    }

    /// Returns the metric label for `issuer`: its configured name, or
    /// [`ISSUER_UNKNOWN`] for a value the caller made up.
    fn issuer_label(&self, issuer: Option<&str>) -> &str {
        self.issuer_keys(issuer)
            .map_or(ISSUER_UNKNOWN, |keys| keys.config.issuer.as_str())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
