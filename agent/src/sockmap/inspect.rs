//! Reading the pinned fast path without loading it: counters, the sockets
//! in the sockhash and the links that run its `sock_ops` program. The agent
//! uses the same readers for its metrics; `tokengate status` and the tests
//! use [`PinnedSockmap`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, MapInfo, MapType, PerCpuArray, SockHash};
use aya::programs::{loaded_links, loaded_programs, ProgramError, ProgramType};
use tokengate_common::sockmap::{
    SockKey, SockmapConfig, COUNTER_BYTES_PASSED, COUNTER_BYTES_REDIRECTED, COUNTER_MAP_FULL,
    COUNTER_MSG_PASSED, COUNTER_MSG_REDIRECTED, COUNTER_SLOTS, COUNTER_SOCKETS_ADDED,
    COUNTER_UPDATE_FAILED, MAP_CONFIG, MAP_COUNTERS, MAP_DIRECT, MAP_PODS, MAP_SOCKETS, MAX_DIRECT,
    MAX_PODS, MAX_SOCKETS,
};
use tracing::warn;

use super::{SockmapError, SOCKMAP_DIR};

/// Sums of the per-CPU counters of the fast path. The pinned map outlives
/// the agent, so the sums run from the creation of the pins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapCounters {
    /// Sockets added to the sockhash.
    pub sockets_added: u64,
    /// Messages moved to the peer socket.
    pub messages_redirected: u64,
    /// Payload bytes of the redirected messages.
    pub bytes_redirected: u64,
    /// Messages of sockets in the sockhash left to the TCP/IP stack.
    pub messages_passed: u64,
    /// Payload bytes of the passed messages.
    pub bytes_passed: u64,
    /// Sockhash updates rejected because the map was full.
    pub map_full: u64,
    /// Sockhash updates rejected for another reason.
    pub update_failed: u64,
}

/// Type and sizes of a map as `agent-ebpf/src/sockmap.rs` declares it.
struct MapShape {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// The pinned maps; a pin of another shape was made by an incompatible
/// version of the object and is not reused.
const MAP_SHAPES: [MapShape; 5] = [
    MapShape {
        name: MAP_SOCKETS,
        map_type: MapType::SockHash,
        key_size: size_of::<SockKey>() as u32,
        value_size: 4,
        max_entries: MAX_SOCKETS,
    },
    MapShape {
        name: MAP_PODS,
        map_type: MapType::Hash,
        key_size: 8,
        value_size: 1,
        max_entries: MAX_PODS,
    },
    MapShape {
        name: MAP_CONFIG,
        map_type: MapType::Array,
        key_size: 4,
        value_size: size_of::<SockmapConfig>() as u32,
        max_entries: 1,
    },
    MapShape {
        name: MAP_DIRECT,
        map_type: MapType::LruHash,
        key_size: size_of::<SockKey>() as u32,
        value_size: 1,
        max_entries: MAX_DIRECT,
    },
    MapShape {
        name: MAP_COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: tokengate_common::sockmap::COUNTER_SLOTS,
    },
];

/// Removes every pinned map in `dir` when one of them has another shape
/// than this build's object declares, so that the loader creates a
/// consistent new set. Compatible pins stay and are reused.
pub(super) fn remove_incompatible_pins(dir: &Path) -> Result<(), SockmapError> {
    let incompatible = MAP_SHAPES.iter().find(|shape| {
        MapInfo::from_pin(dir.join(shape.name)).is_ok_and(|info| !matches_shape(&info, shape))
    });
    let Some(shape) = incompatible else {
        return Ok(());
    };

    warn!(
        map = shape.name,
        pins = %dir.display(),
        "pinned sockmap map has another layout, creating new maps"
    );
    for shape in &MAP_SHAPES {
        let path = dir.join(shape.name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SockmapError::RemovePin { path, source }),
        }
    }
    Ok(())
}

fn matches_shape(info: &MapInfo, shape: &MapShape) -> bool {
    info.map_type()
        .is_ok_and(|map_type| map_type == shape.map_type)
        && info.key_size() == shape.key_size
        && info.value_size() == shape.value_size
        && info.max_entries() == shape.max_entries
}

