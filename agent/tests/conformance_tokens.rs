//! Table-driven conformance suite for token verification.
//!
//! Each case is a token (built here or taken verbatim from an RFC), the
//! issuer configuration it is checked against, the clock, and the expected
//! outcome: accepted, or rejected with one `Reason`. The published examples
//! of RFC 7515 Appendix A.1 to A.3, RFC 7519 §3.1 and RFC 8037 Appendix A
//! are verified with their published keys, then an attack catalog follows.
//! Every key comes from the issuer's inline JWKS or `hmac_secret_file`, so
//! no case needs the network.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokengate::config::IssuerConfig;
use tokengate::decision::Reason;
use tokengate::jwks::IssuerKeys;
use tokengate::verify::Verifier;

const ISS: &str = "https://idp.example";
const NOW: u64 = 1_700_000_000;

const JWKS: &str = include_str!("../../tests/fixtures/jwks.json");
const RSA_PEM: &str = include_str!("../../tests/fixtures/rsa-1.pem");
const EC_PEM: &str = include_str!("../../tests/fixtures/ec-1.pem");
const ED_PEM: &str = include_str!("../../tests/fixtures/ed-1.pem");
const RSA_UNKNOWN_PEM: &str = include_str!("../../tests/fixtures/rsa-unknown.pem");
const EC_P384_PEM: &str = include_str!("fixtures/ec-p384.pem");

/// The HMAC secret of the `hmac` issuer: 64 bytes, enough for HS512.
const HMAC_SECRET: &[u8; 64] = b"conformance-suite-hmac-secret-0123456789abcdefghijklmnopqrstuvwx";

// RFC 7515 Appendix A.1 (also the RFC 7519 §3.1 example): HS256 over
// {"iss":"joe", "exp":1300819380, "http://example.com/is_root":true} with
// CRLF line breaks, and the published `oct` key.
const RFC7515_A1_TOKEN: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.\
    eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
    dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const RFC7515_A1_KEY: &str =
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";

// RFC 7515 Appendix A.2: RS256 over the same payload, and the public key.
const RFC7515_A2_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.\
    eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
    cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
const RFC7515_A2_N: &str = "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ";

// RFC 7515 Appendix A.3: ES256 over the same payload, and the public key.
const RFC7515_A3_TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.\
    eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
    DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
const RFC7515_A3_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
const RFC7515_A3_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

/// `exp` of the RFC 7515 examples; the clock for them is set just before.
const RFC7515_EXP: u64 = 1_300_819_380;

// RFC 8037 Appendix A.1 (private seed `d`, public `x`) and A.4 (EdDSA over
// the non-JSON payload "Example of Ed25519 signing").
const RFC8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
const RFC8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
const RFC8037_A4_TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.\
    hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

/// One conformance case.
struct Case {
    name: String,
    token: String,
    issuer: Value,
    now: u64,
    expected: Result<(), Reason>,
}

