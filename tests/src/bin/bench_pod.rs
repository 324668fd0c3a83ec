//! `bench_pod`: the pod topology of `cargo xtask bench`, kept up while the
//! benchmark runs.
//!
//! It creates a bridge and one pod namespace with addresses from
//! 198.18.0.0/15. It starts `bench_service` in the pod on a protected and an
//! unprotected port, starts the issuer on loopback and the agent protecting
//! the pod, and mints the benchmark's tokens into files. It then prints one
//! JSON line describing all of this and waits until its standard input
//! closes or it receives SIGINT, SIGTERM or SIGHUP. Then it kills every
//! process left in the pod namespace (such as an nginx the benchmark
//! started), stops the agent, the service and the issuer, and removes the
//! namespace, the bridge and its temporary directory.
//!
//! With `--sockmap` it also sets up a second pod with its own service and a
//! second agent that has `interception.sockmap: true`. An agent that
//! rejects the field gets no second pod, and the topology carries the reason.

// A binary's root resolves modules next to itself, in src/bin/.
#[path = "bench_pod/sockmap.rs"]
mod sockmap;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokengate_tests::agent::{Agent, AgentConfig, HeaderSpec, IssuerSpec, RuleSpec, WorkloadSpec};
use tokengate_tests::issuer::{Issuer, ISSUER};
use tokengate_tests::netns::{run_ip, Network, PodInfo};
use tokengate_tests::tokens::{mint, unix_now, Claims, Key};
use tokengate_tests::workspace_root;

/// Port the agent protects.
const PROTECTED_PORT: u16 = 8080;

/// Port of the same service that the agent leaves alone: the direct path.
const DIRECT_PORT: u16 = 9090;

/// Workload name in the agent config.
const WORKLOAD: &str = "bench";

/// `aud` of every benchmark token.
const AUDIENCE: &str = "orders";

/// Role the benchmark rule requires, so a verified request also runs the
/// rule check.
const ROLE: &str = "orders.read";

/// Path prefix of the benchmark rule; the load generator requests below it.
const RULE_PREFIX: &str = "/orders";

/// Time allowed for `bench_service` to bind its ports.
const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Drain time of the agent on SIGTERM, in seconds: no request is in flight
/// at teardown, so waiting longer only delays cleanup.
const DRAIN_SECONDS: u64 = 2;

/// Keys of the benchmark's token files, one per signing algorithm.
const KEYS: [(Key, &str); 3] = [
    (Key::Rsa1, "RS256"),
    (Key::Ec1, "ES256"),
    (Key::Ed1, "EdDSA"),
];

/// Sets up the benchmark topology and keeps it until a stop signal.
#[derive(Parser, Debug)]
struct Args {
    /// The agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The `bench_service` binary.
    #[arg(long)]
    service: PathBuf,
    /// CPU (as `taskset -c` takes it) that the service is pinned to.
    #[arg(long)]
    service_cpu: String,
    /// Number of distinct tokens per algorithm in the unique-token files.
    #[arg(long)]
    unique_tokens: usize,
    /// Lifetime of every minted token, in seconds; it must cover the run.
    #[arg(long)]
    token_lifetime: u64,
    /// Also set up a second pod protected by an agent with the sockmap fast
    /// path, when the agent accepts `interception.sockmap`.
    #[arg(long)]
    sockmap: bool,
}

fn main() -> Result<()> {
    // Block the stop signals on every thread before any thread starts, so
    // that only the wait below receives them and cleanup always runs.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGHUP);
    stop_signals
        .thread_block()
        .context("failed to block the stop signals")?;

    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("tokengate-bench-")
        .tempdir()
        .context("failed to create the benchmark directory")?;

    let mut network = Network::create()?;
    let pod = network.add_pod("orders")?;
    let sockmap_pod = if args.sockmap {
        Some(network.add_pod("sockmap")?)
    } else {
        None
    };
    let result = run(&args, dir.path(), &pod, sockmap_pod.as_ref(), &stop_signals);

    kill_pod_processes(&pod.netns);
    if let Some(sockmap_pod) = &sockmap_pod {
        kill_pod_processes(&sockmap_pod.netns);
    }
    drop(network);
    drop(dir);
    result
}

