//! The agent on a whole node: IPv6, dual-stack and IPv6-only pods, and
//! callers from a second node and from the host network, each verified the
//! same way as a caller in a pod of the node.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokengate_tests::agent::{agent_binary, Agent};
use tokengate_tests::cases::{valid_claims, SUBJECT};
use tokengate_tests::echo::{EchoRecord, EchoService, REQUEST_ID_HEADER};
use tokengate_tests::http::{Request, Response};
use tokengate_tests::ids::unique_id;
use tokengate_tests::issuer::Issuer;
use tokengate_tests::node::{node_agent_config, pod_workload, Node, Pod, Stack};
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{AUDIENCE, PROTECTED_PORT, UNPROTECTED_PORT, WORKLOAD};
use tokengate_tests::tokens::{mint, Claims, Key};

/// Header the agent sets from the verified `sub` claim in these tests.
const SUBJECT_HEADER: &str = "x-user-id";

/// Time allowed for audit lines and echo records to appear.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect timeout of fail-closed probes: a dropped SYN is retried after
/// 1 s, so 2 s covers one retry.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Time allowed for the agent to exit after SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node with a protected `orders` pod, the echo service in it, the issuer
/// and the agent. Fields drop in declaration order: the agent first, the
/// node last.
struct Bed {
    agent: Agent,
    _issuer: Issuer,
    echo: EchoService,
    orders: Pod,
    node: Node,
    _dir: tempfile::TempDir,
}

/// Builds the node with an `orders` pod of `stack`, lets `extra` add pods
/// or change the node before the service and the agent start, and starts the agent with the standard rules
/// and `sub` copied into [`SUBJECT_HEADER`].
fn bed_with<T>(stack: Stack, extra: impl FnOnce(&mut Node, &Pod) -> T) -> (Bed, T) {
    bed_configured(stack, true, extra)
}

/// Like [`bed_with`], with the agent's `loopback_exempt` set to
/// `loopback_exempt`.
fn bed_configured<T>(
    stack: Stack,
    loopback_exempt: bool,
    extra: impl FnOnce(&mut Node, &Pod) -> T,
) -> (Bed, T) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::create().expect("node");
    let orders = node.add_pod("orders", stack).expect("orders pod");
    let added = extra(&mut node, &orders);
    let echo = orders
        .start_echo(
            &PathBuf::from(env!("CARGO_BIN_EXE_tg-echo")),
            &[PROTECTED_PORT, UNPROTECTED_PORT],
            &dir.path().join("echo.log"),
        )
        .expect("echo");
    let issuer = Issuer::start().expect("issuer");
    let mut config = node_agent_config(
        &issuer,
        vec![pod_workload(&orders, WORKLOAD, &[PROTECTED_PORT])],
    );
    config.loopback_exempt = loopback_exempt;
    let agent = Agent::start_patched(&agent_binary(), &config, |value| {
        value["workloads"][0]["claim_to_headers"] =
            json!([{ "claim": "sub", "header": SUBJECT_HEADER }]);
    })
    .expect("agent");

    let bed = Bed {
        agent,
        _issuer: issuer,
        echo,
        orders,
        node,
        _dir: dir,
    };
    (bed, added)
}

fn bed(stack: Stack) -> Bed {
    bed_with(stack, |_, _| ()).0
}

fn valid_token() -> String {
    mint(Key::Rsa1, &valid_claims())
}

/// Mints a token without the role that `/orders` requires.
fn token_without_role() -> String {
    mint(Key::Ec1, &Claims::valid(SUBJECT, AUDIENCE))
}

/// Sends one GET with a fresh request id from `caller` and returns the
/// response and the id.
fn call(caller: &Pod, addr: SocketAddr, path: &str, token: Option<&str>) -> (Response, String) {
    let id = unique_id();
    let mut request = Request::new("GET", path).header(REQUEST_ID_HEADER, &id);
    if let Some(token) = token {
        request = request.bearer(token);
    }
    let response = caller
        .send(addr, &request)
        .unwrap_or_else(|error| panic!("{} -> {addr}: {error:#}", caller.name));
    (response, id)
}

