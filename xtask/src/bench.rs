//! `cargo xtask bench`: throughput, latency, CPU and memory of tokengate
//! next to the direct path and nginx sidecars, on one pod topology, as root.
//!
//! `bench_pod` (tests crate) sets up a pod namespace on a bridge with
//! `bench_service` on a protected and an unprotected port, the issuer and the
//! agent. This command then runs wrk against each scenario in interleaved
//! rounds (A B A B, so drift over time falls on every scenario alike), with
//! the proxy pinned to one CPU and wrk and the service to the other. It
//! prints a table, writes JSON under `target/bench/` and draws SVG plots
//! from it. After the rounds it measures the memory of idle keep-alive
//! connections. Traffic goes only to the pods' 198.18.0.0/15 addresses and
//! the agents' loopback admin ports.

mod apache;
mod idle;
mod nginx;
mod plot;
mod pod;
mod proc_stats;
mod report;
mod scenario;
mod server;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::json;

use crate::build::{self, Profile};
use crate::{process, workspace};
use apache::{Apache, APACHE_BIN, APACHE_PORT, OPENIDC_MODULE};
use idle::IdleMemory;
use nginx::{Mode, Nginx, VerifierSpec, NGINX_PORT, NJS_MODULE};
use pod::{Pod, PodSettings, Topology};
use report::{IdleResult, Run, Unavailable};
use scenario::{Mix, Scenario};

/// Default measured duration per run, in seconds: long enough for stable
/// percentiles at thousands of requests per second, short enough that the
/// full default run stays under about ten minutes.
const DEFAULT_DURATION_SECONDS: u64 = 10;

/// Default warm-up before each measured run, in seconds: fills the token
/// cache, the upstream connection pools and the CPU caches.
const DEFAULT_WARMUP_SECONDS: u64 = 3;

/// Default client connections: enough to keep one proxy core busy, and the
/// figure of published nginx+njs comparisons on this kind of machine.
const DEFAULT_CONNECTIONS: u32 = 32;

/// Default rounds: two is the least that interleaves A B A B.
const DEFAULT_ROUNDS: u32 = 2;

/// Durations of `--quick`, for a smoke check of the harness.
const QUICK_DURATION_SECONDS: u64 = 2;
const QUICK_WARMUP_SECONDS: u64 = 1;

/// Default idle keep-alive connections per proxy in the memory measurement.
/// The agent uses two descriptors per connection (caller and service), and
/// this machine's hard `RLIMIT_NOFILE` of 20,000 cannot be raised without
/// `CAP_SYS_RESOURCE`, so 10,000 does not fit; 9,000 does.
const DEFAULT_IDLE_CONNECTIONS: usize = 9_000;

/// Idle connections of `--quick`.
const QUICK_IDLE_CONNECTIONS: usize = 1_000;

/// Default worker threads of the agent's tokio runtime: one, because the
/// agent gets one CPU, as nginx gets one worker process. tokio's default
/// (one per CPU at start) would run two threads on the one pinned CPU.
const DEFAULT_AGENT_WORKER_THREADS: usize = 1;

/// Path prefix that the agent's benchmark rule protects; the requests go
/// below it.
const PROTECTED_PREFIX: &str = "/orders";

/// The issuer's JWKS in the workspace, served to httpd from its own
/// document root.
const JWKS_FIXTURE: &str = "tests/fixtures/jwks.json";

/// Distinct tokens per algorithm for the cache-miss scenarios: twice the
/// agent's default cache capacity (10,000), so a cycle through them in
/// order misses the least-recently-used cache on every request.
const UNIQUE_TOKENS: usize = 20_000;

/// Extra token lifetime beyond the planned run, in seconds, for setup and
/// slow runs.
const TOKEN_LIFETIME_MARGIN_SECONDS: u64 = 1800;

/// CPU of wrk and the service.
const LOAD_CPU: &str = "0";

/// CPU of the proxy under test (agent or nginx).
const PROXY_CPU: &str = "1";

