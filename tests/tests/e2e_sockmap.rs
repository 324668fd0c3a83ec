//! The sockmap fast path on the agent's hop to the service, with a real
//! kernel, the real agent and `tg-echo` streaming bodies back. Bytes arrive
//! exact whatever the write sizes, and connections end cleanly on close,
//! half close and reset. No unrelated socket enters the sockhash, and the
//! counters show that the fast path carried the bytes. With the switch off
//! the counters stay at zero.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use tokengate::sockmap::inspect::{PinnedSockmap, SockmapCounters};
use tokengate::sockmap::{netns_cookie, SOCKMAP_DIR};
use tokengate_tests::agent::{agent_binary, Agent, RuleSpec};
use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::EchoService;
use tokengate_tests::echo::ECHO_BODY_PATH;
use tokengate_tests::http::{Connection, Response};
use tokengate_tests::issuer::Issuer;
use tokengate_tests::metrics;
use tokengate_tests::node::{node_agent_config, pod_workload, Node, Pod, Stack};
use tokengate_tests::skip::require_root_and_ebpf;
use tokengate_tests::testbed::{ORDERS_ROLE, PROTECTED_PORT, RESERVED_SOURCE, UNPROTECTED_PORT};
use tokengate_tests::tokens::{mint, Key};
use tokengate_tests::{pattern_bytes, sha256_hex};

/// Size of the fixed-length body: several MiB, far above the socket
/// buffers, so the redirect path has to wait for the reader many times.
const LARGE_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Size of the chunked body written in small, uneven pieces.
const CHUNKED_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Piece sizes of the chunked body, cycled: single bytes, sizes around an
/// MSS and a page, and one above 64 KiB.
const PIECE_SIZES: [usize; 7] = [1, 7, 1448, 4096, 3, 65_537, 16_384];

/// Write size of the fixed-length body.
const FIXED_WRITE_BYTES: usize = 64 * 1024;

/// Requests sent on one keep-alive connection.
const KEEP_ALIVE_REQUESTS: usize = 200;

/// Size of the body the aborted uploads announce; they stop long before.
const ABORTED_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Bytes an aborted upload writes before its connection goes away.
const ABORTED_WRITTEN_BYTES: usize = 2 * 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for the kernel to empty the sockhash once connections are
/// closed, and for an attachment to go once the agent is gone.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A node with dual-stack pods `orders` (running `tg-echo`) and `client`,
/// each in its own cgroup, and an agent that serves the echo-body endpoint.
/// Fields drop in declaration order: the agent (killed, pins removed)
/// first, the namespaces and cgroups last.
struct Bed {
    agent: Agent,
    _echo: EchoService,
    _issuer: Issuer,
    orders: Pod,
    client: Pod,
    _node: Node,
    _dir: tempfile::TempDir,
    token: String,
}

fn start(sockmap: bool) -> Bed {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut node = Node::create().expect("node");
    let orders = node.add_pod("orders", Stack::Dual).expect("orders pod");
    let client = node.add_pod("client", Stack::Dual).expect("client pod");
    let echo = orders
        .start_echo(
            env!("CARGO_BIN_EXE_tg-echo").as_ref(),
            &[PROTECTED_PORT, UNPROTECTED_PORT],
            &dir.path().join("echo.log"),
        )
        .expect("tg-echo");
    let issuer = Issuer::start().expect("issuer");

    let mut workload = pod_workload(&orders, "orders", &[PROTECTED_PORT]);
    workload.rules.push(RuleSpec {
        path_prefix: ECHO_BODY_PATH.to_owned(),
        methods: vec!["POST".to_owned()],
        roles: vec![ORDERS_ROLE.to_owned()],
        ..RuleSpec::default()
    });
    let config = node_agent_config(&issuer, vec![workload]);
    let agent = Agent::start_patched(&agent_binary(), &config, |value| {
        value["interception"]["sockmap"] = json!(sockmap);
    })
    .expect("agent");
    let token = mint(Key::Rsa1, &valid_claims());
    Bed {
        agent,
        _echo: echo,
        _issuer: issuer,
        orders,
        client,
        _node: node,
        _dir: dir,
        token,
    }
}

impl Bed {
    fn connect(&self) -> Connection {
        self.connect_to(self.orders.v4(PROTECTED_PORT))
    }

    fn connect_to(&self, addr: SocketAddr) -> Connection {
        let stream = self
            .client
            .connect(addr, CONNECT_TIMEOUT)
            .expect("connect from the client pod");
        Connection::new(stream).expect("connection")
    }