impl Bed {
    /// Returns the echo record of request `id` if the service has logged
    /// it. The service logs a request before it responds, so a caller that
    /// has its response needs no wait.
    fn logged(&self, id: &str) -> Option<EchoRecord> {
        self.echo
            .records()
            .expect("echo log")
            .into_iter()
            .find(|record| record.request_id() == Some(id))
    }

    /// Waits for the echo record of request `id`.
    fn echo_record(&self, id: &str) -> Option<EchoRecord> {
        let deadline = std::time::Instant::now() + RECORD_TIMEOUT;
        loop {
            let found = self
                .echo
                .records()
                .expect("echo log")
                .into_iter()
                .find(|record| record.request_id() == Some(id));
            if found.is_some() || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the audit line with path `path` and returns it.
    fn audit_line(&self, path: &str) -> Value {
        let lines = self
            .agent
            .wait_for_audit(RECORD_TIMEOUT, |lines| {
                lines.iter().any(|line| line["path"] == path)
            })
            .expect("audit lines");
        lines
            .into_iter()
            .find(|line| line["path"] == path)
            .unwrap_or_else(|| panic!("no audit line for {path}"))
    }

    /// Checks every decision on the protected port at `addr` from `caller`.
    /// Without a token it is 401 with a Bearer challenge, and for a token
    /// without the role it is 403. With a valid token it is 200, and the
    /// service receives the request from the agent's reserved source of the
    /// family, with the token, the subject header and the caller in
    /// `X-Forwarded-For`. The audit lines name the caller.
    fn assert_verified(&self, caller: &Pod, addr: SocketAddr) {
        let label = format!("{} -> {addr}", caller.name);
        let source = caller.source_for(addr).expect("caller has the family");
        let run = unique_id();

        let unauthenticated = format!("/orders/{run}/none");
        let (response, id) = call(caller, addr, &unauthenticated, None);
        assert_eq!(response.status, 401, "{label}: no token");
        assert!(
            response
                .header("www-authenticate")
                .is_some_and(|value| value.starts_with("Bearer")),
            "{label}: challenge {:?}",
            response.header("www-authenticate")
        );
        assert!(
            self.logged(&id).is_none(),
            "{label}: 401 reached the service"
        );
        let line = self.audit_line(&unauthenticated);
        assert_eq!(audit_ip(&line, "source"), Some(source), "{label}: {line}");
        assert_eq!(
            audit_ip(&line, "destination"),
            Some(addr.ip()),
            "{label}: {line}"
        );

        let forbidden = format!("/orders/{run}/forbidden");
        let (response, id) = call(caller, addr, &forbidden, Some(&token_without_role()));
        assert_eq!(response.status, 403, "{label}: token without role");
        assert!(
            self.logged(&id).is_none(),
            "{label}: 403 reached the service"
        );
        assert_eq!(
            self.audit_line(&forbidden)["reason"],
            "missing_role",
            "{label}"
        );

        let allowed = format!("/orders/{run}/allowed");
        let token = valid_token();
        let (response, id) = call(caller, addr, &allowed, Some(&token));
        assert_eq!(response.status, 200, "{label}: valid token");
        let record = self
            .echo_record(&id)
            .expect("allowed request reached the service");
        assert_eq!(
            record.peer_ip(),
            Some(reserved_source(addr)),
            "{label}: upstream source"
        );
        assert_eq!(record.header(SUBJECT_HEADER), Some(SUBJECT), "{label}");
        assert_eq!(
            record.header("authorization"),
            Some(format!("Bearer {token}").as_str()),
            "{label}"
        );
        assert_eq!(
            record.header("x-forwarded-for"),
            Some(source.to_string().as_str()),
            "{label}"
        );
        let line = self.audit_line(&allowed);
        assert_eq!(line["status"], 200, "{label}: {line}");
        assert_eq!(audit_ip(&line, "source"), Some(source), "{label}: {line}");
    }

    /// Checks that the unprotected port at `addr` serves `caller` directly,
    /// so the service receives the caller's own address as the peer.
    fn assert_unprotected_passes(&self, caller: &Pod, addr: SocketAddr) {
        let (response, id) = call(caller, addr, "/anything", None);
        let record = self
            .echo_record(&id)
            .expect("unprotected request reached the service");

        assert_eq!(response.status, 200, "{} -> {addr}", caller.name);
        assert_eq!(
            record.peer_ip(),
            caller.source_for(addr),
            "{} -> {addr}",
            caller.name
        );
    }
}

/// Returns the agent's default reserved source of the family of `addr`
/// (`interception.reserved_source_v4` / `_v6`).
fn reserved_source(addr: SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => IpAddr::V4(tokengate_tests::testbed::RESERVED_SOURCE),
        SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

/// IP address of the socket address in the audit field `field`.
fn audit_ip(line: &Value, field: &str) -> Option<IpAddr> {
    line[field]
        .as_str()
        .and_then(|text| text.parse::<SocketAddr>().ok())
        .map(|addr| addr.ip())
}

/// Adds an IPv6 client pod and returns it as the caller when the node
/// forwards IPv6 between pods, else returns the host namespace.
fn ipv6_pod_caller(node: &mut Node, _orders: &Pod) -> Pod {
    let client = node.add_pod("client", Stack::V6).expect("client pod");
    if node.forwards_ipv6() {
        client
    } else {
        eprintln!("NOTE: no per-device IPv6 forwarding on this kernel; calling from the host");
        node.host()
    }
}

#[test]
fn ipv6_caller_verified_on_dual_stack_pod() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, client) = bed_with(Stack::Dual, ipv6_pod_caller);
    let protected = bed.orders.v6(PROTECTED_PORT);

    bed.assert_verified(&client, protected);
    bed.assert_unprotected_passes(&client, bed.orders.v6(UNPROTECTED_PORT));
}

#[test]
fn dual_stack_pod_protects_both_families() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, client) = bed_with(Stack::Dual, |node, _| {
        node.add_pod("client", Stack::Dual).expect("client pod")
    });
    let callers = if bed.node.forwards_ipv6() {
        vec![client, bed.node.host()]
    } else {
        vec![bed.node.host()]
    };

    for caller in &callers {
        for addr in bed.orders.socket_addrs(PROTECTED_PORT) {
            bed.assert_verified(caller, addr);
        }
        for addr in bed.orders.socket_addrs(UNPROTECTED_PORT) {
            bed.assert_unprotected_passes(caller, addr);
        }
    }
}

