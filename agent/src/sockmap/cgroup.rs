//! Finding the cgroup v2 hierarchy that the `sock_ops` program attaches to.

use std::path::{Path, PathBuf};

/// The kernel's table of this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Returns the mount point of the first cgroup v2 filesystem listed in
/// `mountinfo` (the format of `/proc/PID/mountinfo`, proc(5)).
///
/// The mount point of the host's cgroup namespace is the root of the whole
/// hierarchy: a program attached there runs for the sockets of every
/// cgroup, the pods' and the agent's, wherever the runtime puts them.
pub fn find_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id, parent, major:minor, root, mount point, options,
        // optional fields ended by "-", then filesystem type and source.
        let (before, after) = line.split_once(" - ")?;
        let fs_type = after.split_whitespace().next()?;
        if fs_type != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// Reads [`MOUNTINFO`] and returns the cgroup v2 mount point.
pub fn cgroup2_root() -> std::io::Result<Option<PathBuf>> {
    let text = std::fs::read_to_string(Path::new(MOUNTINFO))?;
    Ok(find_cgroup2_root(&text))
}

/// Decodes the `\ooo` escapes that mountinfo uses for space, tab, newline
/// and backslash in paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 4);
        if bytes[index] == b'\\' {
            if let Some(digits) =
                escape.filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    index += 4;
                    continue;
                }
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 27 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 29 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 29 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn hybrid_layout_finds_unified() {
        assert_eq!(
            find_cgroup2_root(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_layout_with_optional_fields() {
        let text = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 master:3 - cgroup2 cgroup2 rw\n";

        assert_eq!(
            find_cgroup2_root(text),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_has_no_root() {
        let text = "31 29 0:26 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";

        assert_eq!(find_cgroup2_root(text), None);
    }

    #[test]
    fn escaped_space_decoded() {
        let text = "30 29 0:25 / /mnt/cgroup\\040two rw shared:10 - cgroup2 cgroup2 rw\n";

        assert_eq!(
            find_cgroup2_root(text),
            Some(PathBuf::from("/mnt/cgroup two"))
        );
    }

    #[test]
    fn own_mountinfo_is_readable() {
        // The machine may have no cgroup v2 mount; reading must still work.
        assert!(cgroup2_root().is_ok());
    }
}
