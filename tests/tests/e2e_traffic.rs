//! Traffic through the agent: large bodies stream through intact, and many
//! concurrent keep-alive clients each get the expected response.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::{EchoRecord, REQUEST_ID_HEADER};
use tokengate_tests::http::{Connection, Request, Response};
use tokengate_tests::ids::unique_id;
use tokengate_tests::metrics;
use tokengate_tests::netns::Caller;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions, AUDIENCE, WORKLOAD};
use tokengate_tests::tokens::{mint, unix_now, Claims, Key};
use tokengate_tests::{pattern_bytes, sha256_hex};

/// Size of the large bodies: 1 MiB.
const LARGE_BODY_BYTES: usize = 1024 * 1024;

/// Chunk size of the chunked upload.
const UPLOAD_CHUNK_BYTES: usize = 64 * 1024;

const CLIENTS: usize = 32;
const REQUESTS_PER_CLIENT: usize = 20;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for all audit lines to appear after the last response.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

fn connect(caller: &Caller, testbed: &Testbed) -> Connection {
    let stream = caller
        .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
        .unwrap_or_else(|error| panic!("{}: connect: {error}", caller.label()));
    Connection::new(stream).expect("connection")
}

fn echo_of(response: &Response) -> EchoRecord {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|error| panic!("not an echo ({error}): {}", response.text()))
}

#[test]
fn one_mib_body_streams_through() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    let body = pattern_bytes(LARGE_BODY_BYTES);
    let expected_sha = sha256_hex(&body);

    for caller in testbed.outside_callers() {
        let mut connection = connect(&caller, &testbed);
        let fixed = Request::new("POST", "/orders/upload-fixed")
            .bearer(&token)
            .body(body.clone());
        let chunked = Request::new("POST", "/orders/upload-chunked")
            .bearer(&token)
            .chunked_body(body.clone(), UPLOAD_CHUNK_BYTES);
        let small = Request::new("GET", "/orders/after-upload").bearer(&token);

        let fixed_response = connection.send(&fixed).expect("fixed-length upload");
        let chunked_response = connection.send(&chunked).expect("chunked upload");
        let small_response = connection.send(&small).expect("request after the uploads");

        for (name, response) in [
            ("fixed-length", &fixed_response),
            ("chunked", &chunked_response),
        ] {
            assert_eq!(
                response.status,
                200,
                "{}: {name} upload: {}",
                caller.label(),
                response.text()
            );
            let echo = echo_of(response);
            assert_eq!(
                echo.body_len,
                LARGE_BODY_BYTES as u64,
                "{}: {name} length",
                caller.label()
            );
            assert_eq!(
                echo.body_sha256,
                expected_sha,
                "{}: {name} SHA-256",
                caller.label()
            );
            assert!(
                echo.body_complete,
                "{}: {name} body ended early",
                caller.label()
            );
        }
        assert_eq!(
            small_response.status,
            200,
            "{}: keep-alive after the uploads",
            caller.label()
        );
    }
}

#[test]
fn one_mib_body_without_token_is_rejected() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let id = unique_id();

    let mut connection = connect(&testbed.client_pod(), &testbed);
    let request = Request::new("POST", "/orders/upload")
        .header(REQUEST_ID_HEADER, &id)
        .body(pattern_bytes(LARGE_BODY_BYTES));
    let response = connection
        .send(&request)
        .expect("response to the rejected upload");

    assert_eq!(response.status, 401);
    let records = testbed.echo.records().expect("echo log");
    assert!(
        records
            .iter()
            .all(|record| record.request_id() != Some(id.as_str())),
        "the upload reached the service"
    );
}

/// A token kind of the concurrency test, with its expected status.
struct Variant {
    name: &'static str,
    token: Option<String>,
    expected_status: u16,
}

fn variants() -> Vec<Variant> {
    let now = unix_now();
    let mut expired = valid_claims();
    expired.exp = Some(now - 3600);
    expired.iat = Some(now - 7200);
    expired.nbf = expired.iat;
    let lacking = Claims::valid("alice@example.test", AUDIENCE).with_roles(&["orders.write"]);
    vec![
        Variant {
            name: "RS256",
            token: Some(mint(Key::Rsa1, &valid_claims())),
            expected_status: 200,
        },
        Variant {
            name: "no token",
            token: None,
            expected_status: 401,
        },
        Variant {
            name: "ES256",
            token: Some(mint(Key::Ec1, &valid_claims())),
            expected_status: 200,
        },
        Variant {
            name: "lacking role",
            token: Some(mint(Key::Rsa1, &lacking)),
            expected_status: 403,
        },
        Variant {
            name: "EdDSA",
            token: Some(mint(Key::Ed1, &valid_claims())),
            expected_status: 200,
        },
        Variant {
            name: "expired",
            token: Some(mint(Key::Ec1, &expired)),
            expected_status: 401,
        },
    ]
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    allowed_ids: Vec<String>,
    denied_ids: Vec<String>,
    problems: Vec<String>,
    /// Connections the agent closed right after a 200.
    closed_after_allow: usize,
}

