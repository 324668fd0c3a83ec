//! The agent under test as a child process.
//!
//! [`Agent::spawn`] writes a config file into a temporary directory. The
//! config puts the pins in a unique bpffs directory, the audit log in the
//! temporary directory and the admin listener on 127.0.0.1 port 0. It then
//! starts `tokengate run --config FILE` and reads the admin address from the
//! log line the agent prints once that listener is bound. Drop kills the
//! process and removes its pins.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

mod config;

pub use config::{AgentConfig, HeaderSpec, IssuerSpec, RuleSpec, WorkloadSpec};

use crate::http;
use crate::ids::unique_id;
use crate::skip::BPFFS;

/// Environment variable with the path of the agent binary.
pub const AGENT_BIN_ENV: &str = "TOKENGATE_BIN";

/// Environment variable with a `RUST_LOG` filter for the agent, for
/// debugging a failing test.
pub const AGENT_LOG_ENV: &str = "TOKENGATE_E2E_LOG";

/// Agent log filter: info carries the admin start line and lifecycle events.
const DEFAULT_AGENT_LOG: &str = "info";

/// Message of the log line that carries the bound admin address.
pub const ADMIN_STARTED_MESSAGE: &str = "admin listener started";

/// Time allowed from spawn until the admin listener is bound.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed until `/readyz` returns 200. Loading the eBPF program and
/// the first JWKS fetch happen in it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval between two polls of `/readyz` or of the process state.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Directory of the agent's default hand-off socket
/// (`interception.handoff.socket`).
const HANDOFF_DIR: &str = "/run/tokengate";

/// Number of agent log lines printed when a test fails.
const LOG_LINES_ON_FAILURE: usize = 200;

