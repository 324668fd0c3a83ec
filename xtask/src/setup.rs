//! `cargo xtask setup`: checks what building and testing need and installs
//! what is missing.
//!
//! It checks first and changes nothing when everything is present, so
//! `demo` and `test` call it on every run. Where it cannot install (not root,
//! not Debian, no network) it names what is missing and the commands to run.

mod apt;
mod linker;
mod route;

use anyhow::{bail, Context};

use crate::workspace;

/// Debian packages needed whatever rustc builds the eBPF program.
const COMMON_PACKAGES: &[apt::Package] = &[
    apt::Package {
        name: "llvm-22-dev",
        reason: "bpf-linker links against LLVM 22 and runs its tools",
    },
    apt::Package {
        name: "libpolly-22-dev",
        reason: "LLVM 22's link flags name Polly, which bpf-linker's build needs",
    },
    apt::Package {
        name: "libzstd-dev",
        reason: "linking against LLVM 22 also needs zstd",
    },
    apt::Package {
        name: "iproute2",
        reason: "the demo and the end-to-end tests create netns and veth with `ip`",
    },
];

/// Checks every requirement, installs what is missing and prints what it
/// found and did.
pub fn run() -> anyhow::Result<()> {
    let route = route::detect()?;
    println!("setup: eBPF toolchain: {}", route::describe(route));

    let mut packages: Vec<&apt::Package> = COMMON_PACKAGES.iter().collect();
    packages.extend(route::packages(route));
    let missing_packages = check_packages(&packages)?;

    let linker_version = linker::installed_version();
    if let Some(version) = &linker_version {
        println!("setup: present: {version}");
    } else if let Some(path) = linker::installed_off_path() {
        bail!(
            "bpf-linker is installed at {} but not on PATH, where the eBPF build \
             looks for it: add {} to PATH",
            path.display(),
            linker::install_dir().display()
        );
    } else {
        println!("setup: missing: bpf-linker (links the eBPF object)");
    }

    if missing_packages.is_empty() && linker_version.is_some() {
        println!("setup: everything needed is present, nothing to install");
        return Ok(());
    }

    install_packages(&missing_packages, linker_version.is_none())?;
    if linker_version.is_none() {
        install_linker()?;
    }
    println!("setup: done");
    Ok(())
}

/// Prints each package's state and returns the missing ones.
fn check_packages<'a>(packages: &[&'a apt::Package]) -> anyhow::Result<Vec<&'a apt::Package>> {
    if !apt::dpkg_available() {
        bail!(
            "dpkg-query not found: setup checks and installs Debian packages and \
             cannot tell whether this system has what they provide\n{}",
            manual_steps(packages, true)
        );
    }

    let mut missing = Vec::new();
    for package in packages {
        if let Some(version) = apt::installed_version(package.name) {
            println!("setup: present: {} {version}", package.name);
        } else {
            println!("setup: missing: {} ({})", package.name, package.reason);
            missing.push(*package);
        }
    }
    Ok(missing)
}

fn install_packages(missing: &[&apt::Package], linker_missing: bool) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !workspace::is_root() {
        bail!(
            "installing Debian packages needs root, and this runs as another user\n{}",
            manual_steps(missing, linker_missing)
        );
    }
    if !apt::apt_get_available() {
        bail!(
            "apt-get not found, so setup cannot install packages\n{}",
            manual_steps(missing, linker_missing)
        );
    }

    let names: Vec<&str> = missing.iter().map(|package| package.name).collect();
    apt::install(&names).with_context(|| {
        format!(
            "failed to install Debian packages: check that the Debian mirror is \
             reachable\n{}",
            manual_steps(missing, linker_missing)
        )
    })?;
    println!("setup: installed: {}", names.join(" "));
    Ok(())
}

fn install_linker() -> anyhow::Result<()> {
    linker::install().with_context(|| {
        format!(
            "failed to install bpf-linker, which needs crates.io and Debian's LLVM 22\n{}",
            manual_steps(&[], true)
        )
    })?;

    let Some(version) = linker::installed_version() else {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails: \
             add {} to PATH",
            linker::install_dir().display()
        );
    };
    println!("setup: installed: {version}");
    Ok(())
}

/// Returns the commands that install what is missing, for the user to run.
fn manual_steps(packages: &[&apt::Package], linker_missing: bool) -> String {
    let mut lines = Vec::new();
    if packages.is_empty() {
        lines.push("to fix, run:".to_owned());
    } else {
        lines.push("to fix, run as root:".to_owned());
        let names: Vec<&str> = packages.iter().map(|package| package.name).collect();
        lines.push("  apt-get update".to_owned());
        lines.push(format!("  apt-get install -y {}", names.join(" ")));
    }
    if linker_missing {
        lines.push(format!("  {}", linker::install_command_line()));
    }

    if packages
        .iter()
        .any(|package| route::is_toolchain_package(package.name))
    {
        let names: Vec<&str> = route::DEBIAN_PACKAGES
            .iter()
            .map(|package| package.name)
            .collect();
        lines.push(format!(
            "in place of {}, a nightly toolchain builds the eBPF program too: {}",
            names.join(" and "),
            route::UPSTREAM_HINT
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_steps_name_packages_and_linker() {
        let package = apt::Package {
            name: "iproute2",
            reason: "netns",
        };

        let steps = manual_steps(&[&package], true);

        assert!(steps.starts_with("to fix, run as root:\n"));
        assert!(steps.contains("\n  apt-get update\n"));
        assert!(steps.contains("\n  apt-get install -y iproute2\n"));
        assert!(steps.contains("cargo install bpf-linker --version 0.13.0"));
        assert!(
            !steps.contains("nightly"),
            "iproute2 has no nightly alternative"
        );
    }

    #[test]
    fn manual_steps_offer_nightly_for_rustc_web() {
        let steps = manual_steps(&[&route::DEBIAN_PACKAGES[0]], false);

        assert!(steps.contains("apt-get install -y rustc-web"));
        assert!(steps.contains("rustup toolchain install nightly --component rust-src"));
        assert!(!steps.contains("bpf-linker"));
    }

    #[test]
    fn manual_steps_for_linker_alone_need_no_root() {
        let steps = manual_steps(&[], true);

        assert!(steps.starts_with("to fix, run:\n"));
        assert!(!steps.contains("apt-get"));
    }
}
