//! Token verification: size, shape, signature by `kid`, algorithm
//! allow-list, and the claims (`exp`, `nbf`, `iat`, `iss`, `aud`, `sub`,
//! `typ`, lifetime) with clock skew.
//!
//! Pure functions over a key snapshot: no network, no logging. The JWKS
//! fetcher (`jwks`) supplies keys; the proxy, `explain` and tests call
//! `Verifier`.

mod claims;
mod json;
mod token;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use sha2::{Digest as _, Sha256};

use crate::config::DEFAULT_MAX_TOKEN_BYTES;
use crate::decision::Reason;
use crate::jwks::{IssuerKeys, KeyKind, VerifyKey};

pub use claims::MAX_NUMERIC_DATE;
pub use token::MAX_KID_BYTES;

/// A token that passed verification, with what policy and audit need.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    pub issuer: String,
    pub subject: Option<String>,
    /// `kid` of the key that verified the signature.
    pub kid: Option<String>,
    pub algorithm: String,
    /// The whole claims set, for rule evaluation.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Roles claim path configured for the issuer, for rule evaluation.
    pub roles_claim: String,
}

/// Verification failure, with the fields that are safe to audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    pub reason: Reason,
    /// `iss` from the unverified payload when it could be read, for audit.
    pub issuer: Option<String>,
    /// `kid` from the header, when a refetch might help (`UnknownKey`).
    pub kid: Option<String>,
}

/// Verifies tokens against the configured issuers' current key sets.
pub struct Verifier {
    issuers: HashMap<String, IssuerEntry>,
    /// Largest `max_token_bytes` of any issuer: longer tokens are rejected
    /// before any decoding, when the issuer is not known yet.
    max_token_bytes: usize,
}

/// One issuer's keys and the settings verification needs.
struct IssuerEntry {
    keys: Arc<IssuerKeys>,
    /// The configured allow-list, with `none` and unknown names left out,
    /// and the HMAC algorithms left out unless `hmac_secret_file` is set,
    /// even when an unvalidated configuration lists them.
    algorithms: Vec<Algorithm>,
    audiences: Vec<String>,
    clock_skew_seconds: u64,
    roles_claim: String,
    require_exp: bool,
    subject_prefixes: Vec<String>,
    required_typ: Option<String>,
    max_token_bytes: usize,
    max_lifetime_seconds: Option<u64>,
}

impl Verifier {
    /// Builds a verifier over the given issuers' key stores. When two
    /// stores name the same issuer, the first one is used.
    pub fn new(issuers: Vec<Arc<IssuerKeys>>) -> Self {
        let mut entries = HashMap::new();
        for keys in issuers {
            let config = &keys.config;
            let has_secret = config.hmac_secret_file.is_some();
            let algorithms = config
                .algorithms
                .iter()
                .filter_map(|name| name.parse::<Algorithm>().ok())
                .filter(|alg| has_secret || alg.family() != AlgorithmFamily::Hmac)
                .collect();
            let entry = IssuerEntry {
                algorithms,
                audiences: config.audiences.clone(),
                clock_skew_seconds: config.clock_skew_seconds,
                roles_claim: config.roles_claim.clone(),
                require_exp: config.require_exp,
                subject_prefixes: config.subject_prefixes.clone(),
                required_typ: config.required_typ.clone(),
                max_token_bytes: config.max_token_bytes,
                max_lifetime_seconds: config.max_lifetime_seconds,
                keys: Arc::clone(&keys),
            };
            entries.entry(config.issuer.clone()).or_insert(entry);
        }

        let max_token_bytes = entries
            .values()
            .map(|entry| entry.max_token_bytes)
            .max()
            .unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        Self {
            issuers: entries,
            max_token_bytes,
        }
    }

    /// Returns the key store of `issuer`, for example to request a refetch
    /// after `Reason::UnknownKey`.
    pub fn issuer_keys(&self, issuer: &str) -> Option<&Arc<IssuerKeys>> {
        self.issuers.get(issuer).map(|entry| &entry.keys)
    }

