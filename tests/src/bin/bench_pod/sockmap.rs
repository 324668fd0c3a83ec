//! A second agent with `interception.sockmap: true`, protecting a second pod,
//! for the benchmark's sockmap scenario.
//!
//! The test harness's `Agent` renders a fixed set of config fields, so this
//! module renders that config, adds the sockmap switch and runs the agent
//! itself. Before that it runs `tokengate check-config` on that config: an
//! agent without the field rejects it, and its message becomes the reason
//! the scenario is skipped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokengate_tests::agent::AgentConfig;
use tokengate_tests::http;
use tokengate_tests::ids::unique_id;
use tokengate_tests::skip::BPFFS;

/// Time allowed from spawn until `/readyz` returns 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed for the agent to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Poll interval while waiting for the agent.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A running agent with the sockmap fast path. Drop stops it and removes
/// its pins.
pub struct SockmapAgent {
    child: Child,
    pub admin: SocketAddr,
    pub audit_path: PathBuf,
    pin_path: PathBuf,
}

/// Renders `config` with `interception.sockmap: true`, the admin listener on
/// `admin`, the audit log and the pins at the given paths.
fn render(config: &AgentConfig, admin: SocketAddr, audit: &Path, pins: &Path) -> Result<String> {
    let yaml = config.to_yaml(audit, pins)?;
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&yaml).context("the rendered agent config is not YAML")?;
    value["interception"]["sockmap"] = serde_yaml::Value::Bool(true);
    // Beside the audit log, so that the hand-off socket goes with the
    // temporary directory instead of staying in /run/tokengate.
    let mut handoff = serde_yaml::Mapping::new();
    handoff.insert(
        "socket".into(),
        audit
            .with_file_name("handoff.sock")
            .display()
            .to_string()
            .into(),
    );
    value["interception"]["handoff"] = serde_yaml::Value::Mapping(handoff);
    value["admin"]["listen"] = serde_yaml::Value::String(admin.to_string());
    serde_yaml::to_string(&value).context("failed to render the sockmap agent config")
}

/// Returns `Err` with the agent's message when `tokengate check-config`
/// rejects the config with `interception.sockmap: true`.
pub fn probe(agent_bin: &Path, config: &AgentConfig, dir: &Path) -> Result<(), String> {
    let path = dir.join("sockmap-probe.yaml");
    let yaml = render(
        config,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir.join("sockmap-probe-audit.log"),
        &Path::new(BPFFS).join("tokengate-probe"),
    )
    .map_err(|error| format!("{error:#}"))?;
    std::fs::write(&path, yaml)
        .map_err(|error| format!("failed to write {}: {error}", path.display()))?;

    let output = Command::new(agent_bin)
        .arg("check-config")
        .arg(&path)
        .output()
        .map_err(|error| {
            format!(
                "failed to run {} check-config: {error}",
                agent_bin.display()
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Err(format!(
        "the agent rejects interception.sockmap: {}",
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    ))
}

impl SockmapAgent {
    /// Starts the agent with `config` plus the sockmap switch and waits until
    /// it is ready.
    pub fn start(agent_bin: &Path, config: &AgentConfig, dir: &Path) -> Result<Self> {
        let admin = free_loopback_port()?;
        let audit_path = dir.join("sockmap-audit.log");
        let pin_path = Path::new(BPFFS).join(format!("tokengate-bench-{}", unique_id()));
        let config_path = dir.join("sockmap.yaml");
        std::fs::write(&config_path, render(config, admin, &audit_path, &pin_path)?)
            .with_context(|| format!("failed to write {}", config_path.display()))?;

        let child = Command::new(agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start {}", agent_bin.display()))?;
        let mut agent = Self {
            child,
            admin,
            audit_path,
            pin_path,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if http::get(self.admin, "/readyz").is_ok_and(|response| response.status == 200) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the sockmap agent exited with {status} before it was ready; its log is above"
                );
            }
            if Instant::now() > deadline {
                bail!("the sockmap agent was not ready within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for SockmapAgent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}

/// Returns a loopback address whose port was free a moment ago: the agent's
/// admin listener, whose port this module must know before the agent runs.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("failed to find a free loopback port")?;
    Ok(listener.local_addr()?)
}
