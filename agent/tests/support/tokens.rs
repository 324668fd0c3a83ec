//! Fixture files and tokens signed with the fixture keys.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// Returns the path of the shared fixture file `name` (keys and JWKS).
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Reads the shared fixture file `name` as text.
pub fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap()
}

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Returns the encoding key and algorithm of fixture key `kid` (the file
/// name without `.pem`; its prefix `rsa`, `ec` or `ed` gives the type).
pub fn fixture_key(kid: &str) -> (EncodingKey, Algorithm) {
    let pem = std::fs::read(fixture_path(&format!("{kid}.pem"))).unwrap();
    match kid.split('-').next().unwrap() {
        "rsa" => (EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS256),
        "ec" => (EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES256),
        "ed" => (EncodingKey::from_ed_pem(&pem).unwrap(), Algorithm::EdDSA),
        other => panic!("no fixture key type {other}"),
    }
}

/// Signs `claims` with fixture key `kid` and a header naming it.
pub fn sign(kid: &str, claims: &Value) -> String {
    sign_with_kid(kid, kid, claims)
}

/// Signs `claims` with fixture key `key_name` under a header whose `kid` is
/// `kid`, which may name no key the issuer publishes.
pub fn sign_with_kid(key_name: &str, kid: &str, claims: &Value) -> String {
    let (key, algorithm) = fixture_key(key_name);
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// Claims of user `user-7` from `issuer` for the `orders` audience with
/// `roles`, issued 10 seconds ago and expiring `expires_in` seconds from now
/// (in the past when negative).
pub fn user_claims(issuer: &str, roles: &[&str], expires_in: i64) -> Value {
    let now = i64::try_from(unix_now()).unwrap();
    json!({
        "iss": issuer,
        "sub": "user-7",
        "aud": "orders",
        "iat": now - 10,
        "exp": now + expires_in,
        "roles": roles,
    })
}

/// Returns a JWKS document with the fixture keys named by `kids`.
pub fn jwks_document(kids: &[&str]) -> Bytes {
    let mut document: Value = serde_json::from_str(&read_fixture("jwks.json")).unwrap();
    document["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|key| kids.contains(&key["kid"].as_str().unwrap()));
    Bytes::from(document.to_string())
}
