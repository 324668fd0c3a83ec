//! Egress mode on the node harness. A pod's calls to a configured
//! destination on a second node, which runs no agent, are steered into the
//! agent, verified there and forwarded from the pod's own address. Other
//! destinations, the agent's own connections and a node without egress
//! configuration are left alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokengate_tests::agent::{agent_binary, Agent, AgentConfig};
use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::{EchoService, REQUEST_ID_HEADER};
use tokengate_tests::ids::unique_id;
use tokengate_tests::issuer::Issuer;
use tokengate_tests::metrics;
use tokengate_tests::node::{node_agent_config, pod_workload, Node, Pod, Stack};
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::tokens::{mint, Key};

/// Port of the destination that egress mode steers.
const STEERED_PORT: u16 = 8080;

/// Port of the same destination that is not configured.
const OTHER_PORT: u16 = 9090;

/// Name of the egress pod in the agent config, audit events and metrics.
const EGRESS_POD: &str = "client-egress";

/// Egress mark the tests configure, distinct from the default to show
/// that the setting reaches the programs.
const TEST_MARK: u32 = 0x7467_0001;

/// Time allowed for one curl call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Time allowed for metrics and audit lines to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// curl's exit code when it could not connect.
const CURL_COULD_NOT_CONNECT: i32 = 7;

/// The node: the egress pod `client`, the protected pod `orders` (egress
/// mode needs no workload, but the agent protects one on every node), and
/// the destination `far` on a second node with the echo service.
struct Setup {
    _dir: tempfile::TempDir,
    issuer: Issuer,
    echo: EchoService,
    client: Pod,
    orders: Pod,
    far: Pod,
    node: Node,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Node::create().expect("node");
        let client = node.add_pod("client", Stack::Dual).expect("client pod");
        let orders = node.add_pod("orders", Stack::Dual).expect("orders pod");
        let node2 = node.add_remote_node("node2").expect("second node");
        let far = node
            .add_remote_pod(&node2, "far", Stack::Dual)
            .expect("destination pod");
        let echo = far
            .start_echo(
                Path::new(env!("CARGO_BIN_EXE_tg-echo")),
                &[STEERED_PORT, OTHER_PORT],
                &dir.path().join("echo.log"),
            )
            .expect("echo service");
        let issuer = Issuer::start().expect("issuer");
        Self {
            _dir: dir,
            issuer,
            echo,
            client,
            orders,
            far,
            node,
        }
    }

    fn agent_config(&self) -> AgentConfig {
        node_agent_config(
            &self.issuer,
            vec![pod_workload(&self.orders, "orders", &[8080])],
        )
    }

    /// Builds the `egress` section: `client` steers `far` on
    /// [`STEERED_PORT`] for each address family that works here.
    fn egress_section(&self) -> Value {
        let mut destinations = Vec::new();
        if let Some(v4) = self.far.ipv4 {
            destinations.push(json!({ "cidr": format!("{v4}/32"), "ports": [STEERED_PORT] }));
        }
        if self.ipv6_works() {
            let v6 = self.far.ipv6.expect("dual-stack pod");
            destinations.push(json!({ "cidr": format!("{v6}/128"), "ports": [STEERED_PORT] }));
        }
        json!({
            "mark": TEST_MARK,
            "pods": [{
                "name": EGRESS_POD,
                "netns": self.client.netns_path(),
                "cgroup": self.client.cgroup.as_ref().expect("pod cgroup"),
                "destinations": destinations,
                "from_headers": [{ "name": "Authorization", "value_prefix": "Bearer " }],
                "rules": [{ "path_prefix": "/orders", "methods": ["GET"], "roles": ["orders.read"] }],
            }],
        })
    }

    /// Tells whether pods reach the second node over IPv6 here.
    fn ipv6_works(&self) -> bool {
        self.node.forwards_ipv6()
    }

    fn start_agent(&self, egress: Value) -> Agent {
        Agent::start_patched(&agent_binary(), &self.agent_config(), |config| {
            config["egress"] = egress;
        })
        .expect("agent with egress mode")
    }

    /// Echo records of the request with `id`.
    fn received(&self, id: &str) -> Vec<tokengate_tests::echo::EchoRecord> {
        self.echo
            .records()
            .expect("echo log")
            .into_iter()
            .filter(|record| record.request_id() == Some(id))
            .collect()
    }
}

/// Outcome of one curl call from a pod.
#[derive(Debug)]
struct Call {
    /// curl's exit code.
    exit: i32,
    /// HTTP status, 0 without a response.
    status: u16,
    /// Response headers and body as curl printed them.
    output: String,
}

