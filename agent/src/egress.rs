//! Egress mode: verifying a selected pod's calls at the source.
//!
//! The `tokengate-egress` object is loaded once per node with its maps
//! pinned under `<pin_path>/egress/maps_v<N>/`, `N` being the layout
//! version of the shared types. For each configured pod the agent
//! creates egress listeners on the pod's loopback (127.0.0.1 and `::1`, on
//! ports the kernel chooses). It enters the pod and its destinations in the
//! maps, keyed by the pod's network namespace cookie. Then it attaches the
//! `connect4`, `connect6` and `sock_ops` programs to the pod's cgroup
//! through links pinned under `<pin_path>/egress/links/`.
//!
//! A connection to a configured destination then lands on the listener.
//! The agent takes its original destination from the flow map, verifies
//! each request like an ingress request and forwards allowed ones from the
//! pod's namespace.
//!
//! The links stay pinned when the agent exits, so the pod's calls to the
//! destinations keep landing on the dead listener and fail instead of
//! leaving unverified. This module does not verify requests (see `proxy`).

mod cgroup;
mod metrics;
mod overlap;
mod sys;
mod upstream;

mod maps;

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use tokengate_common::egress::{
    FlowKey, Origin, Pod, LAYOUT_VERSION, PROGRAM_CONNECT4, PROGRAM_CONNECT6, PROGRAM_SOCK_OPS,
};

use crate::app::Core;
use crate::config::{Config, EgressConfig, EgressPodConfig};
use crate::netns::PodNetns;
use crate::proxy::{self, DrainController, OriginLookup, ProxySlot};

pub use self::cgroup::{cgroup_id, own_cgroup_dir, unified_mount};
use self::maps::EgressMaps;
use self::metrics::EgressMetrics;
use self::upstream::EgressUpstream;

/// The egress object built from `agent-ebpf`, copied into `OUT_DIR` by
/// `build.rs`. It is aligned because aya parses it in place.
static EGRESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tokengate-egress.o"));

/// Directory below the pin path for the egress maps and links.
pub const EGRESS_DIR: &str = "egress";

/// Directory below [`EGRESS_DIR`] that contains the pinned links.
pub const LINKS_DIR: &str = "links";

/// Prefix of the directories below [`EGRESS_DIR`] that contain the pinned
/// maps, followed by the layout version. An agent with another layout
/// creates its own set instead of adopting maps it cannot read.
pub const MAPS_DIR_PREFIX: &str = "maps_v";

/// Egress listener addresses inside the pod. Loopback keeps the listener
/// unreachable from outside the pod, and port 0 lets the kernel pick a port
/// that no process of the pod uses.
const LISTEN_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
const LISTEN_V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);

/// The three programs of the object, their attach types and the suffix of
/// their link pins.
const PROGRAMS: [(&str, u32, &str); 3] = [
    (PROGRAM_CONNECT4, sys::ATTACH_CONNECT4, "connect4"),
    (PROGRAM_CONNECT6, sys::ATTACH_CONNECT6, "connect6"),
    (PROGRAM_SOCK_OPS, sys::ATTACH_SOCK_OPS, "sock_ops"),
];

