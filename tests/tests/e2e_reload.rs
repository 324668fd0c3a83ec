//! Configuration reload of a running agent in real namespaces with the
//! real eBPF steering: an edited file adds a protected port and changes a
//! rule, an invalid edit and SIGHUP keep the agent enforcing. Also runs
//! `tokengate check-config` and `tokengate explain` on fixture files.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokengate_tests::agent::{agent_binary, AgentConfig};
use tokengate_tests::cases::valid_claims;
use tokengate_tests::http::{Connection, Request, Response};
use tokengate_tests::metrics::Sample;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{Testbed, TestbedOptions, ORDERS_ROLE, UNPROTECTED_PORT};
use tokengate_tests::tokens::{fingerprint, mint, Claims, Key};

/// Upper bound of waiting for a reload: the agent polls its file every
/// second, and steering a new port attaches the program again.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

/// Sends `request` from the client pod to port `port` of the orders pod.
fn send(testbed: &Testbed, port: u16, request: &Request) -> Response {
    let addr = testbed.orders.socket_addr(port);
    let stream = testbed
        .client_pod()
        .connect(addr, CONNECT_TIMEOUT)
        .expect("connect");
    Connection::new(stream)
        .expect("connection")
        .send(request)
        .expect("response")
}

/// Replaces the running agent's configuration file the way a `ConfigMap`
/// update does: a new file renamed over the old one.
fn write_config(testbed: &Testbed, yaml: &str) {
    let agent = testbed.agent();
    let path = agent.config_path();
    let staging = path.with_extension("next");
    std::fs::write(&staging, yaml).expect("write staging config");
    std::fs::rename(&staging, path).expect("rename config");
}

fn render(testbed: &Testbed, config: &AgentConfig) -> String {
    let agent = testbed.agent();
    config
        .to_yaml(agent.audit_path(), agent.pin_path())
        .expect("render config")
}

fn reloads(samples: &[Sample], result: &str) -> f64 {
    samples
        .iter()
        .filter(|sample| {
            sample.name == "tokengate_config_reloads_total"
                && sample.labels.get("result").map(String::as_str) == Some(result)
        })
        .map(|sample| sample.value)
        .sum()
}

fn wait_for_reloads(testbed: &Testbed, result: &str, count: f64) {
    let samples = testbed
        .agent()
        .wait_for_metrics(RELOAD_TIMEOUT, |samples| reloads(samples, result) >= count)
        .expect("metrics");
    let actual = reloads(&samples, result);
    // Counter values are whole numbers, exact in an f64.
    #[expect(clippy::float_cmp, reason = "counters hold whole numbers")]
    let matches = actual == count;
    assert!(
        matches,
        "reloads with result {result}: {actual}, expected {count}\n{}",
        testbed.agent().log_tail()
    );
}

/// Polls until `check` holds, failing after [`RELOAD_TIMEOUT`].
fn wait_until(what: &str, testbed: &Testbed, check: impl Fn() -> bool) {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}\n{}",
            testbed.agent().log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn edit_adds_port_and_changes_rule() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let protected = testbed.protected_addr().port();
    let token = mint(Key::Rsa1, &valid_claims());
    let orders = Request::new("GET", "/orders/1").bearer(&token);
    let anonymous = Request::new("GET", "/anything");
    assert_eq!(send(&testbed, protected, &orders).status, 200);
    assert_eq!(
        send(&testbed, UNPROTECTED_PORT, &anonymous).status,
        200,
        "the second port is not protected yet"
    );

    let mut config = testbed.default_agent_config();
    config.workloads[0].ports.push(UNPROTECTED_PORT);
    config.workloads[0].rules[0].roles = vec!["orders.write".to_owned()];
    write_config(&testbed, &render(&testbed, &config));
    wait_until("the added port is protected", &testbed, || {
        send(&testbed, UNPROTECTED_PORT, &anonymous).status == 401
    });

    assert_eq!(
        send(&testbed, protected, &orders).status,
        403,
        "the /orders rule now requires orders.write"
    );
    let writer = mint(
        Key::Rsa1,
        &valid_claims().with_roles(&[ORDERS_ROLE, "orders.write"]),
    );
    assert_eq!(
        send(
            &testbed,
            UNPROTECTED_PORT,
            &Request::new("GET", "/orders/2").bearer(&writer)
        )
        .status,
        200
    );
    wait_for_reloads(&testbed, "success", 1.0);

    // An invalid edit changes nothing.
    write_config(&testbed, "issuers: [\n");
    wait_for_reloads(&testbed, "failure", 1.0);
    assert_eq!(send(&testbed, UNPROTECTED_PORT, &anonymous).status, 401);
    assert_eq!(send(&testbed, protected, &orders).status, 403);
    assert!(
        testbed
            .agent()
            .logs()
            .iter()
            .any(|line| line.contains("configuration reload failed")),
        "the failed reload is logged\n{}",
        testbed.agent().log_tail()
    );
}