/// Calls `GET http://addr/path` with curl in `pod`'s namespace and cgroup,
/// so that the cgroup programs see the call, with `x-request-id: id` and
/// the token when given.
fn call(pod: &Pod, addr: SocketAddr, path: &str, id: &str, token: Option<&str>) -> Call {
    let mut curl = pod.command("curl");
    curl.args(["-s", "-i", "--noproxy", "*", "--max-time", "10"])
        .args(["-H", &format!("{REQUEST_ID_HEADER}: {id}")]);
    if let Some(token) = token {
        curl.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    curl.arg(format!("http://{addr}{path}"));

    let output = pod.output(curl, CALL_TIMEOUT).expect("curl in pod");
    let status = output
        .stdout
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Call {
        exit: output.status.code().unwrap_or(-1),
        status,
        output: format!("{}{}", output.stdout, output.stderr),
    }
}

/// Addresses of `far` on `port`, one per family that works here.
fn far_addrs(setup: &Setup, port: u16) -> Vec<SocketAddr> {
    let mut addrs = vec![setup.far.v4(port)];
    if setup.ipv6_works() {
        addrs.push(setup.far.v6(port));
    } else {
        eprintln!("NOTE: IPv6 between nodes does not work on this kernel; IPv4 only");
    }
    addrs
}

fn kernel_event(samples: &[metrics::Sample], event: &str) -> Option<u64> {
    metrics::count(
        samples,
        "tokengate_egress_kernel_events_total",
        &[("event", event)],
    )
}

fn map_entries(samples: &[metrics::Sample], map: &str) -> Option<u64> {
    metrics::count(samples, "tokengate_egress_map_entries", &[("map", map)])
}

#[test]
fn call_without_token_gets_401_at_source() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = setup.start_agent(setup.egress_section());

    for addr in far_addrs(&setup, STEERED_PORT) {
        let id = unique_id();

        let result = call(&setup.client, addr, "/orders/1", &id, None);

        assert_eq!(result.status, 401, "{addr}: {result:?}");
        assert!(
            result.output.contains("WWW-Authenticate: Bearer")
                || result.output.contains("www-authenticate: Bearer"),
            "{addr}: {result:?}"
        );
        assert!(
            setup.received(&id).is_empty(),
            "{addr}: destination received the call"
        );
    }

    let lines = agent
        .wait_for_audit(SETTLE_TIMEOUT, |lines| {
            lines
                .iter()
                .filter(|line| line["workload"] == EGRESS_POD)
                .count()
                >= far_addrs(&setup, STEERED_PORT).len()
        })
        .expect("audit");
    let egress_lines: Vec<&Value> = lines
        .iter()
        .filter(|line| line["workload"] == EGRESS_POD)
        .collect();
    assert!(!egress_lines.is_empty(), "no audit line for the egress pod");
    assert!(
        egress_lines
            .iter()
            .all(|line| line["reason"] == "missing_token"),
        "{egress_lines:?}"
    );
}

#[test]
fn valid_token_reaches_destination_from_pod_address() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = setup.start_agent(setup.egress_section());
    let token = mint(Key::Rsa1, &valid_claims());
    let addrs = far_addrs(&setup, STEERED_PORT);

    for addr in &addrs {
        let id = unique_id();

        let result = call(&setup.client, *addr, "/orders/1", &id, Some(&token));

        assert_eq!(result.status, 200, "{addr}: {result:?}");
        let records = setup.received(&id);
        assert_eq!(records.len(), 1, "{addr}: {records:?}");
        let expected_source = setup.client.source_for(*addr).expect("client address");
        assert_eq!(records[0].peer_ip(), Some(expected_source), "{addr}");
        assert_eq!(
            records[0].local.parse::<SocketAddr>().ok(),
            Some(*addr),
            "{addr}: the destination saw another local address"
        );
        assert_eq!(
            records[0].header("authorization"),
            Some(format!("Bearer {token}").as_str()),
            "{addr}: the token was not forwarded"
        );
    }

    // Each call was steered exactly once: the agent's own connection to the
    // destination did not come back into the agent, and every record was
    // taken out of the maps after use.
    let calls = Some(addrs.len() as u64);
    let samples = agent
        .wait_for_metrics(SETTLE_TIMEOUT, |samples| {
            map_entries(samples, "flows") == Some(0) && map_entries(samples, "pending") == Some(0)
        })
        .expect("metrics");
    assert_eq!(kernel_event(&samples, "steered"), calls);
    assert_eq!(kernel_event(&samples, "recorded"), calls);
    assert_eq!(kernel_event(&samples, "map_error"), Some(0));
    assert_eq!(
        metrics::count(
            &samples,
            "tokengate_egress_connections_total",
            &[("pod", EGRESS_POD), ("result", "forwarded")],
        ),
        calls
    );
    assert_eq!(map_entries(&samples, "flows"), Some(0));
    assert_eq!(map_entries(&samples, "pending"), Some(0));
}