/// Starts the service, issuer and agent, reports the topology and waits for
/// the stop signal. Everything started here stops when this returns.
fn run(
    args: &Args,
    dir: &Path,
    pod: &PodInfo,
    sockmap_pod: Option<&PodInfo>,
    stop_signals: &SigSet,
) -> Result<()> {
    let _service = ServiceGuard::start(args, pod)?;
    let issuer = Issuer::start()?;
    let agent = Agent::start(&args.agent, &agent_config(&issuer, pod))?;
    let (_sockmap_service, sockmap_agent, sockmap_topology) = match sockmap_pod {
        Some(sockmap_pod) => start_sockmap(args, dir, &issuer, sockmap_pod)?,
        None => (
            None,
            None,
            json!({ "unavailable": "not requested (bench_pod runs without --sockmap)" }),
        ),
    };

    let started = Instant::now();
    let token_files = write_tokens(dir, args.unique_tokens, args.token_lifetime)?;
    eprintln!(
        "bench_pod: minted {} tokens per algorithm in {:.1} s",
        args.unique_tokens,
        started.elapsed().as_secs_f64()
    );

    let topology = json!({
        "netns": pod.netns,
        "pod_address": pod.address.to_string(),
        "protected_port": PROTECTED_PORT,
        "direct_port": DIRECT_PORT,
        "path": format!("{RULE_PREFIX}/1"),
        "agent_pid": agent.pid(),
        "agent_admin": agent.admin_addr().to_string(),
        "audit_path": agent.audit_path(),
        "work_dir": dir,
        "tokens": token_files,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "role": ROLE,
        "rsa_kid": Key::Rsa1.kid(),
        "rsa_private_key": workspace_root().join("tests/fixtures/rsa-1.pem"),
        "sockmap": sockmap_topology,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{topology}").context("failed to write the topology")?;
    stdout.flush().context("failed to flush the topology")?;

    // Standard input closing (the benchmark exited, however it exited) is
    // turned into a stop signal, so one wait covers both.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        let _ = kill(Pid::this(), Signal::SIGTERM);
    });
    let signal = stop_signals
        .wait()
        .context("failed to wait for a stop signal")?;
    eprintln!("bench_pod: {signal:?}, removing the topology");
    drop(sockmap_agent);
    Ok(())
}

/// Starts the second pod's service and its sockmap agent when the agent
/// accepts the field. Returns them (both `None` when skipped) and the
/// topology entry: the pod's address, port and agent, or the reason it is
/// unavailable.
fn start_sockmap(
    args: &Args,
    dir: &Path,
    issuer: &Issuer,
    pod: &PodInfo,
) -> Result<(
    Option<ServiceGuard>,
    Option<sockmap::SockmapAgent>,
    serde_json::Value,
)> {
    let config = agent_config(issuer, pod);
    if let Err(reason) = sockmap::probe(&args.agent, &config, dir) {
        eprintln!("bench_pod: sockmap scenario unavailable: {reason}");
        return Ok((None, None, json!({ "unavailable": reason })));
    }
    let service = ServiceGuard::start(args, pod)?;
    let agent = sockmap::SockmapAgent::start(&args.agent, &config, dir)?;
    let topology = json!({
        "pod_address": pod.address.to_string(),
        "protected_port": PROTECTED_PORT,
        "agent_pid": agent.pid(),
        "agent_admin": agent.admin.to_string(),
        "audit_path": agent.audit_path,
    });
    Ok((Some(service), Some(agent), topology))
}

