//! Builds the eBPF object from the `agent-ebpf` workspace.
//!
//! The program builds for `bpfel-unknown-none`, which has no `core` in
//! rustup's stable toolchains. Two routes provide one:
//!
//! - Debian: `rustc-web` installs a rustc at `/usr/bin/rustc`, and
//!   `libstd-rust-web-dev-bpf` a prebuilt `core` for the target under
//!   `/usr/lib/rustlib/bpfel-unknown-none`. Cargo runs with
//!   `RUSTC=/usr/bin/rustc` and `RUSTC_BOOTSTRAP=1`, because aya-ebpf enables
//!   the unstable `asm_experimental_arch` feature on BPF targets.
//! - Upstream: a rustup nightly with the `rust-src` component
//!   (`rustup toolchain install nightly --component rust-src`) builds `core`
//!   itself: `rustup run nightly cargo build --target bpfel-unknown-none
//!   -Z build-std=core`.
//!
//! Both link with `bpf-linker` (set in `agent-ebpf/.cargo/config.toml`),
//! which must be on `PATH`. On Debian it is built against LLVM 22, so the
//! build puts `/usr/lib/llvm-22/bin` first on `PATH`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Directory of the eBPF workspace, relative to the workspace root.
const EBPF_DIR: &str = "agent-ebpf";

/// Name of the program crate's binary, which is the object file.
const OBJECT_NAME: &str = "tokengate-ebpf";

/// Target triple of the object (little-endian BPF, as on x86-64 and arm64).
const TARGET: &str = "bpfel-unknown-none";

/// rustc of Debian's `rustc-web` package.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

/// Prebuilt `core` for the target from `libstd-rust-web-dev-bpf`.
const DEBIAN_TARGET_LIBS: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

/// LLVM tools that Debian's bpf-linker build expects on `PATH`.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The rustup toolchain of the upstream route.
const NIGHTLY: &str = "nightly";

/// Environment variable that forces a route: `debian` or `upstream`.
pub const ROUTE_ENV: &str = "TOKENGATE_EBPF_ROUTE";

/// Variables of the calling cargo that must not reach the eBPF build: host
/// compiler flags, another target directory (the object would not be where
/// the agent's build script looks) or toolchain.
const INHERITED_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
];

/// The toolchain that builds the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Debian's rustc with its prebuilt `core` for the target.
    Debian,
    /// A rustup nightly with `rust-src`, building `core` with build-std.
    Upstream,
}

/// Returns where a release build leaves the object, the path the agent's
/// build script embeds by default.
pub fn object_path(workspace_root: &Path) -> PathBuf {
    profile_object_path(workspace_root, true)
}

/// Builds the eBPF object and returns its path.
///
/// A debug build (`release == false`) lands under `.../debug/`, which the
/// agent's build script does not read by default: pass the returned path in
/// `TOKENGATE_EBPF_OBJECT` to the agent's build.
pub fn build_ebpf(workspace_root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let route = detect_route()?;
    check_linker()?;

    let mut command = match route {
        Route::Debian => {
            let mut command =
                Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
            command.args(["build", "--target", TARGET]);
            command
                .env("RUSTC", DEBIAN_RUSTC)
                .env("RUSTC_BOOTSTRAP", "1");
            command
        }
        Route::Upstream => {
            let mut command = Command::new("rustup");
            command.args([
                "run",
                NIGHTLY,
                "cargo",
                "build",
                "--target",
                TARGET,
                "-Z",
                "build-std=core",
            ]);
            command
        }
    };
    if release {
        command.arg("--release");
    }
    for var in INHERITED_VARS {
        if !(route == Route::Debian && *var == "RUSTC") {
            command.env_remove(var);
        }
    }
    command
        .env("PATH", path_with_llvm())
        .current_dir(workspace_root.join(EBPF_DIR));

    println!("ebpf: building with the {} route", route.name());
    let status = command
        .status()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !status.success() {
        bail!("eBPF build failed ({status}); the compiler output is above");
    }

    let object = if release {
        object_path(workspace_root)
    } else {
        profile_object_path(workspace_root, false)
    };
    if !object.is_file() {
        bail!(
            "eBPF build succeeded but left no object at {}",
            object.display()
        );
    }
    Ok(object)
}

/// Picks the route: the one named in [`ROUTE_ENV`], else Debian's when its
/// files are present, else the upstream one when rustup has a nightly with
/// `rust-src`.
pub fn detect_route() -> anyhow::Result<Route> {
    if let Some(value) = env::var_os(ROUTE_ENV) {
        let route = parse_route(&value.to_string_lossy())?;
        let missing = match route {
            Route::Debian => missing_debian(),
            Route::Upstream => missing_upstream(),
        };
        if let Some(missing) = missing {
            bail!(
                "{ROUTE_ENV} selects the {} route, but {missing}",
                route.name()
            );
        }
        return Ok(route);
    }

    let Some(debian_missing) = missing_debian() else {
        return Ok(Route::Debian);
    };
    let Some(upstream_missing) = missing_upstream() else {
        return Ok(Route::Upstream);
    };
    bail!(
        "no toolchain can build the eBPF object for {TARGET}.\n\
         Debian route: {debian_missing}.\n\
         Upstream route: {upstream_missing}.\n\
         `cargo xtask setup` installs the Debian route."
    )
}

