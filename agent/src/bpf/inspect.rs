//! Reading the agent's pins without the agent: every link, map and program
//! pinned under the pin path, and the per-pod summary that `tokengate
//! status` prints. Node-wide objects that other parts pin under the same
//! path are found by the walk too.
//!
//! The kind of a pinned object comes from `/proc/self/fdinfo` of the fd
//! that opening the pin returns, because `BPF_OBJ_GET_INFO_BY_FD` fills
//! any object's info without saying which kind it is.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray};
use aya::programs::loaded_programs;
use serde::Serialize;
use tokengate_common::{
    COUNTER_DROPPED, COUNTER_PASSED, COUNTER_STEERED, MAP_COUNTERS, MAP_LAYOUT_VERSION, MAP_PORTS,
};

use super::{layout, pins, syscall, SteerCounters};

/// Map types whose entries are counted by walking their keys: hash,
/// per-CPU hash, LRU hash, LRU per-CPU hash, LPM trie, hash of maps and
/// sockhash (`enum bpf_map_type`).
const HASH_LIKE_MAP_TYPES: [u32; 7] = [1, 5, 9, 10, 11, 13, 18];

/// Map types whose every slot always exists: array and per-CPU array.
const FIXED_MAP_TYPES: [u32; 2] = [2, 6];

/// Upper bound on keys counted per map, so that a huge map cannot stall
/// `status`.
const MAX_COUNTED_KEYS: u64 = 1 << 20;

/// One pinned object.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedObject {
    pub path: PathBuf,
    #[serde(flatten)]
    pub kind: PinnedKind,
}

/// Kind of the object behind a pin, with the kernel's description of it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PinnedKind {
    Link {
        id: u32,
        link_type: String,
        program: Option<ProgramSummary>,
        /// Inode of the network namespace, for netns links.
        netns_ino: Option<u64>,
    },
    Map {
        id: u32,
        name: String,
        map_type: String,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        /// Entries in use; `None` where the kernel offers no way to count
        /// them from user space (sockmap with 4-byte values, program
        /// arrays).
        entries: Option<u64>,
    },
    Program(ProgramSummary),
    /// A pin that could not be opened or identified.
    Unreadable {
        error: String,
    },
}

/// A loaded program as the kernel describes it.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramSummary {
    pub id: u32,
    pub name: String,
    pub tag: String,
    pub program_type: String,
}

/// Everything pinned under a pin path.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PinTree {
    pub objects: Vec<PinnedObject>,
    /// Directories, parents before children.
    pub dirs: Vec<PathBuf>,
}

/// One pod's pins, summarised.
#[derive(Clone, Debug, Serialize)]
pub struct PodPins {
    pub workload: String,
    pub link: Option<PinnedKind>,
    /// Layout versions of the pinned map sets (`maps_v<N>`); 0 for maps
    /// pinned in the pod directory itself.
    pub layout_versions: Vec<u32>,
    /// True when a map set of this agent's layout version exists.
    pub current_layout: bool,
    pub ports: Vec<u16>,
    pub counters: Option<SteerCounters>,
}

/// Walks `pin_path` and identifies every pin. A missing pin path is an
/// empty tree.
pub fn walk(pin_path: &Path) -> std::io::Result<PinTree> {
    let mut tree = PinTree::default();
    if !pin_path.exists() {
        return Ok(tree);
    }
    let programs = program_index();
    walk_dir(pin_path, &programs, &mut tree)?;
    Ok(tree)
}

fn walk_dir(
    dir: &Path,
    programs: &BTreeMap<u32, ProgramSummary>,
    tree: &mut PinTree,
) -> std::io::Result<()> {
    tree.dirs.push(dir.to_owned());
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk_dir(&path, programs, tree)?;
        } else {
            let kind = identify(&path, programs);
            tree.objects.push(PinnedObject { path, kind });
        }
    }
    Ok(())
}

/// Opens the pin at `path` and describes the object behind it.
pub fn identify(path: &Path, programs: &BTreeMap<u32, ProgramSummary>) -> PinnedKind {
    let fd = match syscall::obj_get(path) {
        Ok(fd) => fd,
        Err(error) => {
            return PinnedKind::Unreadable {
                error: error.to_string(),
            }
        }
    };
    let info = match fdinfo(fd.as_fd()) {
        Ok(info) => info,
        Err(error) => {
            return PinnedKind::Unreadable {
                error: error.to_string(),
            }
        }
    };
    let number = |key: &str| info.get(key).and_then(|value| value.parse::<u64>().ok());

    if let Some(link_type) = info.get("link_type") {
        let program = number("prog_id").and_then(|id| programs.get(&(id as u32)).cloned());
        return PinnedKind::Link {
            id: number("link_id").unwrap_or_default() as u32,
            link_type: link_type.clone(),
            program,
            netns_ino: number("netns_ino"),
        };
    }
    if let Some(map_type) = number("map_type") {
        return describe_map(path, fd.as_fd(), map_type as u32, &number);
    }
    if info.contains_key("prog_type") {
        let id = number("prog_id").unwrap_or_default() as u32;
        if let Some(program) = programs.get(&id) {
            return PinnedKind::Program(program.clone());
        }
        return PinnedKind::Program(ProgramSummary {
            id,
            name: String::new(),
            tag: info.get("prog_tag").cloned().unwrap_or_default(),
            program_type: info.get("prog_type").cloned().unwrap_or_default(),
        });
    }
    PinnedKind::Unreadable {
        error: "not a link, map or program".to_owned(),
    }
}

