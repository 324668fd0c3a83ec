//! cgroup v2 directories for test pods, removed on drop together with any
//! process still in them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Filesystem type of the unified cgroup hierarchy in /proc/self/mountinfo.
const CGROUP2_FS_TYPE: &str = "cgroup2";

/// Time allowed for killed processes to leave a cgroup before its
/// directory is removed.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval between two attempts to remove a cgroup directory.
const REMOVE_POLL: Duration = Duration::from_millis(20);

/// Mount point of the cgroup v2 hierarchy, read from /proc/self/mountinfo:
/// `/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` in hybrid
/// mode.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    match find_cgroup2_mount(&mountinfo) {
        Some(path) => Ok(path),
        None => bail!(
            "no cgroup2 mount in /proc/self/mountinfo: mount one with \
             `mount -t cgroup2 none /sys/fs/cgroup`"
        ),
    }
}

/// Mount point of the first `cgroup2` line. A line is `ID PARENT MAJ:MIN
/// ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != CGROUP2_FS_TYPE {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Decodes the octal escapes (`\040` for a space) that mountinfo uses.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut output = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = bytes.get(index + 1..index + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|text| u8::from_str_radix(text, 8).ok())
        });
        match (bytes[index], escaped) {
            (b'\\', Some(byte)) => {
                output.push(byte);
                index += 4;
            }
            (byte, _) => {
                output.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&output).into_owned()
}

/// A cgroup directory this process created. Drop kills every process still
/// in it (they are the test's own) and removes the directory.
#[derive(Debug)]
pub(crate) struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// Creates `path`, which must not exist yet.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir(path).with_context(|| {
            format!(
                "failed to create cgroup {}: remove a leftover one with `rmdir`",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        kill_members(&self.path);
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
                Err(error) if Instant::now() > deadline => {
                    eprintln!(
                        "cleanup: failed to remove cgroup {}: {error}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(REMOVE_POLL),
            }
        }
    }
}

/// Sends SIGKILL to every process in the cgroup: through `cgroup.kill`
/// (Linux 5.14), else one by one from `cgroup.procs`.
fn kill_members(path: &Path) {
    if std::fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .lines()
        .filter_map(|line| line.trim().parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_found_in_hybrid_layout() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";

        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cgroup2_mount_unescapes_spaces() {
        let mountinfo = "41 31 0:38 / /mnt/with\\040space rw - cgroup2 none rw\n";

        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn cgroup2_mount_missing_on_v1_host() {
        let mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";

        assert_eq!(find_cgroup2_mount(mountinfo), None);
    }
}
