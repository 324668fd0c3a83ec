//! Layout of the agent's pins in bpffs and the operations on them.
//!
//! `<pin_path>/pods/<workload>/` contains `link`, the program's attachment
//! to the pod's namespace, and `maps_v<N>/` with the maps of layout version
//! `N`, pinned by name by the loader (see `layout`).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use aya::programs::links::FdLink;
use tokengate_common::{
    SteerConfig, COUNTER_SLOTS, LISTENER_SLOTS, MAP_CONFIG, MAP_COUNTERS, MAP_LISTENERS, MAP_PORTS,
    MAX_PORTS,
};
use tracing::warn;

use super::{links, BpfError};

/// Directory below the pin path that contains one directory per workload.
const PODS_DIR: &str = "pods";

/// Pin of the link that attaches the program to the pod's namespace.
pub const LINK_PIN: &str = "link";

/// Pin of a new link while it waits to replace [`LINK_PIN`]. bpffs rejects
/// names with dots, hence the underscore.
pub const LINK_STAGING_PIN: &str = "link_next";

/// Maximum length of a file name on Linux, in bytes (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Type and sizes of a map as the program in `agent-ebpf` declares it.
struct MapShape {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// The maps the program pins; a pinned map of another shape was made by an
/// incompatible program and is not reused.
const MAP_SHAPES: [MapShape; 4] = [
    MapShape {
        name: MAP_LISTENERS,
        map_type: MapType::SockMap,
        key_size: 4,
        value_size: 4,
        max_entries: LISTENER_SLOTS,
    },
    MapShape {
        name: MAP_PORTS,
        map_type: MapType::Hash,
        key_size: 2,
        value_size: 1,
        max_entries: MAX_PORTS,
    },
    MapShape {
        name: MAP_CONFIG,
        map_type: MapType::Array,
        key_size: 4,
        value_size: size_of::<SteerConfig>() as u32,
        max_entries: 1,
    },
    MapShape {
        name: MAP_COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: COUNTER_SLOTS,
    },
];

pub fn pods_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(PODS_DIR)
}

/// Returns the pin directory of `workload`, after checking that the name is one
/// path component that bpffs accepts.
pub fn pod_dir(pin_path: &Path, workload: &str) -> Result<PathBuf, BpfError> {
    let valid = !workload.is_empty()
        && workload.len() <= NAME_MAX
        && workload
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if !valid {
        return Err(BpfError::InvalidWorkloadName {
            name: workload.to_owned(),
        });
    }
    Ok(pods_dir(pin_path).join(workload))
}

/// Removes the pinned maps in `dir` whose type or sizes differ from what the
/// embedded program declares, so that the loader creates them anew. A link
/// left by the previous agent keeps its own references to the old maps.
pub fn remove_incompatible_maps(dir: &Path, workload: &str) -> Result<(), BpfError> {
    for shape in &MAP_SHAPES {
        let path = dir.join(shape.name);
        if !exists(&path) {
            continue;
        }
        match MapInfo::from_pin(&path) {
            Ok(info) if shape.matches(&info) => continue,
            Ok(info) => warn!(
                workload,
                map = shape.name,
                key_size = info.key_size(),
                value_size = info.value_size(),
                max_entries = info.max_entries(),
                "pinned map has another shape, creating it anew"
            ),
            Err(error) => {
                warn!(workload, map = shape.name, error = %error, "pinned map unreadable, creating it anew");
            }
        }
        remove_file(&path)?;
    }
    Ok(())
}

/// Pins `link` as `dir/link`. An existing pin is replaced by `rename`, which
/// is atomic: the new link is attached before the old pin goes, and the
/// kernel detaches the old link some time later (see `links`). Returns
/// whether an old pin was replaced.
pub fn pin_link(link: FdLink, dir: &Path) -> Result<bool, BpfError> {
    let target = dir.join(LINK_PIN);
    if !exists(&target) {
        link.pin(&target).map_err(|source| BpfError::Pin {
            path: target,
            source,
        })?;
        return Ok(false);
    }

    let staging = dir.join(LINK_STAGING_PIN);
    remove_file(&staging)?;
    let pinned = link.pin(&staging).map_err(|source| BpfError::Pin {
        path: staging.clone(),
        source,
    })?;
    if let Err(source) = std::fs::rename(&staging, &target) {
        // Detach the new link (its pin and then its fd go) and keep the old.
        if let Err(error) = pinned.unpin() {
            warn!(path = %staging.display(), error = %error, "failed to remove staging link pin");
        }
        return Err(BpfError::ReplaceLink {
            path: target,
            source,
        });
    }
    Ok(true)
}

/// Removes the pins of `workload` under `pin_path`: first the link, which
/// detaches the program from the pod's namespace, then the maps and the
/// directory. Returns whether there was anything to remove.
///
/// For a workload that is no longer protected: afterwards its ports reach
/// the pod's own sockets.
pub fn remove_pins(pin_path: &Path, workload: &str) -> Result<bool, BpfError> {
    let dir = pod_dir(pin_path, workload)?;
    if !exists(&dir) {
        return Ok(false);
    }
    remove_dir(&dir, workload)?;
    Ok(true)
}

/// Removes the link pin, then every other entry of `dir`, then `dir`, and
/// waits until the kernel has released the links of `workload`.
pub fn remove_dir(dir: &Path, workload: &str) -> Result<(), BpfError> {
    let attached = links::pod_links(dir)?;
    remove_file(&dir.join(LINK_PIN))?;
    remove_file(&dir.join(LINK_STAGING_PIN))?;

    let entries = std::fs::read_dir(dir).map_err(|source| BpfError::RemovePin {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| BpfError::RemovePin {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            super::layout::remove_tree(&entry.path())?;
        } else {
            remove_file(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir).map_err(|source| BpfError::RemovePin {
        path: dir.to_owned(),
        source,
    })?;
    links::wait_released(workload, &attached)
}

impl MapShape {
    fn matches(&self, info: &MapInfo) -> bool {
        info.map_type()
            .is_ok_and(|map_type| map_type == self.map_type)
            && info.key_size() == self.key_size
            && info.value_size() == self.value_size
            && info.max_entries() == self.max_entries
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Removes a file, treating a missing one as removed.
pub fn remove_file(path: &Path) -> Result<(), BpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::RemovePin {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dir_accepts_plain_names() {
        let dir = pod_dir(Path::new("/sys/fs/bpf/tokengate"), "orders-v1_a").unwrap();

        assert_eq!(dir, Path::new("/sys/fs/bpf/tokengate/pods/orders-v1_a"));
    }

    #[test]
    fn pod_dir_rejects_unsafe_names() {
        let too_long = "a".repeat(NAME_MAX + 1);
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "orders.prod",
            "a b",
            too_long.as_str(),
        ] {
            let result = pod_dir(Path::new("/sys/fs/bpf/tokengate"), name);

            assert!(
                matches!(result, Err(BpfError::InvalidWorkloadName { .. })),
                "accepted {name:?}"
            );
        }
    }

    #[test]
    fn remove_pins_of_unknown_workload() {
        let dir = tempfile::tempdir().unwrap();

        assert!(!remove_pins(dir.path(), "absent").unwrap());
    }

    #[test]
    fn remove_pins_removes_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod_dir(dir.path(), "orders").unwrap();
        std::fs::create_dir_all(&pod).unwrap();
        for name in [LINK_PIN, MAP_PORTS, MAP_CONFIG] {
            std::fs::write(pod.join(name), b"").unwrap();
        }

        assert!(remove_pins(dir.path(), "orders").unwrap());
        assert!(!pod.exists());
    }
}
