//! Costs around the signature check, each through the agent's public API:
//!
//! - `rules/10` and `rules/1000`: one policy decision for a verified token
//!   whose request matches only the last rule, so every rule is tried;
//! - `jwks_parse/100_keys`: `KeySet::from_jwks_json` on a document of 100
//!   keys (34 RSA-2048, 33 P-256, 33 Ed25519, the fixture keys under
//!   distinct `kid`s);
//! - `token_decode`: `Verifier::verify` on a token from an issuer the
//!   verifier does not know, which returns after the header and claims are
//!   decoded and before any key or signature work.
//!
//! Run: `cargo bench -p tokengate --bench policy`. Results are recorded in
//! `docs/benchmarks.md`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

use tokengate::config::{IssuerConfig, RuleConfig};
use tokengate::decision::Reason;
use tokengate::jwks::{IssuerKeys, KeySet};
use tokengate::policy::Policy;
use tokengate::verify::{VerifiedToken, Verifier};

const ISSUER: &str = "https://issuer.bench.test";

/// Keys in the JWKS benchmark document.
const JWKS_KEYS: usize = 100;

fn fixture(name: &str) -> String {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

/// Builds `count` rules: every rule but the last requires a role on its
/// own path prefix, and the last one matches `/orders` and requires the
/// role and a claim the token has.
fn rules(count: usize) -> Vec<RuleConfig> {
    let mut rules: Vec<Value> = (0..count - 1)
        .map(|index| {
            json!({
                "path_prefix": format!("/service-{index}"),
                "methods": ["GET", "POST"],
                "roles": [format!("role-{index}")],
            })
        })
        .collect();
    rules.push(json!({
        "path_prefix": "/orders",
        "methods": ["GET"],
        "roles": ["orders.read"],
        "claims": { "tenant": ["acme", "globex"] },
    }));
    rules
        .into_iter()
        .map(|rule| serde_json::from_value(rule).expect("benchmark rule is valid"))
        .collect()
}

fn verified_token() -> VerifiedToken {
    let claims: Map<String, Value> = json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": "orders",
        "tenant": "acme",
        "roles": ["orders.read", "reports.read"],
        "scope": "orders:read",
    })
    .as_object()
    .expect("object")
    .clone();
    VerifiedToken {
        issuer: ISSUER.to_owned(),
        subject: Some("alice".to_owned()),
        kid: Some("rsa-1".to_owned()),
        algorithm: "RS256".to_owned(),
        claims,
        roles_claim: "roles".to_owned(),
    }
}

fn bench_rules(c: &mut Criterion) {
    let token = verified_token();
    let mut group = c.benchmark_group("rules");
    for count in [10, 1000] {
        let policy = Policy::new(&rules(count));
        let outcome = policy.evaluate("GET", "/orders/7", &token);
        assert_eq!(
            outcome.reason,
            Reason::Allowed,
            "the last rule must allow the benchmark request"
        );
        group.bench_function(count.to_string(), |b| {
            b.iter(|| policy.evaluate(black_box("GET"), black_box("/orders/7"), &token));
        });
    }
    group.finish();
}

/// Builds a JWKS document of [`JWKS_KEYS`] keys from the three fixture
/// public keys, each copy under its own `kid`.
fn jwks_document() -> Vec<u8> {
    let fixture: Value = serde_json::from_str(&fixture("jwks.json")).expect("fixture JWKS");
    let templates = fixture["keys"].as_array().expect("keys array").clone();
    let keys: Vec<Value> = (0..JWKS_KEYS)
        .map(|index| {
            let mut key = templates[index % templates.len()].clone();
            key["kid"] = json!(format!("key-{index}"));
            key
        })
        .collect();
    serde_json::to_vec(&json!({ "keys": keys })).expect("serializes")
}

fn bench_jwks_parse(c: &mut Criterion) {
    let document = jwks_document();
    let (set, skipped) = KeySet::from_jwks_json(&document).expect("valid JWKS");
    assert_eq!(set.len(), JWKS_KEYS, "skipped keys: {skipped:?}");

    c.bench_function("jwks_parse/100_keys", |b| {
        b.iter(|| KeySet::from_jwks_json(black_box(&document)).expect("valid JWKS"));
    });
}

fn bench_token_decode(c: &mut Criterion) {
    let config: IssuerConfig = serde_yaml::from_str(&format!(
        "issuer: {ISSUER}\njwks_uri: http://127.0.0.1:9/jwks\naudiences: [orders]\nalgorithms: [RS256]\n"
    ))
    .expect("issuer config");
    let verifier = Verifier::new(vec![Arc::new(IssuerKeys::new(config))]);

    let key = EncodingKey::from_rsa_pem(fixture("rsa-1.pem").as_bytes()).expect("fixture key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    let claims = json!({
        "iss": "https://other-issuer.bench.test",
        "sub": "f3b1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "aud": "orders",
        "iat": 1_700_000_000,
        "nbf": 1_700_000_000,
        "exp": 1_700_003_600,
        "jti": "bench-token-1",
        "scope": "orders:read orders:write",
        "realm_access": {"roles": ["reader", "writer"]},
        "email": "alice@example.test",
    });
    let token = jsonwebtoken::encode(&header, &claims, &key).expect("signing");
    let failure = verifier
        .verify(&token, 1_700_000_100)
        .expect_err("the issuer is unknown");
    assert_eq!(failure.reason, Reason::UnknownIssuer);

    c.bench_function("token_decode", |b| {
        b.iter(|| verifier.verify(black_box(&token), 1_700_000_100));
    });
}

criterion_group!(benches, bench_rules, bench_jwks_parse, bench_token_decode);
criterion_main!(benches);
