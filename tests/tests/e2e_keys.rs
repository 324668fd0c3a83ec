//! Key handling seen from outside: requests are denied while the issuer's
//! keys are unavailable, and unknown `kid`s refetch the JWKS at a limited
//! rate.

use std::time::{Duration, Instant};

use tokengate_tests::cases::valid_claims;
use tokengate_tests::http::{Connection, Request, Response};
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions};
use tokengate_tests::tokens::{mint, Key};

/// JWKS refresh period of the agent in the key-outage test, in seconds, so
/// the agent notices the issuer's recovery within the test.
const FAST_REFRESH_SECONDS: u64 = 1;

/// Time allowed for a steady state to appear.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for an audit line to appear after its response.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

fn request_orders(testbed: &Testbed, token: &str) -> Response {
    let stream = testbed
        .host()
        .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
        .expect("connect");
    let request = Request::new("GET", "/orders/keys").bearer(token);
    Connection::new(stream)
        .expect("connection")
        .send(&request)
        .expect("response")
}

#[test]
fn denied_until_keys_arrive() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.issuer.set_available(false);
    let mut config = testbed.default_agent_config();
    config.issuers[0].jwks_refresh_seconds = Some(FAST_REFRESH_SECONDS);
    let token = mint(Key::Rsa1, &valid_claims());
    testbed.spawn_agent_with(&config).expect("agent");

    // The agent attaches its workload while the keys are missing. Wait
    // until the port is steered and the agent responds for it.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut response = request_orders(&testbed, &token);
    while response.status == 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        response = request_orders(&testbed, &token);
    }
    let readyz = testbed.agent().admin_get("/readyz").expect("readyz");

    assert_eq!(
        response.status,
        401,
        "request without keys: {}",
        response.text()
    );
    assert_ne!(readyz.status, 200, "/readyz while the issuer is down");
    let audit = testbed
        .agent()
        .wait_for_audit(AUDIT_TIMEOUT, |lines| !lines.is_empty())
        .expect("audit");
    let last = audit.last().expect("an audit line for the denied request");
    assert_eq!(last["reason"], "keys_unavailable");

    testbed.issuer.set_available(true);
    testbed
        .agent_mut()
        .wait_ready(SETTLE_TIMEOUT)
        .expect("ready once the keys arrive");
    let after = request_orders(&testbed, &token);
    assert_eq!(
        after.status,
        200,
        "request once the keys arrived: {}",
        after.text()
    );
}

#[test]
fn unknown_kid_refetch_is_rate_limited() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::RsaUnknown, &valid_claims());
    let fetches_before = testbed.issuer.fetch_count();

    let statuses: Vec<u16> = (0..10)
        .map(|_| request_orders(&testbed, &token).status)
        .collect();
    let fetches_after = testbed.issuer.fetch_count();

    assert!(
        fetches_before >= 1,
        "the agent was ready without fetching the JWKS"
    );
    assert!(
        statuses.iter().all(|status| *status == 401),
        "statuses {statuses:?}"
    );
    assert!(
        fetches_after <= fetches_before + 1,
        "10 unknown-kid tokens caused {} JWKS fetches",
        fetches_after - fetches_before
    );
}
