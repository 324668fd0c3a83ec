//! `cargo xtask bench`: throughput, latency, CPU and memory of tokengate
//! next to the direct path and nginx sidecars, on one pod topology, as root.
//!
//! `bench_pod` (tests crate) sets up a pod namespace on a bridge with
//! `bench_service` on a protected and an unprotected port, the issuer and the
//! agent. This command then runs wrk against each scenario in interleaved
//! rounds (A B A B, so drift over time falls on every scenario alike), with
//! the proxy pinned to one CPU and wrk and the service to the other. It
//! prints a table and writes JSON under `target/bench/`. Traffic goes only
//! to the pod's 198.18.0.0/15 address and the agent's loopback admin port.

mod nginx;
mod pod;
mod proc_stats;
mod report;
mod scenario;
mod wrk;

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::json;

use crate::build::{self, Profile};
use crate::{process, workspace};
use nginx::{Mode, Nginx, VerifierSpec, NGINX_PORT, NJS_MODULE};
use pod::{Pod, PodSettings, Topology};
use report::Run;
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
const PACKAGES: [(&str, &str); 3] = [
    ("wrk", "/usr/bin/wrk"),
    ("nginx", "/usr/sbin/nginx"),
    ("libnginx-mod-http-js", NJS_MODULE),
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
    /// Short smoke run: 2 s measured and 1 s warm-up per run.
    #[arg(long)]
    quick: bool,
}

/// Setup results that every run needs.
struct RunContext<'a> {
    topology: &'a Topology,
    script: &'a Path,
    spki: &'a str,
    connections: u32,
    duration: Duration,
    warmup: Duration,
    ticks_per_second: f64,
}

/// Runs the benchmark and prints the table.
pub fn run(root: &Path, options: &Options) -> anyhow::Result<ExitCode> {
    let (duration, warmup) = if options.quick {
        (QUICK_DURATION_SECONDS, QUICK_WARMUP_SECONDS)
    } else {
        (options.duration, options.warmup)
    };
    if duration == 0 || options.rounds == 0 || options.connections == 0 {
        bail!("--duration, --rounds and --connections must be at least 1");
    }
    let scenarios = scenario::select(&options.scenarios)?;
    check_machine()?;
    install_packages()?;

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

    let runs_total = u64::from(options.rounds) * scenarios.len() as u64;
    let planned_seconds = runs_total * (duration + warmup + 2);
    let pod = Pod::start(&PodSettings {
        pod_bin: &pod_bin,
        agent_bin: &artifacts.agent,
        service_bin: &service_bin,
        service_cpu: LOAD_CPU,
        unique_tokens: UNIQUE_TOKENS,
        token_lifetime_seconds: planned_seconds + TOKEN_LIFETIME_MARGIN_SECONDS,
    })?;
    let topology = &pod.topology;
    pin_agent(topology.agent_pid)?;
    let idle_rss_kib = proc_stats::status_kib(&[topology.agent_pid], "VmRSS")?;

    let script = wrk::write_script(&topology.work_dir)?;
    let spki = nginx::spki_base64(&topology.rsa_private_key)?;
    let context = RunContext {
        topology,
        script: &script,
        spki: &spki,
        connections: options.connections,
        duration: Duration::from_secs(duration),
        warmup: Duration::from_secs(warmup),
        ticks_per_second: proc_stats::clock_ticks(),
    };

    let mut runs = Vec::new();
    for round in 1..=options.rounds {
        for scenario in &scenarios {
            println!(
                "bench: round {round}/{}: {}",
                options.rounds,
                scenario.name()
            );
            runs.push(run_one(&context, *scenario, round)?);
            topology.truncate_audit()?;
        }
    }

    let summaries = report::summarize(&runs);
    println!("\n{}", report::table(&summaries));
    println!(
        "agent idle RSS before the load: {:.1} MiB",
        kib_to_mib(idle_rss_kib)
    );

    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
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
    });
    let document = report::document(&settings, &machine(), &runs, &summaries);
    let path = report::write(root, unix_time, &document)?;
    println!("bench: results in {}", path.display());

    drop(pod);
    Ok(ExitCode::SUCCESS)
}

/// Runs one scenario once: warm-up, then the measured run with the proxy's
/// CPU time, peak RSS and the agent's cache counters around it.
fn run_one(context: &RunContext<'_>, scenario: Scenario, round: u32) -> anyhow::Result<Run> {
    let topology = context.topology;
    let rs256 = topology.token_files("RS256")?;
    let mut nginx = None;
    let (port, token_file, proxy_pids) = match scenario {
        Scenario::Direct => (topology.direct_port, rs256.one.clone(), Vec::new()),
        Scenario::Tokengate { alg, mix } => {
            let files = topology.token_files(alg)?;
            let file = match mix {
                Mix::Hit => files.one.clone(),
                Mix::Miss => files.unique.clone(),
            };
            (topology.protected_port, file, vec![topology.agent_pid])
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
    };
    let url = format!("http://{}:{port}{}", topology.pod_address, topology.path);
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

    let is_agent = matches!(scenario, Scenario::Tokengate { .. });
    let cache_before = if is_agent {
        Some(topology.cache_counters()?)
    } else {
        None
    };
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
    let cache = match cache_before {
        Some((hits, misses)) => {
            let (hits_after, misses_after) = topology.cache_counters()?;
            Some((hits_after - hits, misses_after - misses))
        }
        None => None,
    };
    drop(nginx);

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
