//! Attack cases against the request path, in process and without root. Bad
//! tokens and bad HTTP go as raw bytes to one workload proxy on 127.0.0.1
//! port 0, which has a real JWKS server and a real service behind the
//! loopback upstream. Each test states what must not happen: a denied request
//! reaching the service, a wrong status or audit reason, a hang, a token in
//! the audit output, or a metric label the caller can multiply.
//!
//! A failing `attack_*` test documents a bug in the agent; it is kept
//! failing until the agent is fixed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use tokengate::app::Core;
use tokengate::proxy::DrainController;
use tokengate::verify;

#[path = "support/lib.rs"]
mod support;

use support::http::{bind_loopback, serve_http, JwksServer};
use support::tokens::{fixture_key, fixture_path as fixture};

/// Upper bound of every wait on a condition or a whole reply.
const WAIT: Duration = Duration::from_secs(10);

/// A reply is complete when the connection stays silent this long.
const IDLE: Duration = Duration::from_millis(700);

const ISSUER: &str = "https://issuer.tokengate.test";
const WORKLOAD: &str = "orders";

/// Token sources of the standard workload: the default header and a cookie.
const HEADER_AND_COOKIE: &str = r#"
    from_headers:
      - name: Authorization
        value_prefix: "Bearer "
    from_cookies: [access_token]"#;

/// Token sources of a workload that reads its token from a cookie only.
const COOKIE_ONLY: &str = r"
    from_cookies: [access_token]";

// ---------------------------------------------------------------- harness

struct Harness {
    proxy: SocketAddr,
    admin: SocketAddr,
    service: Service,
    jwks: JwksServer,
    audit: mpsc::UnboundedReceiver<String>,
    _drain: DrainController,
    _admin_drain: DrainController,
    core: Core,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with_sources(HEADER_AND_COOKIE).await
    }

    async fn start_with_sources(sources: &str) -> Self {
        let jwks = JwksServer::start().await;
        let service = Service::start().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_address = listener.local_addr().unwrap();
        let yaml = config_yaml(jwks.address, proxy_address.port(), sources);
        let config = tokengate::config::parse(&yaml, "attack.yaml").unwrap();

        let (audit_output, audit) = support::agent::capture_audit(1024 * 1024);
        let serving = support::agent::start_serving(
            &config,
            Box::new(audit_output),
            listener,
            service.address,
        )
        .await;

        let harness = Self {
            proxy: proxy_address,
            admin: serving.admin,
            service,
            jwks,
            audit,
            _drain: serving.drain,
            _admin_drain: serving.admin_drain,
            core: serving.core,
        };
        support::agent::wait_for_keys(&harness.core, WAIT).await;
        harness
    }

    /// Sends `bytes` on a new connection and returns everything the proxy
    /// wrote back until it closed the connection or went silent.
    async fn exchange(&self, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.proxy).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        read_reply(&mut stream).await
    }

    /// Sends a `GET` for `target` with `Authorization: Bearer token` and
    /// returns the status.
    async fn get_status(&self, target: &str, token: &str) -> u16 {
        let reply = self.exchange(&bearer_get(target, token)).await;
        first_status(&reply)
    }

    /// Returns the next audit event, parsed.
    async fn next_audit(&mut self) -> Value {
        let line = self.next_audit_line().await;
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("audit line {line:?}: {error}"))
    }

    /// Returns the next audit event as the raw line.
    async fn next_audit_line(&mut self) -> String {
        support::agent::next_audit_line(&mut self.audit, WAIT).await
    }

    /// Drops the audit events queued so far.
    fn skip_audit(&mut self) {
        while self.audit.try_recv().is_ok() {}
    }

    async fn metrics_text(&self) -> String {
        support::metrics::scrape(self.admin).await
    }
}

fn config_yaml(jwks: SocketAddr, port: u16, sources: &str) -> String {
    format!(
        r"
issuers:
  - issuer: {ISSUER}
    jwks_uri: http://{jwks}/jwks.json
    audiences: [orders]
    algorithms: [RS256, ES256, EdDSA]
    jwks_refresh_seconds: 3600
    unknown_kid_refetch_seconds: 3600
workloads:
  - name: {WORKLOAD}
    netns: /var/run/netns/tokengate-attack-unused
    ports: [{port}]{sources}
    rules:
      - path_prefix: /admin
        roles: [admin]
      - path_prefix: /public
        methods: [GET]
      - path_prefix: /orders
        methods: [GET, POST]
        roles: [reader]
"
    )
}