    /// Verifies `token` at `now_unix` seconds. On `Reason::UnknownKey` the
    /// caller may ask the issuer's key store for a rate-limited refetch and
    /// try again once.
    ///
    /// Steps, each failing with its own reason:
    /// 1. Reject a token longer than every issuer's `max_token_bytes`
    ///    before decoding anything (`TokenTooLarge`).
    /// 2. Parse it without trusting it (`MalformedToken`, see `token::read`
    ///    for the header members that are rejected).
    /// 3. Reject `none` in any spelling (`AlgorithmNotAllowed`).
    /// 4. Pick the issuer by exact `iss` (`UnknownIssuer`), and apply its
    ///    own `max_token_bytes` (`TokenTooLarge`).
    /// 5. Check `alg` against that issuer's allow-list.
    /// 6. Pick the keys by `kid` whose type, curve and `alg` fit the token's
    ///    `alg`; for HMAC, the issuer's secret whatever the `kid`.
    /// 7. Verify the signature (`InvalidSignature`).
    /// 8. Check the claims (`Expired`, `NotYetValid`, `AudienceMismatch`,
    ///    `InvalidClaims`).
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<VerifiedToken, VerifyFailure> {
        let fail = |reason: Reason, issuer: Option<&String>, kid: Option<&String>| VerifyFailure {
            reason,
            issuer: issuer.cloned(),
            kid: kid.cloned(),
        };

        if token.len() > self.max_token_bytes {
            return Err(fail(Reason::TokenTooLarge, None, None));
        }
        let unverified = token::read(token).map_err(|reason| fail(reason, None, None))?;
        let issuer = unverified.issuer.as_ref();
        let kid = unverified.kid.as_ref();

        // RFC 8725 §3.1: an unsecured token is never accepted, whatever its
        // issuer; checked first so no spelling of `none` reaches the keys.
        if unverified.alg.trim().eq_ignore_ascii_case("none") {
            return Err(fail(Reason::AlgorithmNotAllowed, issuer, kid));
        }

        let entry = issuer
            .and_then(|iss| self.issuers.get(iss))
            .ok_or_else(|| fail(Reason::UnknownIssuer, issuer, kid))?;
        if token.len() > entry.max_token_bytes {
            return Err(fail(Reason::TokenTooLarge, issuer, kid));
        }

        // `alg` names are case-sensitive (RFC 7515 §4.1.1), so `rs256`
        // matches nothing.
        let alg = entry
            .algorithms
            .iter()
            .copied()
            .find(|allowed| {
                unverified
                    .alg
                    .parse::<Algorithm>()
                    .is_ok_and(|alg| alg == *allowed)
            })
            .ok_or_else(|| fail(Reason::AlgorithmNotAllowed, issuer, kid))?;

        let key_set = entry
            .keys
            .keys()
            .ok_or_else(|| fail(Reason::KeysUnavailable, issuer, kid))?;
        let candidates = select_keys(key_set.keys(), kid.map(String::as_str), alg)
            .map_err(|reason| fail(reason, issuer, kid))?;
        let key = verify_signature(&unverified, &candidates, alg)
            .map_err(|reason| fail(reason, issuer, kid))?;

        let rules = claims::ClaimRules {
            skew: entry.clock_skew_seconds,
            require_exp: entry.require_exp,
            audiences: &entry.audiences,
            subject_prefixes: &entry.subject_prefixes,
            required_typ: entry.required_typ.as_deref(),
            max_lifetime: entry.max_lifetime_seconds,
        };
        claims::check(
            &unverified.claims,
            unverified.typ.as_deref(),
            now_unix,
            &rules,
        )
        .map_err(|reason| fail(reason, issuer, kid))?;

        let subject = unverified
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        Ok(VerifiedToken {
            issuer: unverified.issuer.unwrap_or_default(),
            subject,
            kid: key.kid.clone(),
            algorithm: unverified.alg,
            claims: unverified.claims,
            roles_claim: entry.roles_claim.clone(),
        })
    }
}