/// Debian packages the benchmark runs, with the file that shows each is
/// installed.
const PACKAGES: [(&str, &str); 5] = [
    ("wrk", "/usr/bin/wrk"),
    ("nginx", "/usr/sbin/nginx"),
    ("libnginx-mod-http-js", NJS_MODULE),
    ("apache2", APACHE_BIN),
    ("libapache2-mod-auth-openidc", OPENIDC_MODULE),
];

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Measured seconds per run.
    #[arg(long, default_value_t = DEFAULT_DURATION_SECONDS)]
    duration: u64,
    /// Warm-up seconds before each measured run, not counted.
    #[arg(long, default_value_t = DEFAULT_WARMUP_SECONDS)]
    warmup: u64,
    /// Client connections that wrk keeps open.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    connections: u32,
    /// Interleaved rounds over all scenarios.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    rounds: u32,
    /// Comma-separated scenario names; every scenario when absent.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Short smoke run: 2 s measured and 1 s warm-up per run, 1,000 idle
    /// connections.
    #[arg(long)]
    quick: bool,
    /// Idle keep-alive connections per proxy in the memory measurement; 0
    /// skips it.
    #[arg(long, default_value_t = DEFAULT_IDLE_CONNECTIONS)]
    idle_connections: usize,
    /// Worker threads of the agent's tokio runtime; 0 keeps tokio's default.
    #[arg(long, default_value_t = DEFAULT_AGENT_WORKER_THREADS)]
    agent_worker_threads: usize,
    /// Agent binary to measure instead of the fresh release build, such as
    /// a saved build from before a change.
    #[arg(long, value_name = "FILE")]
    agent: Option<PathBuf>,
    /// Use the release binaries of the last build (agent, `bench_pod`,
    /// `bench_service` in target/release/) instead of building, for runs
    /// while other builds hold cargo's lock.
    #[arg(long)]
    no_build: bool,
    /// Only redraw the plots (into target/bench/ and docs/bench/) from a
    /// results file of an earlier run, such as target/bench/latest.json.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

/// Setup results that every run needs.
struct RunContext<'a> {
    topology: &'a Topology,
    script: &'a Path,
    spki: &'a str,
    jwks_json: &'a str,
    connections: u32,
    duration: Duration,
    warmup: Duration,
    ticks_per_second: f64,
}

