//! Loading, pinning and attaching the `sk_lookup` steering program.
//!
//! One program instance per pod, attached to the pod's network namespace
//! with its link and maps pinned under `<pin_path>/pods/<workload>`, so that
//! a dead agent leaves the port closed instead of open. This module does not
//! create the listeners (see `netns`) or accept on them (see `proxy`).

mod bpffs;
pub mod features;
pub mod inspect;
mod layout;
mod links;
mod logs;
mod maps;
mod pins;
mod replace;
mod syscall;
pub mod uninstall;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use tokengate_common::{SteerConfig, FLAG_LOOPBACK_EXEMPT, PROGRAM_SK_LOOKUP};
use tracing::info;

use crate::config::{InterceptionConfig, WorkloadConfig};

pub use logs::LOG_THREAD_NAME;
pub use pins::remove_pins;

/// The eBPF object built from `agent-ebpf`, copied into `OUT_DIR` by
/// `build.rs`. aya parses it in place, so it must be 8-byte aligned.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tokengate-ebpf.o"));

/// Per-CPU counter sums of one pod's program.
///
/// The maps outlive the agent, so the sums count from the first attach to
/// the pod after its pins were created, across agent restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SteerCounters {
    /// Connections to a protected port handed to the agent's listener.
    pub steered: u64,
    /// Connections left to the pod's own sockets: unprotected ports, the
    /// agent's reserved source, and loopback callers when they are exempt.
    pub passed: u64,
    /// Connections to a protected port dropped: no listener of their family
    /// (agent down, or no IPv6 listener) or no valid configuration record.
    pub dropped: u64,
}

