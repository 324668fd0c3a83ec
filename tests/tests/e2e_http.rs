//! HTTP edge cases on a protected port: paths that try to leave a rule's
//! prefix, requests with conflicting framing, and pipelined requests. In
//! each, a request the rules deny must never reach the service.

use std::io::Write;
use std::time::Duration;

use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::REQUEST_ID_HEADER;
use tokengate_tests::http::{Connection, Request};
use tokengate_tests::ids::unique_id;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions};
use tokengate_tests::tokens::{mint, Key};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

fn connect(testbed: &Testbed) -> Connection {
    let stream = testbed
        .client_pod()
        .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
        .expect("connect");
    Connection::new(stream).expect("connection")
}

/// Targets of the service's log entries.
fn logged_targets(testbed: &Testbed) -> Vec<String> {
    let records = testbed.echo.records().expect("echo log");
    records.into_iter().map(|record| record.target).collect()
}

#[test]
fn dot_segments_cannot_leave_rule() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    let targets = [
        "/orders/../admin/dot",
        "/orders/./../admin/dot-dot",
        "/orders/%2e%2e/admin/encoded-dot",
        "/orders/%2E%2E/admin/upper-encoded-dot",
        "/orders%2f..%2fadmin/encoded-slash",
    ];

    for target in targets {
        let response = connect(&testbed)
            .send(&Request::new("GET", target).bearer(&token))
            .expect("response");

        assert!(
            matches!(response.status, 400 | 403),
            "{target}: status {} lets a valid /orders token reach another path",
            response.status
        );
    }
    let logged = logged_targets(&testbed);
    assert!(logged.is_empty(), "the service received {logged:?}");
}

#[test]
fn conflicting_framing_cannot_smuggle() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());

    // Content-Length covers the chunk terminator and the GET, so a parser
    // that honours it reads one POST whose body contains the GET. A parser
    // that honours chunked coding, as RFC 9112 §6.3 requires, reads an
    // empty body and then the GET as a second request. If the agent and the
    // service disagreed, the GET would reach the service without a check.
    // It carries no token, so it must never reach the service.
    let mut connection = connect(&testbed);
    let smuggled = "0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\nHost: orders\r\n\r\n";
    let raw = format!(
        "POST /orders/smuggle HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}",
        smuggled.len()
    );
    connection
        .stream()
        .write_all(raw.as_bytes())
        .expect("write");
    let first = connection.read_raw_response();
    let second = if connection.is_reusable() {
        connection.read_raw_response().ok()
    } else {
        None
    };

    let logged = logged_targets(&testbed);
    assert!(
        !logged.iter().any(|target| target.contains("smuggled")),
        "the request without a token reached the service: {logged:?}"
    );
    if let Ok(first) = &first {
        assert!(
            matches!(first.status, 200 | 400),
            "first response {}",
            first.status
        );
    }
    if let Some(second) = &second {
        assert_eq!(
            second.status, 401,
            "the smuggled request got {}",
            second.status
        );
    }
}

#[test]
fn pipelined_requests_decided_separately() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Ec1, &valid_claims());
    let ids: Vec<String> = (0..3)
        .map(|index| format!("pipelined-{index}-{}", unique_id()))
        .collect();

    // Three requests in one write: allowed, denied, allowed.
    let mut lines = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        lines.push(format!("GET /orders/pipelined/{index} HTTP/1.1"));
        lines.push("Host: orders".to_owned());
        lines.push(format!("{REQUEST_ID_HEADER}: {id}"));
        if index != 1 {
            lines.push(format!("Authorization: Bearer {token}"));
        }
        lines.push(String::new());
    }
    let raw = lines.join("\r\n") + "\r\n";
    let mut connection = connect(&testbed);
    connection
        .stream()
        .write_all(raw.as_bytes())
        .expect("write");
    let first = connection.read_raw_response().expect("first response");
    let second = connection.read_raw_response().expect("second response");
    let third = if connection.is_reusable() {
        Some(connection.read_raw_response().expect("third response"))
    } else {
        None
    };

    assert_eq!(first.status, 200);
    let first_echo: tokengate_tests::echo::EchoRecord =
        serde_json::from_slice(&first.body).expect("the first response is an echo");
    assert_eq!(first_echo.request_id(), Some(ids[0].as_str()));
    assert_eq!(second.status, 401);
    let records = testbed.echo.records().expect("echo log");
    let reached = |id: &str| records.iter().any(|record| record.request_id() == Some(id));
    assert!(
        reached(&ids[0]),
        "the first request did not reach the service"
    );
    assert!(
        !reached(&ids[1]),
        "the request without a token reached the service"
    );
    match third {
        Some(third) => {
            assert_eq!(third.status, 200);
            assert!(
                reached(&ids[2]),
                "the third request did not reach the service"
            );
        }
        None => assert!(
            !reached(&ids[2]),
            "the service got a request whose response was lost"
        ),
    }
}