fn case(name: &str, token: String, issuer: &Value, expected: Result<(), Reason>) -> Case {
    Case {
        name: name.to_owned(),
        token,
        issuer: issuer.clone(),
        now: NOW,
        expected,
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_decode(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url constant")
}

/// Extracts the DER body of a PEM file.
fn pem_body(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD.decode(body).expect("PEM body")
}

/// Returns the public JWK of the P-384 fixture. openssl writes the public point as
/// the last field of the PKCS#8 `ECPrivateKey`, so the last 97 bytes are
/// `04 || x || y`.
fn p384_jwk() -> Value {
    let der = pem_body(EC_P384_PEM);
    let point = &der[der.len() - 97..];
    assert_eq!(point[0], 4, "uncompressed point at the end of the PKCS#8");
    json!({"kty": "EC", "crv": "P-384", "kid": "ec-384", "use": "sig",
           "x": b64(&point[1..49]), "y": b64(&point[49..])})
}

fn fixture_jwks() -> Vec<Value> {
    let document: Value = serde_json::from_str(JWKS).expect("fixture JWKS");
    document["keys"].as_array().expect("keys").clone()
}

/// Returns the RSA fixture's JWK without `alg`, under another `kid`, so that one
/// key can verify every RS* and PS* algorithm.
fn rsa_any_jwk() -> Value {
    let mut jwk = fixture_jwks()[0].clone();
    let object = jwk.as_object_mut().expect("object");
    object.remove("alg");
    object.insert("kid".to_owned(), json!("rsa-any"));
    jwk
}

/// Returns the RSA fixture's public key as a PKCS#1 `RSAPublicKey` DER, the bytes
/// an attacker would feed to HS256 in a key confusion attack.
fn rsa_public_der() -> Vec<u8> {
    fn integer(bytes: &[u8]) -> Vec<u8> {
        let mut value = bytes.to_vec();
        if value[0] & 0x80 != 0 {
            value.insert(0, 0);
        }
        let mut out = vec![0x02];
        out.extend(der_length(value.len()));
        out.extend(value);
        out
    }
    let jwk = &fixture_jwks()[0];
    let n = b64_decode(jwk["n"].as_str().expect("n"));
    let e = b64_decode(jwk["e"].as_str().expect("e"));

    let mut body = integer(&n);
    body.extend(integer(&e));
    let mut out = vec![0x30];
    out.extend(der_length(body.len()));
    out.extend(body);
    out
}

fn der_length(len: usize) -> Vec<u8> {
    match len {
        0..=0x7f => vec![u8::try_from(len).expect("short")],
        0x80..=0xff => vec![0x81, u8::try_from(len).expect("one byte")],
        _ => vec![
            0x82,
            u8::try_from(len >> 8).expect("high"),
            u8::try_from(len & 0xff).expect("low"),
        ],
    }
}

fn rsa_public_pem() -> String {
    let body = STANDARD.encode(rsa_public_der());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).expect("ASCII"))
        .collect();
    format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

/// PKCS#8 DER of the Ed25519 seed `d` (RFC 8410 §7), for jsonwebtoken.
fn ed25519_pkcs8(seed: &[u8]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn encoding_key(alg: Algorithm, key: &str) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(key.as_bytes()).expect("secret")
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            EncodingKey::from_ec_pem(key.as_bytes()).expect("EC PEM")
        }
        Algorithm::EdDSA => EncodingKey::from_ed_pem(key.as_bytes()).expect("Ed PEM"),
        _ => EncodingKey::from_rsa_pem(key.as_bytes()).expect("RSA PEM"),
    }
}

fn secret_key(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).expect("non-empty secret")
}

/// Signs raw header and payload text, so cases can carry duplicate names
/// or members that serde would not write.
fn sign_raw(header: &str, payload: &str, alg: Algorithm, key: &EncodingKey) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).expect("sign");
    format!("{input}.{signature}")
}

/// Signs `claims` with a header of `alg`, `kid` and any `extra` members.
fn sign(alg: Algorithm, key: &str, kid: Option<&str>, extra: &Value, claims: &Value) -> String {
    let mut header = json!({"alg": alg_name(alg)});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    for (name, value) in extra.as_object().expect("object") {
        header[name] = value.clone();
    }
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        alg,
        &encoding_key(alg, key),
    )
}

fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg)
        .expect("serialize")
        .as_str()
        .expect("string")
        .to_owned()
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": "orders", "iat": NOW, "nbf": NOW, "exp": NOW + 300})
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().expect("object").remove(name);
    claims
}

/// Replaces the signature part of `token`.
fn with_signature(token: &str, signature: &str) -> String {
    let cut = token.rfind('.').expect("three parts");
    format!("{}.{signature}", &token[..cut])
}

fn signature_of(token: &str) -> &str {
    &token[token.rfind('.').expect("three parts") + 1..]
}

/// Returns the asymmetric issuer used by most cases.
fn base_issuer() -> Value {
    let mut keys = fixture_jwks();
    keys.push(rsa_any_jwk());
    keys.push(p384_jwk());
    keys.push(json!({"kty": "RSA", "kid": "enc-1", "use": "enc",
                     "n": fixture_jwks()[0]["n"], "e": "AQAB"}));
    json!({
        "issuer": ISS,
        "jwks": {"keys": keys},
        "audiences": ["orders", "billing"],
        "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
        "clock_skew_seconds": 60,
    })
}

/// `base_issuer` with `changes` merged in.
fn issuer_with(changes: &Value) -> Value {
    let mut issuer = base_issuer();
    for (name, value) in changes.as_object().expect("object") {
        issuer[name] = value.clone();
    }
    issuer
}