fn agent_config(issuer: &Issuer, pod: &PodInfo) -> AgentConfig {
    AgentConfig {
        issuers: vec![IssuerSpec {
            issuer: ISSUER.to_owned(),
            jwks_uri: issuer.jwks_uri(),
            audiences: vec![AUDIENCE.to_owned()],
            algorithms: KEYS.iter().map(|(_, alg)| (*alg).to_owned()).collect(),
            unknown_kid_refetch_seconds: None,
            jwks_refresh_seconds: None,
        }],
        workloads: vec![WorkloadSpec {
            name: WORKLOAD.to_owned(),
            netns: pod.netns_path(),
            ports: vec![PROTECTED_PORT],
            from_headers: vec![HeaderSpec {
                name: "Authorization".to_owned(),
                value_prefix: "Bearer ".to_owned(),
            }],
            from_cookies: Vec::new(),
            rules: vec![RuleSpec {
                path_prefix: RULE_PREFIX.to_owned(),
                methods: vec!["GET".to_owned()],
                roles: vec![ROLE.to_owned()],
                ..RuleSpec::default()
            }],
        }],
        loopback_exempt: true,
        drain_seconds: DRAIN_SECONDS,
    }
}

/// Mints, per algorithm, one token into `ALG-one.txt` and `count` distinct
/// tokens (distinct `sub`) into `ALG-unique.txt`, one per line. Returns the
/// file paths by algorithm.
fn write_tokens(dir: &Path, count: usize, lifetime: u64) -> Result<serde_json::Value> {
    let now = unix_now();
    let claims_for = |subject: &str| {
        let mut claims = Claims::valid(subject, AUDIENCE).with_roles(&[ROLE]);
        claims.exp = Some(now + lifetime);
        claims
    };

    let mut files = serde_json::Map::new();
    for (key, alg) in KEYS {
        let one_path = dir.join(format!("{alg}-one.txt"));
        let one = mint(key, &claims_for("bench-repeated"));
        std::fs::write(&one_path, format!("{one}\n"))
            .with_context(|| format!("failed to write {}", one_path.display()))?;

        // RSA signing dominates; two threads halve it on two cores.
        let half = count / 2;
        let (first, second) = std::thread::scope(|scope| {
            let first = scope.spawn(|| mint_range(key, 0..half, &claims_for));
            let second = scope.spawn(|| mint_range(key, half..count, &claims_for));
            (first.join(), second.join())
        });
        let (Ok(first), Ok(second)) = (first, second) else {
            bail!("minting {alg} tokens panicked");
        };
        let unique_path = dir.join(format!("{alg}-unique.txt"));
        std::fs::write(&unique_path, first + &second)
            .with_context(|| format!("failed to write {}", unique_path.display()))?;

        files.insert(
            alg.to_owned(),
            json!({ "one": one_path, "unique": unique_path }),
        );
    }
    Ok(serde_json::Value::Object(files))
}

fn mint_range(
    key: Key,
    range: std::ops::Range<usize>,
    claims_for: &(dyn Fn(&str) -> Claims + Sync),
) -> String {
    let mut text = String::new();
    for index in range {
        text.push_str(&mint(key, &claims_for(&format!("bench-{index}"))));
        text.push('\n');
    }
    text
}

/// `bench_service` in the pod, pinned to its CPU. Drop kills it.
struct ServiceGuard {
    child: Child,
}

impl ServiceGuard {
    fn start(args: &Args, pod: &PodInfo) -> Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pod.netns,
                "taskset",
                "-c",
                &args.service_cpu,
            ])
            .arg(&args.service)
            .args(["--port", &PROTECTED_PORT.to_string()])
            .args(["--port", &DIRECT_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start {}", args.service.display()))?;
        let stdout = child.stdout.take().context("service stdout is not piped")?;
        let guard = Self { child };

        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = sender.send(lines.next());
            for _ in lines {}
        });
        match receiver.recv_timeout(SERVICE_START_TIMEOUT) {
            Ok(Some(Ok(_))) => Ok(guard),
            Ok(_) => bail!("bench_service exited before listening"),
            Err(_) => bail!("bench_service did not listen within {SERVICE_START_TIMEOUT:?}"),
        }
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every process whose network namespace is the pod's, such as an
/// nginx the benchmark left behind when it was killed itself.
fn kill_pod_processes(netns: &str) {
    let Ok(pids) = run_ip(&["netns", "pids", netns]) else {
        return;
    };
    for pid in pids.split_whitespace().filter_map(|pid| pid.parse().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