#[test]
fn ipv6_only_pod_protected() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = bed(Stack::V6);
    let host = bed.node.host();

    assert_eq!(bed.orders.ipv4, None);
    bed.assert_verified(&host, bed.orders.v6(PROTECTED_PORT));
    bed.assert_unprotected_passes(&host, bed.orders.v6(UNPROTECTED_PORT));
    // The pod calling its own address is no loopback caller: verified too.
    bed.assert_verified(&bed.orders, bed.orders.v6(PROTECTED_PORT));
}

#[test]
fn ipv6_fails_closed_after_sigkill() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut bed = bed(Stack::Dual);
    let host = bed.node.host();
    let (before, _) = call(&host, bed.orders.v6(PROTECTED_PORT), "/orders/1", None);
    assert_eq!(before.status, 401, "agent serves IPv6 before the kill");

    bed.agent.sigkill().expect("SIGKILL");
    bed.agent.wait_exit(EXIT_TIMEOUT).expect("agent exits");

    for addr in bed.orders.socket_addrs(PROTECTED_PORT) {
        let result = host.connect(addr, PROBE_TIMEOUT);
        assert!(
            result.is_err(),
            "{addr}: protected port accepted a connection with the agent dead"
        );
    }
    bed.assert_unprotected_passes(&host, bed.orders.v6(UNPROTECTED_PORT));
    bed.assert_unprotected_passes(&host, bed.orders.v4(UNPROTECTED_PORT));
}