/// Runs the benchmark and prints the table.
pub fn run(root: &Path, options: &Options) -> anyhow::Result<ExitCode> {
    if let Some(path) = &options.plot {
        return redraw(root, path);
    }
    let (duration, warmup, idle_connections) = if options.quick {
        (
            QUICK_DURATION_SECONDS,
            QUICK_WARMUP_SECONDS,
            options.idle_connections.min(QUICK_IDLE_CONNECTIONS),
        )
    } else {
        (options.duration, options.warmup, options.idle_connections)
    };
    if duration == 0 || options.rounds == 0 || options.connections == 0 {
        bail!("--duration, --rounds and --connections must be at least 1");
    }
    let mut scenarios = scenario::select(&options.scenarios)?;
    check_machine()?;
    install_packages()?;
    // Before any proxy starts, so that each inherits the raised limit.
    idle::raise_open_files_limit(idle_connections)?;

    let (pod_bin, service_bin, agent_bin) = if options.no_build {
        last_build(root, options.agent.as_deref())?
    } else {
        build_binaries(root, options.agent.as_deref())?
    };

    let runs_total = u64::from(options.rounds) * scenarios.len() as u64;
    let planned_seconds = runs_total * (duration + warmup + 2);
    let pod = Pod::start(&PodSettings {
        pod_bin: &pod_bin,
        agent_bin: &agent_bin,
        service_bin: &service_bin,
        service_cpu: LOAD_CPU,
        unique_tokens: UNIQUE_TOKENS,
        token_lifetime_seconds: planned_seconds + TOKEN_LIFETIME_MARGIN_SECONDS,
        sockmap: scenarios.contains(&Scenario::TokengateSockmap),
        agent_worker_threads: (options.agent_worker_threads > 0)
            .then_some(options.agent_worker_threads),
    })?;
    let topology = &pod.topology;
    let unavailable = drop_unavailable(&mut scenarios, topology)?;
    for (name, reason) in &unavailable {
        println!("bench: skipping {name}: {reason}");
    }
    pin_agent(topology.agent_pid)?;
    if let Ok(sockmap) = &topology.sockmap {
        pin_agent(sockmap.agent_pid)?;
    }
    let idle_rss_kib = proc_stats::status_kib(&[topology.agent_pid], "VmRSS")?;

    let script = wrk::write_script(&topology.work_dir)?;
    let spki = nginx::spki_base64(&topology.rsa_private_key)?;
    let jwks_path = root.join(JWKS_FIXTURE);
    let jwks_json = std::fs::read_to_string(&jwks_path)
        .with_context(|| format!("failed to read {}", jwks_path.display()))?;
    let context = RunContext {
        topology,
        script: &script,
        spki: &spki,
        jwks_json: &jwks_json,
        connections: options.connections,
        duration: Duration::from_secs(duration),
        warmup: Duration::from_secs(warmup),
        ticks_per_second: proc_stats::clock_ticks(),
    };

    let runs = run_rounds(&context, &scenarios, options.rounds)?;
    let idle = if idle_connections == 0 {
        Vec::new()
    } else {
        measure_idle(&context, &scenarios, idle_connections)?
    };

    let summaries = report::summarize(&runs);
    println!("\n{}", report::table(&summaries, &unavailable, &idle));
    println!(
        "agent idle RSS before the load: {:.1} MiB",
        kib_to_mib(idle_rss_kib)
    );
    let results = Results {
        runs: &runs,
        summaries: &summaries,
        unavailable: &unavailable,
        idle: &idle,
    };
    let settings = json!({
        "duration_seconds": duration,
        "warmup_seconds": warmup,
        "connections": options.connections,
        "rounds": options.rounds,
        "quick": options.quick,
        "unique_tokens": UNIQUE_TOKENS,
        "load_cpu": LOAD_CPU,
        "proxy_cpu": PROXY_CPU,
        "agent_idle_rss_kib": idle_rss_kib,
        "agent_worker_threads": options.agent_worker_threads,
        "agent": agent_bin,
        "idle_connections": idle_connections,
    });
    write_results(root, &settings, &results, options.quick)?;

    drop(pod);
    Ok(ExitCode::SUCCESS)
}

/// Everything a run measured.
struct Results<'a> {
    runs: &'a [Run],
    summaries: &'a [report::Summary],
    unavailable: &'a [Unavailable],
    idle: &'a [IdleResult],
}

/// Writes the JSON document and draws the plots; a quick run's plots stay
/// out of docs/, since it is a smoke check.
fn write_results(
    root: &Path,
    settings: &serde_json::Value,
    results: &Results<'_>,
    quick: bool,
) -> anyhow::Result<()> {
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let document = report::document(
        settings,
        &machine(),
        results.runs,
        results.summaries,
        results.unavailable,
        results.idle,
    );
    let path = report::write(root, unix_time, &document)?;
    println!("bench: results in {}", path.display());
    for plot in plot::write_all(root, &document, !quick)? {
        println!("bench: plot {}", plot.display());
    }
    Ok(())
}

