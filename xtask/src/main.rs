//! Developer tasks for tokengate, run as `cargo xtask COMMAND`.
//!
//! Each command lives in its own module, and this file only parses the
//! command line and dispatches. Commands print every external command they run.

mod bench;
mod build;
mod demo;
mod ebpf;
mod process;
mod run;
mod setup;
mod test;
mod workspace;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::build::Profile;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and demo tokengate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing to build and test: Debian packages and
    /// bpf-linker. Changes nothing when everything is present.
    Setup,
    /// Build the eBPF object, then the agent that embeds it, and print the
    /// agent binary's path.
    Build {
        /// Build both in the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run setup and build, then the end-to-end demo (needs root).
    Demo,
    /// Run setup and build, then every test of the workspace in release,
    /// and print what ran, what failed and what was skipped.
    Test {
        /// Arguments for the test binaries, such as a name filter.
        #[arg(last = true)]
        test_args: Vec<OsString>,
    },
    /// Benchmark tokengate against the direct path and nginx sidecars (needs root).
    Bench(bench::Options),
    /// Build the agent in release and run it: `cargo xtask run -- ARGS`.
    Run {
        /// Arguments for the agent, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = workspace::root();
    match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Build { debug } => {
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            let artifacts = build::run(&root, profile)?;
            println!("{}", artifacts.agent.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo::run(&root),
        Command::Test { test_args } => test::run(&root, &test_args),
        Command::Run { args } => run::run(&root, &args),
        Command::Bench(options) => bench::run(&root, &options),
    }
}
