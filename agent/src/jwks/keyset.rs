//! Parsing a JWKS document (RFC 7517 §5) into verification keys.
//!
//! Only public signature keys of the kinds jsonwebtoken verifies are kept:
//! RSA, EC P-256 and P-384, and Ed25519. Symmetric (`oct`) keys in a JWKS
//! are never kept, so a JWKS can never turn into an HMAC secret; the only
//! HMAC key is the one from the issuer's `hmac_secret_file`.

use std::fmt;

use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Shortest RSA modulus accepted, in bits. RFC 7518 §3.3 requires 2048 for
/// RS*/PS*, and aws-lc-rs rejects shorter keys at verification anyway.
pub const MIN_RSA_MODULUS_BITS: usize = 2048;

/// base64url as JWKs use it (RFC 7517 §2): unpadded, but padding from a
/// lenient issuer is tolerated because it changes nothing.
const JWK_BASE64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The key type and curve of a verification key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    /// An HMAC secret (`kty` `oct`) of `bytes` bytes.
    Hmac {
        bytes: usize,
    },
}

impl KeyKind {
    /// JWK `kty` of this kind.
    pub fn kty(self) -> &'static str {
        match self {
            Self::Rsa => "RSA",
            Self::EcP256 | Self::EcP384 => "EC",
            Self::Ed25519 => "OKP",
            Self::Hmac { .. } => "oct",
        }
    }

    /// JWK `crv` of this kind, `None` for RSA.
    pub fn crv(self) -> Option<&'static str> {
        match self {
            Self::Rsa | Self::Hmac { .. } => None,
            Self::EcP256 => Some("P-256"),
            Self::EcP384 => Some("P-384"),
            Self::Ed25519 => Some("Ed25519"),
        }
    }

    /// True when a key of this kind can verify `alg` (RFC 7518 §3.1): RSA
    /// for RS*/PS*, P-256 for ES256, P-384 for ES384, Ed25519 for `EdDSA`,
    /// and an HMAC secret for HS* when it is at least as long as the hash
    /// output, as RFC 7518 §3.2 requires.
    pub fn fits(self, alg: Algorithm) -> bool {
        match self {
            Self::Rsa => alg.family() == AlgorithmFamily::Rsa,
            Self::EcP256 => alg == Algorithm::ES256,
            Self::EcP384 => alg == Algorithm::ES384,
            Self::Ed25519 => alg == Algorithm::EdDSA,
            Self::Hmac { bytes } => match alg {
                Algorithm::HS256 => bytes >= 32,
                Algorithm::HS384 => bytes >= 48,
                Algorithm::HS512 => bytes >= 64,
                _ => false,
            },
        }
    }
}

/// One public key usable for signature verification.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub decoding: DecodingKey,
    /// The key's parameters as published, to tell whether a refetched set
    /// differs from the current one.
    identity: String,
}

impl VerifyKey {
    /// True when this key may verify a token signed with `alg`: its type
    /// and curve fit, and its own `alg`, if any, is the same.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A JWK that was left out of the set, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedKey {
    pub kid: Option<String>,
    pub reason: String,
}

/// An issuer's verification keys at one point in time.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

/// Error from parsing a JWKS document that yields no key set.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("the response is not a JWKS JSON object with a `keys` array; check that jwks_uri points at the JWKS")]
    NotJwks {
        #[source]
        source: serde_json::Error,
    },
    #[error("the JWKS holds no usable signature key ({skipped} skipped); check the issuer's published keys")]
    NoUsableKeys { skipped: usize },
    #[error(
        "the HMAC secret is empty; write the secret shared with the issuer into hmac_secret_file"
    )]
    EmptySecret,
}

impl KeySet {
    /// Parses a JWKS document. Keys that are not signature keys, or that
    /// do not parse, are returned in the second element instead of
    /// failing the whole set. A document with no usable key is an error.
    pub fn from_jwks_json(document: &[u8]) -> Result<(Self, Vec<SkippedKey>), KeySetError> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document =
            serde_json::from_slice(document).map_err(|source| KeySetError::NotJwks { source })?;

        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for value in document.keys {
            let kid = value
                .get("kid")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            match parse_jwk(value) {
                Ok(key) => keys.push(key),
                Err(reason) => skipped.push(SkippedKey { kid, reason }),
            }
        }

