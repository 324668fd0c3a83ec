//! The `tokengate` command: parses the command line, sets up logging and
//! the runtime, and hands over to `tokengate::app`.

mod node_commands;

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Log filter when `RUST_LOG` is unset: lifecycle events, warnings and
/// errors, without a line per request.
const DEFAULT_LOG_FILTER: &str = "info";

/// Per-node agent that verifies the JWT of every request to a protected pod
/// port, after eBPF has steered the connection into it.
#[derive(Parser)]
#[command(name = "tokengate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT. The configuration is
    /// reloaded when the file changes and on SIGHUP.
    Run {
        /// Configuration file (YAML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Parse and check a configuration file, print OK or the problems.
    CheckConfig {
        /// Configuration file (YAML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the decision the agent would make for one request: the reason,
    /// the status, the token's issuer and subject, the rule that matched and
    /// why. The token itself is never printed, only its fingerprint.
    Explain(ExplainArgs),
    /// Print what the agent set up on this node: pods, attached programs,
    /// map fill levels, counters, pins and kernel features. Works without a
    /// running agent, and reads readiness and counters from a running one.
    Status(node_commands::StatusArgs),
    /// Remove every link, pin and map the agent owns under its pin path,
    /// its hand-off socket and its enrolment state. Refuses while an agent
    /// is running unless --force is given.
    Uninstall(node_commands::UninstallArgs),
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Workload to decide for; may be left out when only one is configured.
    #[arg(long, value_name = "NAME")]
    workload: Option<String>,
    /// The token, or `-` to read it from standard input so that it does not
    /// land in the shell history. Placed where the workload reads tokens.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Request method.
    #[arg(long, value_name = "METHOD", default_value = "GET")]
    method: String,
    /// Request path, with or without the query.
    #[arg(long, value_name = "PATH")]
    path: String,
    /// A further request header, as 'Name: value'; may be repeated.
    #[arg(long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// JWKS file used for every issuer in place of fetching keys.
    #[arg(long, value_name = "FILE")]
    jwks: Option<PathBuf>,
    /// Time of the decision in Unix seconds; the current time when absent.
    #[arg(long, value_name = "UNIX")]
    now: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();

    match cli.command {
        Command::CheckConfig { file } => match tokengate::config::load(&file) {
            Ok(config) => {
                println!("OK: {}", summary(&config));
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {:#}", anyhow::Error::from(error));
                ExitCode::FAILURE
            }
        },
        Command::Explain(args) => match explain(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Status(args) => finish(node_commands::status(&args)),
        Command::Uninstall(args) => finish(node_commands::uninstall(&args)),
        Command::Run { config } => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "tokengate failed");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prints the error of a one-shot command and returns the exit code.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the tokio runtime")?;
    runtime.block_on(tokengate::app::run(path))
}

/// Describes a valid configuration in one line: issuers, and workloads with
/// their ports and rule counts.
fn summary(config: &tokengate::config::Config) -> String {
    let issuers: Vec<&str> = config
        .issuers
        .iter()
        .map(|issuer| issuer.issuer.as_str())
        .collect();
    let workloads: Vec<String> = config
        .workloads
        .iter()
        .map(|workload| {
            let ports: Vec<String> = workload.ports.iter().map(u16::to_string).collect();
            format!(
                "{} (ports {}, {} rules)",
                workload.name,
                ports.join(","),
                workload.rules.len()
            )
        })
        .collect();
    let selectors: Vec<&str> = config
        .enrollment
        .iter()
        .flat_map(|enrollment| &enrollment.selectors)
        .map(|selector| selector.name.as_str())
        .collect();
    format!(
        "{} issuer(s) [{}], {} workload(s) [{}], {} pod selector(s) [{}]",
        issuers.len(),
        issuers.join(", "),
        workloads.len(),
        workloads.join(", "),
        selectors.len(),
        selectors.join(", ")
    )
}

fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let config = tokengate::config::load(&args.config)?;
    let token = match args.token.as_deref() {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("while reading the token from standard input")?;
            Some(text.trim().to_owned())
        }
        Some(token) => Some(token.to_owned()),
        None => None,
    };
    let request = tokengate::explain::ExplainRequest {
        workload: args.workload,
        token,
        method: args.method,
        path: args.path,
        headers: args.headers,
        jwks_file: args.jwks,
        now_unix: args.now,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("while starting the tokio runtime")?;
    let explanation = runtime.block_on(tokengate::explain::explain(&config, &request))?;
    print!("{explanation}");
    Ok(())
}

/// Logs to standard error (standard output carries audit events), filtered
/// by `RUST_LOG`. `log` records of dependencies go through the same
/// subscriber; the eBPF programs' records arrive at debug level under the
/// target `tokengate::ebpf`.
fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
