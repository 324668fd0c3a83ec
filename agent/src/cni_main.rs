//! The `tokengate-cni` command. Without arguments the container runtime
//! runs it as a chained CNI plugin (see `tokengate::cni::plugin`); with
//! `install` or `uninstall` it sets itself up on a node.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokengate::cni::install::{self, InstallOptions};
use tokengate::cni::plugin::{self, DEFAULT_TIMEOUT_SECONDS};
use tokengate::cni::protocol::MAX_MESSAGE_BYTES;
use tokengate::config::DEFAULT_CNI_SOCKET;

/// Namespace excluded when `install` gets no `--exclude-namespace`: the
/// cluster's own DNS and network pods run there and must start before any
/// tokengate agent can.
const DEFAULT_EXCLUDED_NAMESPACE: &str = "kube-system";

/// Sets up the tokengate chained CNI plugin on a node.
#[derive(Parser)]
#[command(name = "tokengate-cni", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy this binary into the CNI binary directory and chain it as the
    /// last plugin of the primary conflist.
    Install {
        /// CNI binary directory of the node.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// CNI configuration directory of the node.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's socket (`enrollment.socket`).
        #[arg(long, default_value = DEFAULT_CNI_SOCKET)]
        agent_socket: PathBuf,
        /// Namespace whose pods start without asking the agent; may be
        /// repeated. Defaults to kube-system.
        #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
        exclude_namespaces: Vec<String>,
        /// Time the plugin waits for the agent, in seconds.
        #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECONDS)]
        timeout_seconds: u64,
        /// Check again every this many seconds and chain the entry again
        /// when the network plugin rewrote its conflist; runs until killed.
        #[arg(long, value_name = "SECONDS")]
        watch_seconds: Option<u64>,
    },
    /// Remove the entry from the primary conflist and the binary.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        return manage(Cli::parse().command);
    }
    run_plugin()
}

/// Runs one CNI invocation as the runtime started it.
fn run_plugin() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();

    let mut stdin = Vec::new();
    if env("CNI_COMMAND").as_deref() != Some("VERSION") {
        let limit = u64::try_from(MAX_MESSAGE_BYTES).unwrap_or(u64::MAX);
        if let Err(error) = std::io::stdin().take(limit).read_to_end(&mut stdin) {
            eprintln!("tokengate-cni: failed to read the network configuration: {error}");
        }
    }

    let output = plugin::run(&env, &stdin);

    for line in &output.stderr {
        eprintln!("{line}");
    }
    if let Some(text) = &output.stdout {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::from(output.exit_code)
}

fn manage(command: Command) -> ExitCode {
    match command {
        Command::Install {
            bin_dir,
            conf_dir,
            agent_socket,
            mut exclude_namespaces,
            timeout_seconds,
            watch_seconds,
        } => {
            if exclude_namespaces.is_empty() {
                exclude_namespaces.push(DEFAULT_EXCLUDED_NAMESPACE.to_owned());
            }
            let source_binary = match std::env::current_exe() {
                Ok(path) => path,
                Err(error) => {
                    eprintln!("error: failed to find this executable: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let options = InstallOptions {
                source_binary,
                bin_dir,
                conf_dir,
                agent_socket,
                exclude_namespaces,
                timeout_seconds,
            };
            loop {
                match install::install(&options) {
                    Ok((path, true)) => println!("chained into {}", path.display()),
                    Ok((path, false)) => {
                        if watch_seconds.is_none() {
                            println!("already chained in {}", path.display());
                        }
                    }
                    Err(error) => {
                        eprintln!("error: {:#}", anyhow::Error::from(error));
                        if watch_seconds.is_none() {
                            return ExitCode::FAILURE;
                        }
                    }
                }
                let Some(seconds) = watch_seconds else {
                    return ExitCode::SUCCESS;
                };
                std::thread::sleep(Duration::from_secs(seconds.max(1)));
            }
        }
        Command::Uninstall { bin_dir, conf_dir } => match install::uninstall(&bin_dir, &conf_dir) {
            Ok(Some(path)) => {
                println!("removed from {}", path.display());
                ExitCode::SUCCESS
            }
            Ok(None) => {
                println!("not chained in {}", conf_dir.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {:#}", anyhow::Error::from(error));
                ExitCode::FAILURE
            }
        },
    }
}
