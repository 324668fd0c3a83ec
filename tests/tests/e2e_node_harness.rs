//! The node harness itself, without the agent: every caller reaches pods
//! of every IP family, processes land in the pod's namespace and cgroup,
//! and drop removes everything.

use std::path::PathBuf;
use std::time::Duration;

use tokengate_tests::echo::{EchoService, REQUEST_ID_HEADER};
use tokengate_tests::http::Request;
use tokengate_tests::ids::unique_id;
use tokengate_tests::netns::{netns_exists, run_ip};
use tokengate_tests::node::{Node, Pod, Stack};
use tokengate_tests::skip::require_root;

/// Port of the echo service in these tests.
const PORT: u16 = 8080;

/// Time allowed for a short command in a pod.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

fn echo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tg-echo"))
}

/// Sends a GET from `caller` to every address of `target` and checks that
/// the echo service logged it with `caller`'s address as the peer.
fn assert_reaches(caller: &Pod, target: &Pod, echo: &EchoService) {
    for addr in target.socket_addrs(PORT) {
        let Some(source) = caller.source_for(addr) else {
            continue;
        };
        let id = unique_id();
        let request = Request::new("GET", "/harness").header(REQUEST_ID_HEADER, &id);

        let response = caller
            .send(addr, &request)
            .unwrap_or_else(|error| panic!("{} -> {addr}: {error:#}", caller.name));
        let record = echo
            .records()
            .expect("echo log")
            .into_iter()
            .find(|record| record.request_id() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("{} -> {addr}: no echo record", caller.name));

        assert_eq!(response.status, 200, "{} -> {addr}", caller.name);
        assert_eq!(record.peer_ip(), Some(source), "{} -> {addr}", caller.name);
    }
}

#[test]
fn callers_reach_every_stack() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::create().expect("node");
    let dual = node.add_pod("dual", Stack::Dual).expect("dual pod");
    let v4 = node.add_pod("v4", Stack::V4).expect("v4 pod");
    let v6 = node.add_pod("v6", Stack::V6).expect("v6 pod");
    let host_network = node
        .add_host_network_pod("hostnet")
        .expect("host-network pod");
    let remote = node.add_remote_node("node2").expect("second node");
    let remote_pod = node
        .add_remote_pod(&remote, "caller", Stack::Dual)
        .expect("second-node pod");
    let echo = dual
        .start_echo(&echo_bin(), &[PORT], &dir.path().join("echo.log"))
        .expect("echo");

    let mut callers = vec![node.host(), host_network, v4, remote_pod];
    if node.forwards_ipv6() {
        callers.push(v6);
    } else {
        eprintln!(
            "NOTE: no per-device IPv6 forwarding on this kernel; pod-to-pod IPv6 not checked"
        );
    }

    for caller in &callers {
        assert_reaches(caller, &dual, &echo);
    }
}

#[test]
fn command_runs_in_pod_netns_and_cgroup() {
    if !require_root() {
        return;
    }
    let mut node = Node::create().expect("node");
    let pod = node.add_pod("shell", Stack::Dual).expect("pod");
    let cgroup = pod.cgroup.clone().expect("pod cgroup");

    let mut command = pod.command("sh");
    command.args(["-c", "cat /proc/self/cgroup; ip -o addr show dev eth0"]);
    let output = pod.output(command, COMMAND_TIMEOUT).expect("command");

    assert!(output.status.success(), "{output:?}");
    let root = tokengate_tests::node::cgroup2_root().expect("cgroup2 root");
    let relative = cgroup.strip_prefix(&root).expect("pod cgroup under root");
    let expected = format!("0::/{}", relative.display());
    assert!(
        output.stdout.lines().any(|line| line == expected),
        "no {expected:?} in {}",
        output.stdout
    );
    assert!(
        output.stdout.contains(&pod.ipv4.expect("ipv4").to_string()),
        "{}",
        output.stdout
    );
    assert!(
        output.stdout.contains(&pod.ipv6.expect("ipv6").to_string()),
        "{}",
        output.stdout
    );
}

#[test]
fn drop_removes_everything() {
    if !require_root() {
        return;
    }
    let mut node = Node::create().expect("node");
    let pod = node.add_pod("gone", Stack::Dual).expect("pod");
    let remote = node.add_remote_node("node2").expect("second node");
    let remote_pod = node
        .add_remote_pod(&remote, "gone", Stack::V6)
        .expect("second-node pod");
    let sleeper = pod
        .spawn({
            let mut command = pod.command("sleep");
            command.arg("600");
            command
        })
        .expect("sleep");
    let pods_cgroup = node.pods_cgroup().to_owned();
    let top_cgroup = pods_cgroup.parent().expect("top cgroup").to_owned();
    let names = [
        pod.netns.clone().expect("netns"),
        remote.netns.clone(),
        remote_pod.netns.clone().expect("netns"),
    ];
    let prefix = format!("tgn{}", node.id());

    // The process is left running on purpose: the cgroup guard must kill it.
    std::mem::forget(sleeper);
    drop(node);

    for name in &names {
        assert!(!netns_exists(name), "namespace {name} left behind");
    }
    assert!(
        !top_cgroup.exists(),
        "cgroup {} left behind",
        top_cgroup.display()
    );
    let links = run_ip(&["-o", "link", "show"]).expect("ip link");
    assert!(
        !links.contains(&prefix),
        "device with prefix {prefix} left behind: {links}"
    );
}
