//! The steering program's own log records reach the agent's log at debug
//! level, behind the agent's rate limit, and what the limit drops is
//! counted. The test removes the pod's listener from the pinned listener
//! map while the agent runs, so that the program drops connections to the
//! protected port and logs each drop, which it does nowhere else.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, SockMap};
use socket2::{Domain, Protocol, Socket, Type};
use tokengate_common::{LISTENER_V4, MAP_LISTENERS};
use tokengate_tests::agent::AGENT_LOG_ENV;
use tokengate_tests::metrics;
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{probe, Reachability, Testbed, TestbedOptions, WORKLOAD};

/// Connections sent at the dropping program in one burst: well above the
/// agent's burst of 20 records, so that the rate limit must act.
const DROPPED_CONNECTIONS: usize = 60;

/// Message of the program's record for a dropped connection.
const DROP_RECORD: &str = "tokengate: dropped connection";

/// Time allowed for the records to reach the agent's log.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a SYN to `addr` without waiting for a reply. The socket is returned
/// and kept open, so that the kernel does not abort the attempt.
fn syn(addr: SocketAddr) -> Socket {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .expect("TCP socket");
    socket.set_nonblocking(true).expect("non-blocking socket");
    // In progress is the expected outcome of a non-blocking connect.
    let _ = socket.connect(&addr.into());
    socket
}

/// Removes the pod's IPv4 listener from the pinned listener map, as if
/// the agent's socket had gone while the program stays attached.
fn remove_listener(pin_path: &Path) {
    let path = pin_path
        .join("pods")
        .join(WORKLOAD)
        .join(format!("maps_v{}", tokengate_common::MAP_LAYOUT_VERSION))
        .join(MAP_LISTENERS);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let mut listeners: SockMap<MapData> =
        SockMap::try_from(Map::SockMap(data)).expect("the listener map is a sockmap");
    listeners
        .clear_index(&LISTENER_V4)
        .expect("remove the IPv4 listener");
}

#[test]
fn program_logs_reach_agent_rate_limited() {
    if !require_root_and_ebpf() {
        return;
    }
    // This file contains one test, so the variable reaches only its agent.
    std::env::set_var(AGENT_LOG_ENV, "info,tokengate::ebpf=debug");
    let mut testbed =
        Testbed::new(&TestbedOptions::for_tests(env!("CARGO_BIN_EXE_tg-echo"))).expect("testbed");
    testbed.start_agent().expect("agent");
    let addr = testbed.protected_addr();
    assert_eq!(probe(&testbed.host(), addr), Reachability::Answered(401));

    remove_listener(testbed.agent().pin_path());
    let started = Instant::now();
    let sockets: Vec<Socket> = (0..DROPPED_CONNECTIONS).map(|_| syn(addr)).collect();

    let records = || {
        testbed
            .agent()
            .logs()
            .iter()
            .filter(|line| line.contains(DROP_RECORD))
            .count()
    };
    let suppressed = || {
        let samples = testbed.agent().metrics().expect("metrics");
        metrics::count(
            &samples,
            "tokengate_ebpf_log_records_suppressed_total",
            &[("workload", WORKLOAD)],
        )
        .unwrap_or(0)
    };
    // The reader hands records over in batches: wait until the limit has
    // dropped some, then compare what got through with what it allows.
    let deadline = Instant::now() + LOG_TIMEOUT;
    while records() == 0 || suppressed() == 0 {
        assert!(
            Instant::now() < deadline,
            "{} records logged and none suppressed within {LOG_TIMEOUT:?}:\n{}",
            records(),
            testbed.agent().log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = records();
    let elapsed = started.elapsed();
    drop(sockets);

    // Burst of 20, then 10 a second (one per 100 ms); one more for a
    // refill in flight.
    let refills = usize::try_from(elapsed.as_millis() / 100).expect("a short test") + 1;
    let allowed = 20 + refills + 1;
    assert!(
        logged <= allowed,
        "{logged} records logged in {elapsed:?}, the limit allows {allowed}"
    );
    println!(
        "{logged} records logged in {elapsed:?}, {} suppressed",
        suppressed()
    );
    let samples = testbed.agent().metrics().expect("metrics");
    let dropped = metrics::count(
        &samples,
        "tokengate_steering_connections_total",
        &[("workload", WORKLOAD), ("verdict", "dropped")],
    )
    .unwrap_or(0);
    assert!(
        dropped >= DROPPED_CONNECTIONS as u64,
        "{dropped} drops counted for {DROPPED_CONNECTIONS} connections"
    );
}