        if keys.is_empty() {
            return Err(KeySetError::NoUsableKeys {
                skipped: skipped.len(),
            });
        }
        Ok((Self { keys }, skipped))
    }

    /// Parses a JWKS written into the configuration: a JSON string holding
    /// the document, or the document itself as a mapping.
    pub fn from_inline(value: &serde_json::Value) -> Result<(Self, Vec<SkippedKey>), KeySetError> {
        match value {
            serde_json::Value::String(text) => Self::from_jwks_json(text.as_bytes()),
            document => {
                // Serialising a `Value` cannot fail: its keys are strings.
                let bytes = serde_json::to_vec(document).unwrap_or_default();
                Self::from_jwks_json(&bytes)
            }
        }
    }

    /// Builds a set that holds only the HMAC `secret`.
    pub fn hmac_only(secret: &[u8]) -> Result<Self, KeySetError> {
        let mut set = Self::default();
        set.add_hmac_secret(secret)?;
        Ok(set)
    }

    /// Adds the issuer's HMAC `secret` as an `oct` key without a `kid`.
    /// Its identity is the secret's SHA-256, so the secret itself is kept
    /// only inside the decoding key.
    pub fn add_hmac_secret(&mut self, secret: &[u8]) -> Result<(), KeySetError> {
        let decoding = DecodingKey::from_secret(secret).map_err(|_| KeySetError::EmptySecret)?;
        let digest = Sha256::digest(secret);
        let identity = format!("hmac|{}", JWK_BASE64.encode(digest));
        self.keys.push(VerifyKey {
            kid: None,
            kind: KeyKind::Hmac {
                bytes: secret.len(),
            },
            alg: None,
            decoding,
            identity,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Returns every key, in document order.
    pub fn keys(&self) -> &[VerifyKey] {
        &self.keys
    }

    /// Keys whose `kid` is `kid`; a JWKS may publish one `kid` for keys of
    /// different algorithms.
    pub fn with_kid<'a>(&'a self, kid: &'a str) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys
            .iter()
            .filter(move |key| key.kid.as_deref() == Some(kid))
    }

    /// True when some key has this `kid`.
    pub fn contains_kid(&self, kid: &str) -> bool {
        self.with_kid(kid).next().is_some()
    }

    /// Returns the `kid`s of the keys for logs, with `-` for a key without one.
    pub fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|key| key.kid.as_deref().unwrap_or("-"))
            .collect()
    }

    /// True when both sets hold the same keys, in any order.
    pub fn same_keys(&self, other: &KeySet) -> bool {
        let mut mine: Vec<&str> = self.keys.iter().map(|key| key.identity.as_str()).collect();
        let mut theirs: Vec<&str> = other.keys.iter().map(|key| key.identity.as_str()).collect();
        mine.sort_unstable();
        theirs.sort_unstable();
        mine == theirs
    }
}

/// The JWK members this module reads (RFC 7517 §4, RFC 7518 §6).
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn parse_jwk(value: serde_json::Value) -> Result<VerifyKey, String> {
    let raw: RawJwk =
        serde_json::from_value(value).map_err(|error| format!("not a valid JWK: {error}"))?;

    if let Some(usage) = raw.usage.as_deref().filter(|usage| *usage != "sig") {
        return Err(format!("not a signature key (use {usage:?})"));
    }
    if let Some(ops) = &raw.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("key_ops does not include \"verify\"".to_owned());
        }
    }

    let (kind, decoding, material) = match raw.kty.as_str() {
        "RSA" => rsa_key(&raw)?,
        "EC" => ec_key(&raw)?,
        "OKP" => okp_key(&raw)?,
        "oct" => return Err("symmetric key; HMAC keys are never used for verification".to_owned()),
        other => return Err(format!("unsupported key type {other:?}")),
    };

    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => {
            let alg = name
                .parse::<Algorithm>()
                .ok()
                .filter(|alg| alg.family() != AlgorithmFamily::Hmac)
                .ok_or_else(|| format!("alg {name:?} is not a supported signature algorithm"))?;
            if !kind.fits(alg) {
                return Err(format!(
                    "alg {name:?} does not fit key type {} {:?}",
                    kind.kty(),
                    kind.crv()
                ));
            }
            Some(alg)
        }
    };

    let identity = format!("{:?}|{:?}|{:?}|{material}", raw.kid, kind, alg);
    Ok(VerifyKey {
        kid: raw.kid,
        kind,
        alg,
        decoding,
        identity,
    })
}

