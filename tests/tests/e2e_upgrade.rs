//! Restarts and upgrades of the agent while callers keep sending requests.
//!
//! An upgrade hands the listening sockets from agent A to agent B over the
//! hand-off socket: under continuous load no request fails and every request
//! that reached the service carried a valid token. A plain restart (SIGKILL,
//! then start) leaves the protected port closed in between and adopts the
//! pins. A hand-off socket left by a killed agent does not stop the next one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokengate_tests::agent::{agent_binary, Agent, AgentConfig, READY_TIMEOUT};
use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::{EchoService, REQUEST_ID_HEADER};
use tokengate_tests::http::{Connection, Request, Response};
use tokengate_tests::ids::unique_id;
use tokengate_tests::issuer::Issuer;
use tokengate_tests::node::{node_agent_config, pod_workload, Node, Pod, Stack};
use tokengate_tests::skip::{require_root_and_ebpf, BPFFS};
use tokengate_tests::tokens::{mint, tamper_signature, Key};

/// Protected port of the service.
const PORT: u16 = 8080;

/// Workload name in the agent config.
const WORKLOAD: &str = "orders";

/// Client threads of the load.
const WORKERS: usize = 4;

/// Upper bound on the requests of one client thread, so the load ends even
/// if the stop flag is never set.
const MAX_REQUESTS_PER_WORKER: usize = 2000;

/// Every this many requests a worker opens a new connection; the others go
/// on the kept-alive one.
const NEW_CONNECTION_EVERY: usize = 7;

/// Every this many requests a worker sends an invalid token.
const INVALID_EVERY: usize = 5;

/// Pause between two requests of one worker, so the load spans the whole
/// hand-off without saturating two cores.
const PACE: Duration = Duration::from_millis(3);

/// Load before agent B starts and after agent A is gone.
const LOAD_MARGIN: Duration = Duration::from_millis(1500);

/// Time for agent A to drain and exit after the hand-off: its drain
/// deadline plus shutdown.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connect timeout of the load's requests. A connection that waits this
/// long counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The pods, the service and the issuer of one test.
struct Bed {
    dir: tempfile::TempDir,
    pins: PinGuard,
    handoff_socket: PathBuf,
    issuer: Issuer,
    echo: EchoService,
    orders: Pod,
    client: Pod,
    node: Node,
}

impl Bed {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut node = Node::create().expect("node");
        let orders = node.add_pod("orders", Stack::Dual).expect("orders pod");
        let client = node.add_pod("client", Stack::Dual).expect("client pod");
        let echo = orders
            .start_echo(
                env!("CARGO_BIN_EXE_tg-echo").as_ref(),
                &[PORT],
                &dir.path().join("echo.log"),
            )
            .expect("echo service");
        let issuer = Issuer::start().expect("issuer");
        let id = unique_id();
        Self {
            pins: PinGuard(Path::new(BPFFS).join(format!("tg-upgrade-{id}"))),
            handoff_socket: dir.path().join("handoff.sock"),
            dir,
            issuer,
            echo,
            orders,
            client,
            node,
        }
    }

    fn config(&self) -> AgentConfig {
        node_agent_config(
            &self.issuer,
            vec![pod_workload(&self.orders, WORKLOAD, &[PORT])],
        )
    }

    /// Starts an agent on the shared pins and hand-off socket. It exits by
    /// itself once it has handed off and drained.
    fn spawn_agent(&self) -> Agent {
        let pins = self.pins.0.clone();
        let socket = self.handoff_socket.clone();
        Agent::spawn_patched(
            &agent_binary(),
            &self.config(),
            move |config: &mut Value| {
                config["interception"]["pin_path"] = json!(pins);
                config["interception"]["handoff"] = json!({
                    "socket": socket,
                    "exit_after_handoff": true,
                    "timeout_seconds": 20,
                });
            },
        )
        .expect("agent spawned")
    }

    fn start_agent(&self) -> Agent {
        let mut agent = self.spawn_agent();
        agent.wait_ready(READY_TIMEOUT).expect("agent ready");
        agent
    }

    fn target(&self) -> SocketAddr {
        self.orders.v4(PORT)
    }

    /// Addresses of the service for the load: IPv4, and IPv6 where the
    /// node forwards it between pods.
    fn load_targets(&self) -> Vec<SocketAddr> {
        let mut targets = vec![self.orders.v4(PORT)];
        if self.node.forwards_ipv6() {
            targets.push(self.orders.v6(PORT));
        }
        targets
    }
}

