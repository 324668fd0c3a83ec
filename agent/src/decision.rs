//! The closed set of decisions and reasons.
//!
//! One enum feeds the audit event's `reason`, the `reason` metric label and
//! the error code in 401/403 responses, so logs, dashboards and callers see
//! the same words and label cardinality stays bounded. This module decides
//! nothing itself.

use serde::Serialize;

/// Outcome of a request or connection: forwarded or rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded to the service.
    Allow,
    /// Rejected without contacting the service.
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Reason for allowing or denying a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A rule matched and the verified token met its requirements.
    Allowed,
    /// A public rule matched; no token was needed or checked.
    Public,
    /// A rule that lets anonymous callers through matched, and the request
    /// went on without identity headers (missing, or failed when allowed).
    Anonymous,
    /// No token in any configured location.
    MissingToken,
    /// More than one token in the request (two headers, or header and cookie).
    MultipleTokens,
    /// The token is longer than the issuer's or the agent's maximum size.
    TokenTooLarge,
    /// Not a well-formed JWS compact serialization, or bad JSON inside.
    MalformedToken,
    /// `alg` is `none`, not in the issuer's allow-list, or does not fit the key.
    AlgorithmNotAllowed,
    /// `iss` names no configured issuer.
    UnknownIssuer,
    /// No key with the token's `kid`, even after a refetch.
    UnknownKey,
    /// The issuer's keys have not been fetched yet.
    KeysUnavailable,
    /// The signature does not verify.
    InvalidSignature,
    /// `exp` is in the past beyond the clock skew, or missing.
    Expired,
    /// `nbf` or `iat` is in the future beyond the clock skew.
    NotYetValid,
    /// `aud` matches no configured audience.
    AudienceMismatch,
    /// A claim has the wrong type or form (`exp` as a string or beyond the
    /// year 9999), or `typ`, `sub` or the lifetime breaks the issuer's
    /// requirement. A missing `exp` is `Expired`.
    InvalidClaims,
    /// The token's `jti`, or its subject at its `iat`, is on the revocation
    /// list.
    Revoked,
    /// No rule matches the method and path (default deny).
    NoRuleMatched,
    /// A required claim value is absent.
    ClaimMismatch,
    /// None of the required roles is held.
    MissingRole,
    /// A required scope is not held.
    MissingScope,
    /// The bytes on a protected port were not a valid HTTP/1.1 request.
    MalformedRequest,
    /// The service could not be reached after the request was allowed.
    UpstreamUnavailable,
    /// A connection reached the agent's listener for a port the workload does
    /// not protect. It is closed without an HTTP response.
    UnprotectedPort,
}

impl Reason {
    /// Every reason, for tests and for pre-registering metric labels.
    pub const ALL: [Reason; 24] = [
        Self::Allowed,
        Self::Public,
        Self::Anonymous,
        Self::MissingToken,
        Self::MultipleTokens,
        Self::TokenTooLarge,
        Self::MalformedToken,
        Self::AlgorithmNotAllowed,
        Self::UnknownIssuer,
        Self::UnknownKey,
        Self::KeysUnavailable,
        Self::InvalidSignature,
        Self::Expired,
        Self::NotYetValid,
        Self::AudienceMismatch,
        Self::InvalidClaims,
        Self::Revoked,
        Self::NoRuleMatched,
        Self::ClaimMismatch,
        Self::MissingRole,
        Self::MissingScope,
        Self::MalformedRequest,
        Self::UpstreamUnavailable,
        Self::UnprotectedPort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Public => "public",
            Self::Anonymous => "anonymous",
            Self::MissingToken => "missing_token",
            Self::MultipleTokens => "multiple_tokens",
            Self::TokenTooLarge => "token_too_large",
            Self::MalformedToken => "malformed_token",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key",
            Self::KeysUnavailable => "keys_unavailable",
            Self::InvalidSignature => "invalid_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::AudienceMismatch => "audience_mismatch",
            Self::InvalidClaims => "invalid_claims",
            Self::Revoked => "revoked",
            Self::NoRuleMatched => "no_rule_matched",
            Self::ClaimMismatch => "claim_mismatch",
            Self::MissingRole => "missing_role",
            Self::MissingScope => "missing_scope",
            Self::MalformedRequest => "malformed_request",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UnprotectedPort => "unprotected_port",
        }
    }

    /// HTTP status the caller receives for this reason.
    ///
    /// RFC 6750 §3.1: a missing or invalid token is 401 `invalid_token`, a
    /// valid token without the needed rights is 403 `insufficient_scope`.
    /// For the reasons that allow, it is the status of a successful forward;
    /// the service's own status is what the caller receives.
    pub fn status(self) -> u16 {
        match self {
            Self::Allowed | Self::Public | Self::Anonymous => 200,
            Self::MissingToken
            | Self::MultipleTokens
            | Self::TokenTooLarge
            | Self::MalformedToken
            | Self::AlgorithmNotAllowed
            | Self::UnknownIssuer
            | Self::UnknownKey
            | Self::KeysUnavailable
            | Self::InvalidSignature
            | Self::Expired
            | Self::NotYetValid
            | Self::AudienceMismatch
            | Self::InvalidClaims
            | Self::Revoked => 401,
            // UnprotectedPort never produces a response: the connection is
            // closed. 403 is what it would be if one were sent.
            Self::NoRuleMatched
            | Self::ClaimMismatch
            | Self::MissingRole
            | Self::MissingScope
            | Self::UnprotectedPort => 403,
            Self::MalformedRequest => 400,
            Self::UpstreamUnavailable => 502,
        }
    }

    /// Human-readable description for response bodies and the
    /// `error_description` of the challenge. It reveals no key, claim value
    /// or rule detail.
    pub fn description(self) -> &'static str {
        match self {
            Self::Allowed => "request allowed",
            Self::Public => "public route",
            Self::Anonymous => "anonymous request passed on",
            Self::MissingToken => "no bearer token in the request",
            Self::MultipleTokens => "more than one token in the request",
            Self::TokenTooLarge => "the token is too large",
            Self::MalformedToken => "the token is not a well-formed JWT",
            Self::AlgorithmNotAllowed => "the token's signing algorithm is not accepted",
            Self::UnknownIssuer => "the token's issuer is not trusted",
            Self::UnknownKey => "the token's signing key is not known",
            Self::KeysUnavailable => "the issuer's keys are not available yet",
            Self::InvalidSignature => "the token's signature is invalid",
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::AudienceMismatch => "the token is not meant for this service",
            Self::InvalidClaims => "the token's claims are invalid",
            Self::Revoked => "the token has been revoked",
            Self::NoRuleMatched => "no rule allows this request",
            Self::ClaimMismatch => "the token lacks a required claim value",
            Self::MissingRole => "the token lacks a required role",
            Self::MissingScope => "the token lacks a required scope",
            Self::MalformedRequest => "the request is not valid HTTP/1.1",
            Self::UpstreamUnavailable => "the service is unavailable",
            Self::UnprotectedPort => "the port is not protected by this workload",
        }
    }

    pub fn decision(self) -> Decision {
        match self {
            Self::Allowed | Self::Public | Self::Anonymous => Decision::Allow,
            _ => Decision::Deny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique() {
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    #[test]
    fn only_success_reasons_allow() {
        let allowing = [Reason::Allowed, Reason::Public, Reason::Anonymous];
        for reason in Reason::ALL {
            let allows = reason.decision() == Decision::Allow;
            assert_eq!(allowing.contains(&reason), allows, "{reason:?}");
            assert_eq!(allows, reason.status() == 200, "{reason:?}");
        }
    }
}
