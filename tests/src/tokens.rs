//! Token minting with the fixture keys.
//!
//! `rsa-1`, `ec-1` and `ed-1` are in the issuer's JWKS; `rsa-unknown` is
//! not, so its tokens carry a `kid` the agent cannot resolve. Helpers also
//! build the hostile tokens that must be rejected: `alg: none`, HMAC signed
//! with public key material, and a tampered signature.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::issuer::{ISSUER, JWKS_JSON};

/// Lifetime of a valid test token, in seconds: long enough for the slowest
/// test, short enough to look like a real access token.
pub const VALID_LIFETIME_SECONDS: u64 = 600;

/// A fixture signing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// RSA 2048, RS256, in the JWKS.
    Rsa1,
    /// P-256, ES256, in the JWKS.
    Ec1,
    /// Ed25519, `EdDSA`, in the JWKS.
    Ed1,
    /// RSA 2048, RS256, not in the JWKS.
    RsaUnknown,
}

impl Key {
    /// Returns the `kid` header value of this key's tokens.
    pub fn kid(self) -> &'static str {
        match self {
            Self::Rsa1 => "rsa-1",
            Self::Ec1 => "ec-1",
            Self::Ed1 => "ed-1",
            Self::RsaUnknown => "rsa-unknown",
        }
    }

    pub fn algorithm(self) -> Algorithm {
        match self {
            Self::Rsa1 | Self::RsaUnknown => Algorithm::RS256,
            Self::Ec1 => Algorithm::ES256,
            Self::Ed1 => Algorithm::EdDSA,
        }
    }

    fn encoding_key(self) -> EncodingKey {
        let result = match self {
            Self::Rsa1 => EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa-1.pem")),
            Self::RsaUnknown => {
                EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa-unknown.pem"))
            }
            Self::Ec1 => EncodingKey::from_ec_pem(include_bytes!("../fixtures/ec-1.pem")),
            Self::Ed1 => EncodingKey::from_ed_pem(include_bytes!("../fixtures/ed-1.pem")),
        };
        result.unwrap_or_else(|error| panic!("fixture key {} is invalid: {error}", self.kid()))
    }
}

/// JWT claims; absent options are left out of the token.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// A string or an array of strings, as RFC 7519 §4.1.3 allows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Space-separated scopes, as RFC 8693 §4.2 defines `scope`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl Claims {
    /// Claims of a currently valid token from [`ISSUER`] for `audience`,
    /// without roles or scopes.
    pub fn valid(subject: &str, audience: &str) -> Self {
        let now = unix_now();
        Self {
            iss: Some(ISSUER.to_owned()),
            sub: Some(subject.to_owned()),
            aud: Some(serde_json::Value::String(audience.to_owned())),
            exp: Some(now + VALID_LIFETIME_SECONDS),
            nbf: Some(now),
            iat: Some(now),
            roles: None,
            scope: None,
        }
    }

    #[must_use]
    pub fn with_roles(mut self, roles: &[&str]) -> Self {
        self.roles = Some(roles.iter().map(|role| (*role).to_owned()).collect());
        self
    }

    #[must_use]
    pub fn with_scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.to_owned());
        self
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Signs `claims` with `key`, setting `alg` and `kid` from the key.
pub fn mint(key: Key, claims: &Claims) -> String {
    let mut header = Header::new(key.algorithm());
    header.kid = Some(key.kid().to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding_key())
        .unwrap_or_else(|error| panic!("failed to sign with {}: {error}", key.kid()))
}

/// An unsigned token (`alg: none`, RFC 7519 §6), which a verifier must
/// reject.
pub fn mint_alg_none(claims: &Claims) -> String {
    let header = serde_json::json!({ "alg": "none", "typ": "JWT", "kid": Key::Rsa1.kid() });
    format!("{}.{}.", encode_segment(&header), encode_segment(claims))
}

/// Signs an HS256 token with the issuer's published JWKS as the HMAC
/// secret, under the RSA key's `kid`: the algorithm confusion attack of
/// RFC 8725 §2.1.
pub fn mint_hs256_with_public_key(claims: &Claims) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(Key::Rsa1.kid().to_owned());
    let key = EncodingKey::from_secret(JWKS_JSON.as_bytes()).expect("any bytes are an HMAC key");
    jsonwebtoken::encode(&header, claims, &key).expect("HMAC signing cannot fail")
}

/// `token` with its signature changed in one byte, still valid base64url.
pub fn tamper_signature(token: &str) -> String {
    let (signed, signature) = token.rsplit_once('.').expect("a JWS has three segments");
    let mut bytes = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("the signature is base64url");
    bytes[0] ^= 0x01;
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Fingerprint the agent logs and audits instead of a token: the first 16
/// hex characters of the token's SHA-256.
pub fn fingerprint(token: &str) -> String {
    crate::sha256_hex(token.as_bytes())[..16].to_owned()
}

fn encode_segment<T: Serialize>(value: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("claims serialize"))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    use super::*;

    const AUDIENCE: &str = "orders";

    fn decoding_key(kid: &str) -> DecodingKey {
        let jwks: JwkSet = serde_json::from_str(JWKS_JSON).expect("jwks");
        let jwk = jwks.find(kid).expect("kid in jwks");
        DecodingKey::from_jwk(jwk).expect("decoding key")
    }

    fn validation(algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation
    }

    #[test]
    fn published_keys_verify_minted_tokens() {
        let claims = Claims::valid("alice", AUDIENCE).with_roles(&["orders.read"]);
        for key in [Key::Rsa1, Key::Ec1, Key::Ed1] {
            let token = mint(key, &claims);

            let header = decode_header(&token).expect("header");
            let decoded = decode::<serde_json::Value>(
                &token,
                &decoding_key(key.kid()),
                &validation(key.algorithm()),
            );

            assert_eq!(header.kid.as_deref(), Some(key.kid()));
            let decoded = decoded.unwrap_or_else(|error| panic!("{}: {error}", key.kid()));
            assert_eq!(decoded.claims["roles"][0], "orders.read");
        }
    }

    #[test]
    fn unknown_key_is_not_published() {
        let jwks: JwkSet = serde_json::from_str(JWKS_JSON).expect("jwks");
        let token = mint(Key::RsaUnknown, &Claims::valid("alice", AUDIENCE));

        let result = decode::<serde_json::Value>(
            &token,
            &decoding_key(Key::Rsa1.kid()),
            &validation(Algorithm::RS256),
        );

        assert!(jwks.find(Key::RsaUnknown.kid()).is_none());
        assert!(
            result.is_err(),
            "rsa-1 must not verify an rsa-unknown signature"
        );
    }

    #[test]
    fn tampered_signature_fails_verification() {
        let token = mint(Key::Rsa1, &Claims::valid("alice", AUDIENCE));
        let tampered = tamper_signature(&token);

        let result = decode::<serde_json::Value>(
            &tampered,
            &decoding_key(Key::Rsa1.kid()),
            &validation(Algorithm::RS256),
        );

        assert_ne!(tampered, token);
        assert!(result.is_err());
    }

    #[test]
    fn alg_none_token_has_empty_signature() {
        let token = mint_alg_none(&Claims::valid("alice", AUDIENCE));
        let header_segment = token.split('.').next().expect("header segment");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header_segment).expect("base64url"))
                .expect("header json");

        assert!(token.ends_with('.'));
        assert_eq!(header["alg"], "none");
    }

    #[test]
    fn fingerprint_is_sha256_prefix() {
        assert_eq!(fingerprint("abc"), "ba7816bf8f01cfea");
    }
}
