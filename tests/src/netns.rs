//! Pods as network namespaces on a bridge in the host namespace.
//!
//! A [`Network`] reserves one /24 of 198.18.0.0/15 (reserved for network
//! benchmarks by RFC 2544, so no production network uses it), creates a bridge that
//! has the .1 address of that /24, and attaches each pod through a veth
//! pair whose pod end is renamed `eth0`. Every guard removes what it made on
//! drop, also while a test unwinds from a panic.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};

use crate::ids::unique_id;

/// Directory where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// First address of 198.18.0.0/15.
const RANGE_START: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// Number of /24 networks in 198.18.0.0/15.
const SUBNET_COUNT: u32 = 512;

/// Host part of the bridge's address in its /24.
const GATEWAY_HOST: u8 = 1;

/// Host part of the first pod's address; later pods count up from it.
const FIRST_POD_HOST: u8 = 10;

/// Interface name of the pod end of each veth pair, as in a Kubernetes pod.
const POD_INTERFACE: &str = "eth0";

static NEXT_SUBNET_SEED: AtomicU32 = AtomicU32::new(0);

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Returns whether a named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// One /24 of 198.18.0.0/15, reserved for the lifetime of this value.
///
/// The reservation is an flock(2) on a file in the temporary directory. The
/// kernel drops the lock when its holder exits, so a crashed test leaves no
/// stale reservation behind.
#[derive(Debug)]
pub struct Subnet {
    index: u32,
    _lock: Flock<File>,
}

impl Subnet {
    /// Reserves a /24 that no other process has reserved and that no address or
    /// route of the host namespace overlaps. The search starts at a point
    /// derived from the process id and a counter, so parallel processes
    /// rarely contend for the same lock.
    pub fn allocate() -> Result<Self> {
        let lock_dir = std::env::temp_dir().join("tokengate-test-subnets");
        std::fs::create_dir_all(&lock_dir)
            .with_context(|| format!("failed to create {}", lock_dir.display()))?;
        let host_networks = host_ipv4_networks()?;

        let seed = NEXT_SUBNET_SEED.fetch_add(1, Ordering::Relaxed);
        let start = std::process::id().wrapping_mul(97).wrapping_add(seed) % SUBNET_COUNT;
        for offset in 0..SUBNET_COUNT {
            let index = (start + offset) % SUBNET_COUNT;
            let network = subnet_network(index);
            if host_networks
                .iter()
                .any(|&(address, len)| overlaps(network, 24, address, len))
            {
                continue;
            }

            let path = lock_dir.join(format!("{index}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("failed to open {}", path.display()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Self { index, _lock: lock }),
                Err((_, Errno::EWOULDBLOCK)) => {}
                Err((_, errno)) => {
                    return Err(errno).with_context(|| format!("failed to lock {}", path.display()))
                }
            }
        }
        bail!("no free /24 left in 198.18.0.0/15: remove leftover test bridges (`ip -4 route`)")
    }

    /// Network address of this /24.
    pub fn network(&self) -> Ipv4Addr {
        subnet_network(self.index)
    }

    /// Address with the given host part inside this /24.
    pub fn address(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.network().octets();
        Ipv4Addr::new(a, b, c, host)
    }
}

fn subnet_network(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(RANGE_START) + (index << 8))
}

/// Returns whether two IPv4 prefixes share at least one address.
fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len).min(32);
    if len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    u32::from(a) & mask == u32::from(b) & mask
}

/// Addresses and route prefixes of the host namespace, as (address, prefix
/// length) pairs; a bare address counts as a /32.
fn host_ipv4_networks() -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut networks = Vec::new();
    for args in [
        &["-4", "-o", "addr", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
    ] {
        let output = run_ip(args)?;
        for token in output.split_whitespace() {
            let (address, len) = match token.split_once('/') {
                Some((address, len)) => (address, len.parse::<u8>().ok()),
                None => (token, Some(32)),
            };
            if let (Ok(address), Some(len)) = (address.parse::<Ipv4Addr>(), len) {
                networks.push((address, len));
            }
        }
    }
    Ok(networks)
}