/// Reads a route name as [`ROUTE_ENV`] takes it.
fn parse_route(value: &str) -> anyhow::Result<Route> {
    match value {
        "debian" => Ok(Route::Debian),
        "upstream" => Ok(Route::Upstream),
        other => bail!("invalid {ROUTE_ENV} value {other:?}; use `debian` or `upstream`"),
    }
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Self::Debian => "Debian",
            Self::Upstream => "upstream",
        }
    }
}

fn profile_object_path(workspace_root: &Path, release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace_root
        .join(EBPF_DIR)
        .join("target")
        .join(TARGET)
        .join(profile)
        .join(OBJECT_NAME)
}

/// Describes what the Debian route lacks, with the command that installs
/// it, or returns `None` when nothing is missing.
fn missing_debian() -> Option<String> {
    if !Path::new(DEBIAN_RUSTC).is_file() {
        return Some(format!(
            "{DEBIAN_RUSTC} is missing; install it with `apt-get install rustc-web`"
        ));
    }
    let has_core = std::fs::read_dir(DEBIAN_TARGET_LIBS).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|entry| entry.file_name().to_string_lossy().starts_with("libcore-"))
    });
    if !has_core {
        return Some(format!(
            "no prebuilt core in {DEBIAN_TARGET_LIBS}; install it with `apt-get install libstd-rust-web-dev-bpf`"
        ));
    }
    None
}

/// Describes what the upstream route lacks, with the command that installs
/// it, or returns `None` when nothing is missing.
fn missing_upstream() -> Option<String> {
    let install = format!("`rustup toolchain install {NIGHTLY} --component rust-src`");
    let output = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    let sysroot = match output {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(_) => {
            return Some(format!(
                "rustup has no {NIGHTLY} toolchain; install it with {install}"
            ))
        }
        Err(_) => {
            return Some(format!(
                "rustup is not on PATH; install rustup, then run {install}"
            ))
        }
    };
    let core_source = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core_source.is_file() {
        return Some(format!(
            "the {NIGHTLY} toolchain lacks rust-src; add it with `rustup component add rust-src --toolchain {NIGHTLY}`"
        ));
    }
    None
}

/// Fails with the install command when `bpf-linker` cannot run.
fn check_linker() -> anyhow::Result<()> {
    match Command::new("bpf-linker").arg("--version").env("PATH", path_with_llvm()).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => bail!(
            "bpf-linker --version failed ({}): {}; reinstall it with `cargo xtask setup`",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(_) => bail!(
            "bpf-linker is not on PATH; `cargo xtask setup` installs it (with LLVM 22 from Debian), \
             or run `cargo install bpf-linker` and add ~/.cargo/bin to PATH"
        ),
    }
}

/// `PATH` with [`LLVM_BIN`] first when that directory exists.
fn path_with_llvm() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    if !Path::new(LLVM_BIN).is_dir() {
        return current;
    }
    let mut paths = vec![PathBuf::from(LLVM_BIN)];
    paths.extend(env::split_paths(&current));
    env::join_paths(paths).unwrap_or(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_path_is_release_build() {
        let path = object_path(Path::new("/repo"));

        assert_eq!(
            path,
            Path::new("/repo/agent-ebpf/target/bpfel-unknown-none/release/tokengate-ebpf")
        );
    }

    #[test]
    fn debug_object_path() {
        let path = profile_object_path(Path::new("/repo"), false);

        assert_eq!(
            path,
            Path::new("/repo/agent-ebpf/target/bpfel-unknown-none/debug/tokengate-ebpf")
        );
    }

    #[test]
    fn route_names() {
        assert_eq!(parse_route("debian").unwrap(), Route::Debian);
        assert_eq!(parse_route("upstream").unwrap(), Route::Upstream);
        let error = parse_route("nightly").unwrap_err().to_string();
        assert!(error.contains("\"nightly\""), "{error}");
    }

    #[test]
    fn llvm_dir_leads_path() {
        let path = path_with_llvm();

        if Path::new(LLVM_BIN).is_dir() {
            assert_eq!(
                env::split_paths(&path).next(),
                Some(PathBuf::from(LLVM_BIN))
            );
        } else {
            assert_eq!(Some(path), env::var_os("PATH"));
        }
    }
}
