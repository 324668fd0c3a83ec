//! The decision for one request: route, token, verification, rules.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::WorkloadProxy;
use crate::cache::{self, TokenDigest};
use crate::config::ForwardMode;
use crate::decision::Reason;
use crate::extract::TokenLocation;
use crate::jwks::IssuerKeys;
use crate::metrics::{self, CACHE_HIT, CACHE_MISS, ISSUER_UNKNOWN, RESULT_VALID};
use crate::policy::{self, RequestFacts, TokenState};
use crate::verify::{VerifiedToken, VerifyFailure};

/// The outcome of authorizing one request, with what the audit event and
/// the forwarded request need.
#[derive(Debug)]
pub struct Authorization {
    pub reason: Reason,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub token_fingerprint: Option<String>,
    pub verification_seconds: Option<f64>,
    pub rule: Option<usize>,
    /// The normalised request path, forwarded in place of the raw one.
    pub normalized_path: Option<String>,
    /// Headers built from verified claims, set only when the reason is
    /// `Allowed`.
    pub identity_headers: Vec<(HeaderName, HeaderValue)>,
    /// `Authorization: Bearer` value for a cookie token that
    /// `cookie_to_authorization` moves.
    pub moved_bearer: Option<HeaderValue>,
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
            normalized_path: None,
            identity_headers: Vec::new(),
            moved_bearer: None,
        }
    }
}

impl WorkloadProxy {
    /// Decides whether the request with `method`, `path` (without query) and
    /// `headers` may reach the service.
    ///
    /// The rule is found first, so a public rule or a passed CORS preflight
    /// costs no token verification.
    pub(super) async fn authorize(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Authorization {
        self.authorize_at(method, path, headers, unix_now()).await
    }

    /// Decides like the proxy does for a request at `now_unix` seconds;
    /// `tokengate explain` calls this, so it cannot disagree with the proxy.
    pub async fn authorize_at(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        now_unix: u64,
    ) -> Authorization {
        let routed = self.policy.route(&RequestFacts::new(method, path, headers));
        let mut authorization = Authorization::denied(Reason::MissingToken);
        authorization.rule = routed.rule;
        authorization
            .normalized_path
            .clone_from(&routed.normalized_path);
        if !routed.needs_token() {
            authorization.reason = self.policy.decide(&routed, TokenState::Missing).reason;
            return authorization;
        }

        let found = match self.sources.locate(headers) {
            Ok(Some(found)) => found,
            Ok(None) => {
                authorization.reason = self.policy.decide(&routed, TokenState::Missing).reason;
                return authorization;
            }
            Err(reason) => {
                authorization.reason = self
                    .policy
                    .decide(&routed, TokenState::Failed(reason))
                    .reason;
                return authorization;
            }
        };
        let token = found.token;
        // One SHA-256 serves as the cache key and the fingerprint.
        let digest = cache::token_digest(token);
        authorization.token_fingerprint = Some(fingerprint(&digest));

        let (result, elapsed) = self.verify_with_refetch(token, digest, now_unix).await;
        let seconds = elapsed.as_secs_f64();
        authorization.verification_seconds = Some(seconds);

        let verified = match result {
            Ok(verified) => verified,
            Err(failure) => {
                tracing::debug!(
                    workload = %self.name,
                    reason = failure.reason.as_str(),
                    jwt.iss = failure.issuer.as_deref(),
                    jwt.kid = failure.kid.as_deref(),
                    "token rejected"
                );
                authorization.reason = self
                    .policy
                    .decide(&routed, TokenState::Failed(failure.reason))
                    .reason;
                authorization.issuer = failure.issuer;
                return authorization;
            }
        };
        authorization.reason = self
            .policy
            .decide(&routed, TokenState::Valid(&verified))
            .reason;
        if authorization.reason == Reason::Allowed {
            authorization.identity_headers = self.identity_headers(&verified);
            if self.forward == ForwardMode::CookieToAuthorization
                && matches!(found.location, TokenLocation::Cookie(_))
            {
                authorization.moved_bearer = HeaderValue::from_str(&format!("Bearer {token}")).ok();
            }
        }
        authorization.issuer = Some(verified.issuer.clone());
        authorization.subject.clone_from(&verified.subject);
        authorization
    }

    /// Builds the `claim_to_headers` headers from `verified`. A claim that
    /// is absent, null or not representable in a header value (a control
    /// character) sets no header.
    fn identity_headers(&self, verified: &VerifiedToken) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::with_capacity(self.claim_headers.len());
        for (claim, name) in &self.claim_headers {
            let Some(text) =
                policy::lookup_claim(&verified.claims, claim).and_then(policy::header_text)
            else {
                continue;
            };
            match HeaderValue::from_bytes(text.as_bytes()) {
                Ok(value) => headers.push((name.clone(), value)),
                Err(_) => {
                    tracing::debug!(workload = %self.name, header = %name, "claim value not valid in a header, header not set");
                }
            }
        }
        headers
    }

