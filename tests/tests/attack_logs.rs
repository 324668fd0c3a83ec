//! Attack cases against the real agent's log output, at the `debug` level
//! an operator turns on to investigate: a caller-chosen `kid` must not forge
//! log lines, and no token or signature may appear in the log.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};

use tokengate_tests::agent::AGENT_LOG_ENV;
use tokengate_tests::cases::valid_claims;
use tokengate_tests::http::{Connection, Request};
use tokengate_tests::issuer::ISSUER;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions, AUDIENCE};
use tokengate_tests::tokens::{mint, unix_now, Key};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Text that starts a forged log line when a log writer copies a `kid`
/// without escaping its line break.
const FORGED_LINE: &str = "FORGED tokengate stopped";

/// Signs a token whose `kid` the issuer never published, with a line break
/// and a fake log line in it.
fn token_with_injected_kid() -> String {
    let header = serde_json::json!({"alg": "RS256", "kid": format!("x\n{FORGED_LINE}\rY")});
    let claims = serde_json::json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "mallory",
        "exp": unix_now() + 300,
    });
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa-unknown.pem"))
        .expect("fixture key");
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).expect("sign");
    format!("{message}.{signature}")
}

#[test]
fn attack_debug_log_injection_and_leaks() {
    if !require_root_and_ebpf() {
        return;
    }
    // Only this test runs in this binary, so no other thread reads the
    // variable while it changes.
    std::env::set_var(AGENT_LOG_ENV, "debug");
    let mut testbed =
        Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed");
    testbed.start_agent().expect("agent");
    let valid = mint(Key::Rsa1, &valid_claims());
    let injected = token_with_injected_kid();

    for token in [&valid, &injected] {
        let stream = testbed
            .client_pod()
            .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
            .expect("connect");
        let mut connection = Connection::new(stream).expect("connection");
        let _ = connection
            .send(&Request::new("GET", "/orders/1").bearer(token))
            .expect("response");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && !testbed
            .agent()
            .logs()
            .iter()
            .any(|line| line.contains("token rejected"))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = testbed.agent().logs();
    for line in logs.iter().filter(|line| line.contains("FORGED")) {
        println!("log line with the injected kid: {line}");
    }

    let forged: Vec<&String> = logs
        .iter()
        .filter(|line| line.starts_with(FORGED_LINE))
        .collect();
    assert!(
        forged.is_empty(),
        "a caller's kid started its own log line: {forged:?}"
    );
    for token in [&valid, &injected] {
        let (_, signature) = token.rsplit_once('.').expect("three segments");
        assert!(
            !logs.iter().any(|line| line.contains(signature)),
            "a token signature is in the agent log"
        );
    }
}
