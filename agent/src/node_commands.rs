//! The `status` and `uninstall` commands of the `tokengate` binary: they
//! read or remove what an agent left on this node.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokengate::config::{Config, InterceptionConfig};

/// Arguments of `tokengate status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Configuration file of the agent (YAML); the default pin path and
    /// hand-off socket when absent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `tokengate uninstall`.
#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Configuration file of the agent (YAML): its pin path, hand-off
    /// socket and enrolment state are removed.
    #[arg(long, value_name = "FILE", conflicts_with = "pin_path")]
    config: Option<PathBuf>,
    /// Pin directory in bpffs to remove, with the hand-off socket derived
    /// from it; /sys/fs/bpf/tokengate when neither this nor --config is
    /// given.
    #[arg(long, value_name = "DIR")]
    pin_path: Option<PathBuf>,
    /// Remove everything even while an agent is running.
    #[arg(long)]
    force: bool,
}

/// Prints the status of the agent and its pins.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let interception = match &args.config {
        Some(path) => load(path)?.interception,
        None => InterceptionConfig::default(),
    };
    let status = tokengate::status::collect(&interception);
    if args.json {
        let text = serde_json::to_string_pretty(&status).context("while encoding the status")?;
        println!("{text}");
    } else {
        print!("{}", tokengate::status::render_text(&status));
    }
    Ok(())
}

/// Removes the agent's pins and state and prints what was removed.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let target = match (&args.config, &args.pin_path) {
        (Some(path), _) => tokengate::uninstall::Target::from_config(&load(path)?),
        (None, Some(pin_path)) => tokengate::uninstall::Target::from_pin_path(pin_path),
        (None, None) => tokengate::uninstall::Target::from_pin_path(Path::new(
            tokengate::config::DEFAULT_PIN_PATH,
        )),
    };
    let report = tokengate::uninstall::uninstall(&target, args.force)?;
    if report.is_empty() {
        println!("nothing to remove under {}", target.pin_path.display());
        return Ok(());
    }
    let pins = &report.pins;
    println!(
        "removed {} links, {} maps, {} programs, {} other pins and {} directories under {}",
        pins.links,
        pins.maps,
        pins.programs,
        pins.other,
        pins.dirs,
        target.pin_path.display()
    );
    for file in &report.files {
        println!("removed {}", file.display());
    }
    Ok(())
}

fn load(path: &Path) -> anyhow::Result<Config> {
    tokengate::config::load(path).with_context(|| format!("while loading {}", path.display()))
}
