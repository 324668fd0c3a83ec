//! bpf-linker: the linker that turns rustc's LLVM bitcode into a BPF object.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{process, workspace};

/// Folder of Debian's LLVM 22 tools. bpf-linker's build finds LLVM through
/// it, and the eBPF build puts it first on `PATH`.
const LLVM_BIN_DIR: &str = "/usr/lib/llvm-22/bin";

/// Install prefix of Debian's LLVM 22, for bpf-linker's build.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// bpf-linker release to install. 0.13.0 has the `llvm-22` feature that
/// links against Debian's LLVM 22, while its default feature wants LLVM 23,
/// which Debian 12 does not ship. Pinned so that a new release cannot change
/// the features under a CI run.
const LINKER_VERSION: &str = "0.13.0";

/// Arguments of `cargo` that install bpf-linker against LLVM 22.
const INSTALL_ARGS: [&str; 7] = [
    "install",
    "bpf-linker",
    "--version",
    LINKER_VERSION,
    "--no-default-features",
    "--features",
    "llvm-22",
];

/// Returns the output of `bpf-linker --version` with the `PATH` that the
/// eBPF build uses, or `None` when it is missing or cannot run (for example
/// when the LLVM library it was linked against is gone).
pub fn installed_version() -> Option<String> {
    let output = process::probe(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", build_path()),
    )?;
    Some(output.trim().to_owned())
}

/// Returns the path of a working bpf-linker in `cargo install`'s folder,
/// for the case where that folder is not on `PATH`.
pub fn installed_off_path() -> Option<PathBuf> {
    let path = install_dir().join("bpf-linker");
    process::probe(
        Command::new(&path)
            .arg("--version")
            .env("PATH", build_path()),
    )?;
    Some(path)
}

/// Builds and installs bpf-linker from crates.io against Debian's LLVM 22.
pub fn install() -> anyhow::Result<()> {
    process::run(
        Command::new(workspace::cargo())
            .env("PATH", build_path())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(INSTALL_ARGS),
    )
}

/// Returns the install command as the user would type it in a shell.
pub fn install_command_line() -> String {
    format!(
        "PATH={LLVM_BIN_DIR}:$PATH LLVM_PREFIX={LLVM_PREFIX} cargo {}",
        INSTALL_ARGS.join(" ")
    )
}

/// Returns the folder where `cargo install` puts binaries.
pub fn install_dir() -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    cargo_home.join("bin")
}

fn build_path() -> OsString {
    workspace::path_with(Path::new(LLVM_BIN_DIR))
}
