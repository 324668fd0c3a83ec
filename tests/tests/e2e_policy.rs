//! Rules, ownership binding, identity headers and token forwarding through
//! real namespaces, the real eBPF steering and the real agent.
//!
//! The harness's `AgentConfig` has no fields for templates, `requires`,
//! `forward` or `claim_to_headers`, so these tests write the agent config
//! themselves and run the agent with [`PolicyAgent`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokengate_tests::agent::{agent_binary, ADMIN_STARTED_MESSAGE};
use tokengate_tests::echo::{EchoRecord, REQUEST_ID_HEADER};
use tokengate_tests::http::{self, Connection, Request, Response};
use tokengate_tests::ids::unique_id;
use tokengate_tests::issuer::ISSUER;
use tokengate_tests::skip::{require_root_and_ebpf, BPFFS};
use tokengate_tests::testbed::{Testbed, TestbedOptions, AUDIENCE, PROTECTED_PORT};
use tokengate_tests::tokens::{mint, tamper_signature, Claims, Key};

/// Time allowed for the agent to bind its admin listener and become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed for the echo service to log a forwarded request.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect timeout of one request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Cookie that carries the token.
const TOKEN_COOKIE: &str = "tg_token";

/// The workload's rules, with the index of each in a comment.
const RULES: &str = r"
    rules:
      # 0
      - path: /healthz
        public: true
      # 1
      - path_template: /users/{user}/orders/**
        requires:
          segment_equals_claim: {segment: user, claim: sub}
      # 2
      - path_prefix: /feed
        allow_missing: true
      # 3
      - path_prefix: /catalog
        allow_missing_or_failed: true
";

/// The agent, started with a config file this test wrote. Drop kills it
/// and removes its pins.
struct PolicyAgent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    pin_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl PolicyAgent {
    /// Starts the agent protecting the testbed's `orders` pod with `forward`
    /// and waits until `/readyz` returns 200.
    fn start(testbed: &Testbed, forward: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-e2e-policy-")
            .tempdir()
            .context("failed to create the agent directory")?;
        let pin_path = Path::new(BPFFS).join(format!("tokengate-{}", unique_id()));
        let config_path = dir.path().join("tokengate.yaml");
        let config = format!(
            r#"admin:
  listen: 127.0.0.1:0
audit:
  file: {audit}
interception:
  pin_path: {pins}
  handoff:
    socket: {handoff}
drain_seconds: 2
issuers:
  - issuer: {ISSUER}
    jwks_uri: {jwks}
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
workloads:
  - name: orders
    netns: {netns}
    ports: [{PROTECTED_PORT}]
    from_headers:
      - name: Authorization
        value_prefix: "Bearer "
    from_cookies: [{TOKEN_COOKIE}]
    forward: {forward}
    claim_to_headers:
      - {{claim: sub, header: x-user-id}}
      - {{claim: roles, header: x-user-roles}}
{RULES}"#,
            audit = dir.path().join("audit.log").display(),
            pins = pin_path.display(),
            handoff = dir.path().join("handoff.sock").display(),
            jwks = testbed.issuer.jwks_uri(),
            netns = testbed.orders.netns_path().display(),
        );
        std::fs::write(&config_path, config).context("failed to write the agent config")?;

        let mut child = Command::new(agent_binary())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start the agent")?;
        let stderr = child.stderr.take().context("agent stderr is not piped")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = mpsc::channel();
        let thread_logs = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = admin_addr(&line) {
                    let _ = sender.send(addr);
                }
                thread_logs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });

        let agent = Self {
            child,
            logs,
            pin_path,
            _dir: dir,
        };
        let admin = receiver
            .recv_timeout(START_TIMEOUT)
            .with_context(|| format!("the agent bound no admin listener{}", agent.log_text()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if http::get(admin, "/readyz").is_ok_and(|response| response.status == 200) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready in time{}", agent.log_text());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn log_text(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        format!("\n--- agent log ---\n{}", logs.join("\n"))
    }
}

impl Drop for PolicyAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.log_text());
        }
        if let Err(error) = std::fs::remove_dir_all(&self.pin_path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "cleanup: failed to remove {}: {error}",
                    self.pin_path.display()
                );
            }
        }
    }
}

/// Reads `addr=IP:PORT` from the admin listener's start line.
fn admin_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(ADMIN_STARTED_MESSAGE)? + ADMIN_STARTED_MESSAGE.len()..];
    rest.split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|value| value.trim_matches('"').parse().ok())
}

fn testbed() -> Testbed {
    Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed")
}

fn token(subject: &str, roles: &[&str]) -> String {
    mint(
        Key::Rsa1,
        &Claims::valid(subject, AUDIENCE).with_roles(roles),
    )
}

/// Sends `request` from the host namespace to the protected port, and
/// returns the response and what the service received, if anything.
fn send(testbed: &Testbed, request: Request) -> (Response, Option<EchoRecord>) {
    let id = unique_id();
    let request = request.header(REQUEST_ID_HEADER, &id);
    let stream = testbed
        .host()
        .connect(testbed.protected_addr(), CONNECT_TIMEOUT)
        .expect("connect to the protected port");
    let response = Connection::new(stream)
        .expect("connection")
        .send(&request)
        .expect("response");

    let find = || {
        testbed
            .echo
            .records()
            .expect("echo log")
            .into_iter()
            .find(|record| record.request_id() == Some(id.as_str()))
    };
    if response.status != 200 {
        return (response, find());
    }
    let deadline = Instant::now() + ECHO_TIMEOUT;
    loop {
        if let Some(record) = find() {
            return (response, Some(record));
        }
        assert!(
            Instant::now() < deadline,
            "the service did not log the allowed request {} {}",
            request.method,
            request.target
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Values of header `name` that the service received.
fn received(record: &EchoRecord, name: &str) -> Vec<String> {
    record
        .headers
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.clone())
        .collect()
}

#[test]
fn ownership_binding_and_identity_headers() {
    if !require_root_and_ebpf() {
        return;
    }
    let testbed = testbed();
    let _agent = PolicyAgent::start(&testbed, "original").expect("agent");
    let alice = token("alice", &["reader", "writer"]);

    let (own, record) = send(
        &testbed,
        Request::new("GET", "/users/alice/orders/7")
            .bearer(&alice)
            .header("X-User-Id", "admin")
            .header("x-user-roles", "admin"),
    );
    assert_eq!(own.status, 200, "{}", own.text());
    let record = record.expect("the service received the request");
    assert_eq!(received(&record, "x-user-id"), ["alice"]);
    assert_eq!(received(&record, "x-user-roles"), ["reader,writer"]);
    assert_eq!(
        received(&record, "authorization"),
        [format!("Bearer {alice}")],
        "forward: original keeps the token"
    );

    let (other, record) = send(
        &testbed,
        Request::new("GET", "/users/bob/orders/7").bearer(&alice),
    );
    assert_eq!(other.status, 403, "{}", other.text());
    assert!(
        other
            .header("www-authenticate")
            .is_some_and(|value| value.contains(r#"error="insufficient_scope""#)),
        "{:?}",
        other.headers
    );
    assert!(
        record.is_none(),
        "the service received another user's request"
    );

    for path in [
        "/users/alice/../bob/orders/7",
        "/users/%62ob/orders/7",
        "//users/bob/orders",
    ] {
        let (response, record) = send(&testbed, Request::new("GET", path).bearer(&alice));
        assert_eq!(response.status, 403, "{path}: {}", response.text());
        assert!(record.is_none(), "{path} reached the service");
    }

    let (encoded, record) = send(
        &testbed,
        Request::new("GET", "/users/%61lice/./orders//7?x=1").bearer(&alice),
    );
    assert_eq!(encoded.status, 200, "{}", encoded.text());
    assert_eq!(
        record.expect("forwarded").target,
        "/users/alice/orders/7?x=1",
        "the service receives the normalised path"
    );

    let (public, record) = send(
        &testbed,
        Request::new("GET", "/healthz").header("x-user-id", "admin"),
    );
    assert_eq!(public.status, 200, "{}", public.text());
    assert_eq!(
        received(&record.expect("forwarded"), "x-user-id"),
        Vec::<String>::new()
    );

    let (anonymous, record) = send(
        &testbed,
        Request::new("GET", "/feed").header("x-user-id", "admin"),
    );
    assert_eq!(anonymous.status, 200, "{}", anonymous.text());
    assert_eq!(
        received(&record.expect("forwarded"), "x-user-id"),
        Vec::<String>::new()
    );
}

#[test]
fn cookie_to_authorization_public_and_anonymous() {
    if !require_root_and_ebpf() {
        return;
    }
    let testbed = testbed();
    let _agent = PolicyAgent::start(&testbed, "cookie_to_authorization").expect("agent");
    let alice = token("alice", &["reader"]);
    let forged = tamper_signature(&alice);

    let (moved, record) = send(
        &testbed,
        Request::new("GET", "/users/alice/orders").header(
            "Cookie",
            &format!("theme=dark; {TOKEN_COOKIE}={alice}; lang=en"),
        ),
    );
    assert_eq!(moved.status, 200, "{}", moved.text());
    let record = record.expect("forwarded");
    assert_eq!(
        received(&record, "authorization"),
        [format!("Bearer {alice}")]
    );
    assert_eq!(received(&record, "cookie"), ["theme=dark; lang=en"]);
    assert_eq!(received(&record, "x-user-id"), ["alice"]);

    let (header_token, record) = send(
        &testbed,
        Request::new("GET", "/users/alice/orders").bearer(&alice),
    );
    assert_eq!(header_token.status, 200, "{}", header_token.text());
    assert_eq!(
        received(&record.expect("forwarded"), "authorization"),
        [format!("Bearer {alice}")]
    );

    let (missing, _) = send(&testbed, Request::new("GET", "/users/alice/orders"));
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        Some(r#"Bearer realm="tokengate""#)
    );

    let (public, record) = send(&testbed, Request::new("GET", "/healthz").bearer(&forged));
    assert_eq!(public.status, 200, "{}", public.text());
    assert_eq!(
        received(&record.expect("forwarded"), "authorization"),
        Vec::<String>::new(),
        "an unverified token reached the service on a public route"
    );

    let (anonymous, record) = send(&testbed, Request::new("GET", "/feed"));
    assert_eq!(anonymous.status, 200, "{}", anonymous.text());
    assert!(record.is_some());

    let (bad_on_feed, record) = send(&testbed, Request::new("GET", "/feed").bearer(&forged));
    assert_eq!(bad_on_feed.status, 401, "{}", bad_on_feed.text());
    assert!(
        bad_on_feed
            .header("www-authenticate")
            .is_some_and(|value| value.contains(r#"error="invalid_token""#)),
        "{:?}",
        bad_on_feed.headers
    );
    assert!(
        record.is_none(),
        "a request with a bad token reached the service"
    );

    let (bad_on_catalog, record) = send(
        &testbed,
        Request::new("GET", "/catalog/1")
            .header("Cookie", &format!("{TOKEN_COOKIE}={forged}; theme=dark")),
    );
    assert_eq!(bad_on_catalog.status, 200, "{}", bad_on_catalog.text());
    let record = record.expect("forwarded");
    assert_eq!(received(&record, "cookie"), ["theme=dark"]);
    assert_eq!(received(&record, "authorization"), Vec::<String>::new());
    assert_eq!(received(&record, "x-user-id"), Vec::<String>::new());
}