#[test]
fn other_destination_not_steered() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = setup.start_agent(setup.egress_section());

    for addr in far_addrs(&setup, OTHER_PORT) {
        let id = unique_id();

        let result = call(&setup.client, addr, "/orders/1", &id, None);

        assert_eq!(result.status, 200, "{addr}: {result:?}");
        let records = setup.received(&id);
        assert_eq!(records.len(), 1, "{addr}");
        assert_eq!(records[0].header("authorization"), None);
    }

    let samples = agent.metrics().expect("metrics");
    assert_eq!(kernel_event(&samples, "steered"), Some(0));
    assert!(kernel_event(&samples, "passed") >= Some(1));
}

#[test]
fn agent_mark_is_never_steered() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = setup.start_agent(setup.egress_section());
    let addr = setup.far.v4(STEERED_PORT);
    let id = unique_id();
    // A socket of the pod's cgroup with the agent's mark stands for a
    // misconfiguration that puts an agent socket under the programs.
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {TEST_MARK})\n\
         s.settimeout(5)\n\
         s.connect(('{}', {}))\n\
         s.sendall(b'GET /orders/1 HTTP/1.1\\r\\nHost: far\\r\\n{REQUEST_ID_HEADER}: {id}\\r\\nConnection: close\\r\\n\\r\\n')\n\
         print(s.recv(64).split(b' ')[1].decode())\n",
        addr.ip(),
        addr.port()
    );
    let mut python = setup.client.command("python3");
    python.args(["-c", &script]);

    let output = setup
        .client
        .output(python, CALL_TIMEOUT)
        .expect("python in pod");

    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout.trim(), "200", "{output:?}");
    assert_eq!(
        setup.received(&id).len(),
        1,
        "the marked call did not reach the destination directly"
    );
    let samples = agent.metrics().expect("metrics");
    assert_eq!(kernel_event(&samples, "agent_skipped"), Some(1));
    assert_eq!(kernel_event(&samples, "steered"), Some(0));
}

#[test]
fn egress_off_steers_nothing() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = Agent::start(&agent_binary(), &setup.agent_config()).expect("agent");

    for addr in far_addrs(&setup, STEERED_PORT) {
        let id = unique_id();

        let result = call(&setup.client, addr, "/orders/1", &id, None);

        assert_eq!(result.status, 200, "{addr}: {result:?}");
        assert_eq!(setup.received(&id).len(), 1, "{addr}");
    }
    assert!(!agent.pin_path().join("egress").exists());
    let samples = agent.metrics().expect("metrics");
    assert!(!metrics::contains(
        &samples,
        "tokengate_egress_kernel_events_total",
        &[]
    ));
}

#[test]
fn dead_agent_leaves_destination_closed() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let mut agent = setup.start_agent(setup.egress_section());
    let pins: PathBuf = agent.pin_path().join("egress").join("links");
    let addr = setup.far.v4(STEERED_PORT);

    agent.sigkill().expect("kill agent");
    agent.wait_exit(SETTLE_TIMEOUT).expect("agent exit");
    let id = unique_id();
    let result = call(&setup.client, addr, "/orders/1", &id, None);

    assert_eq!(result.exit, CURL_COULD_NOT_CONNECT, "{result:?}");
    assert!(setup.received(&id).is_empty(), "the call left unverified");
    let pinned = std::fs::read_dir(&pins).expect("link pins").count();
    assert_eq!(
        pinned, 3,
        "connect4, connect6 and sock_ops links stay pinned"
    );
}

#[test]
fn destination_in_agent_network_rejected() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let mut egress = setup.egress_section();
    let far_v4 = setup.far.ipv4.expect("far IPv4");
    egress["agent_networks"] = json!([format!("{far_v4}/32")]);

    let result = Agent::spawn_patched(&agent_binary(), &setup.agent_config(), |config| {
        config["egress"] = egress;
    });

    let error = format!(
        "{:#}",
        result.expect_err("agent must refuse the configuration")
    );
    assert!(error.contains("verify each request twice"), "{error}");
}

