//! Facts about the workspace and the process that several commands need.

use std::env;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// File where the test harness records each test that skipped, one line per
/// test: `SKIP: TEST: REASON`. `cargo xtask test` empties it before the run.
const TEST_SKIPS_FILE: &str = "target/test-skips.txt";

/// Returns the workspace root: the parent of this crate's manifest folder.
pub fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask's manifest folder has a parent")
        .to_path_buf()
}

/// Returns the path of the file where the test harness records skips.
pub fn test_skips_file(root: &Path) -> PathBuf {
    root.join(TEST_SKIPS_FILE)
}

/// Returns the cargo that runs this xtask, so that nested builds use the
/// same toolchain, or `cargo` from `PATH` when started some other way.
pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// Tells whether this process runs with effective user id 0.
///
/// The owner of `/proc/self` is the process's effective user id (proc(5)),
/// which avoids a libc call and the `unsafe` it would need.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Tells whether this runs in CI, where tests must run and not skip.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|value| value == "true")
}

/// Returns the value of `PATH` with `dir` in front.
pub fn path_with(dir: &Path) -> OsString {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).expect("PATH entries contain no ':'")
}