fn decode_member(raw: Option<&String>, member: &str) -> Result<Vec<u8>, String> {
    let text = raw.ok_or_else(|| format!("member {member:?} is missing"))?;
    JWK_BASE64
        .decode(text)
        .map_err(|error| format!("member {member:?} is not base64url: {error}"))
}

fn rsa_key(raw: &RawJwk) -> Result<(KeyKind, DecodingKey, String), String> {
    let n = decode_member(raw.n.as_ref(), "n")?;
    let e = decode_member(raw.e.as_ref(), "e")?;

    let leading_zero_bytes = n.iter().take_while(|byte| **byte == 0).count();
    let significant = &n[leading_zero_bytes..];
    let bits = significant.first().map_or(0, |first| {
        (significant.len() - 1) * 8 + (8 - first.leading_zeros() as usize)
    });
    if bits < MIN_RSA_MODULUS_BITS {
        return Err(format!(
            "RSA modulus has {bits} bits, fewer than {MIN_RSA_MODULUS_BITS}"
        ));
    }
    if e.iter().all(|byte| *byte == 0) {
        return Err("RSA exponent is zero".to_owned());
    }

    let material = format!("{}|{}", JWK_BASE64.encode(&n), JWK_BASE64.encode(&e));
    Ok((
        KeyKind::Rsa,
        DecodingKey::from_rsa_raw_components(&n, &e),
        material,
    ))
}

fn ec_key(raw: &RawJwk) -> Result<(KeyKind, DecodingKey, String), String> {
    let (kind, coordinate_len) = match raw.crv.as_deref() {
        Some("P-256") => (KeyKind::EcP256, 32),
        Some("P-384") => (KeyKind::EcP384, 48),
        other => return Err(format!("unsupported EC curve {other:?}")),
    };
    let x = decode_member(raw.x.as_ref(), "x")?;
    let y = decode_member(raw.y.as_ref(), "y")?;
    if x.len() != coordinate_len || y.len() != coordinate_len {
        return Err(format!(
            "EC coordinates must be {coordinate_len} bytes each"
        ));
    }

    // SEC 1 §2.3.3 uncompressed point, the form aws-lc-rs verifies with.
    let mut point = Vec::with_capacity(1 + 2 * coordinate_len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);

    let material = JWK_BASE64.encode(&point);
    Ok((kind, DecodingKey::from_ec_der(&point), material))
}