/// Path of the agent binary: `TOKENGATE_BIN`, else the release build in the
/// workspace's target directory.
pub fn agent_binary() -> PathBuf {
    match std::env::var_os(AGENT_BIN_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => crate::workspace_root()
            .join("target")
            .join("release")
            .join("tokengate"),
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    exit_status: Option<ExitStatus>,
    admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    config_path: PathBuf,
    audit_path: PathBuf,
    pin_path: PathBuf,
    /// The hand-off socket of the config as patched, which a killed agent
    /// leaves behind.
    handoff_socket: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

impl Agent {
    /// Spawns the agent and waits until its admin listener is bound; it may
    /// not be ready yet.
    pub fn spawn(binary: &Path, config: &AgentConfig) -> Result<Self> {
        Self::spawn_patched(binary, config, |_| {})
    }

    /// Like [`Agent::spawn`], with `patch` applied to the config (see
    /// [`AgentConfig::to_value`]) before it is written, for fields that
    /// [`AgentConfig`] does not model.
    pub fn spawn_patched(
        binary: &Path,
        config: &AgentConfig,
        patch: impl FnOnce(&mut Value),
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-e2e-")
            .tempdir()
            .context("failed to create the agent's temporary directory")?;
        let config_path = dir.path().join("tokengate.yaml");
        let audit_path = dir.path().join("audit.log");
        let pin_path = Path::new(BPFFS).join(format!("tokengate-{}", unique_id()));
        let mut value = config.to_value(&audit_path, &pin_path);
        patch(&mut value);
        let handoff_socket = handoff_socket(&value);
        let yaml = serde_yaml::to_string(&value).context("failed to render the agent config")?;
        std::fs::write(&config_path, yaml)
            .with_context(|| format!("failed to write {}", config_path.display()))?;

        let mut child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var(AGENT_LOG_ENV).unwrap_or_else(|_| DEFAULT_AGENT_LOG.to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start the agent {}", binary.display()))?;

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (admin_sender, admin_receiver) = mpsc::channel();
        let stderr = child.stderr.take().context("agent stderr is not piped")?;
        let thread_logs = Arc::clone(&logs);
        std::thread::spawn(move || {
            let mut sender = Some(admin_sender);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if let Some(addr) = parse_admin_addr(&line) {
                    if let Some(sender) = sender.take() {
                        let _ = sender.send(addr);
                    }
                }
                thread_logs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });

        let mut agent = Self {
            child,
            exit_status: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
            config_path,
            audit_path,
            pin_path,
            handoff_socket,
            dir: Some(dir),
            keep: false,
        };
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            if let Ok(addr) = admin_receiver.recv_timeout(POLL_INTERVAL) {
                agent.admin = addr;
                return Ok(agent);
            }
            if let Some(status) = agent.try_exit_status()? {
                bail!(
                    "agent exited with {status} before its admin listener started{}",
                    agent.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent logged no {ADMIN_STARTED_MESSAGE:?} line within {ADMIN_TIMEOUT:?}{}",
                    agent.log_tail()
                );
            }
        }
    }

    /// Spawns the agent and waits until `/readyz` returns 200.
    pub fn start(binary: &Path, config: &AgentConfig) -> Result<Self> {
        let mut agent = Self::spawn(binary, config)?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Like [`Agent::start`], with `patch` applied to the config as in
    /// [`Agent::spawn_patched`].
    pub fn start_patched(
        binary: &Path,
        config: &AgentConfig,
        patch: impl FnOnce(&mut Value),
    ) -> Result<Self> {
        let mut agent = Self::spawn_patched(binary, config, patch)?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Waits until `/readyz` returns 200, failing early if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match http::get(self.admin, "/readyz") {
                Ok(response) if response.status == 200 => return Ok(()),
                Ok(response) => format!("{} {}", response.status, response.text().trim()),
                Err(error) => format!("{error:#}"),
            };
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "agent exited with {status} before it was ready{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready within {timeout:?}, last /readyz: {last}{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Process id of the agent.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    /// Directory of the agent's pins in bpffs.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// `GET path` on the admin listener.
    pub fn admin_get(&self, path: &str) -> Result<http::Response> {
        http::get(self.admin, path)
    }

    /// Text of `/metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        let response = self.admin_get("/metrics")?;
        if response.status != 200 {
            bail!("/metrics returned {}: {}", response.status, response.text());
        }
        Ok(response.text())
    }

    /// Parsed samples of `/metrics`.
    pub fn metrics(&self) -> Result<Vec<crate::metrics::Sample>> {
        crate::metrics::parse(&self.metrics_text()?)
    }

    /// Polls `/metrics` until `predicate` holds for its samples or the
    /// timeout passes, and returns the last samples read. Counters may move
    /// just after the response that a test waits for.
    pub fn wait_for_metrics(
        &self,
        timeout: Duration,
        predicate: impl Fn(&[crate::metrics::Sample]) -> bool,
    ) -> Result<Vec<crate::metrics::Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.metrics()?;
            if predicate(&samples) || Instant::now() > deadline {
                return Ok(samples);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Raw text of the audit file; empty if the agent has not written it.
    pub fn audit_text(&self) -> Result<String> {
        match std::fs::read_to_string(&self.audit_path) {
            Ok(text) => Ok(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(error) => {
                Err(error).with_context(|| format!("failed to read {}", self.audit_path.display()))
            }
        }
    }

    /// Reads every audit line, each parsed as a JSON object.
    pub fn audit_lines(&self) -> Result<Vec<Value>> {
        self.audit_text()?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .with_context(|| format!("audit line is not JSON: {line:?}"))?;
                if !value.is_object() {
                    bail!("audit line is not a JSON object: {line:?}");
                }
                Ok(value)
            })
            .collect()
    }

    /// Audit lines whose `path` equals `path`.
    pub fn audit_lines_for_path(&self, path: &str) -> Result<Vec<Value>> {
        Ok(self
            .audit_lines()?
            .into_iter()
            .filter(|line| line["path"] == path)
            .collect())
    }

    /// Polls the audit file until `predicate` holds for its lines or the
    /// timeout passes, and returns the last lines read. The agent may write
    /// an audit line just after it sends the response.
    pub fn wait_for_audit(
        &self,
        timeout: Duration,
        predicate: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.audit_lines()?;
            if predicate(&lines) || Instant::now() > deadline {
                return Ok(lines);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Lines the agent has written to stderr so far, without colour codes.
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL.
    pub fn sigkill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        if self.exit_status.is_some() {
            bail!("agent already exited, cannot send {signal}");
        }
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("failed to send {signal} to the agent"))
    }

    /// Waits until the agent exits and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent still running {timeout:?} after the request to stop{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Returns whether the process is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.try_exit_status()?.is_none())
    }

    /// Leaves the temporary directory (config, audit log) and the pins in
    /// place after drop, for debugging. The process is still killed.
    pub fn keep_files(&mut self) {
        self.keep = true;
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
    }

    /// Formats the last lines of the agent's log for an error message.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let start = logs.len().saturating_sub(LOG_LINES_ON_FAILURE);
        let mut text = String::from("\n--- agent log ---\n");
        for line in &logs[start..] {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("--- end of agent log ---");
        text
    }

    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit_status.is_none() {
            self.exit_status = self
                .child
                .try_wait()
                .context("failed to poll the agent process")?;
        }
        Ok(self.exit_status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
            if let Some(dir) = self.dir.take() {
                let kept_dir = dir.keep();
                eprintln!("agent config and audit log kept in {}", kept_dir.display());
            }
        }
        if !self.keep {
            if let Err(error) = std::fs::remove_dir_all(&self.pin_path) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    eprintln!(
                        "cleanup: failed to remove {}: {error}",
                        self.pin_path.display()
                    );
                }
            }
            // A killed agent leaves its hand-off socket. Agents of an
            // upgrade test share one, so it goes only once nothing listens.
            if let Some(socket) = &self.handoff_socket {
                let nothing_listens = std::os::unix::net::UnixStream::connect(socket)
                    .is_err_and(|error| error.kind() == std::io::ErrorKind::ConnectionRefused);
                if nothing_listens {
                    let _ = std::fs::remove_file(socket);
                }
            }
        }
    }
}