/// Chooses the keys that may verify a token with `kid` and `alg`.
///
/// HMAC: the issuer's secret, whatever the `kid`, because it is the only
/// `oct` key and a JWKS never supplies one; `UnknownKey` when the secret is
/// missing or too short for `alg`. Otherwise, with a `kid`: the keys with
/// that `kid`, `UnknownKey` if there are none, `AlgorithmNotAllowed` if
/// none fits `alg` (an RSA key never verifies ES256 or HS256, a key whose
/// JWK pins RS256 never verifies PS256). Without a `kid`: every key that
/// fits `alg`, and `UnknownKey` if none does.
fn select_keys<'k>(
    keys: &'k [VerifyKey],
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Vec<&'k VerifyKey>, Reason> {
    if alg.family() == AlgorithmFamily::Hmac {
        let secrets: Vec<&VerifyKey> = keys
            .iter()
            .filter(|key| matches!(key.kind, KeyKind::Hmac { .. }) && key.fits(alg))
            .collect();
        if secrets.is_empty() {
            return Err(Reason::UnknownKey);
        }
        return Ok(secrets);
    }

    let Some(kid) = kid else {
        let fitting: Vec<&VerifyKey> = keys.iter().filter(|key| key.fits(alg)).collect();
        if fitting.is_empty() {
            return Err(Reason::UnknownKey);
        }
        return Ok(fitting);
    };

    let named: Vec<&VerifyKey> = keys
        .iter()
        .filter(|key| key.kid.as_deref() == Some(kid))
        .collect();
    if named.is_empty() {
        return Err(Reason::UnknownKey);
    }
    let fitting: Vec<&VerifyKey> = named.into_iter().filter(|key| key.fits(alg)).collect();
    if fitting.is_empty() {
        return Err(Reason::AlgorithmNotAllowed);
    }
    Ok(fitting)
}

/// Verifies the signature over the signing input with each candidate until
/// one succeeds, and returns that key. Claims are checked afterwards, from
/// the strictly parsed payload, so jsonwebtoken only does the cryptography.
fn verify_signature<'k>(
    unverified: &token::Unverified<'_>,
    candidates: &[&'k VerifyKey],
    alg: Algorithm,
) -> Result<&'k VerifyKey, Reason> {
    for key in candidates {
        match jsonwebtoken::crypto::verify(
            unverified.signature,
            unverified.signing_input.as_bytes(),
            &key.decoding,
            alg,
        ) {
            Ok(true) => return Ok(key),
            Ok(false) => {}
            Err(error) => {
                let reason = reason_for(error.kind());
                if reason != Reason::InvalidSignature {
                    return Err(reason);
                }
            }
        }
    }
    Err(Reason::InvalidSignature)
}

/// Maps a jsonwebtoken error to the reason reported for it.
fn reason_for(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::InvalidSignature
        // A key that aws-lc-rs cannot use verifies nothing, so the
        // signature counts as invalid.
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::Provider(_)
        | ErrorKind::Signing(_)
        | ErrorKind::RsaFailedSigning => Reason::InvalidSignature,
        // The key's type does not fit the algorithm, or the algorithm is
        // not one the validation allows.
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::InvalidKeyFormat => Reason::AlgorithmNotAllowed,
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::InvalidIssuer => Reason::UnknownIssuer,
        ErrorKind::InvalidAudience => Reason::AudienceMismatch,
        // Shape and encoding problems; also `InvalidSubject`, because this
        // verifier never sets an expected subject, and kinds added to jsonwebtoken later.
        _ => Reason::MalformedToken,
    }
}