/// Redraws the plots from the results file at `path`.
fn redraw(root: &Path, path: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a benchmark results file", path.display()))?;
    for plot in plot::write_all(root, &document, true)? {
        println!("bench: plot {}", plot.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every scenario once per round, in the same order each round, so
/// that drift over time falls on every scenario alike.
fn run_rounds(
    context: &RunContext<'_>,
    scenarios: &[Scenario],
    rounds: u32,
) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for scenario in scenarios {
            println!("bench: round {round}/{rounds}: {}", scenario.name());
            runs.push(run_one(context, *scenario, round)?);
            context.topology.truncate_audit()?;
        }
    }
    Ok(runs)
}

/// Builds the eBPF object, the agent, `bench_pod` and `bench_service`, and
/// returns the paths of the last three; `agent` replaces the fresh agent.
fn build_binaries(
    root: &Path,
    agent: Option<&Path>,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let artifacts = build::run(root, Profile::Release)?;
    let executables = build::cargo_build(
        root,
        Profile::Release,
        &artifacts.ebpf_object,
        &[
            "--package",
            "tokengate-tests",
            "--bin",
            "bench_pod",
            "--bin",
            "bench_service",
        ],
    )?;
    let pod_bin = build::find_executable(&executables, "bench_pod")?;
    let service_bin = build::find_executable(&executables, "bench_service")?;
    let agent_bin = agent.map_or(artifacts.agent, Path::to_path_buf);
    Ok((pod_bin, service_bin, agent_bin))
}

/// Returns the binaries of the last release build, like [`build_binaries`]
/// without building.
fn last_build(root: &Path, agent: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = root.join("target/release");
    let [pod_bin, service_bin, agent_bin] =
        ["bench_pod", "bench_service", "tokengate"].map(|name| dir.join(name));
    for path in [&pod_bin, &service_bin, &agent_bin] {
        if !path.is_file() {
            bail!("{} not found; run without --no-build once", path.display());
        }
    }
    Ok((
        pod_bin,
        service_bin,
        agent.map_or(agent_bin, Path::to_path_buf),
    ))
}

/// Removes the scenarios that cannot run here from `scenarios` and returns
/// them with the reason. The sockmap scenario needs an agent that accepts
/// `interception.sockmap` and then attached the fast path: an agent whose
/// attach failed forwards through the TCP/IP stack, which is the plain
/// tokengate scenario under another name.
fn drop_unavailable(
    scenarios: &mut Vec<Scenario>,
    topology: &Topology,
) -> anyhow::Result<Vec<Unavailable>> {
    let sockmap_reason = match &topology.sockmap {
        Err(reason) => Some(reason.clone()),
        Ok(sockmap) if !pod::sockmap_enabled(sockmap.agent_admin)? => Some(
            "the agent accepts interception.sockmap but did not attach the fast path \
             (tokengate_sockmap_enabled is 0; its warning above gives the cause)"
                .to_owned(),
        ),
        Ok(_) => None,
    };
    let mut unavailable = Vec::new();
    scenarios.retain(|scenario| {
        let reason = match scenario {
            Scenario::TokengateSockmap => sockmap_reason.clone(),
            _ => None,
        };
        match reason {
            Some(reason) => {
                unavailable.push((scenario.name(), reason));
                false
            }
            None => true,
        }
    });
    Ok(unavailable)
}

/// Measures the RSS of idle keep-alive connections for each proxy among
/// `scenarios`: the agent (one RS256 token, so every request is a cache
/// hit), nginx-plain and nginx-njs. httpd is left out: its event MPM with
/// one process serves a few hundred connections, not thousands.
fn measure_idle(
    context: &RunContext<'_>,
    scenarios: &[Scenario],
    count: usize,
) -> anyhow::Result<Vec<IdleResult>> {
    let topology = context.topology;
    let token = std::fs::read_to_string(&topology.token_files("RS256")?.one)
        .context("failed to read the RS256 token file")?;
    let token = token.trim();
    let mut results = Vec::new();

    let agent_scenarios = scenarios
        .iter()
        .any(|scenario| matches!(scenario, Scenario::Tokengate { .. }));
    if agent_scenarios {
        println!("bench: {count} idle connections: tokengate");
        let addr = format!("{}:{}", topology.pod_address, topology.protected_port)
            .parse()
            .context("invalid pod address")?;
        let memory = idle::measure(
            &idle::Target {
                addr,
                path: &topology.path,
                token,
                pids: &[topology.agent_pid],
            },
            count,
            idle::SETTLE_TIME,
        )?;
        results.push(("tokengate".to_owned(), memory));
    }

    for (scenario, mode) in [
        (Scenario::NginxPlain, Mode::Plain),
        (Scenario::NginxNjs, Mode::Njs),
    ] {
        if !scenarios.contains(&scenario) {
            continue;
        }
        println!("bench: {count} idle connections: {}", scenario.name());
        let nginx = start_nginx(context, mode)?;
        let memory = idle_nginx(context, &nginx, token, count)?;
        drop(nginx);
        results.push((scenario.name(), memory));
    }
    Ok(results)
}

fn idle_nginx(
    context: &RunContext<'_>,
    nginx: &Nginx,
    token: &str,
    count: usize,
) -> anyhow::Result<IdleMemory> {
    let topology = context.topology;
    let addr = format!("{}:{NGINX_PORT}", topology.pod_address)
        .parse()
        .context("invalid pod address")?;
    idle::measure(
        &idle::Target {
            addr,
            path: &topology.path,
            token,
            pids: &nginx.pids(),
        },
        count,
        idle::SETTLE_TIME,
    )
}

/// Runs one scenario once: warm-up, then the measured run with the proxy's
/// CPU time, peak RSS and the agent's cache counters around it.
fn run_one(context: &RunContext<'_>, scenario: Scenario, round: u32) -> anyhow::Result<Run> {
    let topology = context.topology;
    let rs256 = topology.token_files("RS256")?;
    let mut nginx = None;
    let mut apache = None;
    let mut address = topology.pod_address.clone();
    let mut admin = None;
    let (port, token_file, proxy_pids) = match scenario {
        Scenario::Direct => (topology.direct_port, rs256.one.clone(), Vec::new()),
        Scenario::Tokengate { alg, mix } => {
            let files = topology.token_files(alg)?;
            let file = match mix {
                Mix::Hit => files.one.clone(),
                Mix::Miss => files.unique.clone(),
            };
            admin = Some(topology.agent_admin);
            (topology.protected_port, file, vec![topology.agent_pid])
        }
        Scenario::TokengateSockmap => {
            let sockmap = topology
                .sockmap
                .as_ref()
                .map_err(|reason| anyhow::anyhow!("no sockmap pod: {reason}"))?;
            address.clone_from(&sockmap.pod_address);
            admin = Some(sockmap.agent_admin);
            (
                sockmap.protected_port,
                rs256.one.clone(),
                vec![sockmap.agent_pid],
            )
        }
        Scenario::NginxNjs | Scenario::NginxPlain => {
            let mode = if scenario == Scenario::NginxNjs {
                Mode::Njs
            } else {
                Mode::Plain
            };
            let started = start_nginx(context, mode)?;
            let pids = started.pids();
            nginx = Some(started);
            (NGINX_PORT, rs256.one.clone(), pids)
        }
        Scenario::ApacheOpenidc => {
            let started = start_apache(context)?;
            let pids = started.pids();
            apache = Some(started);
            (APACHE_PORT, rs256.one.clone(), pids)
        }
    };
    let url = format!("http://{address}:{port}{}", topology.path);
    let mut load = wrk::Load {
        url,
        token_file: &token_file,
        connections: context.connections,
        duration: context.warmup,
        cpu: LOAD_CPU,
    };
    if !context.warmup.is_zero() {
        wrk::run(&load, context.script)?;
    }

    let cache_before = admin.map(pod::cache_counters).transpose()?;
    proc_stats::reset_peak_rss(&proxy_pids)?;
    let cpu_before = proc_stats::cpu_ticks(&proxy_pids)?;

    load.duration = context.duration;
    let result = wrk::run(&load, context.script)?;

    let cpu_after = proc_stats::cpu_ticks(&proxy_pids)?;
    let peak_rss_kib = if proxy_pids.is_empty() {
        None
    } else {
        Some(proc_stats::status_kib(&proxy_pids, "VmHWM")?)
    };
    let cache = match (cache_before, admin) {
        (Some((hits, misses)), Some(admin)) => {
            let (hits_after, misses_after) = pod::cache_counters(admin)?;
            Some((hits_after - hits, misses_after - misses))
        }
        _ => None,
    };
    drop(nginx);
    drop(apache);

    #[expect(
        clippy::cast_precision_loss,
        reason = "tick and request counts are far below 2^52"
    )]
    let cpu_seconds_per_10k = (!proxy_pids.is_empty() && result.requests > 0).then(|| {
        (cpu_after - cpu_before) as f64 / context.ticks_per_second / result.requests as f64
            * 10_000.0
    });
    Ok(Run {
        scenario: scenario.name(),
        round,
        wrk: result,
        cpu_seconds_per_10k,
        peak_rss_kib,
        cache,
    })
}