#[test]
fn second_node_callers_verified() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, far) = bed_with(Stack::Dual, |node, _| {
        let remote = node.add_remote_node("node2").expect("second node");
        node.add_remote_pod(&remote, "far", Stack::Dual)
            .expect("second-node pod")
    });
    let mut addrs = vec![bed.orders.v4(PROTECTED_PORT)];
    if bed.node.forwards_ipv6() {
        addrs.push(bed.orders.v6(PROTECTED_PORT));
    } else {
        eprintln!("NOTE: no per-device IPv6 forwarding on this kernel; second node over IPv4 only");
    }

    for addr in addrs {
        bed.assert_verified(&far, addr);
    }
    bed.assert_unprotected_passes(&far, bed.orders.v4(UNPROTECTED_PORT));
}

#[test]
fn host_network_callers_verified() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, host_network) = bed_with(Stack::Dual, |node, _| {
        node.add_host_network_pod("hostnet")
            .expect("host-network pod")
    });

    for caller in [bed.node.host(), host_network] {
        assert_eq!(caller.ipv4, Some(bed.node.ipv4()));
        for addr in bed.orders.socket_addrs(PROTECTED_PORT) {
            bed.assert_verified(&caller, addr);
        }
    }
}

#[test]
fn ipv6_pod_loopback_steered_when_not_exempt() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, ()) = bed_configured(Stack::Dual, false, |_, _| ());
    let token = valid_token();

    for loopback in [
        SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, PROTECTED_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PROTECTED_PORT)),
    ] {
        let (denied, denied_id) = call(&bed.orders, loopback, "/orders/loopback", None);
        let (allowed, allowed_id) = call(&bed.orders, loopback, "/orders/loopback", Some(&token));

        assert_eq!(
            denied.status,
            401,
            "{loopback} without a token: {}",
            denied.text()
        );
        assert!(
            bed.logged(&denied_id).is_none(),
            "{loopback}: the denied request reached the service"
        );
        assert_eq!(
            allowed.status,
            200,
            "{loopback} with a token: {}",
            allowed.text()
        );
        let record = bed
            .echo_record(&allowed_id)
            .expect("allowed request logged");
        assert_eq!(
            record.peer_ip(),
            Some(reserved_source(loopback)),
            "{loopback}"
        );
    }
}

/// Link-local IPv6 address of `pod`'s `eth0`.
fn link_local(pod: &Pod) -> std::net::Ipv6Addr {
    let mut command = pod.command("ip");
    command.args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]);
    let output = pod
        .output(command, Duration::from_secs(5))
        .expect("ip addr");
    output
        .stdout
        .split_whitespace()
        .find_map(|token| token.strip_suffix("/64")?.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address in {:?}", output.stdout))
}

#[test]
fn ipv6_link_local_caller_verified() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = bed(Stack::Dual);
    let host = bed.node.host();
    let device = bed.node.pod_device(&bed.orders).expect("pod device");
    let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{device}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse()
        .expect("ifindex number");
    let addr = SocketAddr::V6(std::net::SocketAddrV6::new(
        link_local(&bed.orders),
        PROTECTED_PORT,
        0,
        index,
    ));

    let (denied, _) = call(&host, addr, "/orders/link-local", None);
    let (allowed, id) = call(&host, addr, "/orders/link-local", Some(&valid_token()));

    assert_eq!(
        denied.status,
        401,
        "{addr} without a token: {}",
        denied.text()
    );
    let line = bed.audit_line("/orders/link-local");
    assert_eq!(audit_ip(&line, "destination"), Some(addr.ip()), "{line}");
    assert_eq!(
        allowed.status,
        200,
        "{addr} with a token: {}",
        allowed.text()
    );
    let record = bed.echo_record(&id).expect("allowed request logged");
    assert_eq!(record.peer_ip(), Some(reserved_source(addr)));
}

#[test]
fn ipv4_pod_without_ipv6_protected() {
    if !require_root_and_ebpf() {
        return;
    }
    let (bed, ()) = bed_with(Stack::V4, |node, orders| {
        node.disable_ipv6(orders).expect("disable IPv6 in the pod");
    });

    bed.assert_verified(&bed.node.host(), bed.orders.v4(PROTECTED_PORT));
    assert!(
        bed.agent
            .logs()
            .iter()
            .any(|line| line.contains("no IPv6 listener in the pod")),
        "the agent did not report the missing IPv6 listener"
    );
}