/// Sums each slot of the counter array over the CPUs.
pub(super) fn read_counters(
    counters: &PerCpuArray<MapData, u64>,
) -> Result<SockmapCounters, SockmapError> {
    let mut sums = [0u64; COUNTER_SLOTS as usize];
    for (slot, sum) in (0u32..).zip(sums.iter_mut()) {
        let values = counters.get(&slot, 0).map_err(|source| SockmapError::Map {
            map: MAP_COUNTERS,
            source,
        })?;
        *sum = values.iter().copied().fold(0u64, u64::wrapping_add);
    }
    let slot = |index: u32| sums[index as usize];
    Ok(SockmapCounters {
        sockets_added: slot(COUNTER_SOCKETS_ADDED),
        messages_redirected: slot(COUNTER_MSG_REDIRECTED),
        bytes_redirected: slot(COUNTER_BYTES_REDIRECTED),
        messages_passed: slot(COUNTER_MSG_PASSED),
        bytes_passed: slot(COUNTER_BYTES_PASSED),
        map_full: slot(COUNTER_MAP_FULL),
        update_failed: slot(COUNTER_UPDATE_FAILED),
    })
}

/// Counts the keys an iterator yields, at most [`MAX_SOCKETS`]: a key
/// deleted during the walk restarts the kernel's iteration, so the walk
/// needs a bound. The count is approximate while sockets come and go.
pub(super) fn count_keys<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> usize {
    keys.take(MAX_SOCKETS as usize).flatten().count()
}

/// The fast path's pinned maps, opened from `<pin_path>/sockmap/`.
pub struct PinnedSockmap {
    dir: PathBuf,
    sockets: SockHash<MapData, SockKey>,
    counters: PerCpuArray<MapData, u64>,
}

impl PinnedSockmap {
    /// Opens the pinned sockhash and counters below `pin_path`.
    pub fn open(pin_path: &Path) -> Result<Self, SockmapError> {
        let dir = pin_path.join(SOCKMAP_DIR);
        let sockets = open_pinned(&dir, MAP_SOCKETS, Map::SockHash)?;
        let counters = open_pinned(&dir, MAP_COUNTERS, Map::PerCpuArray)?;
        Ok(Self {
            dir,
            sockets,
            counters,
        })
    }

    /// Returns the keys of the sockets in the sockhash now.
    pub fn socket_keys(&self) -> Vec<SockKey> {
        self.sockets
            .keys()
            .take(MAX_SOCKETS as usize)
            .filter_map(Result::ok)
            .collect()
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<SockmapCounters, SockmapError> {
        read_counters(&self.counters)
    }

    /// Returns the ids of the `sock_ops` links whose program uses these
    /// pinned maps: the attachments of every agent that loaded them.
    pub fn attached_links(&self) -> Result<BTreeSet<u32>, ProgramError> {
        let map_ids: BTreeSet<u32> = MAP_SHAPES
            .iter()
            .filter_map(|shape| MapInfo::from_pin(self.dir.join(shape.name)).ok())
            .map(|info| info.id())
            .collect();
        links_using_maps(&map_ids)
    }
}

/// Returns the ids of the `sock_ops` links whose program uses one of
/// `map_ids`. Objects that go away during the walk are skipped.
pub fn links_using_maps(map_ids: &BTreeSet<u32>) -> Result<BTreeSet<u32>, ProgramError> {
    let mut programs = BTreeSet::new();
    for program in loaded_programs() {
        let program = match program {
            Ok(program) => program,
            Err(error) if is_gone(&error) => continue,
            Err(error) => return Err(error),
        };
        if !program
            .program_type()
            .is_ok_and(|program_type| program_type == ProgramType::SockOps)
        {
            continue;
        }
        let uses_maps = program
            .map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.iter().any(|id| map_ids.contains(id)));
        if uses_maps {
            programs.insert(program.id());
        }
    }

    let mut links = BTreeSet::new();
    for link in loaded_links() {
        match link {
            Ok(link) if programs.contains(&link.prog_id) => {
                links.insert(link.id);
            }
            Ok(_) => {}
            Err(error) if is_gone(&error) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(links)
}

fn open_pinned<M>(
    dir: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<M, SockmapError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_pin(dir.join(name))
        .map_err(|source| SockmapError::Map { map: name, source })?;
    M::try_from(wrap(data)).map_err(|source| SockmapError::Map { map: name, source })
}

/// Tells whether a listing failed only because the object went away
/// between finding its id and opening it.
fn is_gone(error: &ProgramError) -> bool {
    match error {
        ProgramError::SyscallError(error) => matches!(
            error.io_error.raw_os_error(),
            Some(libc::ENOENT | libc::EAGAIN)
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_keys_skips_errors_and_is_bounded() {
        let keys = vec![Ok(1u64), Err(MapError::KeyNotFound), Ok(2)];

        assert_eq!(count_keys(keys.into_iter()), 2);
        assert_eq!(
            count_keys(std::iter::repeat_with(|| Ok::<u64, MapError>(7))),
            MAX_SOCKETS as usize
        );
    }

    #[test]
    fn missing_pins_are_not_incompatible() {
        let dir = tempfile::tempdir().unwrap();

        remove_incompatible_pins(dir.path()).unwrap();
    }
}
