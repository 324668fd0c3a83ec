//! `cargo xtask build`: the eBPF object first, then the agent that embeds it.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{ebpf, process, workspace};

/// Environment variable with the eBPF object's path, which the agent's build
/// embeds.
pub const EBPF_OBJECT_ENV: &str = "TOKENGATE_EBPF_OBJECT";

/// Cargo profile of a build.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl fmt::Display for Profile {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Release => "release",
            Self::Debug => "debug",
        })
    }
}

/// Files that `build` produced.
pub struct Artifacts {
    /// The BPF ELF object that the agent embeds.
    pub ebpf_object: PathBuf,
    /// The agent binary, the one file to ship.
    pub agent: PathBuf,
}

/// An executable that cargo built.
pub struct Executable {
    /// Name of the cargo target, such as `tokengate`.
    pub name: String,
    pub path: PathBuf,
}

/// Builds the eBPF object, then the agent with that object embedded.
pub fn run(root: &Path, profile: Profile) -> anyhow::Result<Artifacts> {
    println!("build: eBPF object ({profile})");
    let object = ebpf::build_ebpf(root, profile == Profile::Release)
        .context("failed to build the eBPF object")?;
    let ebpf_object = root.join(object);
    println!("build: eBPF object: {}", ebpf_object.display());

    println!("build: agent ({profile})");
    let executables = cargo_build(root, profile, &ebpf_object, &["--package", "tokengate"])?;
    let agent = find_executable(&executables, "tokengate")?;
    println!("build: agent: {}", agent.display());

    Ok(Artifacts { ebpf_object, agent })
}

/// Runs `cargo build` with `args` in `profile`, with the eBPF object's path
/// in the environment, and returns the executables it built.
///
/// Cargo reports each artifact as JSON on standard output, with the
/// binary's path wherever the target folder is. Its progress and diagnostics
/// still go to standard error.
pub fn cargo_build(
    root: &Path,
    profile: Profile,
    ebpf_object: &Path,
    args: &[&str],
) -> anyhow::Result<Vec<Executable>> {
    let mut command = Command::new(workspace::cargo());
    command
        .current_dir(root)
        .env(EBPF_OBJECT_ENV, ebpf_object)
        .args(["build", "--message-format=json-render-diagnostics"])
        .args(args);
    if profile == Profile::Release {
        command.arg("--release");
    }
    let line = process::describe(&command);
    println!("+ {line}");

    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut executables = Vec::new();
    for message in BufReader::new(stdout).lines() {
        let message = message.with_context(|| format!("failed to read the output of `{line}`"))?;
        if let Some(executable) = parse_executable(&message) {
            executables.push(executable);
        }
    }

    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(executables)
}

/// Returns the path of the executable named `name`.
pub fn find_executable(executables: &[Executable], name: &str) -> anyhow::Result<PathBuf> {
    executables
        .iter()
        .find(|executable| executable.name == name)
        .map(|executable| executable.path.clone())
        .with_context(|| format!("cargo reported no executable named `{name}`"))
}

/// Parses one line of cargo's JSON output. Returns the executable that a
/// `compiler-artifact` message names, or `None` for every other line.
fn parse_executable(message: &str) -> Option<Executable> {
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    if value["reason"] != "compiler-artifact" {
        return None;
    }

    let path = value["executable"].as_str()?;
    let name = value["target"]["name"].as_str()?;
    Some(Executable {
        name: name.to_owned(),
        path: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_with_executable_parsed() {
        let message = r#"{"reason":"compiler-artifact","target":{"name":"tokengate","kind":["bin"]},"executable":"/w/target/release/tokengate","fresh":true}"#;

        let executable = parse_executable(message).expect("an executable");

        assert_eq!(executable.name, "tokengate");
        assert_eq!(executable.path, Path::new("/w/target/release/tokengate"));
    }

    #[test]
    fn library_artifact_ignored() {
        let message = r#"{"reason":"compiler-artifact","target":{"name":"tokengate","kind":["lib"]},"executable":null}"#;

        assert!(parse_executable(message).is_none());
    }

    #[test]
    fn other_messages_ignored() {
        assert!(parse_executable(r#"{"reason":"build-finished","success":true}"#).is_none());
        assert!(parse_executable("not json").is_none());
    }
}