/// Removes the shared pin directory at the end, after the agents are gone.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: failed to remove {}: {error}", self.0.display());
            }
        }
    }
}

/// One request of the load.
#[derive(Clone, Debug)]
struct Sent {
    token: String,
    valid: bool,
}

/// What one worker did.
#[derive(Debug, Default)]
struct WorkerReport {
    sent: HashMap<String, Sent>,
    failures: Vec<String>,
    retries: usize,
    connections: usize,
}

/// The whole load's outcome.
#[derive(Debug, Default)]
struct LoadReport {
    sent: HashMap<String, Sent>,
    failures: Vec<String>,
    retries: usize,
    connections: usize,
}

/// Client threads that send requests until `stop` is set.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<WorkerReport>>,
}

impl Load {
    /// Starts the workers; worker `n` sends to `targets[n % targets.len()]`.
    fn start(client: &Pod, targets: &[SocketAddr]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let valid = mint(Key::Rsa1, &valid_claims());
        let invalid = [
            tamper_signature(&valid),
            mint(Key::RsaUnknown, &valid_claims()),
        ];
        let workers = (0..WORKERS)
            .map(|worker| {
                let client = client.clone();
                let stop = Arc::clone(&stop);
                let valid = valid.clone();
                let invalid = invalid.clone();
                let target = targets[worker % targets.len()];
                std::thread::spawn(move || {
                    run_worker(worker, &client, target, &valid, &invalid, &stop)
                })
            })
            .collect();
        Self { stop, workers }
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for worker in self.workers {
            let worker = worker.join().expect("worker thread");
            report.sent.extend(worker.sent);
            report.failures.extend(worker.failures);
            report.retries += worker.retries;
            report.connections += worker.connections;
        }
        report
    }
}

fn run_worker(
    worker: usize,
    client: &Pod,
    target: SocketAddr,
    valid: &str,
    invalid: &[String; 2],
    stop: &AtomicBool,
) -> WorkerReport {
    let mut report = WorkerReport::default();
    let mut connection: Option<Connection> = None;
    let run = unique_id();

    for index in 0..MAX_REQUESTS_PER_WORKER {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let is_valid = index % INVALID_EVERY != INVALID_EVERY - 1;
        let token = if is_valid {
            valid.to_owned()
        } else {
            invalid[index / INVALID_EVERY % 2].clone()
        };
        if index % NEW_CONNECTION_EVERY == 0 {
            connection = None;
        }
        let id = format!("{run}-w{worker}-{index}");
        let request = Request::new("GET", &format!("/orders/{index}"))
            .header(REQUEST_ID_HEADER, &id)
            .bearer(&token);
        report.sent.insert(
            id.clone(),
            Sent {
                token,
                valid: is_valid,
            },
        );

        let reused = connection.is_some();
        let mut result = send(client, target, &mut connection, &mut report, &request);
        if let Err(error) = &result {
            // An idempotent request on a kept-alive connection that the
            // server closed before responding may be sent again once on a
            // new connection, as HTTP clients do (RFC 9110 §9.2.2).
            if reused && is_retryable(error) {
                report.retries += 1;
                connection = None;
                result = send(client, target, &mut connection, &mut report, &request);
            }
        }
        match result {
            Ok(response) => {
                let expected = if is_valid { 200 } else { 401 };
                if response.status != expected {
                    report.failures.push(format!(
                        "{id}: status {} where {expected} was expected: {}",
                        response.status,
                        response.text()
                    ));
                }
            }
            Err(error) => report.failures.push(format!("{id}: {error:#}")),
        }
        std::thread::sleep(PACE);
    }
    report
}