fn start_apache(context: &RunContext<'_>) -> anyhow::Result<Apache> {
    let topology = context.topology;
    let listen = format!("{}:{APACHE_PORT}", topology.pod_address)
        .parse()
        .context("invalid pod address")?;
    Apache::start(
        &topology.netns,
        listen,
        topology.direct_port,
        PROXY_CPU,
        context.jwks_json,
        &apache::Requirements {
            issuer: &topology.issuer,
            audience: &topology.audience,
            role: &topology.role,
            path_prefix: PROTECTED_PREFIX,
        },
    )
}

fn start_nginx(context: &RunContext<'_>, mode: Mode) -> anyhow::Result<Nginx> {
    let topology = context.topology;
    let listen = format!("{}:{NGINX_PORT}", topology.pod_address)
        .parse()
        .context("invalid pod address")?;
    let dir = topology.work_dir.join(match mode {
        Mode::Njs => "nginx-njs",
        Mode::Plain => "nginx-plain",
    });
    Nginx::start(
        &dir,
        &topology.netns,
        listen,
        topology.direct_port,
        PROXY_CPU,
        mode,
        &VerifierSpec {
            spki_base64: context.spki,
            kid: &topology.rsa_kid,
            issuer: &topology.issuer,
            audience: &topology.audience,
            role: &topology.role,
        },
    )
}

