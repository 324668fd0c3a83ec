//! Every request case, from the host namespace and from another pod,
//! through real namespaces, the real eBPF steering and the real agent.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use tokengate_tests::cases::{self, Attempt};
use tokengate_tests::metrics;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions, WORKLOAD};

/// Time allowed for audit lines to appear after the responses.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

fn wait_for_attempts(testbed: &Testbed, attempts: &[Attempt]) -> Vec<serde_json::Value> {
    testbed
        .agent()
        .wait_for_audit(AUDIT_TIMEOUT, |lines| {
            attempts.iter().all(|attempt| {
                lines
                    .iter()
                    .any(|line| line["path"] == attempt.path.as_str())
            })
        })
        .expect("audit lines")
}

#[test]
fn every_case_from_host_and_pod() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");

    let mut attempts = Vec::new();
    for caller in testbed.outside_callers() {
        for case in cases::demo_cases().into_iter().chain(cases::extra_cases()) {
            attempts.push(cases::send_case(&case, &caller, testbed.protected_addr()));
        }
    }
    let audit = wait_for_attempts(&testbed, &attempts);
    cases::check_audit(&mut attempts, &audit, testbed.protected_addr());
    cases::check_echo_log(&mut attempts, &testbed.echo.records().expect("echo log"));

    let report = cases::failure_report(&attempts);
    assert!(report.is_empty(), "failed cases:\n{report}");
}

#[test]
fn audit_has_no_token_text() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");

    let mut attempts = Vec::new();
    for case in cases::demo_cases().into_iter().chain(cases::extra_cases()) {
        attempts.push(cases::send_case(
            &case,
            &testbed.host(),
            testbed.protected_addr(),
        ));
    }
    wait_for_attempts(&testbed, &attempts);
    let audit_text = testbed.agent().audit_text().expect("audit text");
    let log_text = testbed.agent().logs().join("\n");

    let audit_leaks = cases::find_token_leaks(&attempts, &audit_text);
    let log_leaks = cases::find_token_leaks(&attempts, &log_text);

    assert!(!audit_text.is_empty(), "the agent wrote no audit lines");
    assert!(
        audit_leaks.is_empty(),
        "tokens in the audit log: {audit_leaks:?}"
    );
    assert!(
        log_leaks.is_empty(),
        "tokens in the agent log: {log_leaks:?}"
    );
}

#[test]
fn metrics_count_every_decision() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");

    let mut attempts = Vec::new();
    for caller in testbed.outside_callers() {
        for case in cases::demo_cases() {
            attempts.push(cases::send_case(&case, &caller, testbed.protected_addr()));
        }
    }
    wait_for_attempts(&testbed, &attempts);
    let decided = attempts.len() as u64;
    let samples = testbed
        .agent()
        .wait_for_metrics(AUDIT_TIMEOUT, |samples| {
            let labels = [("workload", WORKLOAD)];
            metrics::count(samples, "tokengate_decisions_total", &labels) >= Some(decided)
        })
        .expect("metrics");

    let mut expected: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for attempt in &attempts {
        let decision = if attempt.case.allowed() {
            "allow"
        } else {
            "deny"
        };
        *expected
            .entry((decision, attempt.case.expected_reason))
            .or_default() += 1;
    }
    for ((decision, reason), count) in &expected {
        let labels = [
            ("workload", WORKLOAD),
            ("decision", *decision),
            ("reason", *reason),
        ];
        let actual = metrics::count(&samples, "tokengate_decisions_total", &labels);
        assert_eq!(
            actual,
            Some(*count as u64),
            "tokengate_decisions_total{labels:?}"
        );
    }
    let verified = metrics::count(
        &samples,
        "tokengate_verification_duration_seconds_count",
        &[],
    )
    .unwrap_or(0);
    let tokens_sent = attempts
        .iter()
        .filter(|attempt| !attempt.tokens.is_empty())
        .count() as u64;
    assert!(
        verified >= tokens_sent,
        "{verified} verifications for {tokens_sent} tokens"
    );
    let steered = metrics::count(
        &samples,
        "tokengate_steering_connections_total",
        &[("workload", WORKLOAD), ("verdict", "steered")],
    )
    .unwrap_or(0);
    let connections = attempts.len() as u64;
    assert!(
        steered >= connections,
        "{steered} steered connections for {connections} requests"
    );
    // The program logs nothing on this path, so nothing was suppressed.
    assert_eq!(
        metrics::count(
            &samples,
            "tokengate_ebpf_log_records_suppressed_total",
            &[("workload", WORKLOAD)],
        ),
        Some(0)
    );
}

#[test]
fn non_http_bytes_rejected_and_audited() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let before = testbed.agent().audit_lines().expect("audit").len();

    // A TLS ClientHello prefix followed by a line break: not HTTP/1.1.
    let stream = testbed
        .client_pod()
        .connect(testbed.protected_addr(), Duration::from_secs(5))
        .expect("connect");
    let mut connection = tokengate_tests::http::Connection::new(stream).expect("connection");
    connection
        .stream()
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        .expect("write");
    let answer = connection.read_raw_response();
    let audit = testbed
        .agent()
        .wait_for_audit(AUDIT_TIMEOUT, |lines| lines.len() > before)
        .expect("audit");

    if let Ok(response) = &answer {
        assert_eq!(
            response.status, 400,
            "non-HTTP bytes got {}",
            response.status
        );
    }
    let rejected: Vec<_> = audit[before..]
        .iter()
        .filter(|line| line["reason"] == "malformed_request")
        .collect();
    assert_eq!(
        rejected.len(),
        1,
        "audit lines after the bytes: {:?}",
        &audit[before..]
    );
    assert_eq!(rejected[0]["decision"], "deny");
    assert_eq!(rejected[0]["workload"], WORKLOAD);
    assert!(
        testbed.echo.records().expect("echo log").is_empty(),
        "the service received the bytes"
    );
}
