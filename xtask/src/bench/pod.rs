//! The benchmark topology: `bench_pod` from the tests crate, run as a child
//! that keeps the pod, service, issuer and agent up until its standard input
//! closes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::process;

/// Timeout of one `/metrics` request to the agent's admin listener.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Token files of one algorithm.
pub struct TokenFiles {
    /// One token, repeated by every request.
    pub one: PathBuf,
    /// Distinct tokens, one per line.
    pub unique: PathBuf,
}

/// The second pod, protected by an agent with the sockmap fast path.
pub struct SockmapPod {
    pub pod_address: String,
    pub protected_port: u16,
    pub agent_pid: u32,
    pub agent_admin: SocketAddr,
    pub audit_path: PathBuf,
}

/// Description of the topology that `bench_pod` set up.
pub struct Topology {
    pub netns: String,
    pub pod_address: String,
    pub protected_port: u16,
    pub direct_port: u16,
    /// Request path that the agent's rule allows for the benchmark tokens.
    pub path: String,
    pub agent_pid: u32,
    pub agent_admin: SocketAddr,
    pub audit_path: PathBuf,
    /// Temporary directory that `bench_pod` removes when it stops.
    pub work_dir: PathBuf,
    /// Token files by algorithm name (`RS256`, `ES256`, `EdDSA`).
    pub tokens: BTreeMap<String, TokenFiles>,
    /// Issuer, audience, role and key id that the agent accepts, so that the
    /// njs verifier checks the same.
    pub issuer: String,
    pub audience: String,
    pub role: String,
    pub rsa_kid: String,
    /// PEM file of the RS256 signing key; its public half is in the JWKS.
    pub rsa_private_key: PathBuf,
    /// The sockmap pod, or why there is none.
    pub sockmap: Result<SockmapPod, String>,
}

/// Settings passed to `bench_pod`.
pub struct PodSettings<'a> {
    pub pod_bin: &'a Path,
    pub agent_bin: &'a Path,
    pub service_bin: &'a Path,
    pub service_cpu: &'a str,
    pub unique_tokens: usize,
    pub token_lifetime_seconds: u64,
    /// Set up the sockmap pod too.
    pub sockmap: bool,
    /// Worker threads of the agent's tokio runtime; `None` leaves tokio's
    /// default of one per CPU the agent may run on when it starts.
    pub agent_worker_threads: Option<usize>,
}

/// A running `bench_pod`. Drop closes its standard input and waits for it
/// to remove everything.
pub struct Pod {
    child: Child,
    stdin: Option<ChildStdin>,
    pub topology: Topology,
}