/// Fails unless this runs as root on a machine with at least two CPUs.
fn check_machine() -> anyhow::Result<()> {
    if !workspace::is_root() {
        bail!(
            "the benchmark needs root: it creates network namespaces and loads \
             eBPF programs; run `cargo xtask bench` as root"
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus < 2 {
        bail!("the benchmark pins the proxy and the load generator to two CPUs; this machine has {cpus}");
    }
    Ok(())
}

/// Installs wrk, nginx and its njs module with apt-get when one is missing.
fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    process::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing),
    )
    .context("failed to install the benchmark's Debian packages; install them and retry")
}

/// Pins every thread of the agent to [`PROXY_CPU`]; threads it starts
/// later inherit the mask.
fn pin_agent(pid: u32) -> anyhow::Result<()> {
    let mut command = Command::new("taskset");
    command.args(["-a", "-p", "-c", PROXY_CPU, &pid.to_string()]);
    let mut quiet = command;
    quiet.stdout(std::process::Stdio::null());
    process::run(&mut quiet)
}

/// Returns what identifies the machine: CPU count and model, kernel.
fn machine() -> serde_json::Value {
    let model = process::probe(&mut Command::new("lscpu")).and_then(|text| {
        text.lines()
            .find(|line| line.starts_with("Model name:"))
            .map(|line| line.trim_start_matches("Model name:").trim().to_owned())
    });
    let kernel = process::probe(Command::new("uname").arg("-r")).map(|text| text.trim().to_owned());
    json!({
        "nproc": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "cpu_model": model,
        "kernel": kernel,
    })
}

#[expect(clippy::cast_precision_loss, reason = "RSS in KiB is far below 2^52")]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
