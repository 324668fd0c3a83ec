//! Starting and stopping the proxies that the benchmark compares with
//! (nginx, Apache httpd): both run as a parent process with workers.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;

/// Time allowed for a server to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for a server to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Poll interval while waiting for a server.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Waits until `addr` accepts connections. Fails with the server's error
/// log when `child` exits first, and after [`START_TIMEOUT`].
pub fn wait_listening(
    name: &str,
    child: &mut Child,
    addr: SocketAddr,
    error_log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(error_log).unwrap_or_default();
            bail!("{name} exited with {status} before listening on {addr}:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on {addr} within {START_TIMEOUT:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Sends SIGTERM to `child`, which stops its workers, and kills `pids`
/// (the parent and its workers, read before) when it has not exited after
/// [`STOP_TIMEOUT`].
pub fn stop(child: &mut Child, pids: &[u32]) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let _ = child.wait();
}