/// Errors of loading, attaching and reading the steering program.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("failed to read the filesystem type of {path}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("pin path {path} is not on a bpf filesystem; mount bpffs there (`mount -t bpf bpf DIR`) or choose a path under /sys/fs/bpf")]
    NotBpffs { path: PathBuf },
    #[error("failed to mount bpffs at {target}; the agent needs CAP_SYS_ADMIN, or mount it on the host and pass it in")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to create pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload name {name:?} cannot name a bpffs directory; use only ASCII letters, digits, '_' and '-' (bpffs rejects dots)")]
    InvalidWorkloadName { name: String },
    #[error("failed to load the eBPF object for workload {workload}")]
    Load {
        workload: String,
        // Boxed: `EbpfError` is large and would make every result large.
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {kind} named {name}; rebuild it with `cargo xtask build`")]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },
    #[error("failed to load or attach program {program} for workload {workload}")]
    Program {
        workload: String,
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to access map {map} of workload {workload}")]
    Map {
        workload: String,
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to replace pinned link {path}; the previous link stays attached")]
    ReplaceLink {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to remove pin {path}")]
    RemovePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to list the loaded eBPF {kind}; the agent needs CAP_SYS_ADMIN to read them")]
    ListObjects {
        kind: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("kernel lacks the eBPF features {missing:?} that ingress steering needs; run on Linux 5.9 or later with BPF enabled")]
    MissingFeatures { missing: Vec<&'static str> },
    #[error("timed out after {timeout:?} waiting for the kernel to release the old links {links:?} of workload {workload}; a process may hold them open (`bpftool link show` lists the pids that hold each link)")]
    LinkNotReleased {
        workload: String,
        links: Vec<u32>,
        timeout: std::time::Duration,
    },
}

/// The node-wide loader.
pub struct Steering {
    pin_path: PathBuf,
    steer_config: SteerConfig,
    features: features::KernelFeatures,
}

/// One pod's attached program and its maps; dropping it leaves the pinned
/// link in place (fail closed).
pub struct PodSteering {
    workload: String,
    pin_dir: PathBuf,
    ebpf: Ebpf,
    /// Reader of the program's log records; dropping it stops the reader.
    logs: Option<logs::ProgramLogs>,
}

impl Steering {
    /// Mounts bpffs at the pin path's filesystem if needed and prepares the
    /// embedded object.
    pub fn new(config: &InterceptionConfig) -> Result<Self, BpfError> {
        bpffs::ensure_mounted(&config.pin_path)?;
        let features = features::KernelFeatures::probe(&config.pin_path);
        features.log();
        let missing = features.missing_required();
        if !missing.is_empty() {
            return Err(BpfError::MissingFeatures { missing });
        }
        let pods = pins::pods_dir(&config.pin_path);
        std::fs::create_dir_all(&pods)
            .map_err(|source| BpfError::CreateDir { path: pods, source })?;

        let flags = if config.loopback_exempt {
            FLAG_LOOPBACK_EXEMPT
        } else {
            0
        };
        let steer_config =
            SteerConfig::new(flags, config.reserved_source_v4, config.reserved_source_v6);
        Ok(Self {
            pin_path: config.pin_path.clone(),
            steer_config,
            features,
        })
    }

    /// Returns what the kernel offered when the agent started.
    pub fn features(&self) -> &features::KernelFeatures {
        &self.features
    }

    /// Returns the root of the agent's pins in bpffs.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// Loads the program for `workload`, fills its maps (ports, config,
    /// listeners), attaches it to the namespace and pins link and maps.
    ///
    /// When a previous agent left pins for the workload, their maps are
    /// reused if their layout version matches, so the old program steers
    /// into the new listeners as soon as they are written. The pinned link
    /// is then updated to run the new program (`BPF_LINK_UPDATE`), so the
    /// protected ports are never left open and never see two programs.
    /// Where the kernel refuses the update, a new link replaces the old pin
    /// by `rename` and this waits until the kernel has released the old
    /// link (see `replace`).
    ///
    /// Without `listener_v6`, IPv6 connections to protected ports are dropped.
    pub fn attach(
        &self,
        workload: &WorkloadConfig,
        netns: &File,
        listener_v4: &TcpListener,
        listener_v6: Option<&TcpListener>,
    ) -> Result<PodSteering, BpfError> {
        let name = workload.name.as_str();
        let pin_dir = pins::pod_dir(&self.pin_path, name)?;
        std::fs::create_dir_all(&pin_dir).map_err(|source| BpfError::CreateDir {
            path: pin_dir.clone(),
            source,
        })?;
        // Before any pinned map is replaced, so that the links of a program
        // that uses the old maps are found too.
        let previous_links = links::pod_links(&pin_dir)?;
        let stale_layouts = layout::find_stale(&pin_dir, name)?;
        let maps_dir = layout::maps_dir(&pin_dir);
        std::fs::create_dir_all(&maps_dir).map_err(|source| BpfError::CreateDir {
            path: maps_dir.clone(),
            source,
        })?;
        pins::remove_incompatible_maps(&maps_dir, name)?;

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&maps_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| BpfError::Load {
                workload: name.to_owned(),
                source: Box::new(source),
            })?;

        // Verify the program before touching maps that an old link may use.
        program(&mut ebpf)?
            .load()
            .map_err(|source| program_error(name, source))?;

        maps::write_config(&mut ebpf, name, self.steer_config)?;
        maps::write_listeners(&mut ebpf, name, listener_v4, listener_v6)?;
        maps::write_ports(&mut ebpf, name, &workload.ports)?;

        let program = program(&mut ebpf)?;
        let installed = replace::install(program, netns, &pin_dir, name, &previous_links)?;
        // No program of this pod uses the stale maps any more.
        layout::remove_stale(stale_layouts)?;

        let logs = logs::ProgramLogs::start(&mut ebpf, name);
        info!(
            workload = name,
            netns = %workload.netns.display(),
            ports = ?workload.ports,
            ipv6 = listener_v6.is_some(),
            installed = %installed,
            "steering attached"
        );
        Ok(PodSteering {
            workload: name.to_owned(),
            pin_dir,
            ebpf,
            logs,
        })
    }
}

impl PodSteering {
    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<SteerCounters, BpfError> {
        maps::read_counters(&self.ebpf, &self.workload)
    }

    /// Returns how many of the program's log records the rate limit
    /// dropped (see `logs`).
    pub fn log_records_suppressed(&self) -> u64 {
        self.logs.as_ref().map_or(0, logs::ProgramLogs::suppressed)
    }

    /// Returns the directory that contains this pod's pinned link and maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Returns the name of the workload the program steers for.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// Detaches the program and removes the pod's pins, and waits until the
    /// kernel has released the link. Afterwards the protected ports reach
    /// the pod's own sockets again, so call it only for a workload that is
    /// no longer protected.
    pub fn detach(self) -> Result<(), BpfError> {
        let Self {
            workload,
            pin_dir,
            ebpf,
            logs,
        } = self;
        drop(logs);
        drop(ebpf);
        pins::remove_dir(&pin_dir, &workload)?;
        info!(workload, "steering detached");
        Ok(())
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, BpfError> {
    let missing = BpfError::MissingObject {
        kind: "sk_lookup program",
        name: PROGRAM_SK_LOOKUP,
    };
    let program = ebpf.program_mut(PROGRAM_SK_LOOKUP).ok_or(missing)?;
    program.try_into().map_err(|_| BpfError::MissingObject {
        kind: "sk_lookup program",
        name: PROGRAM_SK_LOOKUP,
    })
}

fn program_error(workload: &str, source: aya::programs::ProgramError) -> BpfError {
    BpfError::Program {
        workload: workload.to_owned(),
        program: PROGRAM_SK_LOOKUP,
        source,
    }
}
