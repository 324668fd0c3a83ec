//! Makes sure the pin path lives on a bpf filesystem.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
use tracing::info;

use super::BpfError;

/// Mount point of bpffs under systemd and on most distributions. The agent
/// mounts bpffs there, and only there, when it is missing.
pub const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// Serializes check-and-mount within the process, because a second mount on
/// top of the first would hide the pins made in it.
static MOUNT_LOCK: Mutex<()> = Mutex::new(());

/// Mounts bpffs at [`BPFFS_MOUNT_POINT`] when `pin_path` is below it and not
/// on a bpf filesystem yet.
///
/// NOTE: the lock does not cover other processes; two agents starting at the
/// same moment on a host without bpffs could both mount it.
pub fn ensure_mounted(pin_path: &Path) -> Result<(), BpfError> {
    let _guard = MOUNT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    let existing = nearest_existing(pin_path);
    if is_bpffs(&existing)? {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT_POINT);
    if !pin_path.starts_with(mount_point) {
        return Err(BpfError::NotBpffs {
            path: pin_path.to_owned(),
        });
    }

    mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| BpfError::Mount {
        target: mount_point.to_owned(),
        source,
    })?;
    info!(path = BPFFS_MOUNT_POINT, "mounted bpffs");
    Ok(())
}

/// Tells whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    let stat = statfs(path).map_err(|source| BpfError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}

/// Returns the deepest ancestor of `path` (itself included) that exists, so that a
/// pin path not yet created is judged by the filesystem it will be made on.
fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|ancestor| !ancestor.as_os_str().is_empty() && ancestor.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_existing_walks_up() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("a/b/c");

        assert_eq!(nearest_existing(&missing), dir.path());
        assert_eq!(nearest_existing(dir.path()), dir.path());
    }

    #[test]
    fn tempdir_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();

        assert!(!is_bpffs(dir.path()).unwrap());
    }

    #[test]
    fn path_outside_mount_point_is_rejected() {
        let dir = tempfile::tempdir().unwrap();

        let error = ensure_mounted(&dir.path().join("pins")).unwrap_err();

        assert!(matches!(error, BpfError::NotBpffs { .. }), "{error}");
    }
}