fn describe_map(
    path: &Path,
    fd: BorrowedFd<'_>,
    map_type: u32,
    number: &dyn Fn(&str) -> Option<u64>,
) -> PinnedKind {
    let key_size = number("key_size").unwrap_or_default() as u32;
    let max_entries = number("max_entries").unwrap_or_default() as u32;
    let entries = if HASH_LIKE_MAP_TYPES.contains(&map_type) {
        syscall::count_keys(fd, key_size, MAX_COUNTED_KEYS).ok()
    } else if FIXED_MAP_TYPES.contains(&map_type) {
        Some(u64::from(max_entries))
    } else {
        None
    };
    let info = MapInfo::from_pin(path).ok();
    PinnedKind::Map {
        id: number("map_id").unwrap_or_default() as u32,
        name: info
            .as_ref()
            .and_then(|info| info.name_as_str().map(str::to_owned))
            .unwrap_or_default(),
        map_type: info
            .as_ref()
            .and_then(|info| info.map_type().ok())
            .map_or_else(|| map_type.to_string(), |kind| format!("{kind:?}")),
        key_size,
        value_size: number("value_size").unwrap_or_default() as u32,
        max_entries,
        entries,
    }
}

/// Reads the `key:\tvalue` lines that the kernel shows for `fd`.
fn fdinfo(fd: BorrowedFd<'_>) -> std::io::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect())
}

/// Loaded programs by id. A program that cannot be read is left out.
pub fn program_index() -> BTreeMap<u32, ProgramSummary> {
    loaded_programs()
        .filter_map(Result::ok)
        .map(|program| {
            let summary = ProgramSummary {
                id: program.id(),
                name: program.name_as_str().unwrap_or_default().to_owned(),
                tag: format!("{:016x}", program.tag()),
                program_type: program
                    .program_type()
                    .map_or_else(|_| "unknown".to_owned(), |kind| format!("{kind:?}")),
            };
            (summary.id, summary)
        })
        .collect()
}

/// Summarises the pods under `<pin_path>/pods`, using the objects found by
/// [`walk`].
pub fn pods(pin_path: &Path, tree: &PinTree) -> Vec<PodPins> {
    let pods_dir = pins::pods_dir(pin_path);
    let Ok(entries) = std::fs::read_dir(&pods_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();

    names
        .into_iter()
        .map(|workload| {
            let dir = pods_dir.join(&workload);
            let link_path = dir.join(pins::LINK_PIN);
            let link = tree
                .objects
                .iter()
                .find(|object| object.path == link_path)
                .map(|object| object.kind.clone());
            let mut layout_versions: Vec<u32> = layout::all_map_dirs(&dir)
                .iter()
                .filter_map(|maps| layout::version_of(&dir, maps))
                .collect();
            layout_versions.sort_unstable();
            let maps = layout::maps_dir(&dir);
            PodPins {
                workload,
                link,
                current_layout: layout_versions.contains(&MAP_LAYOUT_VERSION),
                layout_versions,
                ports: read_ports(&maps.join(MAP_PORTS)),
                counters: read_counters(&maps.join(MAP_COUNTERS)),
            }
        })
        .collect()
}

fn read_ports(path: &Path) -> Vec<u16> {
    let Ok(data) = MapData::from_pin(path) else {
        return Vec::new();
    };
    let Ok(map) = BpfHashMap::<MapData, u16, u8>::try_from(Map::HashMap(data)) else {
        return Vec::new();
    };
    let mut ports: Vec<u16> = map.keys().filter_map(Result::ok).collect();
    ports.sort_unstable();
    ports
}

fn read_counters(path: &Path) -> Option<SteerCounters> {
    let data = MapData::from_pin(path).ok()?;
    let counters = PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(data)).ok()?;
    let sum = |slot: u32| -> Option<u64> {
        let values = counters.get(&slot, 0).ok()?;
        Some(values.iter().copied().fold(0u64, u64::wrapping_add))
    };
    Some(SteerCounters {
        steered: sum(COUNTER_STEERED)?,
        passed: sum(COUNTER_PASSED)?,
        dropped: sum(COUNTER_DROPPED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pin_path_is_empty() {
        let tree = walk(Path::new("/nonexistent/tokengate-pins")).unwrap();

        assert!(tree.objects.is_empty());
        assert!(tree.dirs.is_empty());
    }

    #[test]
    fn plain_file_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not-a-pin"), b"").unwrap();

        let tree = walk(dir.path()).unwrap();

        assert_eq!(tree.dirs, vec![dir.path().to_owned()]);
        assert!(matches!(
            tree.objects[0].kind,
            PinnedKind::Unreadable { .. }
        ));
    }

    #[test]
    fn pods_without_pods_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();

        assert!(pods(dir.path(), &PinTree::default()).is_empty());
    }
}
