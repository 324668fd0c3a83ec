//! The cgroup v2 facts egress mode needs: where the unified hierarchy is
//! mounted, the agent's own cgroup and a cgroup's id.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Returns the mount point of the cgroup v2 hierarchy from the lines of
/// `/proc/self/mountinfo`. Field 5 is the mount point; the filesystem type
/// follows the ` - ` separator.
pub fn unified_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, filesystem) = line.split_once(" - ")?;
        if filesystem.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Returns the cgroup v2 path of the process from `/proc/self/cgroup`: the
/// `0::` line, relative to the hierarchy's root.
pub fn own_relative_path(cgroup_file: &str) -> Option<&str> {
    cgroup_file
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_start_matches('/'))
}

/// Returns the directory of the agent's own cgroup v2.
pub fn own_cgroup_dir() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = unified_mount(&mountinfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem in /proc/self/mountinfo; egress mode needs the cgroup v2 hierarchy mounted",
        )
    })?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = own_relative_path(&cgroups).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup v2 entry (0::) in /proc/self/cgroup",
        )
    })?;
    Ok(mount.join(relative))
}

/// Returns the id of the cgroup at `dir`, the value that
/// `bpf_get_current_cgroup_id` returns for its tasks: on cgroup v2 it is
/// the inode number of the cgroup's directory.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 29 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";

    #[test]
    fn unified_mount_found_among_v1() {
        assert_eq!(
            unified_mount(MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            unified_mount("24 29 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn own_path_from_hybrid_cgroup_file() {
        let file =
            "12:memory:/user.slice\n1:name=systemd:/user.slice/x.scope\n0::/user.slice/x.scope\n";

        assert_eq!(own_relative_path(file), Some("user.slice/x.scope"));
        assert_eq!(own_relative_path("0::/\n"), Some(""));
        assert_eq!(own_relative_path("1:cpu:/a\n"), None);
    }

    #[test]
    fn own_cgroup_id_is_readable() {
        let Ok(dir) = own_cgroup_dir() else {
            println!("SKIP: no cgroup v2 hierarchy on this machine");
            return;
        };

        assert!(cgroup_id(&dir).expect("stat own cgroup") > 0);
    }
}
