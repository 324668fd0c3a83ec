//! The sockmap fast path on the agent's connections to the services it
//! protects.
//!
//! One node-wide `tokengate-sockmap` object. Its `sock_ops` program is
//! attached to the root of the cgroup v2 hierarchy and puts both ends of
//! every agent-to-service connection inside an enrolled pod into a
//! sockhash. Its `sk_msg` program, attached to that sockhash, moves each
//! message into the peer socket's receive queue. Maps and programs are
//! pinned under `<pin_path>/sockmap/`. This module registers the pods'
//! namespaces (see `app::workload`) and exports the counters; it does not
//! create the sockets (see `netns`, `proxy`).
//!
//! The cgroup link is held by this process and not pinned, so the kernel
//! detaches the program when the agent exits, even when it is killed. No
//! program stays attached to the root cgroup without an agent. Sockets
//! already in the sockhash keep the fast path until they close.

mod cgroup;
mod cookie;
pub mod inspect;
mod metrics;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, ProgramError, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use prometheus::Registry;
use tokengate_common::sockmap::{
    SockKey, SockmapConfig, MAP_CONFIG, MAP_COUNTERS, MAP_PODS, MAP_SOCKETS, PROGRAM_SK_MSG,
    PROGRAM_SOCK_OPS,
};
use tracing::{debug, info, warn};

use crate::config::InterceptionConfig;
use crate::metrics::MetricsError;

pub use self::cgroup::{cgroup2_root, find_cgroup2_root};
pub use self::cookie::netns_cookie;
pub use self::inspect::SockmapCounters;

/// The `tokengate-sockmap` object built from `agent-ebpf`, copied into
/// `OUT_DIR` by `build.rs`. aya parses it in place, so it must be 8-byte
/// aligned.
static SOCKMAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tokengate-sockmap.o"));

/// Directory below the pin path that contains the fast path's maps and
/// programs.
pub const SOCKMAP_DIR: &str = "sockmap";

/// Pin of the loaded `sock_ops` program, for `tokengate status`.
pub const PIN_PROGRAM_SOCK_OPS: &str = "prog_sockops";

/// Pin of the loaded `sk_msg` program, for `tokengate status`.
pub const PIN_PROGRAM_SK_MSG: &str = "prog_sk_msg";

/// Errors of loading and attaching the fast path and of registering pods.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("failed to create pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read {}", cgroup::MOUNTINFO)]
    ReadMountinfo {
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 filesystem in {}; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or set interception.sockmap to false", cgroup::MOUNTINFO)]
    NoCgroup2,
    #[error("failed to open cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the tokengate-sockmap eBPF object")]
    Load {
        // Boxed: `EbpfError` is large and would make every result large.
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "tokengate-sockmap object has no {kind} named {name}; rebuild it with `cargo xtask build`"
    )]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },
    #[error("failed to load program {program}; it needs Linux 5.15 or later (bpf_get_netns_cookie in sock_ops and sk_msg)")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("failed to attach program {program} to {target}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("failed to access map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("failed to pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to remove pin {path}")]
    RemovePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the network namespace cookie of workload {workload}; SO_NETNS_COOKIE needs Linux 5.14")]
    NetnsCookie {
        workload: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded and attached fast path. Dropping it detaches both programs;
/// the pinned maps stay.
pub struct Sockmap {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    pods: Mutex<HashMap<MapData, u64, u8>>,
    sockets: SockHash<MapData, SockKey>,
    counters: PerCpuArray<MapData, u64>,
    /// Owns the programs and their attachments.
    _ebpf: Ebpf,
}

/// Starts the fast path when `config.sockmap` is set, else removes the
/// pins a previous agent left. Registers the `tokengate_sockmap_*` series
/// either way, at zero when the fast path is off.
///
/// A fast path that fails to start is logged and left off: the agent then
/// forwards through the TCP/IP stack, which is slower but equally correct.
pub fn start(
    config: &InterceptionConfig,
    registry: &Registry,
) -> Result<Option<Arc<Sockmap>>, MetricsError> {
    let sockmap = if config.sockmap {
        match Sockmap::load(&config.pin_path, config) {
            Ok(sockmap) => Some(Arc::new(sockmap)),
            Err(error) => {
                warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "sockmap fast path unavailable, forwarding through the TCP/IP stack"
                );
                None
            }
        }
    } else {
        if let Err(error) = remove_pins(&config.pin_path) {
            warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "failed to remove the pins of a previous sockmap fast path"
            );
        }
        None
    };
    metrics::register(registry, sockmap.clone())?;
    Ok(sockmap)
}