impl Pod {
    /// Starts `bench_pod` and waits for its topology line.
    pub fn start(settings: &PodSettings<'_>) -> anyhow::Result<Self> {
        let mut command = Command::new(settings.pod_bin);
        command
            .arg("--agent")
            .arg(settings.agent_bin)
            .arg("--service")
            .arg(settings.service_bin)
            .args(["--service-cpu", settings.service_cpu])
            .args(["--unique-tokens", &settings.unique_tokens.to_string()])
            .args([
                "--token-lifetime",
                &settings.token_lifetime_seconds.to_string(),
            ])
            // Per-request agent logs would cost the agent and fill memory;
            // the harness waits for the info line of the admin listener.
            .env("TOKENGATE_E2E_LOG", "warn,tokengate::app=info");
        if settings.sockmap {
            command.arg("--sockmap");
        }
        if let Some(threads) = settings.agent_worker_threads {
            // tokio's multi-thread runtime reads this when it is built; the
            // agents that bench_pod starts inherit it.
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        let line = process::describe(&command);
        println!("+ {line}");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("bench_pod stdout is not piped")?;

        let mut first = String::new();
        let read = BufReader::new(stdout).read_line(&mut first);
        let mut pod = Self {
            child,
            stdin,
            topology: Topology::empty(),
        };
        read.context("failed to read the topology from bench_pod")?;
        if first.trim().is_empty() {
            bail!("bench_pod exited before it reported the topology; its errors are above");
        }
        pod.topology = Topology::parse(&first)?;
        Ok(pod)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Topology {
    fn empty() -> Self {
        Self {
            netns: String::new(),
            pod_address: String::new(),
            protected_port: 0,
            direct_port: 0,
            path: String::new(),
            agent_pid: 0,
            agent_admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            audit_path: PathBuf::new(),
            work_dir: PathBuf::new(),
            tokens: BTreeMap::new(),
            issuer: String::new(),
            audience: String::new(),
            role: String::new(),
            rsa_kid: String::new(),
            rsa_private_key: PathBuf::new(),
            sockmap: Err(String::new()),
        }
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("invalid topology line from bench_pod: {line:?}"))?;
        let text = |name: &str| -> anyhow::Result<String> {
            value[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("topology field {name:?} is missing"))
        };
        let number = |name: &str| -> anyhow::Result<u64> {
            value[name]
                .as_u64()
                .with_context(|| format!("topology field {name:?} is missing"))
        };

        let mut tokens = BTreeMap::new();
        let Some(by_alg) = value["tokens"].as_object() else {
            bail!("topology field \"tokens\" is missing");
        };
        for (alg, files) in by_alg {
            let file = |kind: &str| -> anyhow::Result<PathBuf> {
                files[kind]
                    .as_str()
                    .map(PathBuf::from)
                    .with_context(|| format!("topology lacks the {kind} token file of {alg}"))
            };
            tokens.insert(
                alg.clone(),
                TokenFiles {
                    one: file("one")?,
                    unique: file("unique")?,
                },
            );
        }

        Ok(Self {
            netns: text("netns")?,
            pod_address: text("pod_address")?,
            protected_port: u16::try_from(number("protected_port")?)?,
            direct_port: u16::try_from(number("direct_port")?)?,
            path: text("path")?,
            agent_pid: u32::try_from(number("agent_pid")?)?,
            agent_admin: text("agent_admin")?
                .parse()
                .context("invalid topology field \"agent_admin\"")?,
            audit_path: PathBuf::from(text("audit_path")?),
            work_dir: PathBuf::from(text("work_dir")?),
            tokens,
            issuer: text("issuer")?,
            audience: text("audience")?,
            role: text("role")?,
            rsa_kid: text("rsa_kid")?,
            rsa_private_key: PathBuf::from(text("rsa_private_key")?),
            sockmap: parse_sockmap(&value["sockmap"])?,
        })
    }

    /// Returns the token files of `alg`.
    pub fn token_files(&self, alg: &str) -> anyhow::Result<&TokenFiles> {
        self.tokens
            .get(alg)
            .with_context(|| format!("bench_pod minted no {alg} tokens"))
    }

    /// Empties the agents' audit files between runs so that the disk does
    /// not fill; the agents append, so they keep writing at the new end.
    pub fn truncate_audit(&self) -> anyhow::Result<()> {
        truncate(&self.audit_path)?;
        if let Ok(sockmap) = &self.sockmap {
            truncate(&sockmap.audit_path)?;
        }
        Ok(())
    }
}

/// Reads the topology's `sockmap` entry: the pod, or `unavailable` with the
/// reason.
fn parse_sockmap(value: &Value) -> anyhow::Result<Result<SockmapPod, String>> {
    if let Some(reason) = value["unavailable"].as_str() {
        return Ok(Err(reason.to_owned()));
    }
    let text = |name: &str| -> anyhow::Result<&str> {
        value[name]
            .as_str()
            .with_context(|| format!("topology field sockmap.{name} is missing"))
    };
    let number = |name: &str| -> anyhow::Result<u64> {
        value[name]
            .as_u64()
            .with_context(|| format!("topology field sockmap.{name} is missing"))
    };
    Ok(Ok(SockmapPod {
        pod_address: text("pod_address")?.to_owned(),
        protected_port: u16::try_from(number("protected_port")?)?,
        agent_pid: u32::try_from(number("agent_pid")?)?,
        agent_admin: text("agent_admin")?
            .parse()
            .context("invalid topology field sockmap.agent_admin")?,
        audit_path: PathBuf::from(text("audit_path")?),
    }))
}

/// Returns the token-cache hit and miss counters of the agent whose admin
/// listener is `admin`.
pub fn cache_counters(admin: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let text = get_metrics(admin)?;
    Ok((
        sum_series(&text, "tokengate_token_cache_hits_total"),
        sum_series(&text, "tokengate_token_cache_misses_total"),
    ))
}

/// Returns the value of the agent's `tokengate_sockmap_enabled` gauge: 1
/// when the fast path is attached.
pub fn sockmap_enabled(admin: SocketAddr) -> anyhow::Result<bool> {
    let text = get_metrics(admin)?;
    Ok(sum_series(&text, "tokengate_sockmap_enabled") == 1)
}

fn truncate(path: &Path) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| file.set_len(0))
        .with_context(|| format!("failed to truncate {}", path.display()))
}

/// Fetches `/metrics` from the agent's admin listener on loopback.
fn get_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, METRICS_TIMEOUT)
        .with_context(|| format!("failed to connect to the agent's admin listener {admin}"))?;
    stream.set_read_timeout(Some(METRICS_TIMEOUT))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("failed to read /metrics")?;
    if !response.starts_with("HTTP/1.1 200") {
        bail!("/metrics on {admin} did not return 200");
    }
    Ok(response)
}

/// Sums every sample of the series `name`, whatever its labels.
fn sum_series(text: &str, name: &str) -> u64 {
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            total += value;
        }
    }
    // Counters are whole numbers well inside f64's exact range.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter is a non-negative whole number"
    )]
    let total = total as u64;
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_summed_over_labels() {
        let text = "# HELP x\n\
                    tokengate_token_cache_hits_total{issuer=\"a\"} 3\n\
                    tokengate_token_cache_hits_total{issuer=\"b\"} 4\n\
                    tokengate_token_cache_hits_total_other 100\n";

        assert_eq!(sum_series(text, "tokengate_token_cache_hits_total"), 7);
    }
}
