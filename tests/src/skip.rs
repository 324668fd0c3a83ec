//! Skip policy for tests that need root, network namespaces and eBPF.
//!
//! On a developer machine without those, such a test prints why it did not
//! run and returns early. In CI (`CI=true`) the same condition is a failure,
//! because a suite that silently skips its eBPF tests proves nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

use crate::agent::agent_binary;

/// Where bpffs is mounted and the agent pins its links and maps.
pub const BPFFS: &str = "/sys/fs/bpf";

/// First kernel release with `BPF_PROG_TYPE_SK_LOOKUP`.
const SK_LOOKUP_MIN_KERNEL: (u32, u32) = (5, 9);

/// Kernel helper that only kernels with `sk_lookup` programs have.
const SK_LOOKUP_SYMBOL: &str = "bpf_sk_lookup_assign";

/// File that lists skipped tests, one `SKIP:` line each, for
/// `cargo xtask test` to report.
pub fn skip_list_path() -> PathBuf {
    crate::workspace_root()
        .join("target")
        .join("test-skips.txt")
}

/// Returns true when this machine can run the privileged e2e tests.
/// Otherwise prints `SKIP: <test>: <reason>`, appends the same line to
/// [`skip_list_path`] and returns false, unless `CI` is `true`, where it
/// panics with the reason instead.
pub fn require_root_and_ebpf() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(|| check_environment(&agent_binary())) {
        Ok(()) => true,
        Err(reason) => skip(reason),
    }
}

/// Like [`require_root_and_ebpf`] for tests that need only root and
/// network namespaces, not eBPF or the agent.
pub fn require_root() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(check_namespaces) {
        Ok(()) => true,
        Err(reason) => skip(reason),
    }
}

fn skip(reason: &str) -> bool {
    let test = current_test_name();
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    assert!(
        !in_ci,
        "{test} cannot run: {reason}. CI=true turns a skip into a failure"
    );
    let line = format!("SKIP: {test}: {reason}");
    // A direct write to stderr bypasses libtest's output capture, which
    // would hide the line for a test that returns normally.
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Err(error) = append_line(&skip_list_path(), &line) {
        let path = skip_list_path();
        let _ = writeln!(
            std::io::stderr(),
            "failed to record the skip in {}: {error}",
            path.display()
        );
    }
    false
}

/// Checks that this process can run the agent at `agent` with real
/// namespaces and eBPF: root, iproute2, a kernel with `sk_lookup`, bpffs
/// (mounted here if missing) and the agent binary. Returns the first
/// problem found.
pub fn check_environment(agent: &Path) -> Result<(), String> {
    check_namespaces()?;
    check_kernel()?;
    ensure_bpffs()?;

    if !agent.is_file() {
        return Err(format!(
            "agent binary not found at {}: run `cargo xtask build` or set TOKENGATE_BIN",
            agent.display()
        ));
    }
    Ok(())
}

fn check_namespaces() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root for network namespaces and eBPF".to_owned());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("the `ip` command (iproute2) is not installed".to_owned());
    }
    Ok(())
}

fn check_kernel() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|error| format!("failed to read the kernel release: {error}"))?;
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().ok());
    let major = numbers.next().flatten();
    let minor = numbers.next().flatten();
    let (Some(major), Some(minor)) = (major, minor) else {
        return Err(format!(
            "cannot parse the kernel release {:?}",
            release.trim()
        ));
    };
    if (major, minor) < SK_LOOKUP_MIN_KERNEL {
        return Err(format!(
            "kernel {major}.{minor} has no sk_lookup programs (needs {}.{} or later)",
            SK_LOOKUP_MIN_KERNEL.0, SK_LOOKUP_MIN_KERNEL.1
        ));
    }

    // Kernels built without BPF or with kallsyms hidden cannot confirm the
    // helper; a readable list without it means no sk_lookup support.
    if let Ok(symbols) = std::fs::read_to_string("/proc/kallsyms") {
        let found = symbols
            .lines()
            .any(|line| line.split_whitespace().nth(2) == Some(SK_LOOKUP_SYMBOL));
        if !found && !symbols.is_empty() {
            return Err(format!(
                "kernel symbol {SK_LOOKUP_SYMBOL} not found: no sk_lookup support"
            ));
        }
    }
    Ok(())
}

/// Mounts bpffs at [`BPFFS`] when nothing is mounted there yet.
fn ensure_bpffs() -> Result<(), String> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    let output = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|error| format!("failed to run mount for bpffs: {error}"))?;
    if !output.status.success() || !is_bpffs(Path::new(BPFFS)) {
        return Err(format!(
            "bpffs is not mounted at {BPFFS} and `mount -t bpf bpf {BPFFS}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|stats| stats.filesystem_type() == BPF_FS_MAGIC)
}

/// Name of the running test: libtest names each test's thread after it. The
/// test binary's name, without Cargo's hash suffix, goes in front.
fn current_test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|path| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => stem,
        })
        .unwrap_or_default();
    let thread = std::thread::current().name().unwrap_or("main").to_owned();
    if thread == "main" {
        binary
    } else {
        format!("{binary}::{thread}")
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{line}")
}