#[test]
fn destination_protected_on_this_node_rejected() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let mut egress = setup.egress_section();
    let orders_v4 = setup.orders.ipv4.expect("orders IPv4");
    egress["pods"][0]["destinations"] =
        json!([{ "cidr": format!("{orders_v4}/32"), "ports": [8080] }]);

    let result = Agent::start_patched(&agent_binary(), &setup.agent_config(), |config| {
        config["egress"] = egress;
    });

    let error = format!(
        "{:#}",
        result.expect_err("agent must refuse a destination it protects itself")
    );
    assert!(error.contains("verified twice"), "{error}");
}

#[test]
fn mapped_ipv4_call_is_steered() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let _agent = setup.start_agent(setup.egress_section());
    let far_v4 = setup.far.ipv4.expect("far IPv4");
    // An IPv6 socket that connects to `::ffff:a.b.c.d` runs connect6 but
    // talks IPv4, as Java clients do.
    let mapped = SocketAddr::new(far_v4.to_ipv6_mapped().into(), STEERED_PORT);
    let token = mint(Key::Rsa1, &valid_claims());

    let denied = call(&setup.client, mapped, "/orders/1", &unique_id(), None);
    let id = unique_id();
    let allowed = call(&setup.client, mapped, "/orders/1", &id, Some(&token));

    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(allowed.status, 200, "{allowed:?}");
    let records = setup.received(&id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        records[0].peer_ip(),
        setup.client.ipv4.map(std::net::IpAddr::V4)
    );
}

#[test]
fn direct_listener_call_is_closed() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let agent = setup.start_agent(setup.egress_section());
    // The client pod listens nowhere else, so its IPv4 loopback listener is
    // the agent's egress listener.
    let mut ss = setup.client.command("ss");
    ss.args(["-H", "-l", "-t", "-n", "-4"]);
    let listeners = setup.client.output(ss, CALL_TIMEOUT).expect("ss in pod");
    let listener: SocketAddr = listeners
        .stdout
        .split_whitespace()
        .find_map(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 listener in the client pod: {listeners:?}"));

    let result = call(&setup.client, listener, "/orders/1", &unique_id(), None);

    assert_eq!(result.status, 0, "{result:?}");
    let samples = agent
        .wait_for_metrics(SETTLE_TIMEOUT, |samples| {
            metrics::count(
                samples,
                "tokengate_egress_connections_total",
                &[("pod", EGRESS_POD), ("result", "no_origin")],
            ) == Some(1)
        })
        .expect("metrics");
    assert_eq!(
        metrics::count(
            &samples,
            "tokengate_egress_connections_total",
            &[("pod", EGRESS_POD), ("result", "no_origin")],
        ),
        Some(1)
    );
}

/// A bpffs directory that the test names itself and removes on drop, for
/// agents that must share their pins.
struct SharedPins(PathBuf);

impl Drop for SharedPins {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: failed to remove {}: {error}", self.0.display());
            }
        }
    }
}

#[test]
fn restarted_agent_adopts_pins() {
    if !require_root_and_ebpf() {
        return;
    }
    let setup = Setup::new();
    let pins = SharedPins(
        Path::new(tokengate_tests::skip::BPFFS).join(format!("tokengate-egress-{}", unique_id())),
    );
    let start = || {
        let egress = setup.egress_section();
        let pin_path = pins.0.clone();
        Agent::start_patched(&agent_binary(), &setup.agent_config(), move |config| {
            config["egress"] = egress;
            config["interception"]["pin_path"] = json!(pin_path);
        })
        .expect("agent on shared pins")
    };
    let addr = setup.far.v4(STEERED_PORT);
    let token = mint(Key::Rsa1, &valid_claims());

    let mut first = start();
    let before = call(&setup.client, addr, "/orders/1", &unique_id(), Some(&token));
    first.sigkill().expect("kill the first agent");
    first.wait_exit(SETTLE_TIMEOUT).expect("first agent exit");
    let between = call(&setup.client, addr, "/orders/1", &unique_id(), None);
    let second = start();
    let denied = call(&setup.client, addr, "/orders/1", &unique_id(), None);
    let id = unique_id();
    let allowed = call(&setup.client, addr, "/orders/1", &id, Some(&token));

    assert_eq!(before.status, 200, "{before:?}");
    assert_eq!(between.exit, CURL_COULD_NOT_CONNECT, "{between:?}");
    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(setup.received(&id).len(), 1);
    let links = std::fs::read_dir(pins.0.join("egress").join("links"))
        .expect("link pins")
        .count();
    assert_eq!(
        links, 3,
        "the second agent replaced the links, not added to them"
    );
    // The counters live in the adopted maps, so they span both agents: four
    // calls, including the one steered to the dead agent's listener.
    let samples = second.metrics().expect("metrics");
    assert_eq!(kernel_event(&samples, "steered"), Some(4));
    drop(second);
}
