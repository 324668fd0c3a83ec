//! The `tokengate` command: parses the command line, sets up logging and
//! the runtime, and hands over to `tokengate::app`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
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
    /// Run the agent until SIGTERM or SIGINT.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();

    match cli.command {
        Command::CheckConfig { file } => match tokengate::config::load(&file) {
            Ok(_) => {
                println!("OK");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {:#}", anyhow::Error::from(error));
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => match run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "tokengate failed");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = tokengate::config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the tokio runtime")?;
    runtime.block_on(tokengate::app::run(config))
}

/// Logs to standard error (standard output carries audit events), filtered
/// by `RUST_LOG`. `log` records, such as aya-log's messages from the eBPF
/// program, go through the same subscriber.
fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
