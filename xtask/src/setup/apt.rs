//! Debian packages: checks with dpkg-query, installs with apt-get.

use std::path::Path;
use std::process::Command;

use crate::process;

/// A Debian package that building or testing needs, and why.
pub struct Package {
    pub name: &'static str,
    pub reason: &'static str,
}

/// Tells whether dpkg-query runs, which is how setup recognises Debian.
pub fn dpkg_available() -> bool {
    process::probe(Command::new("dpkg-query").arg("--version")).is_some()
}

/// Tells whether apt-get is on this system.
pub fn apt_get_available() -> bool {
    ["/usr/bin/apt-get", "/bin/apt-get"]
        .iter()
        .any(|path| Path::new(path).exists())
}

/// Returns the installed version of `name`, or `None` when the package is
/// unknown, removed or only half installed.
pub fn installed_version(name: &str) -> Option<String> {
    let output = process::probe(Command::new("dpkg-query").args([
        "--show",
        "--showformat=${db:Status-Status} ${Version}",
        name,
    ]))?;
    parse_status(&output)
}

/// Runs `apt-get update`, then installs `names` without questions.
/// Recommended packages come along: bpf-linker's build against LLVM 22 was
/// verified on a machine that installed them, so leaving them out is
/// untested.
pub fn install(names: &[&str]) -> anyhow::Result<()> {
    process::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )?;
    process::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(names),
    )
}

/// Parses dpkg-query's `STATUS VERSION` line. Only status `installed`
/// counts, because `config-files` and `half-installed` leave no usable files.
fn parse_status(output: &str) -> Option<String> {
    let (status, version) = output.trim().split_once(' ')?;
    (status == "installed" && !version.is_empty()).then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_installed_gives_version() {
        assert_eq!(
            parse_status("installed 1:22.1.8-1~deb12u1\n"),
            Some("1:22.1.8-1~deb12u1".to_owned())
        );
    }

    #[test]
    fn status_config_files_is_missing() {
        assert_eq!(parse_status("config-files 6.1.0-3"), None);
    }

    #[test]
    fn status_without_version_is_missing() {
        assert_eq!(parse_status("not-installed "), None);
    }
}