/// Returns the first 16 hex characters of the token's SHA-256, an id for
/// logs and audit events that does not reveal the token.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};

    use super::*;
    use crate::config::IssuerConfig;
    use crate::jwks::KeySet;

    const ISS: &str = "https://idp.example";
    const NOW: u64 = 1_700_000_000;
    const SKEW: u64 = 60;

    const JWKS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/jwks.json"
    ));
    const RSA_PEM: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/rsa-1.pem"
    ));
    const EC_PEM: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/ec-1.pem"
    ));
    const ED_PEM: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/ed-1.pem"
    ));
    const RSA_UNKNOWN_PEM: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/rsa-unknown.pem"
    ));

    fn issuer_config(algorithms: &[&str]) -> IssuerConfig {
        serde_json::from_value(json!({
            "issuer": ISS,
            "jwks_uri": "http://127.0.0.1:9/jwks",
            "audiences": ["orders", "billing"],
            "algorithms": algorithms,
            "clock_skew_seconds": SKEW,
            "roles_claim": "realm_access.roles",
        }))
        .expect("issuer config")
    }

    fn verifier_for(config: IssuerConfig) -> Verifier {
        let keys = IssuerKeys::new(config);
        let (set, _) = KeySet::from_jwks_json(JWKS.as_bytes()).expect("fixture JWKS");
        keys.replace_keys(set);
        Verifier::new(vec![Arc::new(keys)])
    }

    fn verifier() -> Verifier {
        verifier_for(issuer_config(&["RS256", "ES256", "EdDSA"]))
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "sub": "alice",
            "aud": "orders",
            "iat": NOW,
            "nbf": NOW,
            "exp": NOW + 300,
            "realm_access": {"roles": ["reader"]},
        })
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().expect("object").remove(key);
        claims
    }

    fn sign(alg: Algorithm, pem: &str, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem.as_bytes()),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem.as_bytes()),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem.as_bytes()),
            AlgorithmFamily::Hmac => EncodingKey::from_secret(pem.as_bytes()),
        }
        .expect("fixture key");
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    fn rs256(claims: &Value) -> String {
        sign(Algorithm::RS256, RSA_PEM, Some("rsa-1"), claims)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Builds a token from header and payload JSON and raw signature bytes.
    fn raw_token(header: &Value, payload: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes()),
            b64(signature)
        )
    }

    fn reason(result: Result<VerifiedToken, VerifyFailure>) -> Result<(), Reason> {
        result.map(|_| ()).map_err(|failure| failure.reason)
    }

    #[test]
    fn valid_tokens_of_each_algorithm() {
        let verifier = verifier();
        let cases = [
            (
                sign(Algorithm::RS256, RSA_PEM, Some("rsa-1"), &claims()),
                "RS256",
                "rsa-1",
            ),
            (
                sign(Algorithm::ES256, EC_PEM, Some("ec-1"), &claims()),
                "ES256",
                "ec-1",
            ),
            (
                sign(Algorithm::EdDSA, ED_PEM, Some("ed-1"), &claims()),
                "EdDSA",
                "ed-1",
            ),
        ];

        for (token, alg, kid) in cases {
            let accepted = verifier.verify(&token, NOW).expect(alg);

            assert_eq!(accepted.issuer, ISS);
            assert_eq!(accepted.subject.as_deref(), Some("alice"));
            assert_eq!(accepted.kid.as_deref(), Some(kid));
            assert_eq!(accepted.algorithm, alg);
            assert_eq!(accepted.roles_claim, "realm_access.roles");
            assert_eq!(accepted.claims["realm_access"]["roles"][0], "reader");
        }
    }

    #[test]
    fn tokens_without_kid_try_fitting_keys() {
        let verifier = verifier();

        for (alg, pem) in [
            (Algorithm::RS256, RSA_PEM),
            (Algorithm::ES256, EC_PEM),
            (Algorithm::EdDSA, ED_PEM),
        ] {
            let token = sign(alg, pem, None, &claims());

            let accepted = verifier.verify(&token, NOW).expect("verifies without kid");

            assert!(accepted.kid.is_some(), "{alg:?}");
        }
    }

    #[test]
    fn claim_failures() {
        let verifier = verifier();
        let cases = [
            (
                "expired",
                with(claims(), "exp", json!(NOW - SKEW - 1)),
                Err(Reason::Expired),
            ),
            (
                "expired within skew",
                with(claims(), "exp", json!(NOW - SKEW + 1)),
                Ok(()),
            ),
            (
                "exp missing",
                without(claims(), "exp"),
                Err(Reason::Expired),
            ),
            (
                "exp not a number",
                with(claims(), "exp", json!("soon")),
                Err(Reason::InvalidClaims),
            ),
            (
                "nbf future",
                with(claims(), "nbf", json!(NOW + SKEW + 1)),
                Err(Reason::NotYetValid),
            ),
            (
                "nbf within skew",
                with(claims(), "nbf", json!(NOW + SKEW)),
                Ok(()),
            ),
            (
                "iat future",
                with(claims(), "iat", json!(NOW + SKEW + 1)),
                Err(Reason::NotYetValid),
            ),
            (
                "wrong iss",
                with(claims(), "iss", json!("https://evil.example")),
                Err(Reason::UnknownIssuer),
            ),
            (
                "iss with trailing slash",
                with(claims(), "iss", json!("https://idp.example/")),
                Err(Reason::UnknownIssuer),
            ),
            (
                "iss missing",
                without(claims(), "iss"),
                Err(Reason::UnknownIssuer),
            ),
            (
                "aud string mismatch",
                with(claims(), "aud", json!("payments")),
                Err(Reason::AudienceMismatch),
            ),
            (
                "aud array mismatch",
                with(claims(), "aud", json!(["payments", "ledger"])),
                Err(Reason::AudienceMismatch),
            ),
            (
                "aud array match",
                with(claims(), "aud", json!(["payments", "billing"])),
                Ok(()),
            ),
            (
                "aud missing",
                without(claims(), "aud"),
                Err(Reason::AudienceMismatch),
            ),
        ];

        for (name, claims, expected) in cases {
            let token = rs256(&claims);

            assert_eq!(reason(verifier.verify(&token, NOW)), expected, "{name}");
        }
    }

    #[test]
    fn audience_unchecked_when_none_configured() {
        let mut config = issuer_config(&["RS256"]);
        config.audiences.clear();
        let verifier = verifier_for(config);

        let token = rs256(&with(claims(), "aud", json!("anything")));

        assert!(verifier.verify(&token, NOW).is_ok());
    }

    #[test]
    fn failure_carries_issuer_and_kid() {
        let verifier = verifier();
        let wrong_issuer = rs256(&with(claims(), "iss", json!("https://evil.example")));
        let unknown_kid = sign(Algorithm::RS256, RSA_PEM, Some("rotated-7"), &claims());

        let issuer_failure = verifier
            .verify(&wrong_issuer, NOW)
            .expect_err("unknown issuer");
        let kid_failure = verifier.verify(&unknown_kid, NOW).expect_err("unknown kid");

        assert_eq!(
            issuer_failure.issuer.as_deref(),
            Some("https://evil.example")
        );
        assert_eq!(
            kid_failure,
            VerifyFailure {
                reason: Reason::UnknownKey,
                issuer: Some(ISS.to_owned()),
                kid: Some("rotated-7".to_owned())
            }
        );
    }

    #[test]
    fn alg_none_in_any_spelling() {
        let verifier = verifier();
        let valid = rs256(&claims());
        let signature = URL_SAFE_NO_PAD
            .decode(valid.rsplit('.').next().expect("signature"))
            .expect("b64");

        for alg in ["none", "None", "NONE", "nOnE"] {
            for sig in [&[][..], &signature[..]] {
                let token = raw_token(&json!({"alg": alg, "kid": "rsa-1"}), &claims(), sig);

                let failure = verifier.verify(&token, NOW).expect_err(alg);

                assert_eq!(
                    failure.reason,
                    Reason::AlgorithmNotAllowed,
                    "{alg} with {} signature bytes",
                    sig.len()
                );
                assert_eq!(failure.issuer.as_deref(), Some(ISS));
            }
        }
    }

    #[test]
    fn algorithms_outside_allow_list() {
        let verifier = verifier_for(issuer_config(&["RS256", "ES256"]));
        let cases = [
            (
                "PS256 with the RSA key",
                sign(Algorithm::PS256, RSA_PEM, Some("rsa-1"), &claims()),
            ),
            (
                "EdDSA not listed",
                sign(Algorithm::EdDSA, ED_PEM, Some("ed-1"), &claims()),
            ),
            (
                "lower-case name",
                raw_token(&json!({"alg": "rs256", "kid": "rsa-1"}), &claims(), b"sig"),
            ),
            (
                "unknown name",
                raw_token(&json!({"alg": "RS1", "kid": "rsa-1"}), &claims(), b"sig"),
            ),
        ];

        for (name, token) in cases {
            assert_eq!(
                reason(verifier.verify(&token, NOW)),
                Err(Reason::AlgorithmNotAllowed),
                "{name}"
            );
        }
    }

    /// Returns the RSA public key from the JWKS in the forms an attacker
    /// could try as an HMAC secret: the modulus bytes and the JWK's JSON.
    fn rsa_public_key_secrets() -> Vec<Vec<u8>> {
        let document: Value = serde_json::from_str(JWKS).expect("fixture JSON");
        let jwk = &document["keys"][0];
        let modulus = URL_SAFE_NO_PAD
            .decode(jwk["n"].as_str().expect("n"))
            .expect("b64");
        vec![modulus, jwk.to_string().into_bytes()]
    }

    #[test]
    fn hs256_with_public_key_as_secret() {
        // Even an issuer configured (without validation) to list HS256 must
        // never verify HMAC with a JWKS key.
        let verifiers = [verifier(), verifier_for(issuer_config(&["RS256", "HS256"]))];

        for secret in rsa_public_key_secrets() {
            let key = EncodingKey::from_secret(&secret).expect("non-empty secret");
            for kid in [Some("rsa-1"), None] {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = kid.map(str::to_owned);
                let token = jsonwebtoken::encode(&header, &claims(), &key).expect("sign");

                for verifier in &verifiers {
                    assert_eq!(
                        reason(verifier.verify(&token, NOW)),
                        Err(Reason::AlgorithmNotAllowed),
                        "kid {kid:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn key_of_other_type_for_kid() {
        let verifier = verifier();
        // Signed correctly with the RSA key, but the header names the EC key.
        let token = sign(Algorithm::RS256, RSA_PEM, Some("ec-1"), &claims());

        assert_eq!(
            reason(verifier.verify(&token, NOW)),
            Err(Reason::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn unknown_keys_and_bad_signatures() {
        let verifier = verifier();
        let valid = rs256(&claims());
        let parts: Vec<&str> = valid.split('.').collect();
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");

        let tampered_payload = b64(with(claims(), "sub", json!("mallory"))
            .to_string()
            .as_bytes());
        let tampered = format!("{}.{tampered_payload}.{}", parts[0], parts[2]);
        let truncated = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            b64(&signature[..signature.len() - 10])
        );
        let mut flipped_signature = signature.clone();
        flipped_signature[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], b64(&flipped_signature));
        let empty_signature = format!("{}.{}.", parts[0], parts[1]);

        let cases = [
            (
                "unknown kid",
                sign(Algorithm::RS256, RSA_PEM, Some("nope"), &claims()),
                Reason::UnknownKey,
            ),
            (
                "unknown key, known kid",
                sign(Algorithm::RS256, RSA_UNKNOWN_PEM, Some("rsa-1"), &claims()),
                Reason::InvalidSignature,
            ),
            (
                "unknown key, no kid",
                sign(Algorithm::RS256, RSA_UNKNOWN_PEM, None, &claims()),
                Reason::InvalidSignature,
            ),
            (
                "ES384 key absent, no kid",
                raw_token(&json!({"alg": "ES384"}), &claims(), b"sig"),
                Reason::AlgorithmNotAllowed,
            ),
            ("tampered payload", tampered, Reason::InvalidSignature),
            ("truncated signature", truncated, Reason::InvalidSignature),
            ("flipped signature bit", flipped, Reason::InvalidSignature),
            ("empty signature", empty_signature, Reason::InvalidSignature),
        ];

        for (name, token, expected) in cases {
            assert_eq!(
                reason(verifier.verify(&token, NOW)),
                Err(expected),
                "{name}"
            );
        }
    }

    #[test]
    fn no_fitting_key_without_kid() {
        let verifier = verifier_for(issuer_config(&["RS256", "ES384"]));
        let token = raw_token(&json!({"alg": "ES384"}), &claims(), b"sig");

        assert_eq!(
            reason(verifier.verify(&token, NOW)),
            Err(Reason::UnknownKey)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let verifier = verifier();
        let valid = rs256(&claims());
        let parts: Vec<&str> = valid.split('.').collect();
        let cases = [
            String::new(),
            "garbage".to_owned(),
            "a.b.c".to_owned(),
            "...".to_owned(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{valid}.extra"),
            format!("{}.{}.{}*", parts[0], parts[1], parts[2]),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], b64(b"not json"), parts[2]),
            raw_token(
                &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
                &claims(),
                b"sig",
            ),
        ];

        for token in cases {
            assert_eq!(
                reason(verifier.verify(&token, NOW)),
                Err(Reason::MalformedToken),
                "token {token:?}"
            );
        }
    }

    #[test]
    fn keys_unavailable_before_first_fetch() {
        let keys = Arc::new(IssuerKeys::new(issuer_config(&["RS256"])));
        let verifier = Verifier::new(vec![keys]);

        let failure = verifier
            .verify(&rs256(&claims()), NOW)
            .expect_err("no keys yet");

        assert_eq!(failure.reason, Reason::KeysUnavailable);
        assert_eq!(failure.issuer.as_deref(), Some(ISS));
    }

    #[test]
    fn issuer_keys_lookup() {
        let verifier = verifier();

        assert!(verifier.issuer_keys(ISS).is_some());
        assert!(verifier.issuer_keys("https://other.example").is_none());
    }

    #[test]
    fn jsonwebtoken_errors_map_to_reasons() {
        let json_error = serde_json::from_str::<Value>("{").expect_err("bad JSON");
        let utf8_error = String::from_utf8(vec![0xff]).expect_err("bad UTF-8");
        // jsonwebtoken's base64 is another major version than ours, so its
        // error is made by jsonwebtoken itself.
        let base64_error = jsonwebtoken::decode_header("!!.e30.c2ln")
            .expect_err("bad base64")
            .into_kind();
        assert!(
            matches!(base64_error, ErrorKind::Base64(_)),
            "{base64_error:?}"
        );
        let cases = [
            (ErrorKind::InvalidToken, Reason::MalformedToken),
            (ErrorKind::InvalidSignature, Reason::InvalidSignature),
            (ErrorKind::InvalidEcdsaKey, Reason::InvalidSignature),
            (ErrorKind::InvalidEddsaKey, Reason::InvalidSignature),
            (
                ErrorKind::InvalidRsaKey("short".to_owned()),
                Reason::InvalidSignature,
            ),
            (ErrorKind::RsaFailedSigning, Reason::InvalidSignature),
            (ErrorKind::Signing("x".to_owned()), Reason::InvalidSignature),
            (
                ErrorKind::Provider("x".to_owned()),
                Reason::InvalidSignature,
            ),
            (ErrorKind::InvalidAlgorithmName, Reason::AlgorithmNotAllowed),
            (ErrorKind::UnsupportedAlgorithm, Reason::AlgorithmNotAllowed),
            (ErrorKind::InvalidKeyFormat, Reason::AlgorithmNotAllowed),
            (ErrorKind::InvalidAlgorithm, Reason::AlgorithmNotAllowed),
            (ErrorKind::MissingAlgorithm, Reason::AlgorithmNotAllowed),
            (
                ErrorKind::MissingRequiredClaim("exp".to_owned()),
                Reason::Expired,
            ),
            (
                ErrorKind::MissingRequiredClaim("aud".to_owned()),
                Reason::MalformedToken,
            ),
            (
                ErrorKind::InvalidClaimFormat("exp".to_owned()),
                Reason::MalformedToken,
            ),
            (ErrorKind::ExpiredSignature, Reason::Expired),
            (ErrorKind::InvalidIssuer, Reason::UnknownIssuer),
            (ErrorKind::InvalidAudience, Reason::AudienceMismatch),
            (ErrorKind::InvalidSubject, Reason::MalformedToken),
            (ErrorKind::ImmatureSignature, Reason::NotYetValid),
            (base64_error, Reason::MalformedToken),
            (
                ErrorKind::Json(Arc::new(json_error)),
                Reason::MalformedToken,
            ),
            (ErrorKind::Utf8(utf8_error), Reason::MalformedToken),
        ];

        for (kind, expected) in cases {
            assert_eq!(reason_for(&kind), expected, "{kind:?}");
        }
    }

    #[test]
    fn fingerprint_is_sha256_prefix() {
        // SHA-256("abc") = ba7816bf 8f01cfea 414140de ...
        assert_eq!(fingerprint("abc"), "ba7816bf8f01cfea");
        assert_eq!(fingerprint(&rs256(&claims())).len(), 16);
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
