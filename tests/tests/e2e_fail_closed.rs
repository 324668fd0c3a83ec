//! What happens when the agent is gone, and what the agent leaves alone:
//! SIGKILL and SIGTERM leave the protected port closed, the unprotected
//! port and in-pod loopback traffic pass untouched.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::{EchoRecord, REQUEST_ID_HEADER};
use tokengate_tests::http::{Connection, Request, Response};
use tokengate_tests::ids::unique_id;
use tokengate_tests::netns::Caller;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{
    probe, Reachability, Testbed, TestbedOptions, PROTECTED_PORT, RESERVED_SOURCE,
};
use tokengate_tests::tokens::{mint, Key};

/// Time allowed for the agent to exit: the test agent's 5 s drain plus
/// shutdown.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Time to wait for audit lines that must not appear.
const ABSENT_AUDIT_WAIT: Duration = Duration::from_millis(500);

/// Time allowed for each connect in these tests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

/// Sends one request with a fresh request id from `caller` and returns the
/// response and the id.
fn call(caller: &Caller, addr: SocketAddr, path: &str, token: Option<&str>) -> (Response, String) {
    let id = unique_id();
    let mut request = Request::new("GET", path).header(REQUEST_ID_HEADER, &id);
    if let Some(token) = token {
        request = request.bearer(token);
    }
    let stream = caller
        .connect(addr, CONNECT_TIMEOUT)
        .unwrap_or_else(|error| panic!("connect to {addr}: {error}"));
    let response = Connection::new(stream)
        .expect("connection")
        .send(&request)
        .expect("response");
    (response, id)
}

fn echo_record(testbed: &Testbed, id: &str) -> Option<EchoRecord> {
    testbed
        .echo
        .records()
        .expect("echo log")
        .into_iter()
        .find(|record| record.request_id() == Some(id))
}

/// Checks from both outside callers that the protected port is closed and
/// the unprotected one responds with 200.
fn assert_fails_closed(testbed: &Testbed) {
    for caller in testbed.outside_callers() {
        let protected = probe(&caller, testbed.protected_addr());
        let unprotected = probe(&caller, testbed.unprotected_addr());

        assert!(
            protected.is_closed(),
            "{}: protected port {protected}",
            caller.label()
        );
        assert_eq!(
            unprotected,
            Reachability::Answered(200),
            "{}: unprotected port",
            caller.label()
        );
    }
}

#[test]
fn sigkill_leaves_port_closed() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    let (before, _) = call(
        &testbed.host(),
        testbed.protected_addr(),
        "/orders/1",
        Some(&token),
    );
    assert_eq!(before.status, 200, "steering does not work before the kill");

    let agent = testbed.agent_mut();
    agent.sigkill().expect("SIGKILL");
    let status = agent.wait_exit(EXIT_TIMEOUT).expect("exit");
    let pins_left = std::fs::read_dir(agent.pin_path()).map_or(0, Iterator::count);

    assert!(!status.success(), "a killed agent cannot exit 0: {status}");
    assert!(
        pins_left > 0,
        "no pins left in {} after SIGKILL",
        testbed.agent().pin_path().display()
    );
    assert_fails_closed(&testbed);
}

#[test]
fn sigterm_drains_and_fails_closed() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    let body = tokengate_tests::pattern_bytes(2048);
    let id = unique_id();

    // Start a request, send half its body, then stop the agent: the
    // request is in flight and must still complete.
    let stream = testbed
        .host()
        .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
        .expect("connect");
    let mut connection = Connection::new(stream).expect("connection");
    let head = format!(
        "POST /orders/drain HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {token}\r\n{REQUEST_ID_HEADER}: {id}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first_half, second_half) = body.split_at(body.len() / 2);
    connection
        .stream()
        .write_all(head.as_bytes())
        .expect("write head");
    connection
        .stream()
        .write_all(first_half)
        .expect("write first half");
    std::thread::sleep(Duration::from_millis(300));
    testbed.agent().sigterm().expect("SIGTERM");
    std::thread::sleep(Duration::from_millis(300));
    connection
        .stream()
        .write_all(second_half)
        .expect("write second half");
    let response = connection
        .read_raw_response()
        .expect("response to the in-flight request");
    let status = testbed.agent_mut().wait_exit(EXIT_TIMEOUT).expect("exit");

    assert_eq!(
        response.status,
        200,
        "in-flight request: {}",
        response.text()
    );
    let record = echo_record(&testbed, &id).expect("the service got the in-flight request");
    assert_eq!(record.body_sha256, tokengate_tests::sha256_hex(&body));
    assert!(status.success(), "agent exit after SIGTERM: {status}");
    assert_fails_closed(&testbed);
}

#[test]
fn unprotected_port_and_pod_loopback_pass() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let pod_loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, PROTECTED_PORT));

    let mut checked = Vec::new();
    for caller in testbed.outside_callers() {
        let (response, id) = call(
            &caller,
            testbed.unprotected_addr(),
            "/orders/unprotected",
            None,
        );
        assert_eq!(
            response.status,
            200,
            "{}: unprotected port without a token",
            caller.label()
        );
        let record = echo_record(&testbed, &id).expect("the service logged the request");
        assert_eq!(
            record.peer_ip(),
            Some(IpAddr::V4(caller.source_ip())),
            "{}: not direct",
            caller.label()
        );
        checked.push(id);
    }
    let (response, id) = call(
        &testbed.orders_pod(),
        pod_loopback,
        "/orders/loopback",
        None,
    );
    assert_eq!(
        response.status,
        200,
        "in-pod loopback without a token: {}",
        response.text()
    );
    let record = echo_record(&testbed, &id).expect("the service logged the loopback request");
    assert_eq!(record.peer_ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    checked.push(id);

    // Give a wrongly steered request time to be audited before checking
    // that none was.
    let audit = testbed
        .agent()
        .wait_for_audit(ABSENT_AUDIT_WAIT, |lines| !lines.is_empty())
        .expect("audit");
    assert!(
        audit.is_empty(),
        "traffic the agent must not see was audited: {audit:?}"
    );
    assert_eq!(checked.len(), 3);
}

#[test]
fn pod_loopback_steered_when_not_exempt() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    let mut config = testbed.default_agent_config();
    config.loopback_exempt = false;
    testbed.start_agent_with(&config).expect("agent");
    let pod_loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, PROTECTED_PORT));
    let token = mint(Key::Ec1, &valid_claims());

    let (denied, denied_id) = call(
        &testbed.orders_pod(),
        pod_loopback,
        "/orders/loopback",
        None,
    );
    let (allowed, allowed_id) = call(
        &testbed.orders_pod(),
        pod_loopback,
        "/orders/loopback",
        Some(&token),
    );

    assert_eq!(
        denied.status,
        401,
        "in-pod loopback without a token: {}",
        denied.text()
    );
    assert!(
        echo_record(&testbed, &denied_id).is_none(),
        "the denied loopback request reached the service"
    );
    assert_eq!(
        allowed.status,
        200,
        "in-pod loopback with a token: {}",
        allowed.text()
    );
    let record =
        echo_record(&testbed, &allowed_id).expect("the allowed request reached the service");
    assert_eq!(record.peer_ip(), Some(IpAddr::V4(RESERVED_SOURCE)));
}