/// Sends `request` on `connection`, opening a new one first when there is
/// none or the last one is done.
fn send(
    client: &Pod,
    target: SocketAddr,
    connection: &mut Option<Connection>,
    report: &mut WorkerReport,
    request: &Request,
) -> anyhow::Result<Response> {
    if !connection.as_ref().is_some_and(Connection::is_reusable) {
        let stream = client.connect(target, CONNECT_TIMEOUT)?;
        *connection = Some(Connection::new(stream)?);
        report.connections += 1;
    }
    let open = connection.as_mut().expect("connection opened above");
    let result = open.send(request);
    if result.is_err() || !open.is_reusable() {
        *connection = None;
    }
    result
}

/// Tells whether an error means the server closed the connection before
/// sending any byte of the response.
fn is_retryable(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}");
    text.contains("closed before a response")
        || text.contains("Connection reset")
        || text.contains("Broken pipe")
}

/// Checks the service's log against what was sent: every request that
/// reached it carried a valid token as sent, and every valid request
/// reached it. Returns the number of unverified requests.
fn unverified_requests(echo: &EchoService, sent: &HashMap<String, Sent>) -> usize {
    let records = echo.records().expect("echo log");
    let mut unverified = 0;
    let mut reached = std::collections::HashSet::new();
    for record in &records {
        let Some(id) = record.request_id() else {
            unverified += 1;
            eprintln!("request without id reached the service: {record:?}");
            continue;
        };
        let Some(entry) = sent.get(id) else {
            continue;
        };
        reached.insert(id.to_owned());
        let expected = format!("Bearer {}", entry.token);
        if !entry.valid || record.header("authorization") != Some(expected.as_str()) {
            unverified += 1;
            eprintln!("unverified request {id} reached the service");
        }
    }
    let missing = sent
        .iter()
        .filter(|(id, entry)| entry.valid && !reached.contains(*id))
        .count();
    assert_eq!(
        missing, 0,
        "{missing} allowed requests never reached the service"
    );
    unverified
}

fn log_contains(agent: &Agent, text: &str) -> bool {
    agent.logs().iter().any(|line| line.contains(text))
}

#[test]
fn handoff_under_load_loses_nothing() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = Bed::new();
    let mut agent_a = bed.start_agent();

    let targets = bed.load_targets();
    let load = Load::start(&bed.client, &targets);
    std::thread::sleep(LOAD_MARGIN);
    let started = Instant::now();
    let mut agent_b = bed.spawn_agent();
    agent_b.wait_ready(READY_TIMEOUT).expect("agent B ready");
    let status_a = agent_a.wait_exit(EXIT_TIMEOUT).expect("agent A exits");
    let handoff_time = started.elapsed();
    std::thread::sleep(LOAD_MARGIN);
    let report = load.finish();

    let unverified = unverified_requests(&bed.echo, &report.sent);
    let invalid = report.sent.values().filter(|sent| !sent.valid).count();
    println!(
        "upgrade under load to {targets:?}: sent {}, invalid tokens {invalid}, connections {}, failed {}, retried {}, unverified {unverified}, B start to A exit {handoff_time:?}",
        report.sent.len(),
        report.connections,
        report.failures.len(),
        report.retries,
    );
    assert!(
        report.failures.is_empty(),
        "failed requests: {:#?}{}{}",
        report.failures,
        agent_a.log_tail(),
        agent_b.log_tail()
    );
    assert_eq!(unverified, 0);
    assert!(status_a.success(), "agent A exited with {status_a}");
    assert!(
        report.sent.len() > WORKERS * 100,
        "load too small: {}",
        report.sent.len()
    );
    assert!(
        log_contains(
            &agent_b,
            "serving the listeners inherited from the previous agent"
        ),
        "agent B did not inherit the listeners{}",
        agent_b.log_tail()
    );
    assert!(
        log_contains(&agent_b, "installed=link updated"),
        "agent B did not update the pinned link{}",
        agent_b.log_tail()
    );
    assert!(log_contains(&agent_a, "new agent serves the sockets"));
}