/// Removes `<pin_path>/sockmap/` and everything in it. Sockets still in
/// the sockhash keep the fast path until they close, because open file
/// descriptors hold the map.
pub fn remove_pins(pin_path: &Path) -> Result<(), SockmapError> {
    let dir = pin_path.join(SOCKMAP_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            info!(path = %dir.display(), "sockmap pins removed");
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SockmapError::RemovePin { path: dir, source }),
    }
}

impl Sockmap {
    /// Loads the object with its maps pinned in `<pin_path>/sockmap/`
    /// (reusing compatible pins), writes the configuration, attaches
    /// `sock_ops` to the cgroup v2 root and `sk_msg` to the sockhash.
    pub fn load(pin_path: &Path, config: &InterceptionConfig) -> Result<Self, SockmapError> {
        let pin_dir = pin_path.join(SOCKMAP_DIR);
        std::fs::create_dir_all(&pin_dir).map_err(|source| SockmapError::CreateDir {
            path: pin_dir.clone(),
            source,
        })?;
        inspect::remove_incompatible_pins(&pin_dir)?;

        let cgroup = cgroup2_root()
            .map_err(|source| SockmapError::ReadMountinfo { source })?
            .ok_or(SockmapError::NoCgroup2)?;
        let cgroup_file = File::open(&cgroup).map_err(|source| SockmapError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&pin_dir)
            .load(SOCKMAP_OBJECT)
            .map_err(|source| SockmapError::Load {
                source: Box::new(source),
            })?;

        write_config(
            &mut ebpf,
            SockmapConfig::new(config.reserved_source_v4, config.reserved_source_v6),
        )?;
        let mut pods: HashMap<MapData, u64, u8> = take_map(&mut ebpf, MAP_PODS)?;
        clear_pods(&mut pods)?;
        let sockets: SockHash<MapData, SockKey> = take_map(&mut ebpf, MAP_SOCKETS)?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, MAP_COUNTERS)?;

        attach_sk_msg(&mut ebpf, &sockets, &pin_dir)?;
        attach_sock_ops(&mut ebpf, &cgroup, cgroup_file.as_fd(), &pin_dir)?;

        info!(
            cgroup = %cgroup.display(),
            pins = %pin_dir.display(),
            "sockmap fast path attached"
        );
        Ok(Self {
            pin_dir,
            cgroup,
            pods: Mutex::new(pods),
            sockets,
            counters,
            _ebpf: ebpf,
        })
    }

    /// Lets the agent's connections to the service in the namespace of
    /// `socket` (any socket created in the pod) take the fast path, and
    /// returns the namespace's cookie for [`Sockmap::unregister_pod`].
    pub fn register_pod(&self, workload: &str, socket: &impl AsFd) -> Result<u64, SockmapError> {
        let cookie = netns_cookie(socket).map_err(|source| SockmapError::NetnsCookie {
            workload: workload.to_owned(),
            source,
        })?;
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, 1, 0)
            .map_err(|source| SockmapError::Map {
                map: MAP_PODS,
                source,
            })?;
        debug!(
            workload,
            netns.cookie = cookie,
            "pod registered for the sockmap fast path"
        );
        Ok(cookie)
    }

    /// Removes a pod registered by [`Sockmap::register_pod`]. Its
    /// connections already in the sockhash keep the fast path until they
    /// close; new ones take the TCP/IP stack.
    pub fn unregister_pod(&self, workload: &str, cookie: u64) -> Result<(), SockmapError> {
        let result = self
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cookie);
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => {
                debug!(
                    workload,
                    netns.cookie = cookie,
                    "pod unregistered from the sockmap fast path"
                );
                Ok(())
            }
            Err(source) => Err(SockmapError::Map {
                map: MAP_PODS,
                source,
            }),
        }
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<SockmapCounters, SockmapError> {
        inspect::read_counters(&self.counters)
    }

    /// Counts the sockets in the sockhash now.
    pub fn socket_count(&self) -> usize {
        inspect::count_keys(self.sockets.keys())
    }

    /// Counts the registered pods.
    pub fn pod_count(&self) -> usize {
        let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        inspect::count_keys(pods.keys())
    }

    /// Returns the directory of the pinned maps and programs.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Returns the cgroup the `sock_ops` program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