/// Errors of starting egress mode.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("failed to create pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the egress eBPF object; the kernel needs cgroup sock_addr, sock_ops and LPM trie support (Linux 5.15 or later)")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("egress eBPF object has no {kind} named {name}; rebuild it with `cargo xtask build`")]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },
    #[error("failed to load program {program} into the kernel")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to access egress map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to find the agent's own cgroup; egress mode needs cgroup v2")]
    OwnCgroup {
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: failed to open network namespace {path}")]
    Netns {
        pod: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: failed to create the egress listener in its namespace")]
    Listen {
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: failed to read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)")]
    NetnsCookie {
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: failed to open cgroup {path}; give the pod's cgroup v2 directory")]
    Cgroup {
        pod: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: cgroup {path} is the agent's own cgroup or one of its parents; the agent's calls would be steered into itself")]
    AgentCgroup { pod: String, path: PathBuf },
    #[error("egress pod {pod}: failed to attach {program} to cgroup {path}")]
    Attach {
        pod: String,
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to pin or remove link pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("egress pod {pod}: destination {destination} covers {address} port {port}, which this agent protects as workload {workload}; a call there would be verified twice, so leave that address out of the egress destinations")]
    VerifiedTwice {
        pod: String,
        destination: String,
        workload: String,
        address: IpAddr,
        port: u16,
    },
    #[error("failed to register the egress metrics")]
    Metrics {
        #[source]
        source: prometheus::Error,
    },
}

/// Running egress mode: the loaded object, the pods' listeners and proxies.
pub struct Egress {
    drain: DrainController,
    /// Keeps the programs loaded while the agent may attach them again.
    _ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Egress {
    /// Starts egress mode when the configuration has egress pods, and
    /// returns `None` without loading anything otherwise. bpffs must be
    /// mounted at the pin path already, which the ingress steering does.
    pub async fn start(config: &Config, core: &Core) -> Result<Option<Self>, EgressError> {
        let egress = &config.egress;
        if !egress.is_enabled() {
            return Ok(None);
        }
        // `/readyz` waits for the egress pods like for workloads.
        for pod in &egress.pods {
            core.readiness.add_workload(&pod.name);
        }
        check_own_workloads(config).await?;
        let pin_dir = config.interception.pin_path.join(EGRESS_DIR);
        let links_dir = pin_dir.join(LINKS_DIR);
        let maps_dir = pin_dir.join(format!("{MAPS_DIR_PREFIX}{LAYOUT_VERSION}"));
        for dir in [&links_dir, &maps_dir] {
            std::fs::create_dir_all(dir).map_err(|source| EgressError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&maps_dir)
            .load(EGRESS_OBJECT)
            .map_err(|source| EgressError::Load {
                source: Box::new(source),
            })?;
        load_programs(&mut ebpf)?;
        let mut maps = EgressMaps::take(&mut ebpf)?;

        let own_cgroup = own_cgroup_dir().map_err(|source| EgressError::OwnCgroup { source })?;
        let agent_cgroup_id =
            cgroup_id(&own_cgroup).map_err(|source| EgressError::OwnCgroup { source })?;
        maps.write_settings(egress.mark, agent_cgroup_id)?;

        let metrics = EgressMetrics::register(core.metrics.registry(), &mut ebpf, &maps)
            .map_err(|source| EgressError::Metrics { source })?;
        let drain = DrainController::new();
        let context = PodContext {
            egress,
            core,
            own_cgroup: &own_cgroup,
            links_dir: &links_dir,
            drain: &drain,
            metrics: &metrics,
        };
        let mut enrolled = Vec::new();
        for pod in &egress.pods {
            enrolled.push(start_pod(&ebpf, &mut maps, &context, pod).await?);
            core.readiness.set_attached(&pod.name, true);
        }
        remove_stale_links(&links_dir, &enrolled)?;
        remove_other_layouts(&pin_dir, &maps_dir)?;
        maps.remove_stale(
            egress,
            &enrolled
                .iter()
                .map(|pod| pod.netns_cookie)
                .collect::<Vec<_>>(),
        )?;

        tracing::info!(
            pods = egress.pods.len(),
            agent_cgroup = %own_cgroup.display(),
            pins = %pin_dir.display(),
            "egress steering attached"
        );
        Ok(Some(Self {
            drain,
            _ebpf: ebpf,
            pin_dir,
        }))
    }

    /// Returns the directory of the egress pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Stops accepting and waits up to `deadline` for open egress
    /// connections. The pinned links stay, so the pods' calls to the
    /// destinations fail while no agent runs.
    pub async fn shutdown(self, deadline: Duration) {
        if !self.drain.drain(deadline).await {
            tracing::warn!("egress connections still open at the drain deadline");
        }
    }
}

/// Refuses egress destinations that cover a port this agent protects in
/// one of its configured workloads (see `overlap`). A workload whose
/// namespace cannot be opened is skipped here; its own enrolment reports it.
async fn check_own_workloads(config: &Config) -> Result<(), EgressError> {
    for workload in &config.workloads {
        let addresses = match PodNetns::open(&workload.netns) {
            Ok(netns) => overlap::pod_addresses(&netns).await,
            Err(error) => Err(error),
        };
        let addresses = match addresses {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(workload = %workload.name, %error, "failed to read the workload's addresses; egress destinations not checked against it");
                continue;
            }
        };
        if let Some(found) = overlap::find_overlaps(&config.egress, workload, &addresses)
            .into_iter()
            .next()
        {
            return Err(EgressError::VerifiedTwice {
                pod: found.pod,
                destination: found.destination,
                workload: found.workload,
                address: found.address,
                port: found.port,
            });
        }
    }
    Ok(())
}

/// Tells whether the pod cgroup `pod_cgroup` is the agent's cgroup
/// `own_cgroup` or one of its parents, so that it would contain the agent.
fn contains_agent(pod_cgroup: &Path, own_cgroup: &Path) -> bool {
    own_cgroup.starts_with(pod_cgroup)
}

/// Shared inputs of every pod's start, besides the pod's own configuration.
struct PodContext<'a> {
    egress: &'a EgressConfig,
    core: &'a Core,
    own_cgroup: &'a Path,
    links_dir: &'a Path,
    drain: &'a DrainController,
    metrics: &'a EgressMetrics,
}

/// A pod whose steering is attached: its namespace cookie and link pins.
pub(crate) struct EnrolledPod {
    pub(crate) netns_cookie: u64,
    link_pins: Vec<PathBuf>,
}

/// The original destinations of one pod's connections.
struct PodOrigins {
    flows: Arc<Mutex<BpfHashMap<MapData, FlowKey, Origin>>>,
    netns_cookie: u64,
    pod: String,
    metrics: EgressMetrics,
}

impl OriginLookup for PodOrigins {
    fn take_origin(&self, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddr> {
        let key = flow_key(self.netns_cookie, client, listener);
        let mut flows = self.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let origin = flows.get(&key, 0).ok()?;
        if let Err(error) = flows.remove(&key) {
            // The LRU evicts it later, unless a new connection with the
            // same 4-tuple overwrites it first.
            tracing::debug!(pod = %self.pod, %error, "failed to delete an egress flow record");
        }
        origin_address(&origin)
    }

    fn count_accept(&self, found: bool) {
        self.metrics.count_accept(&self.pod, found);
    }
}

/// Builds the flow map key the `sock_ops` program wrote for a connection
/// from `client` to the listener at `listener` in the pod's namespace.
fn flow_key(netns_cookie: u64, client: SocketAddr, listener: SocketAddr) -> FlowKey {
    let family = if client.is_ipv4() {
        tokengate_common::AF_INET
    } else {
        tokengate_common::AF_INET6
    };
    FlowKey::new(
        netns_cookie,
        family,
        (address_words(client.ip()), client.port()),
        (address_words(listener.ip()), listener.port()),
    )
}

/// Returns the network-order words of `addr` as the kernel contexts hold
/// them: IPv4 in word 0.
fn address_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let octets = v6.octets();
            let mut words = [0u32; 4];
            for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            words
        }
    }
}

/// Converts a recorded origin to a socket address, or `None` for an
/// unknown family.
fn origin_address(origin: &Origin) -> Option<SocketAddr> {
    let ip = match origin.family {
        tokengate_common::AF_INET => IpAddr::V4(Ipv4Addr::from(origin.addr[0].to_ne_bytes())),
        tokengate_common::AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(origin.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, origin.port))
}

async fn start_pod(
    ebpf: &Ebpf,
    maps: &mut EgressMaps,
    context: &PodContext<'_>,
    pod: &EgressPodConfig,
) -> Result<EnrolledPod, EgressError> {
    let name = &pod.name;
    // A pod cgroup that contains the agent would put the agent's own calls
    // under the programs. They skip them, but such a setup is a mistake.
    if contains_agent(&pod.cgroup, context.own_cgroup) {
        return Err(EgressError::AgentCgroup {
            pod: name.clone(),
            path: pod.cgroup.clone(),
        });
    }
    let cgroup = File::open(&pod.cgroup).map_err(|source| EgressError::Cgroup {
        pod: name.clone(),
        path: pod.cgroup.clone(),
        source,
    })?;
    let netns = PodNetns::open(&pod.netns).map_err(|source| EgressError::Netns {
        pod: name.clone(),
        path: pod.netns.clone(),
        source,
    })?;
    let netns = Arc::new(netns);

    let listen_error = |source| EgressError::Listen {
        pod: name.clone(),
        source,
    };
    let listener_v4 = netns.listen(LISTEN_V4).await.map_err(listen_error)?;
    let listener_v6 = if netns.has_ipv6_loopback().await.unwrap_or(false) {
        Some(netns.listen(LISTEN_V6).await.map_err(listen_error)?)
    } else {
        None
    };
    let netns_cookie =
        sys::netns_cookie(listener_v4.as_fd()).map_err(|source| EgressError::NetnsCookie {
            pod: name.clone(),
            source,
        })?;
    let port = |listener: &std::net::TcpListener| listener.local_addr().map(|addr| addr.port());
    let record = Pod {
        version: LAYOUT_VERSION,
        port_v4: port(&listener_v4).map_err(listen_error)?,
        port_v6: listener_v6
            .as_ref()
            .map(port)
            .transpose()
            .map_err(listen_error)?
            .unwrap_or(0),
    };

    maps.write_pod(netns_cookie, record, pod)?;
    let link_pins = attach(ebpf, pod, &cgroup, context.links_dir)?;

    // NOTE: the request path is built once. A reload that replaces an
    // issuer does not reach it, so egress pods use that issuer's old key
    // store until the agent restarts.
    let workload = pod.workload();
    let slot = Arc::new(ProxySlot::new(context.core.workload_proxy(&workload)));
    let upstream = Arc::new(EgressUpstream::new(Arc::clone(&netns), context.egress.mark));
    let origins = Arc::new(PodOrigins {
        flows: maps.flows(),
        netns_cookie,
        pod: name.clone(),
        metrics: context.metrics.clone(),
    });
    context.metrics.register_pod(name);
    for listener in std::iter::once(listener_v4).chain(listener_v6) {
        let local = listener.local_addr().ok();
        listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
        tracing::debug!(pod = %name, listener.addr = ?local, "egress listener ready");
        tokio::spawn(proxy::serve_egress(
            listener,
            Arc::clone(&upstream),
            Arc::clone(&slot),
            Arc::clone(&origins),
            context.drain.handle(),
        ));
    }

    tracing::info!(
        pod = %name,
        cgroup = %pod.cgroup.display(),
        netns = %pod.netns.display(),
        destinations = pod.destinations.len(),
        ipv6 = record.port_v6 != 0,
        "egress steering attached to pod"
    );
    Ok(EnrolledPod {
        netns_cookie,
        link_pins,
    })
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), EgressError> {
    for (name, _, _) in PROGRAMS {
        let missing = || EgressError::MissingObject {
            kind: "program",
            name,
        };
        let program = ebpf.program_mut(name).ok_or_else(missing)?;
        let result = if name == PROGRAM_SOCK_OPS {
            let program: &mut SockOps = program.try_into().map_err(|_| missing())?;
            program.load()
        } else {
            let program: &mut CgroupSockAddr = program.try_into().map_err(|_| missing())?;
            program.load()
        };
        result.map_err(|source| EgressError::Program {
            program: name,
            source,
        })?;
    }
    Ok(())
}

/// Attaches the three programs to the pod's cgroup and pins the links as
/// `<pod>_<program>` in `links_dir`. A link pinned there by an earlier
/// agent is replaced after the new one is attached, so the cgroup is never
/// without steering.
fn attach(
    ebpf: &Ebpf,
    pod: &EgressPodConfig,
    cgroup: &File,
    links_dir: &Path,
) -> Result<Vec<PathBuf>, EgressError> {
    let mut pins = Vec::new();
    for (name, attach_type, suffix) in PROGRAMS {
        let program = ebpf.program(name).ok_or(EgressError::MissingObject {
            kind: "program",
            name,
        })?;
        let program_fd = program.fd().map_err(|source| EgressError::Program {
            program: name,
            source,
        })?;
        let link = sys::link_create(program_fd.as_fd(), cgroup.as_fd(), attach_type).map_err(
            |source| EgressError::Attach {
                pod: pod.name.clone(),
                program: name,
                path: pod.cgroup.clone(),
                source,
            },
        )?;

        let pin = links_dir.join(format!("{}_{suffix}", pod.name));
        let staging = links_dir.join(format!("{}_{suffix}_next", pod.name));
        let pin_error = |path: &Path| {
            let path = path.to_owned();
            move |source| EgressError::Pin { path, source }
        };
        remove_if_present(&staging).map_err(pin_error(&staging))?;
        sys::obj_pin(link.as_fd(), &staging).map_err(pin_error(&staging))?;
        // rename(2) replaces an earlier agent's pin in one step. That link
        // is detached once its last reference, the old pin, is gone.
        std::fs::rename(&staging, &pin).map_err(pin_error(&pin))?;
        tracing::debug!(pod = %pod.name, program = name, pin = %pin.display(), "egress link pinned");
        pins.push(pin);
    }
    Ok(pins)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Removes the link pins that an earlier agent left for pods that are no
/// longer configured, which detaches those links.
fn remove_stale_links(links_dir: &Path, enrolled: &[EnrolledPod]) -> Result<(), EgressError> {
    let current: HashSet<&Path> = enrolled
        .iter()
        .flat_map(|pod| pod.link_pins.iter().map(PathBuf::as_path))
        .collect();
    let entries = std::fs::read_dir(links_dir).map_err(|source| EgressError::Pin {
        path: links_dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if !current.contains(path.as_path()) {
            remove_if_present(&path).map_err(|source| EgressError::Pin {
                path: path.clone(),
                source,
            })?;
            tracing::info!(pin = %path.display(), "removed egress link of a pod no longer configured");
        }
    }
    Ok(())
}

/// Removes map directories of other layout versions. Their programs ran
/// behind links that [`attach`] has replaced, so nothing uses them now.
fn remove_other_layouts(pin_dir: &Path, current: &Path) -> Result<(), EgressError> {
    let pin_error = |path: &Path, source| EgressError::Pin {
        path: path.to_owned(),
        source,
    };
    let entries = std::fs::read_dir(pin_dir).map_err(|source| pin_error(pin_dir, source))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_maps_dir = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(MAPS_DIR_PREFIX));
        if is_maps_dir && path != current {
            std::fs::remove_dir_all(&path).map_err(|source| pin_error(&path, source))?;
            tracing::info!(pins = %path.display(), "removed egress maps of another layout version");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_round_trip() {
        let cases: [SocketAddr; 2] = [
            "198.18.7.1:8080".parse().unwrap(),
            "[fd00:7467::1]:443".parse().unwrap(),
        ];

        for address in cases {
            let origin = Origin {
                family: if address.is_ipv4() {
                    tokengate_common::AF_INET
                } else {
                    tokengate_common::AF_INET6
                },
                port: address.port(),
                padding: 0,
                addr: address_words(address.ip()),
            };

            assert_eq!(origin_address(&origin), Some(address));
        }
    }

    #[test]
    fn agent_cgroup_containment() {
        let own = Path::new("/sys/fs/cgroup/system.slice/tokengate.service");

        assert!(contains_agent(own, own));
        assert!(contains_agent(
            Path::new("/sys/fs/cgroup/system.slice"),
            own
        ));
        assert!(!contains_agent(
            Path::new("/sys/fs/cgroup/kubepods.slice/pod1"),
            own
        ));
        assert!(!contains_agent(
            Path::new("/sys/fs/cgroup/system.slice/tokengate.service/child"),
            own
        ));
    }

    #[test]
    fn flow_key_matches_kernel_layout() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let listener: SocketAddr = "127.0.0.1:15001".parse().unwrap();

        let key = flow_key(9, client, listener);

        assert_eq!(key.family, tokengate_common::AF_INET);
        assert_eq!(key.client_addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(key.client_port, 40000);
        assert_eq!(key.listener_port, 15001);
        assert_eq!(key.netns_cookie, 9);
    }
}