#[test]
fn restart_after_sigkill_fails_closed_and_adopts_pins() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = Bed::new();
    let token = mint(Key::Rsa1, &valid_claims());
    let request = |id: &str| {
        Request::new("GET", "/orders/1")
            .header(REQUEST_ID_HEADER, id)
            .bearer(&token)
    };
    let mut agent_a = bed.start_agent();
    let before = bed
        .client
        .send(bed.target(), &request("before"))
        .expect("request to A");

    agent_a.sigkill().expect("SIGKILL");
    agent_a.wait_exit(EXIT_TIMEOUT).expect("agent A gone");
    let gap = bed.client.connect(bed.target(), Duration::from_secs(2));
    let agent_b = bed.start_agent();
    let after = bed
        .client
        .send(bed.target(), &request("after"))
        .expect("request to B");

    assert_eq!(before.status, 200);
    assert!(
        gap.is_err(),
        "the protected port accepted a connection with no agent"
    );
    assert_eq!(after.status, 200);
    assert!(
        log_contains(&agent_b, "hand-off socket is stale"),
        "agent B did not notice the stale socket{}",
        agent_b.log_tail()
    );
    assert!(
        log_contains(&agent_b, "installed=link updated"),
        "agent B did not adopt the pinned link{}",
        agent_b.log_tail()
    );
    let reached: Vec<String> = bed
        .echo
        .records()
        .expect("echo log")
        .iter()
        .filter_map(|record| record.request_id().map(str::to_owned))
        .collect();
    assert_eq!(reached, vec!["before".to_owned(), "after".to_owned()]);
}

#[test]
fn handoff_socket_of_dead_agent_means_fresh_start() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = Bed::new();
    // A socket file with no listener, as a killed agent leaves it.
    drop(std::os::unix::net::UnixListener::bind(&bed.handoff_socket).expect("stale socket"));

    let agent = bed.start_agent();
    let response = bed
        .client
        .send(
            bed.target(),
            &Request::new("GET", "/orders/1").bearer(&mint(Key::Ec1, &valid_claims())),
        )
        .expect("request");

    assert_eq!(response.status, 200);
    assert!(
        log_contains(&agent, "hand-off socket is stale"),
        "{}",
        agent.log_tail()
    );
    assert!(
        log_contains(&agent, "hand-off socket listening"),
        "{}",
        agent.log_tail()
    );
    assert!(bed.dir.path().join("handoff.sock").exists());
}

