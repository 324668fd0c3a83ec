//! The harness itself, without the agent: pods reach each other and the
//! host through the bridge, the echo service logs what it gets, and every
//! guard removes what it made.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokengate_tests::echo::{EchoRecord, EchoService, REQUEST_ID_HEADER};
use tokengate_tests::http::{Connection, Request};
use tokengate_tests::netns::{netns_exists, run_ip, Caller, Network};
use tokengate_tests::skip::require_root;
use tokengate_tests::testbed::{probe, Reachability};
use tokengate_tests::{pattern_bytes, sha256_hex};

const PORT: u16 = 8080;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn link_exists(name: &str) -> bool {
    run_ip(&["link", "show", name]).is_ok()
}

#[test]
fn pods_reach_echo_and_guards_clean_up() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut network = Network::create().expect("network");
    let server = network.add_pod("server").expect("server pod");
    let client = network.add_pod("client").expect("client pod");
    let bridge = network.bridge_name().to_owned();
    let log = dir.path().join("echo.log");
    let echo = EchoService::start(
        Path::new(env!("CARGO_BIN_EXE_tg-echo")),
        &server.netns,
        &[PORT],
        &log,
    )
    .expect("echo service");
    let callers = [
        Caller::Host {
            source: network.gateway(),
        },
        Caller::Pod(client.clone()),
    ];
    let body = pattern_bytes(100_000);

    for caller in &callers {
        let stream = caller
            .connect(server.socket_addr(PORT), CONNECT_TIMEOUT)
            .expect("connect");
        let mut connection = Connection::new(stream).expect("connection");
        let request = Request::new("PUT", "/items/1?x=y")
            .header(REQUEST_ID_HEADER, &caller.label())
            .body(body.clone());
        let first = connection.send(&request).expect("first response");
        let second = connection
            .send(&Request::new("GET", "/again"))
            .expect("keep-alive response");

        assert_eq!(first.status, 200);
        assert_eq!(second.status, 200);
        let echoed = first.json().expect("echo json");
        assert_eq!(echoed["method"], "PUT");
        assert_eq!(echoed["target"], "/items/1?x=y");
        assert_eq!(echoed["body_sha256"], sha256_hex(&body));
    }
    let records = echo.records().expect("echo log");
    let peers: Vec<Option<IpAddr>> = records.iter().map(EchoRecord::peer_ip).collect();
    assert_eq!(records.len(), 4, "two requests per caller");
    assert_eq!(peers[0], Some(IpAddr::V4(network.gateway())));
    assert_eq!(peers[2], Some(IpAddr::V4(client.address)));

    // Nothing listens on another port: the connection is refused quickly.
    let closed = probe(&callers[1], SocketAddr::from((server.address, PORT + 1)));
    assert_eq!(closed, Reachability::Refused);
    let pod_loopback = probe(
        &Caller::Pod(server.clone()),
        SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)),
    );
    assert_eq!(pod_loopback, Reachability::Answered(200));

    drop(echo);
    drop(network);
    assert!(!netns_exists(&server.netns), "{} left behind", server.netns);
    assert!(!netns_exists(&client.netns), "{} left behind", client.netns);
    assert!(!link_exists(&bridge), "bridge {bridge} left behind");
}

#[test]
fn guards_clean_up_after_panic() {
    if !require_root() {
        return;
    }
    let names = std::sync::Mutex::new(None);

    let result = std::panic::catch_unwind(|| {
        let mut network = Network::create().expect("network");
        let pod = network.add_pod("doomed").expect("pod");
        *names.lock().expect("names") = Some((pod.netns.clone(), network.bridge_name().to_owned()));
        panic!("test panic while the network exists");
    });

    assert!(result.is_err());
    let (netns, bridge) = names
        .into_inner()
        .expect("names")
        .expect("network was created");
    assert!(!netns_exists(&netns), "{netns} left behind");
    assert!(!link_exists(&bridge), "bridge {bridge} left behind");
}
