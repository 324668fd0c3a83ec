//! Versioned map directories of a pod: `<pod dir>/maps_v<N>/`, where `N` is
//! [`MAP_LAYOUT_VERSION`].
//!
//! An agent adopts only the maps of its own layout version. Maps of another
//! version, and maps pinned straight in the pod directory by agents from
//! before the versioning, stay in use by the running link until the new
//! program replaces it, and are removed afterwards.

use std::path::{Path, PathBuf};

use tokengate_common::MAP_LAYOUT_VERSION;
use tracing::warn;

use super::pins::{remove_file, LINK_PIN, LINK_STAGING_PIN};
use super::BpfError;

/// Prefix of a map directory; the layout version follows it. bpffs rejects
/// dots in names, hence the underscore.
const MAPS_DIR_PREFIX: &str = "maps_v";

/// Returns the map directory of the current layout in `pod_dir`.
pub fn maps_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join(format!("{MAPS_DIR_PREFIX}{MAP_LAYOUT_VERSION}"))
}

/// Pinned map sets in a pod directory that are not of the current layout.
#[derive(Debug, Default)]
pub struct StaleLayouts {
    /// `maps_v<N>` directories of other versions, with their versions.
    pub dirs: Vec<(u32, PathBuf)>,
    /// Map pins directly in the pod directory (layout 0).
    pub unversioned: Vec<PathBuf>,
}

impl StaleLayouts {
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.unversioned.is_empty()
    }
}

/// Finds the map sets in `pod_dir` of another layout version and logs them.
pub fn find_stale(pod_dir: &Path, workload: &str) -> Result<StaleLayouts, BpfError> {
    let mut stale = StaleLayouts::default();
    let entries = match std::fs::read_dir(pod_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(stale),
        Err(source) => {
            return Err(BpfError::RemovePin {
                path: pod_dir.to_owned(),
                source,
            })
        }
    };

    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(version) = name.strip_prefix(MAPS_DIR_PREFIX) {
            match version.parse::<u32>() {
                Ok(version) if version == MAP_LAYOUT_VERSION => {}
                Ok(version) => stale.dirs.push((version, path)),
                Err(_) => {
                    warn!(workload, path = %path.display(), "unknown entry in the pod pin directory, left alone");
                }
            }
        } else if name != LINK_PIN && name != LINK_STAGING_PIN && !path.is_dir() {
            stale.unversioned.push(path);
        }
    }

    if !stale.is_empty() {
        let versions: Vec<u32> = stale.dirs.iter().map(|(version, _)| *version).collect();
        warn!(
            workload,
            found.versions = ?versions,
            found.unversioned = stale.unversioned.len(),
            expected = MAP_LAYOUT_VERSION,
            "pinned maps have another layout version, creating new maps and filling them"
        );
    }
    Ok(stale)
}

/// Returns every directory of `pod_dir` that may contain map pins: the pod
/// directory itself (layout 0) and each `maps_v<N>`.
pub fn all_map_dirs(pod_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![pod_dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(pod_dir) {
        dirs.extend(
            entries
                .flatten()
                .filter(|entry| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with(MAPS_DIR_PREFIX)
                })
                .map(|entry| entry.path()),
        );
    }
    dirs
}

/// Returns the layout version of the map directory `maps` of `pod_dir`:
/// the number of a `maps_v<N>` directory, or 0 for the pod directory when
/// maps are pinned in it directly.
pub fn version_of(pod_dir: &Path, maps: &Path) -> Option<u32> {
    if maps == pod_dir {
        let entries = std::fs::read_dir(pod_dir).ok()?;
        let has_maps = entries.flatten().any(|entry| {
            let name = entry.file_name();
            name != LINK_PIN && name != LINK_STAGING_PIN && !entry.path().is_dir()
        });
        return has_maps.then_some(0);
    }
    maps.file_name()?
        .to_str()?
        .strip_prefix(MAPS_DIR_PREFIX)?
        .parse()
        .ok()
}

/// Removes the stale map sets once no program of this agent uses them.
pub fn remove_stale(stale: StaleLayouts) -> Result<(), BpfError> {
    for path in stale.unversioned {
        remove_file(&path)?;
    }
    for (_, dir) in stale.dirs {
        remove_tree(&dir)?;
    }
    Ok(())
}

/// Removes a directory of pins and everything below it.
pub fn remove_tree(dir: &Path) -> Result<(), BpfError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::RemovePin {
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_dir_carries_version() {
        let dir = maps_dir(Path::new("/sys/fs/bpf/tg/pods/orders"));

        assert_eq!(
            dir,
            Path::new(&format!(
                "/sys/fs/bpf/tg/pods/orders/maps_v{MAP_LAYOUT_VERSION}"
            ))
        );
    }

    #[test]
    fn stale_layouts_are_found() {
        let pod = tempfile::tempdir().unwrap();
        std::fs::create_dir(maps_dir(pod.path())).unwrap();
        std::fs::create_dir(pod.path().join("maps_v0")).unwrap();
        std::fs::write(pod.path().join("TG_PORTS"), b"").unwrap();
        std::fs::write(pod.path().join(LINK_PIN), b"").unwrap();

        let stale = find_stale(pod.path(), "orders").unwrap();

        assert_eq!(stale.dirs, vec![(0, pod.path().join("maps_v0"))]);
        assert_eq!(stale.unversioned, vec![pod.path().join("TG_PORTS")]);
    }

    #[test]
    fn current_layout_is_not_stale() {
        let pod = tempfile::tempdir().unwrap();
        std::fs::create_dir(maps_dir(pod.path())).unwrap();
        std::fs::write(pod.path().join(LINK_PIN), b"").unwrap();

        assert!(find_stale(pod.path(), "orders").unwrap().is_empty());
    }

    #[test]
    fn version_of_map_dirs() {
        let pod = tempfile::tempdir().unwrap();
        std::fs::write(pod.path().join(LINK_PIN), b"").unwrap();

        assert_eq!(
            version_of(pod.path(), &maps_dir(pod.path())),
            Some(MAP_LAYOUT_VERSION)
        );
        assert_eq!(version_of(pod.path(), pod.path()), None);
        std::fs::write(pod.path().join("TG_PORTS"), b"").unwrap();
        assert_eq!(version_of(pod.path(), pod.path()), Some(0));
    }

    #[test]
    fn remove_stale_keeps_current_maps() {
        let pod = tempfile::tempdir().unwrap();
        std::fs::create_dir(maps_dir(pod.path())).unwrap();
        std::fs::create_dir(pod.path().join("maps_v0")).unwrap();
        std::fs::write(pod.path().join("TG_PORTS"), b"").unwrap();

        remove_stale(find_stale(pod.path(), "orders").unwrap()).unwrap();

        assert!(maps_dir(pod.path()).exists());
        assert!(!pod.path().join("maps_v0").exists());
        assert!(!pod.path().join("TG_PORTS").exists());
    }
}
