//! `cargo xtask demo`: the end-to-end demo on one node, as root.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

use crate::build::{self, Profile};
use crate::{process, setup, workspace};

/// Binary of the tests crate that runs the demo.
const DEMO_BIN: &str = "tokengate-demo";

/// Echo service that the demo runs inside the pod namespace. The demo finds
/// it next to its own binary.
const ECHO_BIN: &str = "tg-echo";

/// Variable that gives the demo the agent binary to run.
pub const AGENT_BIN_ENV: &str = "TOKENGATE_BIN";

/// Runs setup and the builds, then replaces this process with the demo, so
/// the demo's exit status is the command's and Ctrl-C reaches it directly.
pub fn run(root: &Path) -> anyhow::Result<ExitCode> {
    if !workspace::is_root() {
        bail!(
            "the demo needs root: it creates network namespaces and veth \
             pairs and loads eBPF programs; run `cargo xtask demo` as root"
        );
    }

    setup::run()?;
    let artifacts = build::run(root, Profile::Release)?;
    println!("demo: building {DEMO_BIN} and {ECHO_BIN}");
    let executables = build::cargo_build(
        root,
        Profile::Release,
        &artifacts.ebpf_object,
        &[
            "--package",
            "tokengate-tests",
            "--bin",
            DEMO_BIN,
            "--bin",
            ECHO_BIN,
        ],
    )?;
    let demo = build::find_executable(&executables, DEMO_BIN)?;

    let mut command = Command::new(&demo);
    command.env(AGENT_BIN_ENV, &artifacts.agent);
    println!("+ {}", process::describe(&command));
    let error = command.exec();
    Err(error).with_context(|| format!("failed to start {}", demo.display()))
}