    /// Builds a request head; `framing` and `extra` are header lines, each
    /// ending with CRLF.
    fn head(&self, framing: &str, extra: &str) -> Vec<u8> {
        format!(
            "POST {ECHO_BODY_PATH} HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {}\r\n{framing}{extra}\r\n",
            self.token
        )
        .into_bytes()
    }

    /// Counters as the agent exports them.
    fn exported(&self) -> SockmapCounters {
        let samples = self.agent.metrics().expect("metrics");
        let value = |name: &str, labels: &[(&str, &str)]| {
            metrics::count(&samples, name, labels).expect("a whole, non-negative counter")
        };
        SockmapCounters {
            sockets_added: value("tokengate_sockmap_sockets_added_total", &[]),
            messages_redirected: value(
                "tokengate_sockmap_messages_total",
                &[("path", "redirected")],
            ),
            bytes_redirected: value("tokengate_sockmap_bytes_total", &[("path", "redirected")]),
            messages_passed: value("tokengate_sockmap_messages_total", &[("path", "passed")]),
            bytes_passed: value("tokengate_sockmap_bytes_total", &[("path", "passed")]),
            map_full: value(
                "tokengate_sockmap_update_errors_total",
                &[("reason", "map_full")],
            ),
            update_failed: value(
                "tokengate_sockmap_update_errors_total",
                &[("reason", "other")],
            ),
        }
    }

    fn pinned(&self) -> PinnedSockmap {
        PinnedSockmap::open(self.agent.pin_path()).expect("pinned sockmap maps")
    }

    /// Waits until the sockhash contains no socket, or fails with its keys.
    fn wait_sockhash_empty(&self) {
        let pinned = self.pinned();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let keys = pinned.socket_keys();
            if keys.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sockhash still holds {} sockets after {SETTLE_TIMEOUT:?}: {keys:?}",
                keys.len()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Writes `head` and then `body` in pieces of the cycled `sizes` (as
/// chunks of the chunked coding when `chunked`) on a clone of the stream.
/// This thread reads the response meanwhile: the echo streams the body back
/// as it arrives, so writing everything first could fill every buffer on
/// the way.
fn exchange(
    connection: &mut Connection,
    head: &[u8],
    body: &[u8],
    sizes: &[usize],
    chunked: bool,
) -> Response {
    let mut writer = connection.stream().try_clone().expect("clone stream");
    std::thread::scope(|scope| {
        let written = scope.spawn(move || -> std::io::Result<()> {
            writer.write_all(head)?;
            let mut offset = 0;
            for size in sizes.iter().cycle() {
                if offset == body.len() {
                    break;
                }
                let end = (offset + size).min(body.len());
                let piece = &body[offset..end];
                if chunked {
                    writer.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
                    writer.write_all(piece)?;
                    writer.write_all(b"\r\n")?;
                } else {
                    writer.write_all(piece)?;
                }
                offset = end;
            }
            if chunked {
                writer.write_all(b"0\r\n\r\n")?;
            }
            writer.flush()
        });
        let response = connection.read_raw_response().expect("echo response");
        let written = written.join().expect("writer thread");
        if let Err(error) = written {
            panic!(
                "request not written ({error}); response {} {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(300)])
            );
        }
        response
    })
}

fn assert_echoed(response: &Response, body: &[u8], case: &str) {
    assert_eq!(response.status, 200, "{case}: {}", response.text());
    assert_eq!(response.body.len(), body.len(), "{case}: echoed length");
    assert_eq!(
        sha256_hex(&response.body),
        sha256_hex(body),
        "{case}: echoed bytes differ"
    );
}

#[test]
fn large_and_partial_writes_are_exact() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let mut connection = bed.connect();
    let large = pattern_bytes(LARGE_BODY_BYTES);
    let chunked = pattern_bytes(CHUNKED_BODY_BYTES);

    let fixed_head = bed.head(&format!("Content-Length: {}\r\n", large.len()), "");
    let fixed_response = exchange(
        &mut connection,
        &fixed_head,
        &large,
        &[FIXED_WRITE_BYTES],
        false,
    );
    let chunked_head = bed.head("Transfer-Encoding: chunked\r\n", "");
    let chunked_response = exchange(&mut connection, &chunked_head, &chunked, &PIECE_SIZES, true);

    assert_echoed(&fixed_response, &large, "8 MiB fixed-length body");
    assert_echoed(&chunked_response, &chunked, "3 MiB body in uneven chunks");
    let counters = bed.exported();
    println!("counters after the uploads: {counters:?}");
    assert!(counters.messages_redirected > 0, "{counters:?}");
    // Each body crosses the hop twice, to the service and back; a direction
    // whose first message raced the peer's insertion stays on the stack.
    let body_bytes = (LARGE_BODY_BYTES + CHUNKED_BODY_BYTES) as u64;
    assert!(
        counters.bytes_redirected >= body_bytes,
        "redirected {} bytes of {} sent each way: {counters:?}",
        counters.bytes_redirected,
        body_bytes
    );
    assert_eq!(
        counters.sockets_added, 2,
        "one upstream connection, two ends: {counters:?}"
    );
    assert_eq!(counters.map_full, 0, "{counters:?}");
    assert_eq!(counters.update_failed, 0, "{counters:?}");
    assert_eq!(bed.pinned().counters().expect("pinned counters"), counters);

    drop(connection);
    bed.wait_sockhash_empty();
}

#[test]
fn keep_alive_carries_many_requests() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let mut connection = bed.connect();

    for index in 0..KEEP_ALIVE_REQUESTS {
        let body = pattern_bytes(index * 37 % 5000);
        let head = bed.head(&format!("Content-Length: {}\r\n", body.len()), "");
        let response = exchange(&mut connection, &head, &body, &[body.len().max(1)], false);
        assert_echoed(&response, &body, &format!("request {index}"));
    }

    let counters = bed.exported();
    println!("counters after {KEEP_ALIVE_REQUESTS} requests: {counters:?}");
    assert_eq!(
        counters.sockets_added, 2,
        "one upstream connection: {counters:?}"
    );
    assert!(
        counters.messages_redirected >= KEEP_ALIVE_REQUESTS as u64,
        "{counters:?}"
    );
    drop(connection);
    bed.wait_sockhash_empty();
}

#[test]
fn service_close_after_response_delivers_all() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let body = pattern_bytes(CHUNKED_BODY_BYTES);

