//! Token verification: signature by `kid`, algorithm allow-list, and the
//! registered claims (`exp`, `nbf`, `iat`, `iss`, `aud`) with clock skew.
//!
//! Pure functions over a key snapshot: no network, no logging. The JWKS
//! fetcher (`jwks`) supplies keys; the proxy and tests call `Verifier`.

use std::sync::Arc;

use crate::decision::Reason;

/// A token that passed verification, with what policy and audit need.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    pub issuer: String,
    pub subject: Option<String>,
    pub kid: Option<String>,
    pub algorithm: String,
    /// The whole claims set, for rule evaluation.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Roles claim path configured for the issuer, for rule evaluation.
    pub roles_claim: String,
}

/// Why verification failed, with what can be audited safely.
#[derive(Clone, Debug)]
pub struct VerifyFailure {
    pub reason: Reason,
    /// `iss` from the unverified payload when it could be read, for audit.
    pub issuer: Option<String>,
    /// `kid` from the header, when a refetch might help (`UnknownKey`).
    pub kid: Option<String>,
}

/// Verifies tokens against the configured issuers' current key sets.
pub struct Verifier {
    // Filled by the implementation.
    _issuers: Vec<Arc<crate::jwks::IssuerKeys>>,
}

impl Verifier {
    /// Builds a verifier over the given issuers' key stores.
    pub fn new(_issuers: Vec<Arc<crate::jwks::IssuerKeys>>) -> Self {
        todo!()
    }

    /// Verifies `token` at `now_unix` seconds. On `Reason::UnknownKey` the
    /// caller may ask the issuer's key store for a rate-limited refetch and
    /// try again once.
    pub fn verify(&self, _token: &str, _now_unix: u64) -> Result<VerifiedToken, VerifyFailure> {
        todo!()
    }
}
