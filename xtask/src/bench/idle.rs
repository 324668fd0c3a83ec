//! Memory of idle keep-alive connections. This opens many client
//! connections to a proxy and sends one verified request on each, so every
//! connection is a kept-alive HTTP/1.1 connection with its upstream work
//! done. Then it leaves them idle and reads the proxy's resident set size.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::proc_stats;
use crate::process;

/// Timeout of each connect, write and read.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Time the connections stay idle before the reading, so that buffers the
/// proxy frees once a connection turns idle are freed.
pub const SETTLE_TIME: Duration = Duration::from_secs(2);

/// Largest response head accepted from the proxy.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The proxy under measurement: its address, the request and its processes.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub token: &'a str,
    /// Processes whose RSS is summed (agent, or nginx master and worker).
    pub pids: &'a [u32],
}

/// Resident set size of the proxy around the idle connections.
#[derive(Clone, Debug)]
pub struct IdleMemory {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    /// Seconds taken to open the connections and get every response.
    pub open_seconds: f64,
}

impl IdleMemory {
    /// Returns the growth of the RSS per idle connection, in KiB.
    #[expect(
        clippy::cast_precision_loss,
        reason = "RSS in KiB and connection counts are far below 2^52"
    )]
    pub fn kib_per_connection(&self) -> f64 {
        self.rss_idle_kib.saturating_sub(self.rss_before_kib) as f64 / self.connections as f64
    }
}

/// Opens `count` connections to `target`, sends one request on each and
/// reads its response, waits `settle`, reads the RSS, then closes them all.
pub fn measure(target: &Target<'_>, count: usize, settle: Duration) -> anyhow::Result<IdleMemory> {
    raise_open_files_limit(count)?;
    let rss_before_kib = proc_stats::status_kib(target.pids, "VmRSS")?;

    let started = Instant::now();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
        target.path, target.addr, target.token
    );
    let mut connections = Vec::with_capacity(count);
    for index in 0..count {
        let stream = request_once(target.addr, &request)
            .with_context(|| format!("idle connection {index} of {count} to {}", target.addr))?;
        connections.push(stream);
    }
    let open_seconds = started.elapsed().as_secs_f64();

    std::thread::sleep(settle);
    let rss_idle_kib = proc_stats::status_kib(target.pids, "VmRSS")?;
    drop(connections);

    Ok(IdleMemory {
        connections: count,
        rss_before_kib,
        rss_idle_kib,
        open_seconds,
    })
}

/// Connects, sends `request` and reads one response with a 2xx status;
/// returns the open connection.
fn request_once(addr: SocketAddr, request: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    read_response(&mut stream)?;
    Ok(stream)
}

/// Reads one response with a `Content-Length` body and fails unless its
/// status is 2xx, so that every idle connection passed verification.
fn read_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_RESPONSE_BYTES {
            bail!("response head longer than {MAX_RESPONSE_BYTES} bytes");
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            bail!("connection closed before the response head ended");
        }
        buffer.extend_from_slice(&chunk[..read]);
    };

    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        bail!("status {status:?}, expected 2xx: {head}");
    }
    let body_len = content_length(&head)
        .with_context(|| format!("response without Content-Length: {head}"))?;
    let mut received = buffer.len() - head_end;
    while received < body_len {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            bail!("connection closed inside the response body");
        }
        received += read;
    }
    Ok(())
}

/// Returns the index just past the blank line that ends the head.
fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|start| start + 4)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit with
/// `prlimit` (util-linux), and fails when even the hard limit is too low for
/// `count` connections. Raising the hard limit needs `CAP_SYS_RESOURCE`.
pub fn raise_open_files_limit(count: usize) -> anyhow::Result<()> {
    /// Descriptors besides the connections: standard streams, files of
    /// this process, with room to spare.
    const SPARE_DESCRIPTORS: u64 = 256;

    let limits =
        std::fs::read_to_string("/proc/self/limits").context("failed to read /proc/self/limits")?;
    let (soft, hard) =
        open_files_limit(&limits).context("no \"Max open files\" line in /proc/self/limits")?;
    let needed = count as u64 + SPARE_DESCRIPTORS;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        bail!(
            "the RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors that \
             {count} idle connections need; raise it (`ulimit -Hn`) or pass a smaller \
             --idle-connections"
        );
    }
    process::run(
        Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}")),
    )
    .context("failed to raise RLIMIT_NOFILE with prlimit")
}

/// Reads the soft and hard limits of the `Max open files` line; `unlimited`
/// reads as `u64::MAX`.
fn open_files_limit(limits: &str) -> Option<(u64, u64)> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|word| {
            if word == "unlimited" {
                Some(u64::MAX)
            } else {
                word.parse().ok()
            }
        });
    Some((values.next()??, values.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_found_after_blank_line() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";

        assert_eq!(find_head_end(response), Some(38));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn content_length_read_case_insensitively() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n";

        assert_eq!(content_length(head), Some(42));
        assert_eq!(content_length("HTTP/1.1 200 OK\r\n\r\n"), None);
    }

    #[test]
    fn open_files_limit_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 unlimited            files\n";

        assert_eq!(open_files_limit(limits), Some((1024, u64::MAX)));
        assert_eq!(
            open_files_limit("Max cpu time unlimited unlimited seconds\n"),
            None
        );
    }

    /// Serves `count` connections with `response` and keeps them open until
    /// the returned thread is joined.
    fn server(
        count: usize,
        response: &'static [u8],
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<TcpStream>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let thread = std::thread::spawn(move || {
            let mut streams = Vec::new();
            for _ in 0..count {
                let (mut stream, _) = listener.accept().expect("accept");
                let mut buffer = [0_u8; 1024];
                let _ = stream.read(&mut buffer).expect("request");
                stream.write_all(response).expect("response");
                streams.push(stream);
            }
            streams
        });
        (addr, thread)
    }

    #[test]
    fn connections_served_and_counted() {
        let (addr, thread) = server(3, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        let pids = [std::process::id()];
        let target = Target {
            addr,
            path: "/orders/1",
            token: "a.b.c",
            pids: &pids,
        };

        let memory = measure(&target, 3, Duration::ZERO).expect("measures");

        assert_eq!(memory.connections, 3);
        assert!(memory.rss_idle_kib > 0);
        drop(thread.join().expect("server thread"));
    }

    #[test]
    fn rejected_request_fails() {
        let (addr, thread) = server(1, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
        let pids = [std::process::id()];
        let target = Target {
            addr,
            path: "/orders/1",
            token: "a.b.c",
            pids: &pids,
        };

        let error = measure(&target, 1, Duration::ZERO).expect_err("401 is not 2xx");

        assert!(format!("{error:#}").contains("status \"401\""), "{error:#}");
        drop(thread.join().expect("server thread"));
    }
}