    // `Connection: close` makes the service end its side with a FIN right
    // after the last redirected bytes of the response.
    for round in 0..3 {
        let mut connection = bed.connect();
        let head = bed.head(
            &format!("Content-Length: {}\r\n", body.len()),
            "Connection: close\r\n",
        );
        let response = exchange(&mut connection, &head, &body, &PIECE_SIZES, false);
        assert_echoed(&response, &body, &format!("round {round}"));
    }

    assert!(bed.exported().messages_redirected > 0);
    bed.wait_sockhash_empty();
}

#[test]
fn half_close_still_gets_response() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let body = pattern_bytes(256 * 1024);
    let stream = bed
        .client
        .connect(bed.orders.v4(PROTECTED_PORT), CONNECT_TIMEOUT)
        .expect("connect");
    stream
        .set_read_timeout(Some(SETTLE_TIMEOUT))
        .expect("read timeout");

    let head = bed.head(
        &format!("Content-Length: {}\r\n", body.len()),
        "Connection: close\r\n",
    );
    let mut reader = stream.try_clone().expect("clone");
    let received = std::thread::scope(|scope| {
        let reading = scope.spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).map(|_| received)
        });
        let mut writer = &stream;
        writer.write_all(&head).expect("head");
        writer.write_all(&body).expect("body");
        stream.shutdown(Shutdown::Write).expect("half close");
        reading.join().expect("reader thread")
    });

    let received = received.expect("response read to its end");
    let text = String::from_utf8_lossy(&received[..received.len().min(200)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let decoded = decode_body(&received);
    assert_eq!(sha256_hex(&decoded), sha256_hex(&body), "echoed body");
    bed.wait_sockhash_empty();
}

/// Returns the body of a raw response framed by `Content-Length` or by
/// chunked transfer coding.
fn decode_body(raw: &[u8]) -> Vec<u8> {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("end of the response head")
        + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let rest = &raw[head_end..];
    let content_length = head.lines().find_map(|line| {
        line.strip_prefix("content-length:").map(|value| {
            value
                .trim()
                .parse::<usize>()
                .expect("numeric content-length")
        })
    });
    match content_length {
        Some(length) => {
            assert_eq!(rest.len(), length, "body length against content-length");
            rest.to_vec()
        }
        None => decode_chunks(rest),
    }
}

fn decode_chunks(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("ASCII chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[test]
fn aborted_uploads_leave_no_entries() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let piece = pattern_bytes(64 * 1024);

    for reset in [true, false] {
        let connection = bed.connect();
        let mut stream = connection.stream().try_clone().expect("clone");
        let head = bed.head(&format!("Content-Length: {ABORTED_BODY_BYTES}\r\n"), "");
        stream.write_all(&head).expect("head");
        let mut written = 0;
        while written < ABORTED_WRITTEN_BYTES {
            stream.write_all(&piece).expect("part of the body");
            written += piece.len();
        }
        // Both ends of the agent's hop are in the sockhash mid-body.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while bed.pinned().socket_keys().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "upstream sockets never entered the sockhash"
            );
            std::thread::sleep(POLL_INTERVAL);
        }

        if reset {
            // SO_LINGER 0: close sends a RST, as the kernel does for a
            // killed process with unread data.
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
        }
        drop(stream);
        drop(connection);

        bed.wait_sockhash_empty();
    }

    // The agent and the service still serve after the aborted uploads.
    let body = pattern_bytes(100_000);
    let mut connection = bed.connect();
    let head = bed.head(&format!("Content-Length: {}\r\n", body.len()), "");
    let response = exchange(&mut connection, &head, &body, &PIECE_SIZES, false);
    assert_echoed(&response, &body, "request after the aborted uploads");
}