/// Reads until the peer closes, goes silent for [`IDLE`], or [`WAIT`]
/// passes.
async fn read_reply(stream: &mut TcpStream) -> String {
    let deadline = Instant::now() + WAIT;
    let mut reply = Vec::new();
    let mut buffer = vec![0_u8; 64 * 1024];
    while Instant::now() < deadline {
        match tokio::time::timeout(IDLE, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(read)) => reply.extend_from_slice(&buffer[..read]),
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// Status codes of every response in `reply`, in order.
fn statuses(reply: &str) -> Vec<u16> {
    reply
        .match_indices("HTTP/1.")
        .filter_map(|(start, _)| reply.get(start + 9..start + 12)?.parse().ok())
        .collect()
}

/// Status of the first response in `reply`, or 0 when there is none.
fn first_status(reply: &str) -> u16 {
    statuses(reply).first().copied().unwrap_or(0)
}

fn bearer_get(target: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: orders.test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// What the service received of one request.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// The protected service: records each request with its whole body and
/// replies `hello`.
struct Service {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Service {
    async fn start() -> Self {
        let (listener, address) = bind_loopback().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        serve_http(listener, move |request: Request<Incoming>, _peer| {
            let record = Arc::clone(&record);
            async move {
                let target = request.uri().to_string();
                let (parts, body) = request.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(http_body_util::Collected::to_bytes)
                    .unwrap_or_default();
                record.lock().unwrap().push(Seen {
                    target,
                    headers: parts.headers,
                    body,
                });
                Response::new(Full::new(Bytes::from_static(b"hello")))
            }
        });
        Self { address, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|seen| seen.target).collect()
    }
}

// ----------------------------------------------------------------- tokens

fn unix_now() -> i64 {
    i64::try_from(support::tokens::unix_now()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Claims of a valid token for the `orders` audience with `roles`.
fn claims(roles: &[&str]) -> Value {
    support::tokens::user_claims(ISSUER, roles, 300)
}

/// Signs the exact header and payload text with fixture key `key_name`, so
/// a test controls every byte the signature covers.
fn sign_raw(header: &str, payload: &str, key_name: &str) -> String {
    let (key, algorithm) = fixture_key(key_name);
    let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, algorithm).unwrap();
    format!("{message}.{signature}")
}

/// Signs `claims` with fixture key `kid` and a plain header naming it.
fn sign(kid: &str, claims: &Value) -> String {
    let (_, algorithm) = fixture_key(kid);
    let header = json!({"alg": format!("{algorithm:?}"), "typ": "JWT", "kid": kid});
    sign_raw(&header.to_string(), &claims.to_string(), kid)
}

fn reader_token() -> String {
    sign("rsa-1", &claims(&["reader"]))
}

/// Replaces the signature part of `token`.
fn with_signature(token: &str, signature: &str) -> String {
    let (message, _) = token.rsplit_once('.').unwrap();
    format!("{message}.{signature}")
}

/// Sends `token` to `/orders` and checks that it gets 401 with `reason` in
/// the audit event (one of several when `|` separates them), and that the
/// service saw nothing.
async fn expect_rejected(harness: &mut Harness, label: &str, token: &str, reason: &str) {
    let reply = harness.exchange(&bearer_get("/orders", token)).await;
    let audit = harness.next_audit().await;

    assert_eq!(first_status(&reply), 401, "{label}: reply {reply}");
    let actual = audit["reason"].as_str().unwrap_or_default();
    assert!(
        reason.split('|').any(|accepted| accepted == actual),
        "{label}: reason {actual}, expected {reason}"
    );
    assert_eq!(audit["status"], 401, "{label}: audit {audit}");
    assert!(
        harness.service.seen().is_empty(),
        "{label}: the service received {:?}",
        harness.service.targets()
    );
}

// ------------------------------------------------------ algorithm attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_alg_none_spellings() {
    let mut harness = Harness::start().await;
    let payload = claims(&["reader", "admin"]).to_string();

    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"}).to_string();
        let unsigned = format!("{}.{}.", b64(header.as_bytes()), b64(payload.as_bytes()));
        let with_garbage = format!("{unsigned}AAAA");

        expect_rejected(&mut harness, alg, &unsigned, "algorithm_not_allowed").await;
        expect_rejected(&mut harness, alg, &with_garbage, "algorithm_not_allowed").await;
    }
}

/// Public key of `rsa-1` as PEM and DER, made with the `openssl` tool.
fn rsa_public_key_forms() -> Vec<(&'static str, Vec<u8>)> {
    let mut forms = Vec::new();
    for (label, format) in [("pem", "PEM"), ("der", "DER")] {
        let output = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", format, "-in"])
            .arg(fixture("rsa-1.pem"))
            .output()
            .expect("openssl runs");
        assert!(output.status.success(), "openssl failed: {output:?}");
        forms.push((label, output.stdout));
    }
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_hmac_with_public_key() {
    let mut harness = Harness::start().await;
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap()).unwrap();
    let modulus = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["n"].as_str().unwrap())
        .unwrap();
    let mut secrets = rsa_public_key_forms();
    secrets.push(("jwk-json", jwks["keys"][0].to_string().into_bytes()));
    secrets.push(("modulus", modulus));
    let payload = claims(&["reader", "admin"]).to_string();

    for (label, secret) in &secrets {
        for (alg, algorithm) in [
            ("HS256", Algorithm::HS256),
            ("HS384", Algorithm::HS384),
            ("HS512", Algorithm::HS512),
        ] {
            for kid in [Some("rsa-1"), None] {
                let mut header = json!({"alg": alg, "typ": "JWT"});
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                let message = format!(
                    "{}.{}",
                    b64(header.to_string().as_bytes()),
                    b64(payload.as_bytes())
                );
                let key = EncodingKey::from_secret(secret).unwrap();
                let signature =
                    jsonwebtoken::crypto::sign(message.as_bytes(), &key, algorithm).unwrap();
                let token = format!("{message}.{signature}");

                expect_rejected(
                    &mut harness,
                    &format!("{alg} keyed with {label}, kid {kid:?}"),
                    &token,
                    "algorithm_not_allowed",
                )
                .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_kid_tricks() {
    let mut harness = Harness::start().await;
    let payload = claims(&["reader", "admin"]).to_string();
    let huge_kid = "k".repeat(60 * 1024);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "path traversal kid",
            json!({"alg": "RS256", "kid": "../../../../dev/null"}),
            "unknown_key",
        ),
        (
            "kid with NUL",
            json!({"alg": "RS256", "kid": "rsa-1\u{0}"}),
            "unknown_key|malformed_token",
        ),
        (
            "60 KiB kid",
            json!({"alg": "RS256", "kid": huge_kid}),
            "unknown_key|malformed_token|token_too_large",
        ),
        (
            "RSA kid with ES256",
            json!({"alg": "ES256", "kid": "rsa-1"}),
            "algorithm_not_allowed",
        ),
        (
            "kid not a string",
            json!({"alg": "RS256", "kid": 1}),
            "malformed_token",
        ),
    ];

    for (label, header, reason) in cases {
        // Signed with a key the issuer never published, so nothing may verify.
        let token = sign_raw(&header.to_string(), &payload, "rsa-unknown");

        expect_rejected(&mut harness, label, &token, reason).await;
    }
    assert!(
        harness.jwks.fetches() <= 2,
        "unknown kids caused {} JWKS fetches",
        harness.jwks.fetches()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_embedded_key_headers() {
    let mut harness = Harness::start().await;
    let payload = claims(&["reader", "admin"]).to_string();
    let unknown_n = {
        let output = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(fixture("rsa-unknown.pem"))
            .output()
            .expect("openssl runs");
        b64(&output.stdout)
    };
    let headers = [
        (
            "jwk",
            json!({"alg": "RS256", "jwk": {"kty": "RSA", "n": unknown_n, "e": "AQAB"}}),
        ),
        (
            "jku",
            json!({"alg": "RS256", "jku": "http://127.0.0.1:9/jwks.json"}),
        ),
        (
            "x5u",
            json!({"alg": "RS256", "x5u": "http://127.0.0.1:9/cert.pem"}),
        ),
        (
            "x5c",
            json!({"alg": "RS256", "x5c": [STANDARD.encode(b"not a cert")]}),
        ),
    ];

    for (label, header) in headers {
        let token = sign_raw(&header.to_string(), &payload, "rsa-unknown");

        expect_rejected(
            &mut harness,
            label,
            &token,
            "invalid_signature|malformed_token",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_crit_and_duplicate_header() {
    let mut harness = Harness::start().await;
    let payload = claims(&["reader"]).to_string();
    let cases = [
        (
            "unknown crit extension",
            r#"{"alg":"RS256","kid":"rsa-1","crit":["urn:x-bind"],"urn:x-bind":"x"}"#,
        ),
        ("empty crit", r#"{"alg":"RS256","kid":"rsa-1","crit":[]}"#),
        (
            "two alg members",
            r#"{"alg":"none","kid":"rsa-1","alg":"RS256"}"#,
        ),
        (
            "two kid members",
            r#"{"alg":"RS256","kid":"ec-1","kid":"rsa-1"}"#,
        ),
    ];

    for (label, header) in cases {
        // Signed by the trusted key: only the header may make it fail.
        let token = sign_raw(header, &payload, "rsa-1");

        expect_rejected(&mut harness, label, &token, "malformed_token").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_forged_signatures() {
    let mut harness = Harness::start().await;
    let es = sign("ec-1", &claims(&["reader"]));
    let rs = reader_token();
    let (_, rs_signature) = rs.rsplit_once('.').unwrap();
    let rs_signature_bytes = URL_SAFE_NO_PAD.decode(rs_signature).unwrap();
    // 256 bytes take 342 characters whose last one carries 4 unused bits;
    // setting one of them spells the same bytes in a non-canonical way.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    );
    let stem = &rs_signature[..rs_signature.len() - 1];
    let twin = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        .chars()
        .find(|candidate| {
            let spelled = format!("{stem}{candidate}");
            spelled != rs_signature
                && lenient
                    .decode(&spelled)
                    .is_ok_and(|bytes| bytes == rs_signature_bytes)
        })
        .expect("a non-canonical twin of the last character");
    let non_canonical = format!("{stem}{twin}");

    let cases = [
        (
            "ES256 all-zero signature",
            with_signature(&es, &b64(&[0; 64])),
            "invalid_signature",
        ),
        (
            "ES256 empty-ish signature",
            with_signature(&es, "AA"),
            "invalid_signature",
        ),
        (
            "RS256 truncated signature",
            with_signature(&rs, &b64(&rs_signature_bytes[..255])),
            "invalid_signature",
        ),
        (
            "RS256 signature with padding",
            format!("{rs}=="),
            "malformed_token",
        ),
        (
            "RS256 signature in standard base64",
            with_signature(&rs, &STANDARD.encode(&rs_signature_bytes)),
            "malformed_token",
        ),
        (
            "RS256 non-canonical trailing bits",
            with_signature(&rs, &non_canonical),
            "malformed_token",
        ),
        (
            "expired and tampered",
            with_signature(
                &sign("rsa-1", &{
                    let mut expired = claims(&["reader"]);
                    expired["exp"] = json!(unix_now() - 3600);
                    expired
                }),
                &b64(&[7; 256]),
            ),
            "invalid_signature",
        ),
    ];

    for (label, token, reason) in cases {
        expect_rejected(&mut harness, label, &token, reason).await;
    }
}

// --------------------------------------------------------- claim attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_time_claim_types() {
    let mut harness = Harness::start().await;
    let now = unix_now();
    let cases = [
        (
            "exp as string",
            json!(format!("{}", now + 300)),
            "exp",
            "malformed_token|invalid_claims",
        ),
        (
            "exp as bool",
            json!(true),
            "exp",
            "malformed_token|invalid_claims",
        ),
        (
            "exp null",
            Value::Null,
            "exp",
            "malformed_token|invalid_claims",
        ),
        ("exp negative", json!(-1), "exp", "expired"),
        ("exp in the past as float", json!(100.5), "exp", "expired"),
        (
            "nbf as string",
            json!("0"),
            "nbf",
            "malformed_token|invalid_claims",
        ),
        ("nbf far future", json!(now + 3600), "nbf", "not_yet_valid"),
        ("iat far future", json!(now + 3600), "iat", "not_yet_valid"),
        (
            "iat as object",
            json!({"t": 1}),
            "iat",
            "malformed_token|invalid_claims",
        ),
    ];

    for (label, value, claim, reason) in cases {
        let mut token_claims = claims(&["reader"]);
        token_claims[claim] = value;
        let token = sign("rsa-1", &token_claims);

        expect_rejected(&mut harness, label, &token, reason).await;
    }

    let mut no_exp = claims(&["reader"]);
    no_exp.as_object_mut().unwrap().remove("exp");
    expect_rejected(&mut harness, "no exp", &sign("rsa-1", &no_exp), "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_duplicate_claims_last_wins() {
    let mut harness = Harness::start().await;
    let now = unix_now();
    let header = r#"{"alg":"RS256","kid":"rsa-1"}"#;
    let future_then_past = format!(
        r#"{{"iss":"{ISSUER}","aud":"orders","roles":["reader"],"exp":{},"exp":{}}}"#,
        now + 300,
        now - 3600
    );
    let foreign_then_ours = format!(
        r#"{{"iss":"https://evil.test","aud":"orders","roles":["reader"],"exp":{},"iss":"{ISSUER}"}}"#,
        now + 300
    );
    let reader_then_admin = format!(
        r#"{{"iss":"{ISSUER}","aud":"orders","roles":["admin"],"exp":{},"roles":["reader"]}}"#,
        now + 300
    );

    // RFC 7519 §4 allows rejecting duplicate members or reading the
    // lexically last one. Either way the verifier and the rules must agree,
    // so no duplicate may turn into access the last member does not grant.
    let cases = [
        ("exp future then past", "/orders", future_then_past, false),
        ("iss foreign then ours", "/orders", foreign_then_ours, true),
        (
            "roles admin then reader",
            "/admin",
            reader_then_admin,
            false,
        ),
    ];
    for (label, target, payload, last_member_allows) in cases {
        let status = harness
            .get_status(target, &sign_raw(header, &payload, "rsa-1"))
            .await;
        let audit = harness.next_audit().await;

        if last_member_allows {
            assert!(matches!(status, 200 | 401), "{label}: audit {audit}");
        } else {
            assert!(matches!(status, 401 | 403), "{label}: audit {audit}");
        }
        if status == 200 {
            assert_eq!(audit["issuer"], ISSUER, "{label}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_audience_variants() {
    let mut harness = Harness::start().await;
    let cases = [
        ("other audience in array", json!(["billing", "payments"])),
        ("nested array", json!([["orders"]])),
        ("number", json!(7)),
        ("different case", json!("Orders")),
        ("trailing space", json!("orders ")),
        ("object", json!({"aud": "orders"})),
        ("empty array", json!([])),
    ];

    for (label, aud) in cases {
        let mut token_claims = claims(&["reader"]);
        token_claims["aud"] = aud;
        let token = sign("rsa-1", &token_claims);

        expect_rejected(&mut harness, label, &token, "audience_mismatch").await;
    }
}

// ------------------------------------------------------ extraction attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_bearer_spellings() {
    let mut harness = Harness::start().await;
    let token = reader_token();
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("Authorization: bearer {token}\r\n"), 200, "allowed"),
        (
            format!("Authorization: BEARER    {token}\r\n"),
            200,
            "allowed",
        ),
        (
            format!("Authorization: Bearer\t{token}\r\n"),
            401,
            "malformed_token",
        ),
        (
            format!("Authorization: Bearer {token} x\r\n"),
            401,
            "malformed_token",
        ),
        (
            format!("Authorization: Bearer {token},{token}\r\n"),
            401,
            "malformed_token",
        ),
        (
            format!("Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n"),
            401,
            "multiple_tokens",
        ),
        (
            format!("Authorization: Basic dTpw\r\nAuthorization: Bearer {token}\r\n"),
            401,
            "multiple_tokens",
        ),
        (
            format!("Authorization: Bearer {token}\r\nCookie: access_token={token}\r\n"),
            401,
            "multiple_tokens",
        ),
        (
            format!("Cookie: access_token={token}; access_token={token}\r\n"),
            401,
            "multiple_tokens",
        ),
        (
            format!("Authorization: Token {token}\r\n"),
            401,
            "missing_token",
        ),
        (
            format!("X-Authorization: Bearer {token}\r\n"),
            401,
            "missing_token",
        ),
    ];

    for (headers, status, reason) in cases {
        let request = format!(
            "GET /orders HTTP/1.1\r\nHost: orders.test\r\n{headers}Connection: close\r\n\r\n"
        );

        let reply = harness.exchange(request.as_bytes()).await;
        let audit = harness.next_audit().await;

        assert_eq!(first_status(&reply), status, "{headers:?}: {reply}");
        assert_eq!(audit["reason"], reason, "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_many_cookies() {
    let harness = Harness::start().await;
    let token = reader_token();

    // Over hyper's limit of 100 header fields.
    let mut many_fields = String::from("GET /orders HTTP/1.1\r\nHost: orders.test\r\n");
    for index in 0..150 {
        writeln!(many_fields, "Cookie: c{index}=v\r").unwrap();
    }
    write!(
        many_fields,
        "Cookie: access_token={token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let reply = harness.exchange(many_fields.as_bytes()).await;
    assert_eq!(first_status(&reply), 431, "150 cookie fields: {reply}");

    // One field with 5000 pairs and the token last.
    let mut pairs: Vec<String> = (0..5000).map(|index| format!("c{index}=v")).collect();
    pairs.push(format!("access_token={token}"));
    let one_field = format!(
        "GET /orders HTTP/1.1\r\nHost: orders.test\r\nCookie: {}\r\nConnection: close\r\n\r\n",
        pairs.join("; ")
    );
    let reply = harness.exchange(one_field.as_bytes()).await;
    assert_eq!(first_status(&reply), 200, "5000 cookie pairs: {reply}");
    assert_eq!(harness.service.seen().len(), 1);
}

/// With a cookie-only workload, a caller adds `Authorization: Bearer` with
/// a made-up token next to a valid cookie. The service must not receive
/// that bearer token, because a service that reads `Authorization` would
/// act on a token the agent never verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_unverified_bearer_forwarded() {
    let harness = Harness::start_with_sources(COOKIE_ONLY).await;
    let verified = reader_token();
    let forged = with_signature(
        &sign("rsa-1", &claims(&["reader", "admin"])),
        &b64(&[0; 256]),
    );
    let request = format!(
        "GET /orders HTTP/1.1\r\nHost: orders.test\r\nCookie: access_token={verified}\r\nAuthorization: Bearer {forged}\r\nConnection: close\r\n\r\n"
    );

    let reply = harness.exchange(request.as_bytes()).await;

    let seen = harness.service.seen();
    let forwarded_authorization = seen
        .first()
        .and_then(|seen| seen.headers.get("authorization"))
        .map(|value| value.to_str().unwrap_or("").to_owned());
    assert!(
        first_status(&reply) != 200 || forwarded_authorization.is_none(),
        "status {} and the service received the unverified Authorization {:?}",
        first_status(&reply),
        forwarded_authorization.map(|value| verify::fingerprint(&value))
    );
}

// ---------------------------------------------------------- size attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_huge_token_and_header() {
    let mut harness = Harness::start().await;

    // A 100 KiB token from an issuer that no config names.
    let payload = json!({"iss": "x".repeat(100 * 1024), "exp": unix_now() + 300}).to_string();
    let big_token = sign_raw(r#"{"alg":"RS256","kid":"rsa-1"}"#, &payload, "rsa-unknown");
    let reply = harness.exchange(&bearer_get("/orders", &big_token)).await;
    let audit = harness.next_audit().await;
    let wire = first_status(&reply);
    // Over the agent's 64 KiB head limit the request is answered 431 before
    // any token is read; below it the token is rejected with 401.
    match wire {
        431 => assert_eq!(audit["reason"], "malformed_request", "100 KiB token"),
        401 => assert!(
            matches!(
                audit["reason"].as_str(),
                Some("unknown_issuer" | "token_too_large")
            ),
            "100 KiB token: audit {audit}"
        ),
        other => panic!("100 KiB token: status {other}"),
    }
    assert_eq!(audit["status"], wire, "100 KiB token: audit status");

    // A 600 KiB header field is over hyper's buffer limit.
    let request = format!(
        "GET /orders HTTP/1.1\r\nHost: orders.test\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "p".repeat(600 * 1024)
    );
    let reply = harness.exchange(request.as_bytes()).await;
    let audit = harness.next_audit().await;
    let wire = first_status(&reply);
    assert!(matches!(wire, 400 | 431), "600 KiB header: status {wire}");
    assert_eq!(audit["reason"], "malformed_request");
    assert_eq!(
        audit["status"], wire,
        "the audit event must record the status the caller got"
    );

    // The agent still serves.
    assert_eq!(harness.get_status("/orders", &reader_token()).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_audit_fields_bounded() {
    let mut harness = Harness::start().await;
    // An unverified `iss` of 64 KiB, rejected as an unknown issuer.
    let long_issuer = format!("https://{}", "i".repeat(64 * 1024));
    let payload = json!({"iss": long_issuer, "exp": unix_now() + 300}).to_string();
    let token = sign_raw(r#"{"alg":"RS256","kid":"rsa-1"}"#, &payload, "rsa-unknown");

    let status = harness.get_status("/orders", &token).await;
    let line = harness.next_audit_line().await;

    assert_eq!(status, 401);
    assert!(
        !line.contains(&token) && !line.contains(token.rsplit_once('.').unwrap().1),
        "the audit line contains the token"
    );
    assert!(
        line.len() < 8 * 1024,
        "one rejected request wrote a {} byte audit line; the unverified issuer is copied in full",
        line.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_token_not_in_audit() {
    let mut harness = Harness::start().await;
    let token = reader_token();
    let (_, signature) = token.rsplit_once('.').unwrap();
    let requests = [
        bearer_get("/orders", &token),
        bearer_get("/admin", &token),
        bearer_get(&format!("/orders?access_token={token}"), &token),
        format!(
            "GET /orders HTTP/1.1\r\nHost: o\r\nCookie: access_token={token}x\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    ];

    for request in requests {
        let _ = harness.exchange(&request).await;
        let line = harness.next_audit_line().await;

        assert!(
            !line.contains(signature),
            "token signature in audit: {line}"
        );
        assert!(
            !line.contains("access_token"),
            "query or cookie in audit: {line}"
        );
    }
}

// ---------------------------------------------------------- HTTP framing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_framing_cannot_smuggle() {
    let harness = Harness::start().await;
    let token = reader_token();
    let hidden =
        format!("GET /admin/smuggled HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {token}\r\n\r\n");
    let start = format!("POST /orders HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {token}\r\n");
    let chunked_body = format!("0\r\n\r\n{hidden}");
    let cases = [
        (
            "CL then TE",
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}",
                chunked_body.len()
            ),
        ),
        (
            "TE then CL",
            format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{chunked_body}",
                chunked_body.len()
            ),
        ),
        (
            "TE chunked, identity",
            format!(
                "Transfer-Encoding: chunked, identity\r\nContent-Length: 3\r\n\r\n{chunked_body}"
            ),
        ),
        (
            "TE xchunked",
            format!("Transfer-Encoding: xchunked\r\n\r\n{chunked_body}"),
        ),
        (
            "TE with tab",
            format!("Transfer-Encoding:\tchunked\r\n\r\n{chunked_body}"),
        ),
        (
            "TE space before colon",
            format!("Transfer-Encoding : chunked\r\n\r\n{chunked_body}"),
        ),
        (
            "two TE fields",
            format!(
                "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"
            ),
        ),
        (
            "obs-fold TE",
            format!("X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n{chunked_body}"),
        ),
        (
            "two CL values",
            format!(
                "Content-Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}",
                hidden.len()
            ),
        ),
        (
            "CL list",
            format!("Content-Length: 0, {}\r\n\r\n{hidden}", hidden.len()),
        ),
        (
            "CL with plus",
            format!("Content-Length: +0\r\n\r\n{hidden}"),
        ),
        (
            "chunk size overflow",
            format!("Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n\r\n{hidden}"),
        ),
        (
            "chunk extension with LF",
            format!("Transfer-Encoding: chunked\r\n\r\n0;x\n\r\n{hidden}"),
        ),
        ("bare LF lines", format!("Content-Length: 0\n\n{hidden}")),
        (
            "bare CR",
            format!("Content-Length: 0\rX: y\r\n\r\n{hidden}"),
        ),
    ];

    for (label, rest) in cases {
        let reply = harness.exchange(format!("{start}{rest}").as_bytes()).await;

        let targets = harness.service.targets();
        assert!(
            !targets.iter().any(|target| target.starts_with("/admin")),
            "{label}: the service received {targets:?}; reply {:?}",
            statuses(&reply)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_expect_continue_on_denied() {
    let mut harness = Harness::start().await;
    let mut stream = TcpStream::connect(harness.proxy).await.unwrap();

    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nHost: o\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_reply(&mut stream).await;
    let _ = stream.write_all(b"secret body").await;
    let rest = read_reply(&mut stream).await;
    let audit = harness.next_audit().await;

    assert!(
        !head.contains("100 Continue"),
        "denied request got 100: {head}"
    );
    assert_eq!(first_status(&head), 401, "{head}");
    assert_eq!(audit["reason"], "missing_token");
    assert!(harness.service.seen().is_empty(), "after {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_pipelined_denied_request() {
    let harness = Harness::start().await;
    let reader = reader_token();
    let pipeline = format!(
        "GET /orders/1 HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n\r\n\
         POST /orders/2 HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\nContent-Length: 4\r\n\r\nbody\
         GET /admin/3 HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n\r\n\
         POST /admin/4 HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\n\r\nhello\
         GET /orders/5 HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\nConnection: close\r\n\r\n"
    );

    let reply = harness.exchange(pipeline.as_bytes()).await;

    assert_eq!(statuses(&reply), vec![200, 200, 403, 401, 200], "{reply}");
    assert_eq!(
        harness.service.targets(),
        vec!["/orders/1", "/orders/2", "/orders/5"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_odd_request_targets() {
    let mut harness = Harness::start().await;
    let admin = sign("rsa-1", &claims(&["reader", "admin"]));
    let reader = reader_token();
    let cases: Vec<(String, u16)> = vec![
        (format!("GET http://evil.test/admin HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n"), 403),
        (format!("GET http://evil.test/orders?x=1 HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n"), 200),
        (format!("OPTIONS * HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {admin}\r\n"), 403),
        (format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nAuthorization: Bearer {admin}\r\n"), 403),
        (format!("get /orders HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n"), 403),
        (format!("GET /orders HTTP/1.0\r\nAuthorization: Bearer {reader}\r\n"), 200),
        (format!("GET /orders#frag HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n"), 200),
        (format!("GET /orders?/../admin HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n"), 200),
    ];

    for (head, status) in cases {
        let request = format!("{head}Connection: close\r\n\r\n");

        let reply = harness.exchange(request.as_bytes()).await;

        assert_eq!(first_status(&reply), status, "{head:?}: {reply}");
        assert!(!reply.contains(" 101 "), "{head:?}: upgraded: {reply}");
        assert!(
            !reply.contains(" 200 Connection established"),
            "{head:?}: tunnel opened: {reply}"
        );
    }
    let targets = harness.service.targets();
    assert_eq!(
        targets,
        vec!["/orders?x=1", "/orders", "/orders", "/orders?/../admin"]
    );
    harness.skip_audit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_non_http_bytes() {
    let mut harness = Harness::start().await;
    let cases: [(&str, &[u8]); 3] = [
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        ),
        ("NUL bytes", b"\0\0\0\0\r\n\r\n"),
    ];

    for (label, bytes) in cases {
        let started = Instant::now();
        let reply = harness.exchange(bytes).await;
        let audit = harness.next_audit().await;

        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{label}: slow close"
        );
        assert_eq!(audit["reason"], "malformed_request", "{label}");
        if label == "HTTP/2 preface" {
            // An HTTP/2 client cannot read an HTTP/1.1 response, so the
            // connection is closed without one, as the README says.
            assert!(reply.is_empty(), "{label}: reply {reply:?}");
            assert!(audit["status"].is_null(), "{label}: audit {audit}");
        } else {
            assert_eq!(first_status(&reply), 400, "{label}: reply {reply:?}");
        }
    }
    assert!(harness.service.seen().is_empty());
}

// ------------------------------------------------------------ path attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_path_tricks_denied() {
    let harness = Harness::start().await;
    let reader = reader_token();
    let targets = [
        "/orders/../admin",
        "/%2e%2e/admin",
        "/orders/%2e%2e/admin",
        "/orders/.%2E/admin",
        "/orders%2f..%2fadmin",
        "/orders%2F..%2Fadmin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/admin;x=1",
        "/orders/..;/admin",
        "/orders/%2e%2e;x/admin",
        "/orders/..%00/admin",
        "/orders\\..\\admin",
        "/public/../admin",
        "/public/..//admin",
        "/admin%2f",
        "/ADMIN",
    ];

    for target in targets {
        let status = harness.get_status(target, &reader).await;

        assert!(matches!(status, 400 | 403), "{target}: status {status}");
    }
    let seen = harness.service.targets();
    assert!(seen.is_empty(), "the service received {seen:?}");
}

/// Removes dot segments as RFC 3986 §5.2.4 does, keeping empty segments.
/// WHATWG URL parsers (Node's `URL`, browsers) and Java's
/// `URI.normalize` resolve paths this way.
fn rfc3986_remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (index, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if index == last {
                    output.push("");
                }
            }
            ".." => {
                output.pop();
                if index == last {
                    output.push("");
                }
            }
            other => output.push(other),
        }
    }
    format!("/{}", output.join("/"))
}

/// RFC 3986 resolution keeps empty segments while it resolves `..`, and
/// servers that merge slashes first drop them, so `..` after `//` pops one
/// segment fewer at one than at the other. Such a path must not let a
/// caller with any valid token reach `/admin/...` through the open
/// `/public` rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_empty_segment_dot_dot() {
    let harness = Harness::start().await;
    let no_roles = sign("rsa-1", &claims(&[]));
    let targets = ["/admin//../public", "/admin/users//../../public/x"];

    for target in targets {
        let status = harness.get_status(target, &no_roles).await;
        let resolved = rfc3986_remove_dot_segments(target);

        assert!(
            status != 200 || !resolved.starts_with("/admin"),
            "{target}: status {status}; the agent matched the /public rule, \
             but a service resolving dot segments per RFC 3986 serves {resolved}"
        );
    }
}

// ------------------------------------------------------- headers attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_connection_and_upgrade_headers() {
    let harness = Harness::start().await;
    let reader = reader_token();
    let requests = [
        format!("GET /orders/ws HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        format!("POST /orders/cl HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\nConnection: content-length, x-forwarded-for\r\nX-Forwarded-For: 198.18.9.9\r\nContent-Length: 6\r\n\r\nsecret"),
        format!("GET /orders/auth HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\nConnection: Authorization, close\r\n\r\n"),
    ];

    for request in &requests {
        let reply = harness.exchange(request.as_bytes()).await;
        assert_eq!(first_status(&reply), 200, "{request:?}: {reply}");
    }
    let denied_upgrade =
        "GET /admin HTTP/1.1\r\nHost: o\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let reply = harness.exchange(denied_upgrade.as_bytes()).await;
    assert_eq!(first_status(&reply), 401);

    let seen = harness.service.seen();
    assert_eq!(seen.len(), 3, "{:?}", harness.service.targets());
    assert!(
        !seen[0].headers.contains_key("upgrade"),
        "upgrade forwarded"
    );
    assert_eq!(seen[1].body, Bytes::from_static(b"secret"));
    assert_eq!(seen[1].headers["x-forwarded-for"], "127.0.0.1");
    assert!(
        seen[2].headers.contains_key("authorization"),
        "the verified token must reach the service"
    );
}

// ----------------------------------------------------- metrics and flood

/// Sample lines of the `tokengate_` series, without comments.
fn series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|line| line.starts_with("tokengate_"))
        .map(|line| {
            line.rsplit_once(' ')
                .map_or(line, |(name, _)| name)
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_metric_labels_bounded() {
    let mut harness = Harness::start().await;
    let send_round = |round: usize| {
        let payload =
            json!({"iss": format!("https://made-up-{round}.test"), "exp": unix_now() + 300})
                .to_string();
        let foreign = sign_raw(
            &format!(r#"{{"alg":"RS256","kid":"k{round}"}}"#),
            &payload,
            "rsa-unknown",
        );
        let unknown_kid = sign_raw(
            &format!(r#"{{"alg":"RS256","kid":"kid-{round}"}}"#),
            &claims(&["reader"]).to_string(),
            "rsa-unknown",
        );
        let bad_alg = sign_raw(
            &format!(r#"{{"alg":"X{round}","kid":"rsa-1"}}"#),
            &claims(&[]).to_string(),
            "rsa-1",
        );
        vec![
            bearer_get(&format!("/m{round}"), &foreign),
            bearer_get(&format!("/n{round}"), &unknown_kid),
            bearer_get("/orders", &bad_alg),
            format!("M{round} /orders HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        ]
    };

    for request in send_round(0) {
        let _ = harness.exchange(&request).await;
    }
    let before = series(&harness.metrics_text().await);
    for round in 1..=15 {
        for request in send_round(round) {
            let _ = harness.exchange(&request).await;
        }
    }
    let after = series(&harness.metrics_text().await);
    harness.skip_audit();

    let added: Vec<&String> = after.iter().filter(|line| !before.contains(line)).collect();
    assert!(
        added.is_empty(),
        "caller-chosen values added series {added:?}"
    );
    assert!(
        harness.jwks.fetches() <= 2,
        "{} JWKS fetches for made-up kids",
        harness.jwks.fetches()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_slowloris_others_served() {
    let harness = Harness::start().await;
    let reader = reader_token();
    let head = format!("GET /orders HTTP/1.1\r\nHost: o\r\nAuthorization: Bearer {reader}\r\n");

    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(harness.proxy).await.unwrap();
        let bytes = head.clone().into_bytes();
        slow.push(tokio::spawn(async move {
            // One byte per second for 10 s, then stop.
            for byte in bytes.iter().take(10) {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let request_started = Instant::now();
        let status = harness.get_status("/orders", &reader).await;
        assert_eq!(status, 200);
        assert!(
            request_started.elapsed() < Duration::from_secs(2),
            "a normal request took {:?} during the slow connections",
            request_started.elapsed()
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for task in slow {
        task.await.unwrap();
    }
    assert!(served >= 5, "only {served} requests served in 10 s");
}
