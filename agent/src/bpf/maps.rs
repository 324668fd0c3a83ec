//! Writing and reading one pod's maps.

use std::collections::BTreeSet;
use std::net::TcpListener;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockMap};
use aya::Ebpf;
use tokengate_common::{
    SteerConfig, COUNTER_DROPPED, COUNTER_PASSED, COUNTER_STEERED, LISTENER_V4, LISTENER_V6,
    MAP_CONFIG, MAP_COUNTERS, MAP_LISTENERS, MAP_PORTS,
};

use super::{BpfError, SteerCounters};

/// Value stored for each protected port; the program only tests presence.
const PORT_PRESENT: u8 = 1;

pub fn write_config(ebpf: &mut Ebpf, workload: &str, config: SteerConfig) -> Result<(), BpfError> {
    let map_error = map_error(workload, MAP_CONFIG);
    let mut array: Array<&mut MapData, SteerConfig> =
        Array::try_from(map_mut(ebpf, MAP_CONFIG)?).map_err(&map_error)?;
    array.set(0, config, 0).map_err(&map_error)
}

/// Puts the listeners into their slots; an absent IPv6 listener empties its
/// slot so that IPv6 connections to protected ports are dropped.
pub fn write_listeners(
    ebpf: &mut Ebpf,
    workload: &str,
    listener_v4: &TcpListener,
    listener_v6: Option<&TcpListener>,
) -> Result<(), BpfError> {
    let map_error = map_error(workload, MAP_LISTENERS);
    let mut sockets: SockMap<&mut MapData> =
        SockMap::try_from(map_mut(ebpf, MAP_LISTENERS)?).map_err(&map_error)?;

    sockets
        .set(LISTENER_V4, listener_v4, 0)
        .map_err(&map_error)?;
    match listener_v6 {
        Some(listener) => sockets.set(LISTENER_V6, listener, 0).map_err(&map_error),
        None => match sockets.clear_index(&LISTENER_V6) {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) || is_empty_sockmap_slot(&error) => Ok(()),
            Err(error) => Err(map_error(error)),
        },
    }
}

/// Makes the ports map hold exactly `ports`: adds the configured ones first,
/// then removes those a previous agent protected and the config no longer
/// lists.
pub fn write_ports(ebpf: &mut Ebpf, workload: &str, ports: &[u16]) -> Result<(), BpfError> {
    let map_error = map_error(workload, MAP_PORTS);
    let mut map: HashMap<&mut MapData, u16, u8> =
        HashMap::try_from(map_mut(ebpf, MAP_PORTS)?).map_err(&map_error)?;

    let configured: BTreeSet<u16> = ports.iter().copied().collect();
    for port in &configured {
        map.insert(port, PORT_PRESENT, 0).map_err(&map_error)?;
    }

    let stale: Vec<u16> = map
        .keys()
        .collect::<Result<Vec<u16>, MapError>>()
        .map_err(&map_error)?
        .into_iter()
        .filter(|port| !configured.contains(port))
        .collect();
    for port in stale {
        match map.remove(&port) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(map_error(error)),
        }
    }
    Ok(())
}

pub fn read_counters(ebpf: &Ebpf, workload: &str) -> Result<SteerCounters, BpfError> {
    let map_error = map_error(workload, MAP_COUNTERS);
    let map = ebpf.map(MAP_COUNTERS).ok_or(BpfError::MissingObject {
        kind: "map",
        name: MAP_COUNTERS,
    })?;
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(&map_error)?;

    let sum = |slot: u32| -> Result<u64, BpfError> {
        let values = counters.get(&slot, 0).map_err(&map_error)?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    };
    Ok(SteerCounters {
        steered: sum(COUNTER_STEERED)?,
        passed: sum(COUNTER_PASSED)?,
        dropped: sum(COUNTER_DROPPED)?,
    })
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, BpfError> {
    ebpf.map_mut(name)
        .ok_or(BpfError::MissingObject { kind: "map", name })
}

fn map_error<'a>(workload: &'a str, map: &'static str) -> impl Fn(MapError) -> BpfError + 'a {
    move |source| BpfError::Map {
        workload: workload.to_owned(),
        map,
        source,
    }
}

/// Tells whether a map operation failed only because the key was absent.
/// Tells whether a sockmap delete failed because the slot was already
/// empty: the kernel (`sock_map_delete_elem`) returns `EINVAL` for that, as
/// for an index past the end, which the `LISTENER_*` slots never are.
fn is_empty_sockmap_slot(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(error) if error.io_error.raw_os_error() == Some(libc::EINVAL))
}

fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(error) => error.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