fn okp_key(raw: &RawJwk) -> Result<(KeyKind, DecodingKey, String), String> {
    if raw.crv.as_deref() != Some("Ed25519") {
        return Err(format!("unsupported OKP curve {:?}", raw.crv));
    }
    let x = decode_member(raw.x.as_ref(), "x")?;
    if x.len() != 32 {
        return Err("Ed25519 public key must be 32 bytes".to_owned());
    }

    let material = JWK_BASE64.encode(&x);
    Ok((KeyKind::Ed25519, DecodingKey::from_ed_der(&x), material))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/jwks.json"
    ));

    fn fixture_keys() -> Vec<serde_json::Value> {
        let document: serde_json::Value = serde_json::from_str(FIXTURE).expect("fixture JSON");
        document["keys"].as_array().expect("keys array").clone()
    }

    fn document(keys: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).expect("serialize")
    }

    #[test]
    fn fixture_parses_three_keys() {
        let (set, skipped) = KeySet::from_jwks_json(FIXTURE.as_bytes()).expect("fixture JWKS");

        assert_eq!(set.kids(), ["rsa-1", "ec-1", "ed-1"]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let kinds: Vec<KeyKind> = set.keys().iter().map(|key| key.kind).collect();
        assert_eq!(kinds, [KeyKind::Rsa, KeyKind::EcP256, KeyKind::Ed25519]);
        assert_eq!(set.keys()[0].alg, Some(Algorithm::RS256));
    }

    #[test]
    fn unusable_keys_are_skipped() {
        let good = fixture_keys()[0].clone();
        let mut short_rsa = good.clone();
        short_rsa["kid"] = json!("short");
        short_rsa["n"] = json!(JWK_BASE64.encode([0xc5; 128]));
        let cases = [
            (
                json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
                "symmetric",
            ),
            (
                json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": good["n"], "e": "AQAB"}),
                "not a signature key",
            ),
            (
                json!({"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": good["n"], "e": "AQAB"}),
                "key_ops",
            ),
            (
                json!({"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": good["n"], "e": "AQAB"}),
                "not a supported",
            ),
            (
                json!({"kty": "RSA", "kid": "hs", "alg": "HS256", "n": good["n"], "e": "AQAB"}),
                "not a supported",
            ),
            (
                json!({"kty": "RSA", "kid": "es", "alg": "ES256", "n": good["n"], "e": "AQAB"}),
                "does not fit",
            ),
            (
                json!({"kty": "RSA", "kid": "no-n", "e": "AQAB"}),
                "\"n\" is missing",
            ),
            (
                json!({"kty": "RSA", "kid": "bad-n", "n": "!!", "e": "AQAB"}),
                "not base64url",
            ),
            (short_rsa, "fewer than 2048"),
            (
                json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}),
                "unsupported EC curve",
            ),
            (
                json!({"kty": "EC", "kid": "short-ec", "crv": "P-256", "x": "AAAA", "y": "AAAA"}),
                "32 bytes",
            ),
            (
                json!({"kty": "OKP", "kid": "x25519", "crv": "X25519", "x": "AA"}),
                "unsupported OKP curve",
            ),
            (
                json!({"kty": "PQC", "kid": "future"}),
                "unsupported key type",
            ),
            (json!({"kid": "no-kty"}), "not a valid JWK"),
        ];

        for (jwk, expected) in cases {
            let kid = jwk["kid"].as_str().map(str::to_owned);
            let (set, skipped) =
                KeySet::from_jwks_json(&document(&[jwk, good.clone()])).expect("one good key");

            assert_eq!(set.len(), 1, "{kid:?}");
            assert_eq!(skipped.len(), 1, "{kid:?}");
            assert_eq!(skipped[0].kid, kid);
            assert!(
                skipped[0].reason.contains(expected),
                "{kid:?}: {}",
                skipped[0].reason
            );
        }
    }

    #[test]
    fn garbage_documents_are_errors() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"{\"keys\": {}}",
            b"<html></html>",
        ] {
            let result = KeySet::from_jwks_json(body);

            assert!(
                matches!(result, Err(KeySetError::NotJwks { .. })),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn empty_or_unusable_set_is_error() {
        let empty = KeySet::from_jwks_json(b"{\"keys\": []}");
        let only_oct = KeySet::from_jwks_json(&document(&[json!({"kty": "oct", "k": "c2VjcmV0"})]));

        assert!(matches!(
            empty,
            Err(KeySetError::NoUsableKeys { skipped: 0 })
        ));
        assert!(matches!(
            only_oct,
            Err(KeySetError::NoUsableKeys { skipped: 1 })
        ));
    }

    #[test]
    fn same_keys_ignores_order() {
        let keys = fixture_keys();
        let (forward, _) = KeySet::from_jwks_json(&document(&keys)).expect("set");
        let reversed: Vec<_> = keys.iter().rev().cloned().collect();
        let (backward, _) = KeySet::from_jwks_json(&document(&reversed)).expect("set");
        let (fewer, _) = KeySet::from_jwks_json(&document(&keys[..2])).expect("set");

        assert!(forward.same_keys(&backward));
        assert!(!forward.same_keys(&fewer));
    }

    #[test]
    fn key_fits_algorithm() {
        let (set, _) = KeySet::from_jwks_json(FIXTURE.as_bytes()).expect("fixture JWKS");
        let rsa = &set.keys()[0];
        let ec = &set.keys()[1];
        let ed = &set.keys()[2];

        assert!(rsa.fits(Algorithm::RS256));
        assert!(!rsa.fits(Algorithm::PS256), "the JWK pins RS256");
        assert!(!rsa.fits(Algorithm::HS256));
        assert!(ec.fits(Algorithm::ES256));
        assert!(!ec.fits(Algorithm::ES384));
        assert!(ed.fits(Algorithm::EdDSA));
        for kind in [
            KeyKind::Rsa,
            KeyKind::EcP256,
            KeyKind::EcP384,
            KeyKind::Ed25519,
        ] {
            for hmac in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                assert!(!kind.fits(hmac), "{kind:?} must not fit {hmac:?}");
            }
        }
    }
}
