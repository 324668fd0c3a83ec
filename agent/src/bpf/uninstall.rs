//! Removing everything the agent pinned under its pin path.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use super::inspect::{self, PinnedKind};
use super::{bpffs, links, pins, BpfError};

/// Counts of the pins that [`remove_all`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemovedPins {
    pub links: usize,
    pub maps: usize,
    pub programs: usize,
    /// Pins that could not be identified, removed all the same.
    pub other: usize,
    pub dirs: usize,
}

impl RemovedPins {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Removes every pin under `pin_path` and `pin_path` itself: link pins
/// first, which detaches their programs, then a wait until the kernel has
/// released those links, then maps, programs, other pins and directories.
/// Nothing outside `pin_path` is touched. A missing pin path is not an
/// error, so a second run removes nothing.
pub fn remove_all(pin_path: &Path) -> Result<RemovedPins, BpfError> {
    let mut removed = RemovedPins::default();
    if !pin_path.exists() {
        return Ok(removed);
    }
    // A directory tree that is not pins is never deleted.
    if !bpffs::is_bpffs(pin_path)? {
        return Err(BpfError::NotBpffs {
            path: pin_path.to_owned(),
        });
    }
    let tree = inspect::walk(pin_path).map_err(|source| BpfError::RemovePin {
        path: pin_path.to_owned(),
        source,
    })?;

    let mut link_ids = BTreeSet::new();
    for object in &tree.objects {
        if let PinnedKind::Link { id, .. } = object.kind {
            pins::remove_file(&object.path)?;
            link_ids.insert(id);
            removed.links += 1;
        }
    }
    links::wait_released("uninstall", &link_ids)?;

    for object in &tree.objects {
        match object.kind {
            PinnedKind::Link { .. } => continue,
            PinnedKind::Map { .. } => removed.maps += 1,
            PinnedKind::Program(_) => removed.programs += 1,
            PinnedKind::Unreadable { .. } => removed.other += 1,
        }
        pins::remove_file(&object.path)?;
    }
    for dir in tree.dirs.iter().rev() {
        match std::fs::remove_dir(dir) {
            Ok(()) => removed.dirs += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BpfError::RemovePin {
                    path: dir.clone(),
                    source,
                })
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pin_path_removes_nothing() {
        let removed = remove_all(Path::new("/nonexistent/tokengate-pins")).unwrap();

        assert!(removed.is_empty());
    }

    #[test]
    fn directory_outside_bpffs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep-me"), b"data").unwrap();

        let error = remove_all(dir.path()).unwrap_err();

        assert!(matches!(error, BpfError::NotBpffs { .. }), "{error}");
        assert!(dir.path().join("keep-me").exists());
    }
}