#[test]
fn sighup_reloads_unchanged_file() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut testbed = testbed();
    testbed.start_agent().expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    let orders = Request::new("GET", "/orders/1").bearer(&token);
    assert_eq!(
        send(&testbed, testbed.protected_addr().port(), &orders).status,
        200
    );

    let pid = i32::try_from(testbed.agent().pid()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGHUP).expect("send SIGHUP");
    wait_for_reloads(&testbed, "success", 1.0);

    assert!(
        testbed.agent_mut().is_running().expect("agent state"),
        "SIGHUP must not end the agent"
    );
    assert_eq!(
        send(&testbed, testbed.protected_addr().port(), &orders).status,
        200
    );
}

// ------------------------------------------------- check-config, explain

const FIXTURE_CONFIG: &str = r"
issuers:
  - issuer: https://issuer.tokengate.test
    jwks_uri: http://127.0.0.1:9/unused-jwks.json
    audiences: [orders]
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/tokengate-explain-unused
    ports: [8080]
    rules:
      - path_prefix: /health
        public: true
      - path_prefix: /orders
        methods: [GET]
        roles: [orders.read]
";

fn fixture_jwks() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/jwks.json"))
}

fn write_fixture_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokengate.yaml");
    std::fs::write(&path, FIXTURE_CONFIG).expect("write fixture config");
    path
}

/// Runs `tokengate explain` with `args`, `stdin` as standard input, and
/// returns the exit success, standard output and standard error.
fn explain(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(agent_binary())
        .arg("explain")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tokengate explain");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("explain output");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn explain_allowed_request() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());
    let token = mint(Key::Rsa1, &valid_claims());

    let (ok, out, err) = explain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--jwks",
            fixture_jwks().to_str().unwrap(),
            "--token",
            &token,
            "--method",
            "GET",
            "--path",
            "/orders/7",
        ],
        "",
    );

    assert!(ok, "explain failed: {err}");
    assert!(out.contains("decision:    allow"), "{out}");
    assert!(out.contains("reason:      allowed"), "{out}");
    assert!(out.contains("status:      200"), "{out}");
    assert!(
        out.contains("issuer:      https://issuer.tokengate.test"),
        "{out}"
    );
    assert!(
        out.contains("rule:        #1 GET path_prefix = /orders"),
        "{out}"
    );
    assert!(out.contains(&fingerprint(&token)), "{out}");
    assert!(!out.contains(&token), "the token itself is printed:\n{out}");
}

#[test]
fn explain_reads_token_from_stdin() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());
    let token = mint(Key::Rsa1, &Claims::valid("bob", "orders"));

    let (ok, out, err) = explain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--jwks",
            fixture_jwks().to_str().unwrap(),
            "--token",
            "-",
            "--path",
            "/orders/7",
        ],
        &format!("{token}\n"),
    );

    assert!(ok, "explain failed: {err}");
    assert!(out.contains("decision:    deny"), "{out}");
    assert!(out.contains("reason:      missing_role"), "{out}");
    assert!(out.contains("status:      403"), "{out}");
    assert!(out.contains("subject:     bob"), "{out}");
    assert!(out.contains("why:         requirement not met"), "{out}");
    assert!(!out.contains(&token), "the token itself is printed:\n{out}");
}

#[test]
fn explain_expired_at_given_time() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());
    let token = mint(Key::Rsa1, &valid_claims());
    let far_future = (tokengate_tests::tokens::unix_now() + 10 * 365 * 86_400).to_string();

    let (ok, out, err) = explain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--jwks",
            fixture_jwks().to_str().unwrap(),
            "--token",
            &token,
            "--path",
            "/orders/7",
            "--now",
            &far_future,
        ],
        "",
    );

    assert!(ok, "explain failed: {err}");
    assert!(out.contains("decision:    deny"), "{out}");
    assert!(out.contains("status:      401"), "{out}");
    assert!(
        out.contains("token_expired") || out.contains("expired"),
        "{out}"
    );
}

#[test]
fn explain_public_rule_without_token() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());

    let (ok, out, err) = explain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--jwks",
            fixture_jwks().to_str().unwrap(),
            "--path",
            "/health",
        ],
        "",
    );

    assert!(ok, "explain failed: {err}");
    assert!(out.contains("decision:    allow"), "{out}");
    assert!(
        out.contains("rule:        #0 any method path_prefix = /health, public"),
        "{out}"
    );
    assert!(out.contains("token:       none read"), "{out}");
}

#[test]
fn explain_unknown_workload_lists_names() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());

    let (ok, _out, err) = explain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--workload",
            "billing",
            "--jwks",
            fixture_jwks().to_str().unwrap(),
            "--path",
            "/",
        ],
        "",
    );

    assert!(!ok);
    assert!(err.contains("no workload \"billing\""), "{err}");
    assert!(err.contains("orders"), "{err}");
}

#[test]
fn check_config_reports_ok_and_errors() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_fixture_config(dir.path());
    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(
        &invalid,
        FIXTURE_CONFIG.replace("ports: [8080]", "ports: [0]"),
    )
    .unwrap();

    let good = Command::new(agent_binary())
        .args(["check-config", config.to_str().unwrap()])
        .output()
        .expect("run check-config");
    let bad = Command::new(agent_binary())
        .args(["check-config", invalid.to_str().unwrap()])
        .output()
        .expect("run check-config");

    let good_out = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success());
    assert!(good_out.starts_with("OK: 1 issuer(s)"), "{good_out}");
    assert!(
        good_out.contains("orders (ports 8080, 2 rules)"),
        "{good_out}"
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("ports"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