/// Runs `ip ARGS` and returns its standard output, or an error that quotes
/// the command and its standard error.
pub fn run_ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip").args(args).output().with_context(|| {
        format!(
            "failed to run `ip {}`: is iproute2 installed?",
            args.join(" ")
        )
    })?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip ARGS` during cleanup. A failure is printed, not raised, because
/// cleanup runs in `Drop`, possibly while a panic unwinds.
fn run_ip_cleanup(args: &[&str]) {
    if let Err(error) = run_ip(args) {
        let text = format!("{error:#}");
        let already_gone = text.contains("Cannot find device") || text.contains("No such file");
        if !already_gone {
            eprintln!("cleanup: {text}");
        }
    }
}

/// A network interface in the host namespace, deleted on drop. Deleting one
/// end of a veth pair deletes the other end too.
#[derive(Debug)]
struct LinkGuard {
    name: String,
    keep: bool,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if !self.keep {
            run_ip_cleanup(&["link", "del", &self.name]);
        }
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
struct NetnsGuard {
    name: String,
    keep: bool,
}

impl NetnsGuard {
    fn create(name: &str) -> Result<Self> {
        if netns_exists(name) {
            bail!("network namespace {name} already exists: remove it with `ip netns del {name}`");
        }
        run_ip(&["netns", "add", name])?;
        Ok(Self {
            name: name.to_owned(),
            keep: false,
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if !self.keep {
            run_ip_cleanup(&["netns", "del", &self.name]);
        }
    }
}

/// A pod's namespace and its veth pair. The link goes first on drop, then
/// the namespace.
#[derive(Debug)]
struct PodGuard {
    host_veth: LinkGuard,
    netns: NetnsGuard,
}

/// What a test needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Short role name such as `orders`.
    pub role: String,
    /// Name of the pod's network namespace.
    pub netns: String,
    /// The pod's address on the bridge.
    pub address: Ipv4Addr,
    /// The bridge's address: the pod's default gateway and the source
    /// address of connections from the host namespace.
    pub gateway: Ipv4Addr,
}

impl PodInfo {
    /// Path of the pod's namespace, for the agent's `netns` setting.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Socket address of one of the pod's ports.
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.address, port))
    }
}

/// A bridge in the host namespace and the pods attached to it.
///
/// Drop order is the field order: pods first, then the bridge, then the
/// /24 reservation.
#[derive(Debug)]
pub struct Network {
    pods: Vec<PodGuard>,
    bridge: LinkGuard,
    subnet: Subnet,
    id: String,
    pod_infos: Vec<PodInfo>,
}

impl Network {
    /// Reserves a /24 and creates the bridge with the gateway address.
    pub fn create() -> Result<Self> {
        let id = unique_id();
        let subnet = Subnet::allocate()?;
        let bridge_name = format!("tge{id}b");

        run_ip(&["link", "add", &bridge_name, "type", "bridge"])?;
        let bridge = LinkGuard {
            name: bridge_name,
            keep: false,
        };
        // With br_netfilter loaded, bridged traffic passes the host's
        // iptables rules, and traffic between test pods must not depend on
        // them. A kernel without the per-bridge switch rejects this, and then
        // the global setting applies.
        let _ = run_ip(&[
            "link",
            "set",
            &bridge.name,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
        ]);
        let gateway = format!("{}/24", subnet.address(GATEWAY_HOST));
        run_ip(&["addr", "add", &gateway, "dev", &bridge.name])?;
        run_ip(&["link", "set", &bridge.name, "up"])?;

        Ok(Self {
            pods: Vec::new(),
            bridge,
            subnet,
            id,
            pod_infos: Vec::new(),
        })
    }

    /// Name of the bridge interface.
    pub fn bridge_name(&self) -> &str {
        &self.bridge.name
    }

    /// Returns the bridge's address, which is also each pod's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.address(GATEWAY_HOST)
    }

    /// Pods created so far, in creation order.
    pub fn pods(&self) -> &[PodInfo] {
        &self.pod_infos
    }

    /// Adds a pod whose namespace name is derived from this network's id and
    /// the role, so parallel tests never share one.
    pub fn add_pod(&mut self, role: &str) -> Result<PodInfo> {
        let netns = format!("tge{}-{role}", self.id);
        self.add_pod_with_netns(role, &netns)
    }

    /// Adds a pod with a chosen namespace name. Fails if that namespace
    /// exists already, so nothing of someone else's is reused or removed.
    pub fn add_pod_with_netns(&mut self, role: &str, netns: &str) -> Result<PodInfo> {
        let index = self.pods.len();
        let host = u8::try_from(usize::from(FIRST_POD_HOST) + index)
            .ok()
            .filter(|host| *host < u8::MAX)
            .context("too many pods on one network: a /24 fits 244 after the first pod address")?;
        let address = self.subnet.address(host);
        let host_veth = format!("tge{}h{index}", self.id);
        let pod_veth = format!("tge{}p{index}", self.id);

        let netns_guard = NetnsGuard::create(netns)?;
        run_ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth, "netns", netns,
        ])?;
        let pod = PodGuard {
            host_veth: LinkGuard {
                name: host_veth,
                keep: false,
            },
            netns: netns_guard,
        };

        run_ip(&[
            "link",
            "set",
            &pod.host_veth.name,
            "master",
            &self.bridge.name,
        ])?;
        run_ip(&["link", "set", &pod.host_veth.name, "up"])?;
        run_ip(&["-n", netns, "link", "set", &pod_veth, "name", POD_INTERFACE])?;
        let cidr = format!("{address}/24");
        run_ip(&["-n", netns, "addr", "add", &cidr, "dev", POD_INTERFACE])?;
        run_ip(&["-n", netns, "link", "set", POD_INTERFACE, "up"])?;
        run_ip(&["-n", netns, "link", "set", "lo", "up"])?;
        run_ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;

        let info = PodInfo {
            role: role.to_owned(),
            netns: netns.to_owned(),
            address,
            gateway: self.gateway(),
        };
        self.pods.push(pod);
        self.pod_infos.push(info.clone());
        Ok(info)
    }

    /// Leaves the bridge, veths and namespaces in place after drop, for
    /// debugging. The caller tells the user how to remove them.
    pub fn keep(&mut self) {
        self.bridge.keep = true;
        for pod in &mut self.pods {
            pod.host_veth.keep = true;
            pod.netns.keep = true;
        }
    }
}

/// Runs `f` on a new thread that has entered the named network namespace,
/// and returns its result. Sockets that `f` creates stay in that namespace
/// when they are used from other threads later. A panic in `f` is resumed
/// on the calling thread.
pub fn run_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(netns);
    let file = File::open(&path)
        .with_context(|| format!("failed to open network namespace {}", path.display()))?;

    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("failed to enter network namespace {netns}"))?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Where a client runs: the host namespace or a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The host namespace; connections to pods leave from the bridge
    /// address `source`.
    Host { source: Ipv4Addr },
    /// Inside a pod's namespace.
    Pod(PodInfo),
}

impl Caller {
    /// Short name for output: `host` or the pod's role.
    pub fn label(&self) -> String {
        match self {
            Self::Host { .. } => "host".to_owned(),
            Self::Pod(pod) => format!("pod {}", pod.role),
        }
    }

    /// Source address of this caller's connections to pods.
    pub fn source_ip(&self) -> Ipv4Addr {
        match self {
            Self::Host { source } => *source,
            Self::Pod(pod) => pod.address,
        }
    }

    /// Runs `f` in this caller's namespace: on the current thread for the
    /// host, on a thread inside the pod's namespace otherwise.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        match self {
            Self::Host { .. } => Ok(f()),
            Self::Pod(pod) => run_in_netns(&pod.netns, f),
        }
    }

    /// Opens a TCP connection from this caller's namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        match self.run(|| TcpStream::connect_timeout(&addr, timeout)) {
            Ok(result) => result,
            Err(error) => Err(io::Error::other(format!("{error:#}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_cover_the_benchmarking_range() {
        assert_eq!(subnet_network(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(subnet_network(255), Ipv4Addr::new(198, 18, 255, 0));
        assert_eq!(subnet_network(256), Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(
            subnet_network(SUBNET_COUNT - 1),
            Ipv4Addr::new(198, 19, 255, 0)
        );
    }

    #[test]
    fn overlap_checks_shorter_prefix() {
        let net = Ipv4Addr::new(198, 18, 5, 0);
        assert!(overlaps(net, 24, Ipv4Addr::new(198, 18, 5, 77), 32));
        assert!(overlaps(net, 24, Ipv4Addr::new(198, 18, 0, 0), 15));
        assert!(overlaps(net, 24, Ipv4Addr::UNSPECIFIED, 0));
        assert!(!overlaps(net, 24, Ipv4Addr::new(198, 18, 50, 1), 32));
        assert!(!overlaps(net, 24, Ipv4Addr::new(192, 0, 2, 0), 24));
    }

    #[test]
    fn allocated_subnets_differ() {
        let first = Subnet::allocate().expect("first subnet");
        let second = Subnet::allocate().expect("second subnet");
        assert_ne!(first.network(), second.network());
        assert!(overlaps(first.network(), 24, RANGE_START, 15));
    }
}
