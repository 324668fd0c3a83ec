//! Checks of what the agent's audit log and the service's request log
//! recorded for a set of attempts.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::{Attempt, SUBJECT};
use crate::echo::EchoRecord;
use crate::issuer::ISSUER;
use crate::testbed::WORKLOAD;
use crate::tokens::fingerprint;

/// Matches each attempt with its audit line and checks the line's fields.
/// `destination` is the protected socket address the callers dialled.
pub fn check_audit(attempts: &mut [Attempt], audit_lines: &[Value], destination: SocketAddr) {
    for attempt in attempts.iter_mut() {
        let lines: Vec<&Value> = audit_lines
            .iter()
            .filter(|line| line["path"] == attempt.path.as_str())
            .collect();
        let [line] = lines.as_slice() else {
            attempt.problems.push(format!(
                "{} audit lines for path {} instead of 1",
                lines.len(),
                attempt.path
            ));
            continue;
        };
        attempt.audit_reason = line["reason"].as_str().map(str::to_owned);
        let problems = check_audit_line(attempt, line, destination);
        attempt.problems.extend(problems);
    }
}

fn check_audit_line(attempt: &Attempt, line: &Value, destination: SocketAddr) -> Vec<String> {
    let case = &attempt.case;
    let mut problems = Vec::new();
    let mut expect = |field: &str, expected: Value| {
        if line[field] != expected {
            problems.push(format!(
                "audit {field} is {} instead of {expected}",
                line[field]
            ));
        }
    };
    expect(
        "decision",
        Value::from(if case.allowed() { "allow" } else { "deny" }),
    );
    expect("reason", Value::from(case.expected_reason));
    expect("status", Value::from(case.expected_status));
    expect("workload", Value::from(WORKLOAD));
    expect("method", Value::from(case.method));

    if line["time"].is_null() {
        problems.push("audit line has no time".to_owned());
    }
    if address_ip(&line["source"]) != Some(attempt.caller_ip) {
        problems.push(format!(
            "audit source is {} instead of {}",
            line["source"], attempt.caller_ip
        ));
    }
    if !address_matches(&line["destination"], destination) {
        problems.push(format!(
            "audit destination is {} instead of {destination}",
            line["destination"]
        ));
    }

    // A single token is fingerprinted; two tokens are rejected before
    // either is chosen.
    if let [token] = attempt.tokens.as_slice() {
        let expected = fingerprint(token);
        if line["token_fingerprint"] != expected.as_str() {
            problems.push(format!(
                "audit token_fingerprint is {} instead of {expected}",
                line["token_fingerprint"]
            ));
        }
    }
    let verified = case.allowed() || case.expected_status == 403;
    if verified {
        if line["issuer"] != ISSUER {
            problems.push(format!(
                "audit issuer is {} instead of {ISSUER}",
                line["issuer"]
            ));
        }
        if line["subject"] != SUBJECT {
            problems.push(format!(
                "audit subject is {} instead of {SUBJECT}",
                line["subject"]
            ));
        }
        match line["verification_seconds"].as_f64() {
            Some(seconds) if seconds >= 0.0 => {}
            _ => problems.push(format!(
                "audit verification_seconds is {}",
                line["verification_seconds"]
            )),
        }
    }
    if case.allowed() && line["rule"].is_null() {
        problems.push("audit line of an allowed request names no rule".to_owned());
    }
    problems
}

/// IP address in an audit address field: `IP:PORT`, `[IPv6]:PORT` or `IP`.
fn address_ip(value: &Value) -> Option<IpAddr> {
    let text = value.as_str()?;
    text.parse::<SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|_| text.parse::<IpAddr>())
        .ok()
}

fn address_matches(value: &Value, expected: SocketAddr) -> bool {
    value
        .as_str()
        .and_then(|text| text.parse::<SocketAddr>().ok())
        == Some(expected)
}

/// Checks that each allowed attempt reached the service exactly once and
/// each denied attempt never did.
pub fn check_echo_log(attempts: &mut [Attempt], records: &[EchoRecord]) {
    for attempt in attempts.iter_mut() {
        let seen = records
            .iter()
            .filter(|record| record.request_id() == Some(attempt.request_id.as_str()))
            .count();
        let expected = usize::from(attempt.case.allowed());
        if seen != expected {
            attempt.problems.push(format!(
                "the service logged this request {seen} times instead of {expected}"
            ));
        }
    }
}

/// Checks that no token, and no token's signature, appears in `text`.
pub fn find_token_leaks(attempts: &[Attempt], text: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    for attempt in attempts {
        for token in &attempt.tokens {
            let signature = token.rsplit('.').next().unwrap_or_default();
            if text.contains(token.as_str()) {
                leaks.push(format!(
                    "{} ({}): the token appears",
                    attempt.case.name, attempt.caller
                ));
            } else if signature.len() >= 16 && text.contains(signature) {
                leaks.push(format!(
                    "{} ({}): the token's signature appears",
                    attempt.case.name, attempt.caller
                ));
            }
        }
    }
    leaks
}

/// Summary and problems of every failed attempt, one block each; empty when
/// all passed.
pub fn failure_report(attempts: &[Attempt]) -> String {
    let mut report = String::new();
    for attempt in attempts.iter().filter(|attempt| !attempt.passed()) {
        report.push_str(&attempt.summary());
        report.push('\n');
        for problem in &attempt.problems {
            report.push_str("    ");
            report.push_str(problem);
            report.push('\n');
        }
    }
    report
}