fn write_config(ebpf: &mut Ebpf, config: SockmapConfig) -> Result<(), SockmapError> {
    let map = ebpf
        .map_mut(MAP_CONFIG)
        .ok_or(SockmapError::MissingObject {
            kind: "map",
            name: MAP_CONFIG,
        })?;
    let mut array: Array<_, SockmapConfig> =
        Array::try_from(map).map_err(|source| SockmapError::Map {
            map: MAP_CONFIG,
            source,
        })?;
    array.set(0, config, 0).map_err(|source| SockmapError::Map {
        map: MAP_CONFIG,
        source,
    })
}

/// Empties the pod map, which may hold the cookies of pods that a previous
/// agent served. The workloads enrolled next register again.
fn clear_pods(pods: &mut HashMap<MapData, u64, u8>) -> Result<(), SockmapError> {
    let stale: Vec<u64> = pods.keys().filter_map(Result::ok).collect();
    for cookie in stale {
        match pods.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(SockmapError::Map {
                    map: MAP_PODS,
                    source,
                })
            }
        }
    }
    Ok(())
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SockmapError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(SockmapError::MissingObject { kind: "map", name })?;
    M::try_from(map).map_err(|source| SockmapError::Map { map: name, source })
}

fn attach_sk_msg(
    ebpf: &mut Ebpf,
    sockets: &SockHash<MapData, SockKey>,
    pin_dir: &Path,
) -> Result<(), SockmapError> {
    let program: &mut SkMsg = program_mut(ebpf, "sk_msg program", PROGRAM_SK_MSG)?;
    program.load().map_err(|source| SockmapError::LoadProgram {
        program: PROGRAM_SK_MSG,
        source,
    })?;
    // Replaces the program of a previous agent on the pinned map; sockets
    // already in the map keep the program they were added with.
    program
        .attach(sockets.fd())
        .map_err(|source| SockmapError::Attach {
            program: PROGRAM_SK_MSG,
            target: MAP_SOCKETS.to_owned(),
            source,
        })?;
    pin_program(pin_dir.join(PIN_PROGRAM_SK_MSG), |path| program.pin(path))
}

fn attach_sock_ops(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    cgroup_file: std::os::fd::BorrowedFd<'_>,
    pin_dir: &Path,
) -> Result<(), SockmapError> {
    let program: &mut SockOps = program_mut(ebpf, "sock_ops program", PROGRAM_SOCK_OPS)?;
    program.load().map_err(|source| SockmapError::LoadProgram {
        program: PROGRAM_SOCK_OPS,
        source,
    })?;
    // aya creates a bpf_link on Linux 5.7 and later, and the kernel rejects
    // attach flags on cgroup links (EINVAL), so the mode must be `Single`.
    // It runs every link of a cgroup side by side all the same: other
    // sock_ops programs at the root (another agent during an upgrade, a
    // CNI) keep running.
    program
        .attach(cgroup_file, CgroupAttachMode::Single)
        .map_err(|source| SockmapError::Attach {
            program: PROGRAM_SOCK_OPS,
            target: cgroup.display().to_string(),
            source,
        })?;
    pin_program(pin_dir.join(PIN_PROGRAM_SOCK_OPS), |path| program.pin(path))
}

fn program_mut<'a, P>(
    ebpf: &'a mut Ebpf,
    kind: &'static str,
    name: &'static str,
) -> Result<&'a mut P, SockmapError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    let missing = SockmapError::MissingObject { kind, name };
    let program = ebpf.program_mut(name).ok_or(missing)?;
    program
        .try_into()
        .map_err(|_| SockmapError::MissingObject { kind, name })
}

/// Pins a program at `path`, replacing the pin of a previous agent.
fn pin_program(
    path: PathBuf,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), SockmapError> {
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SockmapError::RemovePin { path, source }),
    }
    pin(&path).map_err(|source| SockmapError::Pin { path, source })
}
