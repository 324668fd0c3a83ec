//! Copies the eBPF object into `OUT_DIR` so that the agent embeds it and one
//! binary is all that ships.
//!
//! The object comes from `TOKENGATE_EBPF_OBJECT` when set (a relative path is
//! taken from the workspace root), else from the release build of the
//! `agent-ebpf` workspace. This script does not build the object itself: that
//! needs another target and linker, which `cargo xtask build` sets up.

use std::env;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Environment variable naming a prebuilt eBPF object.
const OBJECT_ENV: &str = "TOKENGATE_EBPF_OBJECT";

/// Path of the object that `cargo xtask build` leaves, relative to the
/// workspace root.
const DEFAULT_OBJECT: &str = "agent-ebpf/target/bpfel-unknown-none/release/tokengate-ebpf";

/// File name of the copy in `OUT_DIR` that `bpf.rs` includes.
const EMBEDDED_NAME: &str = "tokengate-ebpf.o";

/// Further objects of the `agent-ebpf` crate, taken from the directory of the
/// main object and copied to `OUT_DIR/<name>.o`.
const OBJECTS: &[&str] = &["tokengate-egress", "tokengate-sockmap"];

fn main() -> ExitCode {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir
        .parent()
        .expect("the agent crate lives inside the workspace");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo::rerun-if-env-changed={OBJECT_ENV}");
    let object = object_path(workspace_root);
    println!("cargo::rerun-if-changed={}", object.display());

    if !object.is_file() {
        eprintln!(
            "error: eBPF object {} not found; run `cargo xtask build`, which builds the eBPF \
             object before the agent, or set {OBJECT_ENV} to a prebuilt object",
            object.display()
        );
        return ExitCode::FAILURE;
    }

    let embedded = out_dir.join(EMBEDDED_NAME);
    if let Err(error) = std::fs::copy(&object, &embedded) {
        eprintln!(
            "error: failed to copy eBPF object {} to {}: {error}",
            object.display(),
            embedded.display()
        );
        return ExitCode::FAILURE;
    }

    let object_dir = object.parent().unwrap_or(workspace_root);
    for name in OBJECTS {
        let source = object_dir.join(name);
        println!("cargo::rerun-if-changed={}", source.display());
        if let Err(error) = std::fs::copy(&source, out_dir.join(format!("{name}.o"))) {
            eprintln!(
                "error: failed to copy eBPF object {}: {error}; run `cargo xtask build`, which builds every object",
                source.display()
            );
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn object_path(workspace_root: &Path) -> PathBuf {
    match env::var_os(OBJECT_ENV) {
        Some(path) if !path.is_empty() => workspace_root.join(path),
        _ => workspace_root.join(DEFAULT_OBJECT),
    }
}