fn run_client(index: usize, caller: &Caller, testbed: &Testbed, variants: &[Variant]) -> ClientLog {
    let mut log = ClientLog::default();
    let mut connection = connect(caller, testbed);
    for request_index in 0..REQUESTS_PER_CLIENT {
        if !connection.is_reusable() {
            connection = connect(caller, testbed);
        }
        let variant = &variants[(index + request_index) % variants.len()];
        let id = format!("client{index}-request{request_index}-{}", unique_id());
        let mut request = Request::new("GET", &format!("/orders/{index}/{request_index}"))
            .header(REQUEST_ID_HEADER, &id);
        if let Some(token) = &variant.token {
            request = request.bearer(token);
        }

        let response = match connection.send(&request) {
            Ok(response) => response,
            Err(error) => {
                log.problems
                    .push(format!("{id} ({}): {error:#}", variant.name));
                continue;
            }
        };
        if response.status != variant.expected_status {
            log.problems.push(format!(
                "{id} ({}): status {} instead of {}",
                variant.name, response.status, variant.expected_status
            ));
            continue;
        }
        if response.status == 200 {
            match serde_json::from_slice::<EchoRecord>(&response.body) {
                Ok(echo) if echo.request_id() == Some(id.as_str()) => {}
                Ok(echo) => log
                    .problems
                    .push(format!("{id}: got the echo of {:?}", echo.request_id())),
                Err(error) => log.problems.push(format!("{id}: not an echo: {error}")),
            }
            if !connection.is_reusable() {
                log.closed_after_allow += 1;
            }
            log.allowed_ids.push(id);
        } else {
            log.denied_ids.push(id);
        }
    }
    log
}

#[test]
fn concurrent_keep_alive_clients() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let variants = variants();
    let callers = testbed.outside_callers();
    let logs = Mutex::new(Vec::new());

    std::thread::scope(|scope| {
        for index in 0..CLIENTS {
            let caller = &callers[index % callers.len()];
            let (testbed, variants, logs) = (&testbed, &variants, &logs);
            scope.spawn(move || {
                let log = caller
                    .run(|| run_client(index, caller, testbed, variants))
                    .expect("client thread");
                logs.lock().expect("logs").push(log);
            });
        }
    });
    let logs = logs.into_inner().expect("logs");

    let problems: Vec<&String> = logs.iter().flat_map(|log| &log.problems).collect();
    assert!(
        problems.is_empty(),
        "{} wrong answers:\n{problems:#?}",
        problems.len()
    );
    let allowed: Vec<&String> = logs.iter().flat_map(|log| &log.allowed_ids).collect();
    let denied: Vec<&String> = logs.iter().flat_map(|log| &log.denied_ids).collect();
    assert_eq!(allowed.len() + denied.len(), CLIENTS * REQUESTS_PER_CLIENT);
    let closed_after_allow: usize = logs.iter().map(|log| log.closed_after_allow).sum();
    assert_eq!(
        closed_after_allow, 0,
        "the agent closed keep-alive connections after allowed requests"
    );

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for record in testbed.echo.records().expect("echo log") {
        if let Some(id) = record.request_id() {
            *seen.entry(id.to_owned()).or_default() += 1;
        }
    }
    let not_once: Vec<_> = allowed
        .iter()
        .filter(|id| seen.get(id.as_str()) != Some(&1))
        .collect();
    let leaked: Vec<_> = denied
        .iter()
        .filter(|id| seen.contains_key(id.as_str()))
        .collect();
    assert!(
        not_once.is_empty(),
        "allowed requests not logged exactly once by the service: {not_once:?}"
    );
    assert!(
        leaked.is_empty(),
        "denied requests reached the service: {leaked:?}"
    );

    let total = CLIENTS * REQUESTS_PER_CLIENT;
    let audit = testbed
        .agent()
        .wait_for_audit(AUDIT_TIMEOUT, |lines| lines.len() >= total)
        .expect("audit");
    assert_eq!(audit.len(), total, "audit lines");
    let samples = testbed
        .agent()
        .wait_for_metrics(AUDIT_TIMEOUT, |samples| {
            let labels = [("workload", WORKLOAD)];
            metrics::count(samples, "tokengate_decisions_total", &labels) >= Some(total as u64)
        })
        .expect("metrics");
    let allow = metrics::count(
        &samples,
        "tokengate_decisions_total",
        &[("workload", WORKLOAD), ("decision", "allow")],
    );
    let deny = metrics::count(
        &samples,
        "tokengate_decisions_total",
        &[("workload", WORKLOAD), ("decision", "deny")],
    );
    assert_eq!(
        allow,
        Some(allowed.len() as u64),
        "allow decisions in the metrics"
    );
    assert_eq!(
        deny,
        Some(denied.len() as u64),
        "deny decisions in the metrics"
    );
}