    /// Verifies `token` through the verified-token cache, then checks the
    /// revocation list, for cached and fresh tokens alike, and records the
    /// verification metric. Returns the result and the time spent, which
    /// excludes an unknown-`kid` refetch.
    async fn verify_with_refetch(
        &self,
        token: &str,
        digest: TokenDigest,
        now_unix: u64,
    ) -> (Result<Arc<VerifiedToken>, VerifyFailure>, Duration) {
        let cache = &self.shared.token_cache;
        let started = Instant::now();
        let mut lookup = cache.lookup_digest(digest, now_unix);
        let mut elapsed = started.elapsed();

        let (result, cache_label) = if let Some(verified) = lookup.take_hit() {
            (Ok(verified), CACHE_HIT)
        } else {
            let (result, verify_elapsed) = self.verify_uncached(token, now_unix).await;
            let started = Instant::now();
            if let Ok(verified) = &result {
                cache.insert(&lookup, verified, &self.shared.verifier, now_unix);
            }
            elapsed += verify_elapsed + started.elapsed();
            (result.map(Arc::new), CACHE_MISS)
        };

        let started = Instant::now();
        let result = result.and_then(|verified| {
            if self.shared.revocations.is_revoked(&verified) {
                Err(VerifyFailure {
                    reason: Reason::Revoked,
                    issuer: Some(verified.issuer.clone()),
                    kid: verified.kid.clone(),
                })
            } else {
                Ok(verified)
            }
        });
        elapsed += started.elapsed();

        self.observe_verification(token, &result, cache_label, elapsed);
        (result, elapsed)
    }

    /// Records the verification metric. The `algorithm` label of a failure
    /// comes from the token header, read again because `VerifyFailure`
    /// does not carry it. Only known algorithm names become labels.
    fn observe_verification(
        &self,
        token: &str,
        result: &Result<Arc<VerifiedToken>, VerifyFailure>,
        cache_label: &str,
        elapsed: Duration,
    ) {
        let (issuer, algorithm, outcome) = match result {
            Ok(verified) => (
                Some(verified.issuer.as_str()),
                metrics::algorithm_label(&verified.algorithm),
                RESULT_VALID,
            ),
            Err(failure) => (
                failure.issuer.as_deref(),
                jsonwebtoken::decode_header(token).map_or(metrics::ALGORITHM_UNKNOWN, |header| {
                    metrics::algorithm_name(header.alg)
                }),
                failure.reason.as_str(),
            ),
        };
        self.shared.metrics.observe_verification(
            self.issuer_label(issuer),
            algorithm,
            cache_label,
            outcome,
            elapsed.as_secs_f64(),
        );
    }

    /// Verifies `token` with the verifier. On an unknown `kid` it requests a
    /// rate-limited refetch from the issuer's key store and, when the key set
    /// changed, verifies once more. Returns the result and the time spent
    /// verifying, which excludes the refetch itself.
    async fn verify_uncached(
        &self,
        token: &str,
        now_unix: u64,
    ) -> (Result<VerifiedToken, VerifyFailure>, Duration) {
        let verifier = &self.shared.verifier;
        let started = Instant::now();
        let first = verifier.verify(token, now_unix);
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
        let second = verifier.verify(token, now_unix);
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

/// Returns the token fingerprint (the first 16 hex characters of its
/// SHA-256, as `verify::fingerprint` computes it) from the digest.
fn fingerprint(digest: &TokenDigest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    #[test]
    fn fingerprint_matches_verify() {
        for token in ["abc", "a", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"] {
            let digest = cache::token_digest(token);

            assert_eq!(fingerprint(&digest), verify::fingerprint(token));
        }
    }
}