/// Builds a verifier for `issuer`. `hmac_secret` is written to a file in
/// `dir` and configured as `hmac_secret_file` when given.
fn verifier(issuer: &Value, hmac_secret: Option<&[u8]>, dir: &std::path::Path) -> Result<Verifier> {
    let mut issuer = issuer.clone();
    if let Some(secret) = hmac_secret {
        let path = dir.join(format!("secret-{}", rand_suffix()));
        std::fs::write(&path, secret)?;
        issuer["hmac_secret_file"] = json!(path);
    }
    let config: IssuerConfig = serde_json::from_value(issuer).context("issuer config")?;
    let keys = Arc::new(IssuerKeys::new(config));
    anyhow::ensure!(keys.is_ready(), "inline keys did not load");
    Ok(Verifier::new(vec![keys]))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cases` and reports every mismatch at once.
fn run(cases: &[Case], hmac_secret: Option<&[u8]>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut failures = Vec::new();
    for case in cases {
        let verifier = verifier(&case.issuer, hmac_secret, dir.path())?;

        let outcome = verifier
            .verify(&case.token, case.now)
            .map(|_| ())
            .map_err(|failure| failure.reason);

        if outcome != case.expected {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expected, outcome
            ));
        }
    }
    anyhow::ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn rfc_examples_verify_with_published_keys() -> Result<()> {
    let issuer = json!({
        "issuer": "joe",
        "jwks": {"keys": [
            {"kty": "RSA", "kid": "rfc7515-a2", "n": RFC7515_A2_N, "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "rfc7515-a3", "x": RFC7515_A3_X, "y": RFC7515_A3_Y},
        ]},
        "algorithms": ["HS256", "RS256", "ES256"],
        "clock_skew_seconds": 0,
    });
    let inside = RFC7515_EXP - 80;
    let dir = tempfile::tempdir()?;
    let verifier = verifier(&issuer, Some(&b64_decode(RFC7515_A1_KEY)), dir.path())?;

    for (name, token, alg) in [
        (
            "RFC 7515 A.1 and RFC 7519 3.1, HS256",
            RFC7515_A1_TOKEN,
            "HS256",
        ),
        ("RFC 7515 A.2, RS256", RFC7515_A2_TOKEN, "RS256"),
        ("RFC 7515 A.3, ES256", RFC7515_A3_TOKEN, "ES256"),
    ] {
        let token: String = token.split_whitespace().collect();

        let accepted = verifier
            .verify(&token, inside)
            .map_err(|failure| anyhow::anyhow!("{name}: {failure:?}"))?;
        let expired = verifier.verify(&token, RFC7515_EXP).map(|_| ());

        assert_eq!(accepted.issuer, "joe", "{name}");
        assert_eq!(accepted.algorithm, alg, "{name}");
        assert_eq!(
            accepted.claims["http://example.com/is_root"],
            json!(true),
            "{name}"
        );
        assert_eq!(
            expired.map_err(|failure| failure.reason),
            Err(Reason::Expired),
            "{name} at its exp"
        );
    }
    Ok(())
}

#[test]
fn rfc8037_ed25519_example() -> Result<()> {
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "rfc8037", "x": RFC8037_X});
    let issuer = json!({
        "issuer": ISS,
        "jwks": {"keys": [jwk]},
        "algorithms": ["EdDSA"],
    });
    let dir = tempfile::tempdir()?;
    let verifier = verifier(&issuer, None, dir.path())?;
    let a4: String = RFC8037_A4_TOKEN.split_whitespace().collect();

    // The published A.4 signature verifies with the published key.
    let set = tokengate::jwks::KeySet::from_inline(&json!({"keys": [jwk]}))?.0;
    let (input, signature) = a4.rsplit_once('.').expect("three parts");
    let valid = jsonwebtoken::crypto::verify(
        signature,
        input.as_bytes(),
        &set.keys()[0].decoding,
        Algorithm::EdDSA,
    )?;
    assert!(valid, "RFC 8037 A.4 signature");

    // The A.4 payload is text, not a JWT claims set, so as a token it is
    // malformed whatever its signature.
    assert_eq!(
        verifier.verify(&a4, NOW).map(|_| ()).map_err(|f| f.reason),
        Err(Reason::MalformedToken)
    );

    // A JWT signed with the A.1 private key verifies with the published
    // public key, and A.4's signature bytes do not carry over to it.
    let key = EncodingKey::from_ed_der(&ed25519_pkcs8(&b64_decode(RFC8037_D)));
    let token = sign_raw(
        r#"{"alg":"EdDSA","kid":"rfc8037"}"#,
        &claims().to_string(),
        Algorithm::EdDSA,
        &key,
    );
    let accepted = verifier.verify(&token, NOW);
    let transplanted = verifier.verify(&with_signature(&token, signature), NOW);

    assert!(accepted.is_ok(), "{accepted:?}");
    assert_eq!(
        transplanted.map(|_| ()).map_err(|f| f.reason),
        Err(Reason::InvalidSignature)
    );
    Ok(())
}

#[test]
fn every_algorithm_verifies() -> Result<()> {
    let secret = std::str::from_utf8(HMAC_SECRET)?;
    let hmac = issuer_with(&json!({
        "algorithms": ["RS256", "HS256", "HS384", "HS512"],
    }));
    let base = base_issuer();
    let mut cases = vec![
        case(
            "RS256",
            sign(
                Algorithm::RS256,
                RSA_PEM,
                Some("rsa-1"),
                &json!({}),
                &claims(),
            ),
            &base,
            Ok(()),
        ),
        case(
            "ES256",
            sign(
                Algorithm::ES256,
                EC_PEM,
                Some("ec-1"),
                &json!({}),
                &claims(),
            ),
            &base,
            Ok(()),
        ),
        case(
            "ES384",
            sign(
                Algorithm::ES384,
                EC_P384_PEM,
                Some("ec-384"),
                &json!({}),
                &claims(),
            ),
            &base,
            Ok(()),
        ),
        case(
            "EdDSA",
            sign(
                Algorithm::EdDSA,
                ED_PEM,
                Some("ed-1"),
                &json!({}),
                &claims(),
            ),
            &base,
            Ok(()),
        ),
        case(
            "HS256",
            sign(Algorithm::HS256, secret, None, &json!({}), &claims()),
            &hmac,
            Ok(()),
        ),
        case(
            "HS384",
            sign(Algorithm::HS384, secret, None, &json!({}), &claims()),
            &hmac,
            Ok(()),
        ),
        case(
            "HS512 with a kid",
            sign(Algorithm::HS512, secret, Some("any"), &json!({}), &claims()),
            &hmac,
            Ok(()),
        ),
        case(
            "RS256 without kid",
            sign(Algorithm::RS256, RSA_PEM, None, &json!({}), &claims()),
            &base,
            Ok(()),
        ),
    ];
    for alg in [
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        cases.push(case(
            &alg_name(alg),
            sign(alg, RSA_PEM, Some("rsa-any"), &json!({}), &claims()),
            &base,
            Ok(()),
        ));
    }

    run(&cases, Some(HMAC_SECRET))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn algorithm_and_key_attacks() -> Result<()> {
    let base = base_issuer();
    let hmac = issuer_with(&json!({"algorithms": ["RS256", "HS256"]}));
    let payload = claims().to_string();
    let mut cases = Vec::new();

    for spelling in ["none", "None", "NONE", "nOnE", " none", "none "] {
        let header = json!({"alg": spelling}).to_string();
        let unsigned = format!("{}.{}.", b64(header.as_bytes()), b64(payload.as_bytes()));
        let with_bytes = format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(payload.as_bytes()),
            b64(b"sig")
        );
        cases.push(case(
            &format!("alg {spelling:?}, empty signature"),
            unsigned,
            &base,
            Err(Reason::AlgorithmNotAllowed),
        ));
        cases.push(case(
            &format!("alg {spelling:?}, some signature"),
            with_bytes,
            &hmac,
            Err(Reason::AlgorithmNotAllowed),
        ));
    }

    // RS/HS key confusion: HS256 keyed with the issuer's public RSA key.
    let pem = rsa_public_pem();
    let der = rsa_public_der();
    let by_pem = sign_raw(
        r#"{"alg":"HS256","kid":"rsa-1"}"#,
        &payload,
        Algorithm::HS256,
        &secret_key(pem.as_bytes()),
    );
    let by_der = sign_raw(
        r#"{"alg":"HS256","kid":"rsa-1"}"#,
        &payload,
        Algorithm::HS256,
        &secret_key(&der),
    );
    let jwk_text = sign_raw(
        r#"{"alg":"HS256"}"#,
        &payload,
        Algorithm::HS256,
        &secret_key(fixture_jwks()[0].to_string().as_bytes()),
    );
    cases.push(case(
        "HS256 with RSA public PEM, no secret configured",
        by_pem.clone(),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "HS256 with RSA public DER, no secret configured",
        by_der.clone(),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "HS256 with RSA public PEM, secret configured",
        by_pem,
        &hmac,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "HS256 with RSA public DER, secret configured",
        by_der,
        &hmac,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "HS256 with the JWK text as secret",
        jwk_text,
        &hmac,
        Err(Reason::InvalidSignature),
    ));

    // The token's alg must fit the JWK's kty, crv, alg and use.
    cases.push(case(
        "ES256 naming the RSA kid",
        sign(
            Algorithm::ES256,
            EC_PEM,
            Some("rsa-1"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "PS256 with a JWK pinned to RS256",
        sign(
            Algorithm::PS256,
            RSA_PEM,
            Some("rsa-1"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "ES384 naming the P-256 kid",
        sign(
            Algorithm::ES384,
            EC_P384_PEM,
            Some("ec-1"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "EdDSA naming the P-384 kid",
        sign(
            Algorithm::EdDSA,
            ED_PEM,
            Some("ec-384"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "key with use enc",
        sign(
            Algorithm::RS256,
            RSA_PEM,
            Some("enc-1"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::UnknownKey),
    ));
    cases.push(case(
        "alg outside the allow-list",
        sign(
            Algorithm::PS256,
            RSA_PEM,
            Some("rsa-any"),
            &json!({}),
            &claims(),
        ),
        &issuer_with(&json!({"algorithms": ["RS256"]})),
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "alg in lower case",
        sign_raw(
            r#"{"alg":"rs256","kid":"rsa-1"}"#,
            &payload,
            Algorithm::RS256,
            &encoding_key(Algorithm::RS256, RSA_PEM),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "unknown alg",
        sign_raw(
            r#"{"alg":"RS1","kid":"rsa-1"}"#,
            &payload,
            Algorithm::RS256,
            &encoding_key(Algorithm::RS256, RSA_PEM),
        ),
        &base,
        Err(Reason::AlgorithmNotAllowed),
    ));
    cases.push(case(
        "signed by an unknown key",
        sign(
            Algorithm::RS256,
            RSA_UNKNOWN_PEM,
            Some("rsa-1"),
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "unknown key without kid",
        sign(
            Algorithm::RS256,
            RSA_UNKNOWN_PEM,
            None,
            &json!({}),
            &claims(),
        ),
        &base,
        Err(Reason::InvalidSignature),
    ));

    // kid values are names to look up, never paths or anything else.
    let rs = |kid: &str| sign(Algorithm::RS256, RSA_PEM, Some(kid), &json!({}), &claims());
    cases.push(case(
        "kid path traversal",
        rs("../../etc/passwd"),
        &base,
        Err(Reason::UnknownKey),
    ));
    cases.push(case(
        "kid absolute path",
        rs("/dev/null"),
        &base,
        Err(Reason::UnknownKey),
    ));
    cases.push(case(
        "kid SQL",
        rs("x' OR '1'='1"),
        &base,
        Err(Reason::UnknownKey),
    ));
    cases.push(case(
        "kid with NUL",
        rs("rsa-1\u{0}"),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "kid with newline",
        rs("rsa-1\nforged log line"),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "kid of 257 bytes",
        rs(&"k".repeat(257)),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "kid of 256 bytes",
        rs(&"k".repeat(256)),
        &base,
        Err(Reason::UnknownKey),
    ));

    // Keys carried or pointed at by the header are never used.
    let attacker_jwk = json!({"kty": "RSA", "n": fixture_jwks()[0]["n"], "e": "AQAB"});
    for (member, value) in [
        ("jku", json!("http://127.0.0.1:9/jwks.json")),
        ("x5u", json!("http://127.0.0.1:9/cert.pem")),
        ("jwk", attacker_jwk),
        ("x5c", json!([STANDARD.encode(rsa_public_der())])),
    ] {
        let token = sign(
            Algorithm::RS256,
            RSA_PEM,
            Some("rsa-1"),
            &json!({ member: value }),
            &claims(),
        );
        cases.push(case(
            &format!("header {member}"),
            token,
            &base,
            Err(Reason::MalformedToken),
        ));
    }
    for crit in [
        json!(["exp"]),
        json!(["b64"]),
        json!(["urn:example:unknown"]),
        json!([]),
    ] {
        let token = sign(
            Algorithm::RS256,
            RSA_PEM,
            Some("rsa-1"),
            &json!({"crit": crit, "b64": true, "exp": 1}),
            &claims(),
        );
        cases.push(case(
            &format!("crit {crit}"),
            token,
            &base,
            Err(Reason::MalformedToken),
        ));
    }

    run(&cases, Some(HMAC_SECRET))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn signature_and_encoding_attacks() -> Result<()> {
    let base = base_issuer();
    let rs256 = sign(
        Algorithm::RS256,
        RSA_PEM,
        Some("rsa-1"),
        &json!({}),
        &claims(),
    );
    let es256 = sign(
        Algorithm::ES256,
        EC_PEM,
        Some("ec-1"),
        &json!({}),
        &claims(),
    );
    let es384 = sign(
        Algorithm::ES384,
        EC_P384_PEM,
        Some("ec-384"),
        &json!({}),
        &claims(),
    );
    let rs_signature = signature_of(&rs256).to_owned();
    let es_bytes = b64_decode(signature_of(&es256));
    let mut cases = vec![case("valid RS256 reference", rs256.clone(), &base, Ok(()))];

    // ECDSA r = s = 0 ("psychic signatures", CVE-2022-21449).
    cases.push(case(
        "ES256 all-zero signature",
        with_signature(&es256, &b64(&[0; 64])),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "ES384 all-zero signature",
        with_signature(&es384, &b64(&[0; 96])),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "ES256 empty signature",
        with_signature(&es256, ""),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "ES256 signature truncated by a byte",
        with_signature(&es256, &b64(&es_bytes[..63])),
        &base,
        Err(Reason::InvalidSignature),
    ));
    let mut der_like = vec![0x30, 0x44, 0x02, 0x20];
    der_like.extend_from_slice(&es_bytes[..32]);
    der_like.extend_from_slice(&[0x02, 0x20]);
    der_like.extend_from_slice(&es_bytes[32..]);
    cases.push(case(
        "ES256 signature in DER form",
        with_signature(&es256, &b64(&der_like)),
        &base,
        Err(Reason::InvalidSignature),
    ));

    // Truncated and re-padded signatures.
    let rs_bytes = b64_decode(&rs_signature);
    cases.push(case(
        "RS256 signature shortened by 3 bytes",
        with_signature(&rs256, &b64(&rs_bytes[..rs_bytes.len() - 3])),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "RS256 signature cut by 4 characters",
        with_signature(&rs256, &rs_signature[..rs_signature.len() - 4]),
        &base,
        Err(Reason::MalformedToken),
    ));
    let mut extended = rs_bytes.clone();
    extended.push(0);
    cases.push(case(
        "RS256 signature with a byte appended",
        with_signature(&rs256, &b64(&extended)),
        &base,
        Err(Reason::InvalidSignature),
    ));
    cases.push(case(
        "RS256 signature cut by 1 character",
        with_signature(&rs256, &rs_signature[..rs_signature.len() - 1]),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "RS256 signature padded",
        format!("{rs256}=="),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "RS256 without signature part",
        rs256[..rs256.rfind('.').expect("dot")].to_owned(),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "RS256 with a fourth part",
        format!("{rs256}.e30"),
        &base,
        Err(Reason::MalformedToken),
    ));

    // Non-canonical base64url: one token has exactly one spelling.
    let last = rs_signature.chars().last().expect("non-empty");
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let value = alphabet.find(last).expect("base64url character");
    // 256 bytes take 342 characters, whose last 4 bits must be zero.
    let dirty = alphabet.as_bytes()[value | 1] as char;
    let trailing = format!("{}{dirty}", &rs_signature[..rs_signature.len() - 1]);
    cases.push(case(
        "signature with non-zero trailing bits",
        with_signature(&rs256, &trailing),
        &base,
        Err(Reason::MalformedToken),
    ));
    let standard = rs_signature.replace('-', "+").replace('_', "/");
    assert_ne!(standard, rs_signature, "the fixture signature has - or _");
    cases.push(case(
        "signature in the standard alphabet",
        with_signature(&rs256, &standard),
        &base,
        Err(Reason::MalformedToken),
    ));
    let parts: Vec<&str> = rs256.split('.').collect();
    cases.push(case(
        "header padded",
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "whitespace inside",
        format!("{}.{} .{}", parts[0], parts[1], parts[2]),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "payload re-encoded with padding",
        format!(
            "{}.{}.{}",
            parts[0],
            STANDARD.encode(b64_decode(parts[1])),
            parts[2]
        ),
        &base,
        Err(Reason::MalformedToken),
    ));

    // Duplicate member names, validly signed.
    let key = encoding_key(Algorithm::RS256, RSA_PEM);
    let payload = claims().to_string();
    let header = r#"{"alg":"RS256","kid":"rsa-1"}"#;
    let dup_header = sign_raw(
        r#"{"alg":"RS256","kid":"rsa-1","kid":"rsa-1"}"#,
        &payload,
        Algorithm::RS256,
        &key,
    );
    let dup_alg = sign_raw(
        r#"{"alg":"none","kid":"rsa-1","alg":"RS256"}"#,
        &payload,
        Algorithm::RS256,
        &key,
    );
    let dup_sub = sign_raw(
        header,
        &payload.replacen('{', r#"{"sub":"admin","#, 1),
        Algorithm::RS256,
        &key,
    );
    let dup_nested = sign_raw(
        header,
        &payload.replacen('{', r#"{"org":{"id":1,"id":2},"#, 1),
        Algorithm::RS256,
        &key,
    );
    cases.push(case(
        "duplicate kid",
        dup_header,
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "duplicate alg",
        dup_alg,
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "duplicate sub",
        dup_sub,
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "duplicate nested member",
        dup_nested,
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "payload not JSON",
        sign_raw(header, "not json", Algorithm::RS256, &key),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "payload an array",
        sign_raw(header, "[1]", Algorithm::RS256, &key),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "payload with trailing data",
        sign_raw(header, &format!("{payload} {{}}"), Algorithm::RS256, &key),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "empty token",
        String::new(),
        &base,
        Err(Reason::MalformedToken),
    ));
    cases.push(case(
        "Bearer prefix left in",
        format!("Bearer {rs256}"),
        &base,
        Err(Reason::MalformedToken),
    ));

    run(&cases, None)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn claim_cases() -> Result<()> {
    let base = base_issuer();
    let rs = |claims: &Value| sign(Algorithm::RS256, RSA_PEM, Some("rsa-1"), &json!({}), claims);
    let raw = |payload: &str| {
        sign_raw(
            r#"{"alg":"RS256","kid":"rsa-1"}"#,
            payload,
            Algorithm::RS256,
            &encoding_key(Algorithm::RS256, RSA_PEM),
        )
    };
    let time_payload = |name: &str, literal: &str| {
        let mut object = without(claims(), name).to_string();
        object.insert_str(1, &format!("\"{name}\":{literal},"));
        object
    };
    let mut cases = vec![
        case("valid", rs(&claims()), &base, Ok(())),
        case(
            "exp missing",
            rs(&without(claims(), "exp")),
            &base,
            Err(Reason::Expired),
        ),
        case(
            "exp missing, not required",
            rs(&without(claims(), "exp")),
            &issuer_with(&json!({"require_exp": false})),
            Ok(()),
        ),
        case(
            "expired beyond skew",
            rs(&with(claims(), "exp", json!(NOW - 61))),
            &base,
            Err(Reason::Expired),
        ),
        case(
            "expired within skew",
            rs(&with(claims(), "exp", json!(NOW - 59))),
            &base,
            Ok(()),
        ),
        case(
            "exp as fraction",
            rs(&with(claims(), "exp", json!(1_700_000_000.5))),
            &base,
            Ok(()),
        ),
        case(
            "nbf in the future",
            rs(&with(claims(), "nbf", json!(NOW + 61))),
            &base,
            Err(Reason::NotYetValid),
        ),
        case(
            "nbf within skew",
            rs(&with(claims(), "nbf", json!(NOW + 59))),
            &base,
            Ok(()),
        ),
        case(
            "iat in the future",
            rs(&with(claims(), "iat", json!(NOW + 61))),
            &base,
            Err(Reason::NotYetValid),
        ),
        case(
            "iss unknown",
            rs(&with(claims(), "iss", json!("https://evil.example"))),
            &base,
            Err(Reason::UnknownIssuer),
        ),
        case(
            "iss with trailing slash",
            rs(&with(claims(), "iss", json!(format!("{ISS}/")))),
            &base,
            Err(Reason::UnknownIssuer),
        ),
        case(
            "iss in upper case",
            rs(&with(claims(), "iss", json!(ISS.to_uppercase()))),
            &base,
            Err(Reason::UnknownIssuer),
        ),
        case(
            "iss missing",
            rs(&without(claims(), "iss")),
            &base,
            Err(Reason::UnknownIssuer),
        ),
        case(
            "iss not a string",
            rs(&with(claims(), "iss", json!([ISS]))),
            &base,
            Err(Reason::MalformedToken),
        ),
        case(
            "aud array with a match",
            rs(&with(claims(), "aud", json!(["other", "billing"]))),
            &base,
            Ok(()),
        ),
        case(
            "aud array mismatch",
            rs(&with(claims(), "aud", json!(["other", "more"]))),
            &base,
            Err(Reason::AudienceMismatch),
        ),
        case(
            "aud string mismatch",
            rs(&with(claims(), "aud", json!("other"))),
            &base,
            Err(Reason::AudienceMismatch),
        ),
        case(
            "aud missing",
            rs(&without(claims(), "aud")),
            &base,
            Err(Reason::AudienceMismatch),
        ),
        case(
            "aud nested array",
            rs(&with(claims(), "aud", json!([["orders"]]))),
            &base,
            Err(Reason::AudienceMismatch),
        ),
    ];

    for name in ["exp", "nbf", "iat"] {
        for (label, literal) in [
            ("a string", format!("\"{NOW}\"")),
            ("1e300", "1e300".to_owned()),
            ("u64::MAX + 1", "18446744073709551616".to_owned()),
            ("u64::MAX", u64::MAX.to_string()),
            ("null", "null".to_owned()),
            ("an object", "{}".to_owned()),
        ] {
            cases.push(case(
                &format!("{name} as {label}"),
                raw(&time_payload(name, &literal)),
                &base,
                Err(Reason::InvalidClaims),
            ));
        }
    }

    let spiffe = issuer_with(&json!({"subject_prefixes": ["spiffe://cluster.local/ns/"]}));
    cases.push(case(
        "sub with SPIFFE prefix",
        rs(&with(
            claims(),
            "sub",
            json!("spiffe://cluster.local/ns/shop/sa/web"),
        )),
        &spiffe,
        Ok(()),
    ));
    cases.push(case(
        "sub outside SPIFFE prefix",
        rs(&claims()),
        &spiffe,
        Err(Reason::InvalidClaims),
    ));
    cases.push(case(
        "sub missing with prefix rule",
        rs(&without(claims(), "sub")),
        &spiffe,
        Err(Reason::InvalidClaims),
    ));

    let at_jwt = issuer_with(&json!({"required_typ": "at+jwt"}));
    for (typ, expected) in [
        ("at+jwt", Ok(())),
        ("AT+JWT", Ok(())),
        ("application/at+jwt", Ok(())),
        ("JWT", Err(Reason::InvalidClaims)),
    ] {
        let token = sign(
            Algorithm::RS256,
            RSA_PEM,
            Some("rsa-1"),
            &json!({"typ": typ}),
            &claims(),
        );
        cases.push(case(&format!("typ {typ}"), token, &at_jwt, expected));
    }
    cases.push(case(
        "typ missing",
        rs(&claims()),
        &at_jwt,
        Err(Reason::InvalidClaims),
    ));

    let short_lived = issuer_with(&json!({"max_lifetime_seconds": 600}));
    cases.push(case(
        "lifetime within limit",
        rs(&claims()),
        &short_lived,
        Ok(()),
    ));
    cases.push(case(
        "lifetime over limit",
        rs(&with(claims(), "exp", json!(NOW + 601))),
        &short_lived,
        Err(Reason::InvalidClaims),
    ));
    cases.push(case(
        "lifetime over limit without iat",
        rs(&with(without(claims(), "iat"), "exp", json!(NOW + 601))),
        &short_lived,
        Err(Reason::InvalidClaims),
    ));

    run(&cases, None)
}

#[test]
fn size_limit_boundaries() -> Result<()> {
    let token = sign(
        Algorithm::RS256,
        RSA_PEM,
        Some("rsa-1"),
        &json!({}),
        &claims(),
    );
    let len = token.len();
    let limit = |bytes: usize| issuer_with(&json!({"max_token_bytes": bytes}));
    let cases = vec![
        case(
            "one byte under the limit",
            token.clone(),
            &limit(len + 1),
            Ok(()),
        ),
        case("exactly at the limit", token.clone(), &limit(len), Ok(())),
        case(
            "one byte over the limit",
            token.clone(),
            &limit(len - 1),
            Err(Reason::TokenTooLarge),
        ),
        case(
            "garbage over the limit is not decoded",
            "!".repeat(len),
            &limit(len - 1),
            Err(Reason::TokenTooLarge),
        ),
        case(
            "default limit",
            "a.".repeat(tokengate::config::DEFAULT_MAX_TOKEN_BYTES),
            &base_issuer(),
            Err(Reason::TokenTooLarge),
        ),
    ];

    run(&cases, None)
}
