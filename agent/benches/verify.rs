//! Cost of one token verification in three forms, for RS256, ES256 and
//! `EdDSA` with the keys in `tests/fixtures`:
//!
//! - `raw_jsonwebtoken`: `jsonwebtoken::decode` with the right key, the
//!   signature check alone;
//! - `cache_miss`: what the request path pays for a token it has not seen:
//!   cache lookup, `Verifier::verify` (key choice, signature, claims),
//!   cache insert and the revocation check;
//! - `cache_hit`: what it pays for a token seen before: SHA-256, lookup,
//!   a copy of the verified claims and the revocation check.
//!
//! Run: `cargo bench -p tokengate --bench verify`. Results are recorded in
//! `docs/benchmarks.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Map, Value};

use tokengate::cache::TokenCache;
use tokengate::config::{CacheConfig, IssuerConfig};
use tokengate::jwks::{IssuerKeys, KeySet};
use tokengate::revocation::{
    JtiEntry, Retention, RevocationDocument, RevocationList, Revocations, SubjectEntry,
};
use tokengate::verify::Verifier;

const ISSUER: &str = "https://issuer.bench.test";

/// Revocation entries of each kind in the benchmark's list, so the check
/// runs against a populated table rather than an empty one.
const REVOKED_ENTRIES: usize = 1000;

fn fixture(name: &str) -> String {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// One algorithm's signing key file and `kid`.
struct Case {
    alg: Algorithm,
    name: &'static str,
    pem: &'static str,
    kid: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        alg: Algorithm::RS256,
        name: "RS256",
        pem: "rsa-1.pem",
        kid: "rsa-1",
    },
    Case {
        alg: Algorithm::ES256,
        name: "ES256",
        pem: "ec-1.pem",
        kid: "ec-1",
    },
    Case {
        alg: Algorithm::EdDSA,
        name: "EdDSA",
        pem: "ed-1.pem",
        kid: "ed-1",
    },
];

fn sign(case: &Case, claims: &Value) -> String {
    let pem = fixture(case.pem);
    let key = match case.alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
        _ => EncodingKey::from_ed_pem(pem.as_bytes()),
    }
    .expect("fixture signing key");
    let mut header = Header::new(case.alg);
    header.kid = Some(case.kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).expect("signing")
}

/// Builds a claims set of the size an identity provider typically issues.
fn claims(now: u64) -> Value {
    json!({
        "iss": ISSUER,
        "sub": "f3b1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "aud": "orders",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "bench-token-1",
        "scope": "orders:read orders:write",
        "realm_access": {"roles": ["reader", "writer"]},
        "email": "alice@example.test",
    })
}

fn issuer_keys() -> Arc<IssuerKeys> {
    let config: IssuerConfig = serde_yaml::from_str(&format!(
        "issuer: {ISSUER}\njwks_uri: http://127.0.0.1:9/jwks\naudiences: [orders]\nalgorithms: [RS256, ES256, EdDSA]\n"
    ))
    .expect("issuer config");
    let keys = IssuerKeys::new(config);
    let (set, _) = KeySet::from_jwks_json(fixture("jwks.json").as_bytes()).expect("fixture JWKS");
    keys.replace_keys(set);
    Arc::new(keys)
}

fn revocations(now: u64) -> Revocations {
    let document = RevocationDocument {
        jtis: (0..REVOKED_ENTRIES)
            .map(|index| JtiEntry {
                jti: format!("revoked-{index}"),
                exp: now + 3600,
            })
            .collect(),
        subjects: (0..REVOKED_ENTRIES)
            .map(|index| SubjectEntry {
                iss: ISSUER.to_owned(),
                sub: format!("user-{index}"),
                revoked_before: now,
            })
            .collect(),
    };
    let retention = Retention::new([(ISSUER, Some(3600), 60)]);
    let revocations = Revocations::new(true);
    revocations.replace(RevocationList::build([&document], &retention, now).0);
    revocations
}

fn decoding_key(kid: &str) -> DecodingKey {
    let set: JwkSet = serde_json::from_str(&fixture("jwks.json")).expect("fixture JWKS");
    let jwk = set.find(kid).expect("kid in the fixture JWKS");
    DecodingKey::from_jwk(jwk).expect("fixture public key")
}

fn bench_verify(c: &mut Criterion) {
    let now = unix_now();
    let keys = issuer_keys();
    let verifier = Verifier::new(vec![Arc::clone(&keys)]);
    let revocations = revocations(now);
    let cache_config = CacheConfig::default();

    for case in &CASES {
        let token = sign(case, &claims(now));
        let mut group = c.benchmark_group(format!("verify/{}", case.name));

        let key = decoding_key(case.kid);
        let mut validation = Validation::new(case.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        group.bench_function("raw_jsonwebtoken", |b| {
            b.iter(|| {
                jsonwebtoken::decode::<Map<String, Value>>(black_box(&token), &key, &validation)
                    .expect("valid token")
            });
        });

        group.bench_function("cache_miss", |b| {
            b.iter_batched(
                || TokenCache::new(&cache_config, vec![Arc::clone(&keys)]),
                |cache| {
                    let lookup = cache.lookup(black_box(&token), now);
                    assert!(lookup.hit().is_none());
                    let accepted = verifier.verify(&token, now).expect("valid token");
                    cache.insert(&lookup, &accepted, &verifier, now);
                    assert!(!revocations.is_revoked(&accepted));
                    cache
                },
                BatchSize::SmallInput,
            );
        });

        let cache = TokenCache::new(&cache_config, vec![Arc::clone(&keys)]);
        let lookup = cache.lookup(&token, now);
        let accepted = verifier.verify(&token, now).expect("valid token");
        cache.insert(&lookup, &accepted, &verifier, now);
        group.bench_function("cache_hit", |b| {
            b.iter(|| {
                let mut lookup = cache.lookup(black_box(&token), now);
                let cached = lookup.take_hit().expect("cached token");
                assert!(!revocations.is_revoked(&cached));
                cached
            });
        });

        group.finish();
    }
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