/// Returns the hand-off socket that an agent with `config` listens on: the
/// configured one, or the default derived from the pin path.
fn handoff_socket(config: &Value) -> Option<PathBuf> {
    let interception = &config["interception"];
    if let Some(socket) = interception["handoff"]["socket"].as_str() {
        return Some(PathBuf::from(socket));
    }
    let pin_path = Path::new(interception["pin_path"].as_str()?);
    let name = pin_path.file_name()?.to_string_lossy();
    Some(Path::new(HANDOFF_DIR).join(format!("{name}.sock")))
}

/// Extracts `addr=IP:PORT` from the admin listener's start line.
fn parse_admin_addr(line: &str) -> Option<SocketAddr> {
    let after_message = &line[line.find(ADMIN_STARTED_MESSAGE)? + ADMIN_STARTED_MESSAGE.len()..];
    after_message
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|value| value.trim_matches('"').parse().ok())
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) that a logger may add
/// even when its output is not a terminal.
fn strip_ansi(line: &str) -> String {
    let mut output = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            output.push(c);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addr_parses_from_plain_and_coloured_lines() {
        let plain = "2025-01-01T00:00:00Z  INFO tokengate::admin: admin listener started addr=127.0.0.1:41234";
        let coloured = "\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m admin listener started \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:5";

        assert_eq!(
            parse_admin_addr(plain),
            Some("127.0.0.1:41234".parse().expect("addr"))
        );
        assert_eq!(
            parse_admin_addr(&strip_ansi(coloured)),
            Some("127.0.0.1:5".parse().expect("addr"))
        );
        assert_eq!(
            parse_admin_addr("admin listener stopped addr=127.0.0.1:1"),
            None
        );
    }
}
