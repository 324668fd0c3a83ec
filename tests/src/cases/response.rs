//! Checks of the response a caller received for one case.

use std::net::IpAddr;

use super::{Case, Credentials};
use crate::echo::EchoRecord;
use crate::http::Response;
use crate::testbed::{RESERVED_SOURCE, TOKEN_COOKIE};
use crate::tokens::fingerprint;

pub(super) fn check_response(
    case: &Case,
    response: &Response,
    credentials: &Credentials,
    request_id: &str,
    body: &[u8],
) -> Vec<String> {
    let mut problems = Vec::new();
    if response.status != case.expected_status {
        problems.push(format!(
            "status {} instead of {}: {}",
            response.status,
            case.expected_status,
            response.text().chars().take(300).collect::<String>()
        ));
        return problems;
    }

    let challenge = response.header("www-authenticate").unwrap_or_default();
    match case.expected_status {
        401 => {
            if !challenge.starts_with("Bearer ") || !challenge.contains("realm=\"tokengate\"") {
                problems.push(format!(
                    "401 without a Bearer realm=\"tokengate\" challenge: {challenge:?}"
                ));
            }
            // RFC 6750 §3.1: no error code when the request had no token,
            // `invalid_token` when it had a bad one.
            let has_error_code = challenge.contains("error=");
            if case.expected_reason == "missing_token" && has_error_code {
                problems.push(format!(
                    "challenge for a missing token has an error code: {challenge:?}"
                ));
            }
            if case.expected_reason != "missing_token"
                && !challenge.contains("error=\"invalid_token\"")
            {
                problems.push(format!(
                    "challenge lacks error=\"invalid_token\": {challenge:?}"
                ));
            }
        }
        403 if !challenge.contains("error=\"insufficient_scope\"") => {
            problems.push(format!(
                "403 challenge lacks error=\"insufficient_scope\": {challenge:?}"
            ));
        }
        200 => problems.extend(check_echo_response(response, credentials, request_id, body)),
        _ => {}
    }
    if case.expected_status != 200 && response.text().contains("body_sha256") {
        problems.push("a denied request got the service's echo".to_owned());
    }
    problems
}

/// Describes the service's echo in a 200 response: the peer address and the
/// fingerprint of the bearer token the service received.
pub(super) fn describe_service_view(response: &Response) -> Option<String> {
    if response.status != 200 {
        return None;
    }
    let record: EchoRecord = serde_json::from_slice(&response.body).ok()?;
    let authorization = match record.header("authorization") {
        Some(value) => match value.strip_prefix("Bearer ") {
            Some(token) => format!("Authorization: Bearer <token {}>", fingerprint(token)),
            None => "an Authorization header without a bearer token".to_owned(),
        },
        None => "no Authorization header".to_owned(),
    };
    Some(format!(
        "the service saw {authorization} from {}",
        record.peer
    ))
}

/// Checks that the response is the service's echo, that the service saw
/// the token and the body, and that the connection came from the agent's
/// reserved source.
fn check_echo_response(
    response: &Response,
    credentials: &Credentials,
    request_id: &str,
    body: &[u8],
) -> Vec<String> {
    let mut problems = Vec::new();
    let record: EchoRecord = match serde_json::from_slice(&response.body) {
        Ok(record) => record,
        Err(error) => {
            return vec![format!(
                "200 body is not the service's echo ({error}): {}",
                response.text()
            )]
        }
    };

    if record.request_id() != Some(request_id) {
        problems.push(format!(
            "echo is for request {:?}, not {request_id:?}",
            record.request_id()
        ));
    }
    if let [sent] = credentials.authorization.as_slice() {
        if record.header("authorization") != Some(sent.as_str()) {
            problems.push("the service did not see the Authorization header as sent".to_owned());
        }
    }
    if let Some(token) = &credentials.cookie {
        let cookie = record.header("cookie").unwrap_or_default();
        if !cookie.contains(&format!("{TOKEN_COOKIE}={token}")) {
            problems.push("the service did not see the token cookie".to_owned());
        }
    }
    if record.peer_ip() != Some(IpAddr::V4(RESERVED_SOURCE)) {
        problems.push(format!(
            "the service saw peer {} instead of {RESERVED_SOURCE}",
            record.peer
        ));
    }
    if record.body_len != body.len() as u64 || !record.body_complete {
        problems.push(format!(
            "the service received {} of {} body bytes",
            record.body_len,
            body.len()
        ));
    }
    if record.body_sha256 != crate::sha256_hex(body) {
        problems.push("the body's SHA-256 at the service differs from the one sent".to_owned());
    }
    problems
}
