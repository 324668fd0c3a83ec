//! `cargo xtask run -- ARGS`: builds the agent and runs it with ARGS.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::build::{self, Profile};
use crate::process;

/// Builds the agent in release and replaces this process with it, so the
/// agent receives signals such as Ctrl-C directly and its exit status is the
/// command's.
pub fn run(root: &Path, args: &[OsString]) -> anyhow::Result<ExitCode> {
    let artifacts = build::run(root, Profile::Release)?;

    let mut command = Command::new(&artifacts.agent);
    command.args(args);
    println!("+ {}", process::describe(&command));
    let error = command.exec();
    Err(error).with_context(|| format!("failed to start {}", artifacts.agent.display()))
}