#[test]
fn unrelated_sockets_stay_out() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let added_before = bed.exported().sockets_added;

    // Host namespace, from the reserved source itself: only the namespace
    // cookie distinguishes it from the agent's hop.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("host listener");
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((RESERVED_SOURCE, 0)).into())
        .expect("bind the reserved source on the host");
    socket
        .connect(&listener.local_addr().expect("addr").into())
        .expect("host loopback connect");
    let mut host_client: TcpStream = socket.into();
    let (mut host_server, _) = listener.accept().expect("accept");
    host_client.write_all(b"ping").expect("host write");
    let mut buffer = [0u8; 4];
    host_server.read_exact(&mut buffer).expect("host read");

    // Inside the enrolled pod, but not from the reserved source: a caller
    // of the unprotected port.
    let pod_stream = bed
        .orders
        .connect(bed.orders.v4(UNPROTECTED_PORT), CONNECT_TIMEOUT)
        .expect("in-pod connect");
    let mut pod_connection = Connection::new(pod_stream).expect("connection");
    let response = pod_connection
        .send(&tokengate_tests::http::Request::new("GET", "/plain"))
        .expect("in-pod request");
    assert_eq!(response.status, 200);

    let host_cookie = netns_cookie(&host_client).expect("host netns cookie");
    let keys = bed.pinned().socket_keys();
    assert!(
        keys.iter().all(|key| key.netns_cookie != host_cookie),
        "host socket in the sockhash: {keys:?}"
    );
    assert!(
        keys.is_empty(),
        "unrelated sockets in the sockhash: {keys:?}"
    );
    assert_eq!(bed.exported().sockets_added, added_before);
}

#[test]
fn switched_off_counts_nothing() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(false);
    let mut connection = bed.connect();
    let body = pattern_bytes(CHUNKED_BODY_BYTES);

    let head = bed.head(&format!("Content-Length: {}\r\n", body.len()), "");
    let response = exchange(&mut connection, &head, &body, &PIECE_SIZES, false);

    assert_echoed(&response, &body, "body without the fast path");
    let samples = bed.agent.metrics().expect("metrics");
    assert!(
        metrics::contains(&samples, "tokengate_sockmap_enabled", &[]),
        "series exported while off"
    );
    assert_eq!(
        metrics::count(&samples, "tokengate_sockmap_enabled", &[]),
        Some(0)
    );
    assert_eq!(bed.exported(), SockmapCounters::default());
    assert!(
        !bed.agent.pin_path().join(SOCKMAP_DIR).exists(),
        "no sockmap pins while off"
    );
}

#[test]
fn killed_agent_leaves_no_attachment() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut bed = start(true);
    let pinned = bed.pinned();
    let links = pinned.attached_links().expect("links");
    assert_eq!(
        links.len(),
        1,
        "one sock_ops link while the agent runs: {links:?}"
    );

    bed.agent.sigkill().expect("SIGKILL");
    bed.agent
        .wait_exit(SETTLE_TIMEOUT)
        .expect("agent exits after SIGKILL");

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let left = pinned.attached_links().expect("links");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sock_ops links {left:?} still attached {SETTLE_TIMEOUT:?} after the agent died"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[test]
fn ipv6_hop_takes_fast_path() {
    if !require_root_and_ebpf() {
        return;
    }
    let bed = start(true);
    let mut connection = bed.connect_to(bed.orders.v6(PROTECTED_PORT));
    let body = pattern_bytes(CHUNKED_BODY_BYTES);

    let head = bed.head(&format!("Content-Length: {}\r\n", body.len()), "");
    let response = exchange(&mut connection, &head, &body, &PIECE_SIZES, false);

    assert_echoed(&response, &body, "body over IPv6");
    let counters = bed.exported();
    println!("counters after the IPv6 upload: {counters:?}");
    assert_eq!(counters.sockets_added, 2, "{counters:?}");
    assert!(
        counters.bytes_redirected >= body.len() as u64,
        "{counters:?}"
    );
    drop(connection);
    bed.wait_sockhash_empty();
}