/// Runs the agent binary with `args` and returns its exit status, standard
/// output and standard error.
fn run_tool(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let output = std::process::Command::new(agent_binary())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run the agent binary");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn status_reports_pins_and_uninstall_removes_them() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = Bed::new();
    let mut agent = bed.start_agent();
    let config = agent.config_path().to_str().expect("UTF-8 path").to_owned();
    let token = mint(Key::Ed1, &valid_claims());
    let response = bed
        .client
        .send(
            bed.target(),
            &Request::new("GET", "/orders/1").bearer(&token),
        )
        .expect("request");
    assert_eq!(response.status, 200);

    let (code, json_text, stderr) = run_tool(&["status", "--config", &config, "--json"]);
    assert!(code.success(), "status failed: {stderr}");
    let status: Value = serde_json::from_str(&json_text).expect("status JSON");
    let (code, text, _) = run_tool(&["status", "--config", &config]);
    assert!(code.success());

    assert_eq!(status["agent"]["pid"], json!(agent.pid()));
    assert_eq!(status["readiness"][0], json!(200));
    assert_eq!(status["features"]["sk_lookup"]["state"], "available");
    let pod = &status["pods"][0];
    assert_eq!(pod["workload"], WORKLOAD);
    assert_eq!(pod["ports"], json!([PORT]));
    assert_eq!(pod["current_layout"], json!(true));
    assert_eq!(pod["link"]["kind"], "link");
    assert_eq!(pod["link"]["program"]["name"], "tokengate_steer");
    assert!(pod["counters"]["steered"].as_u64() >= Some(1), "{pod}");
    let ports_map = status["pins"]
        .as_array()
        .expect("pins")
        .iter()
        .find(|pin| pin["name"] == "TG_PORTS")
        .expect("TG_PORTS pinned");
    assert_eq!(ports_map["entries"], json!(1));
    assert_eq!(ports_map["max_entries"], json!(1024));
    assert!(
        status["counters"]
            .as_object()
            .is_some_and(|counters| !counters.is_empty()),
        "{}",
        status["counters"]
    );
    assert!(text.contains("tokengate_steer"), "{text}");
    assert!(text.contains("entries 1/1024"), "{text}");

    let (refused, _, refusal) = run_tool(&["uninstall", "--config", &config]);
    assert!(!refused.success());
    assert!(refusal.contains("is running"), "{refusal}");
    assert!(bed.pins.0.exists());

    agent.sigterm().expect("SIGTERM");
    agent.wait_exit(EXIT_TIMEOUT).expect("agent stops");
    let links = status["pins"]
        .as_array()
        .expect("pins")
        .iter()
        .filter(|pin| pin["kind"] == "link")
        .count();
    let (removed, output, stderr) = run_tool(&["uninstall", "--config", &config]);
    let (again, second, _) = run_tool(&["uninstall", "--config", &config]);
    let open = bed
        .client
        .send(bed.target(), &Request::new("GET", "/orders/open"))
        .expect("request after uninstall");

    assert!(removed.success(), "uninstall failed: {stderr}");
    assert!(
        output.contains(&format!("removed {links} links")),
        "{output}"
    );
    assert!(
        !bed.pins.0.exists(),
        "{} still exists",
        bed.pins.0.display()
    );
    assert!(again.success());
    assert!(second.contains("nothing to remove"), "{second}");
    // Nothing steers any more: the service responds without a token.
    assert_eq!(open.status, 200);
}

#[test]
fn idle_connection_gets_close_after_handoff() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = Bed::new();
    let token = mint(Key::Rsa1, &valid_claims());
    let request = |id: &str| {
        Request::new("GET", "/orders/1")
            .header(REQUEST_ID_HEADER, id)
            .bearer(&token)
    };
    let mut agent_a = bed.start_agent();
    let stream = bed
        .client
        .connect(bed.target(), CONNECT_TIMEOUT)
        .expect("connect");
    let mut idle = Connection::new(stream).expect("connection");
    let first = idle.send(&request("idle-1")).expect("first request");

    let agent_b = bed.start_agent();
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !log_contains(&agent_a, "new agent serves the sockets") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let still_running = agent_a.is_running().expect("agent A state");
    // The old agent kept the idle connection open and serves its next
    // request, saying that the connection closes afterwards.
    let second = idle
        .send(&request("idle-2"))
        .expect("request on the idle connection");
    let status_a = agent_a.wait_exit(EXIT_TIMEOUT).expect("agent A exits");
    let fresh = bed
        .client
        .send(bed.target(), &request("fresh"))
        .expect("request to agent B");

    assert_eq!(first.status, 200);
    assert!(!first.closes_connection());
    assert!(
        still_running,
        "agent A exited before the idle connection was used"
    );
    assert_eq!(second.status, 200);
    assert!(
        second.closes_connection(),
        "{:?}",
        second.header("connection")
    );
    assert!(status_a.success());
    assert_eq!(fresh.status, 200);
    assert!(agent_b.logs().iter().all(|line| !line.contains("ERROR")));
}
