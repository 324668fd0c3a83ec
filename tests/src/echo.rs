//! The echo service run inside pods: the record it returns and logs, and a
//! guard that runs the `tg-echo` binary in a pod's namespace.
//!
//! `tg-echo` responds to every request with 200 and a JSON [`EchoRecord`], and
//! appends the same record as one line to its log file. Tests read that log
//! to prove which requests reached the service and which never did.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Header that tests set on every request so the echo log can be matched to
/// what the client sent.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Path on which `tg-echo` streams the request body back as the response
/// body (chunked), instead of describing the request. The request log gets
/// the usual record once the body has ended.
pub const ECHO_BODY_PATH: &str = "/echo-body";

/// First line `tg-echo` prints on standard output once every port listens.
pub const READY_LINE_PREFIX: &str = "tg-echo listening";

/// Time allowed for `tg-echo` to bind its ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What the echo service received in one request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoRecord {
    /// Receive time, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Local socket address of the connection: the pod's address and port.
    pub local: String,
    /// Peer socket address: the agent's reserved source for proxied
    /// requests, or the caller itself on unprotected ports.
    pub peer: String,
    pub method: String,
    /// Request target as received, with the query.
    pub target: String,
    /// Header fields in received order; names are lower case.
    pub headers: Vec<(String, String)>,
    /// Number of body bytes received.
    pub body_len: u64,
    /// SHA-256 of the body bytes, lower-case hex.
    pub body_sha256: String,
    /// Whether the body was read to its end without an error.
    pub body_complete: bool,
}

impl EchoRecord {
    /// First value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Value of [`REQUEST_ID_HEADER`], if the request carried one.
    pub fn request_id(&self) -> Option<&str> {
        self.header(REQUEST_ID_HEADER)
    }

    /// IP address part of [`EchoRecord::peer`].
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|addr| addr.ip())
    }
}

/// A running `tg-echo` inside a pod. Drop kills it.
#[derive(Debug)]
pub struct EchoService {
    child: Child,
    log_path: PathBuf,
    keep: bool,
}

impl EchoService {
    /// Starts `tg-echo` in the named namespace on `ports` and waits until it
    /// listens on all of them.
    pub fn start(echo_bin: &Path, netns: &str, ports: &[u16], log_path: &Path) -> Result<Self> {
        check_binary(echo_bin)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(echo_bin);
        Self::start_command(command, netns, ports, log_path)
    }

    /// Starts `command`, which runs `tg-echo` with any options of its own,
    /// adds the log and port options, and waits until it listens on every
    /// port. `place` names where it runs in error messages.
    pub fn start_command(
        mut command: Command,
        place: &str,
        ports: &[u16],
        log_path: &Path,
    ) -> Result<Self> {
        command.arg("--log").arg(log_path);
        for port in ports {
            command.arg("--port").arg(port.to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start tg-echo in {place}"))?;

        let stdout = child.stdout.take().context("echo stdout is not piped")?;
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = sender.send(first);
            // Keep reading so a later write by the service never blocks.
            for _ in lines {}
        });

        let service = Self {
            child,
            log_path: log_path.to_owned(),
            keep: false,
        };
        match receiver.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) if line.starts_with(READY_LINE_PREFIX) => Ok(service),
            Ok(Some(Ok(line))) => bail!("tg-echo printed {line:?} instead of its ready line"),
            Ok(_) => bail!("tg-echo in {place} exited before listening"),
            Err(_) => bail!("tg-echo in {place} did not listen within {START_TIMEOUT:?}"),
        }
    }

    /// Process id of the service.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the request log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Reads every request the service has logged so far.
    pub fn records(&self) -> Result<Vec<EchoRecord>> {
        let text = match std::fs::read_to_string(&self.log_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("failed to read {}", self.log_path.display()))
            }
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .with_context(|| format!("invalid echo log line {line:?}"))
            })
            .collect()
    }

    /// Leaves the service running after drop, for debugging.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

/// Fails with a build hint if `echo_bin` does not exist.
pub fn check_binary(echo_bin: &Path) -> Result<()> {
    if !echo_bin.is_file() {
        bail!(
            "echo binary not found at {}: build it with `cargo build -p tokengate-tests --bins`",
            echo_bin.display()
        );
    }
    Ok(())
}

impl Drop for EchoService {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
