//! A Kubernetes-style node on this machine, for tests of a whole node.
//!
//! The host network namespace is the node: the agent runs there, and
//! host-network callers are processes or sockets there. Each pod is a
//! network namespace joined to the node by a veth pair and routed, as
//! Calico and Cilium do. The node end of every pod's veth has the node's
//! address (/32 and /128). The pod has one /32 and/or /128 and a default
//! route to the node, and the node has a host route to each pod. Each pod
//! also has its own cgroup v2 directory under a `pods` cgroup that the node
//! creates, and [`Pod::command`] starts processes in both.
//!
//! A second node ([`Node::add_remote_node`]) is a namespace with pods
//! behind it that runs no agent. Its pods reach this node's pods through it
//! and the node, so the node forwards their packets. Forwarding is switched
//! on per device, only on the node's own veths (`conf.DEV.forwarding` for
//! IPv4, `conf.DEV.force_forwarding` for IPv6, Linux 6.17), never globally.
//!
//! Addresses come from 198.18.0.0/15 and from the IPv6 /48
//! [`TEST_PREFIX_V6`], one [`AddressBlock`] per node. Everything created is
//! removed on drop, also while a test unwinds from a panic.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

mod addr;
mod cgroup;
mod guard;
mod process;
mod workload;

pub use addr::{AddressBlock, TEST_PREFIX_V6, TEST_PREFIX_V6_LEN};
pub use cgroup::cgroup2_root;
pub use process::{CommandOutput, PodProcess};
pub use workload::{node_agent_config, pod_workload};

use crate::echo::EchoService;
use crate::http::{Connection, Request, Response};
use crate::ids::unique_id;
use crate::netns::{netns_path, run_in_netns};
use cgroup::CgroupGuard;
use guard::{ip_in, write_sysctl, LinkGuard, NetnsGuard};

/// Host part of a node's own address in its block: the pods' gateway.
const NODE_HOST: u8 = 1;

/// Host part of the first pod's address; later pods count up from it.
const FIRST_POD_HOST: u8 = 10;

/// Interface name of the pod end of each veth, as in a Kubernetes pod.
const POD_INTERFACE: &str = "eth0";

/// Interface name of the second node's end of its link to this node.
const REMOTE_UPLINK: &str = "eth0";

/// Prefix of every device, namespace and cgroup name: "tokengate node".
const NAME_PREFIX: &str = "tgn";

/// Maximum length of a Linux interface name (`IFNAMSIZ` minus the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// IP families of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    V4,
    V6,
    Dual,
}

impl Stack {
    pub fn has_v4(self) -> bool {
        matches!(self, Self::V4 | Self::Dual)
    }

    pub fn has_v6(self) -> bool {
        matches!(self, Self::V6 | Self::Dual)
    }
}

/// Where a pod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A pod of this node, in its own network namespace.
    Node,
    /// A host-network pod of this node: the host namespace, own cgroup.
    HostNetwork,
    /// The host namespace itself, in the test's own cgroup.
    Host,
    /// A pod behind the second node of this name.
    RemoteNode(String),
}

/// What a test needs to know about a pod, and how to run things in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Name given at creation, such as `orders`.
    pub name: String,
    pub location: Location,
    /// Name of the pod's network namespace; `None` in the host namespace.
    pub netns: Option<String>,
    /// The pod's cgroup directory; `None` for [`Node::host`].
    pub cgroup: Option<PathBuf>,
    /// The pod's IPv4 address; for host-network callers the node's.
    pub ipv4: Option<Ipv4Addr>,
    /// The pod's IPv6 address; for host-network callers the node's.
    pub ipv6: Option<Ipv6Addr>,
}

impl Pod {
    /// Path of the pod's namespace, for the agent's `netns` setting.
    /// Panics for host-network pods, which have none of their own.
    pub fn netns_path(&self) -> PathBuf {
        let netns = self
            .netns
            .as_deref()
            .unwrap_or_else(|| panic!("pod {} runs in the host namespace", self.name));
        netns_path(netns)
    }

    /// Socket address of `port` on the pod's IPv4 address; panics if the
    /// pod has none.
    pub fn v4(&self, port: u16) -> SocketAddr {
        let ip = self
            .ipv4
            .unwrap_or_else(|| panic!("pod {} has no IPv4 address", self.name));
        SocketAddr::from((ip, port))
    }

    /// Socket address of `port` on the pod's IPv6 address; panics if the
    /// pod has none.
    pub fn v6(&self, port: u16) -> SocketAddr {
        let ip = self
            .ipv6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name));
        SocketAddr::from((ip, port))
    }

    /// Socket addresses of `port` on every address of the pod, IPv4 first.
    pub fn socket_addrs(&self, port: u16) -> Vec<SocketAddr> {
        let v4 = self.ipv4.map(|ip| SocketAddr::from((ip, port)));
        let v6 = self.ipv6.map(|ip| SocketAddr::from((ip, port)));
        v4.into_iter().chain(v6).collect()
    }

    /// Returns the pod's address of the family of `peer`, which is the
    /// source address of its connections to `peer`.
    pub fn source_for(&self, peer: SocketAddr) -> Option<IpAddr> {
        match peer {
            SocketAddr::V4(_) => self.ipv4.map(IpAddr::V4),
            SocketAddr::V6(_) => self.ipv6.map(IpAddr::V6),
        }
    }

    /// Runs `f` on a thread inside the pod's network namespace (on the
    /// current thread in the host namespace). Sockets that `f` creates stay
    /// in that namespace. The thread does not enter the pod's cgroup; use
    /// [`Pod::command`] where cgroup programs must see the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        match &self.netns {
            Some(netns) => run_in_netns(netns, f),
            None => Ok(f()),
        }
    }

    /// Opens a TCP connection from the pod's namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        match self.run(|| TcpStream::connect_timeout(&addr, timeout)) {
            Ok(result) => result,
            Err(error) => Err(io::Error::other(format!("{error:#}"))),
        }
    }

    /// Sends one request on a new connection from the pod's namespace.
    pub fn send(&self, addr: SocketAddr, request: &Request) -> Result<Response> {
        let stream = self
            .connect(addr, crate::http::CONNECT_TIMEOUT)
            .with_context(|| format!("failed to connect from pod {} to {addr}", self.name))?;
        Connection::new(stream)
            .with_context(|| format!("failed to set up the connection to {addr}"))?
            .send(request)
    }

    /// Builds a command that runs `program` in the pod's namespace and
    /// cgroup. Arguments added to it go to `program`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let netns = self.netns.as_deref().map(netns_path);
        process::command_in(netns.as_deref(), self.cgroup.as_deref(), program)
    }

    /// Starts `command` (from [`Pod::command`]); drop kills it.
    pub fn spawn(&self, command: Command) -> Result<PodProcess> {
        PodProcess::spawn(command, &format!("a process in pod {}", self.name))
    }

    /// Runs `command` (from [`Pod::command`]) to its end, killing it after
    /// `timeout`, and returns its exit status and output.
    pub fn output(&self, command: Command, timeout: Duration) -> Result<CommandOutput> {
        process::run_bounded(command, &format!("a process in pod {}", self.name), timeout)
    }

    /// Starts `tg-echo` in the pod's namespace and cgroup on `ports`,
    /// listening on IPv4 and, if the pod has IPv6, on IPv6 too. It logs
    /// each request to `log_path`.
    pub fn start_echo(
        &self,
        echo_bin: &Path,
        ports: &[u16],
        log_path: &Path,
    ) -> Result<EchoService> {
        crate::echo::check_binary(echo_bin)?;
        let mut command = self.command(echo_bin);
        if self.ipv6.is_some() {
            command.arg("--ipv6");
        }
        command.stdin(Stdio::null());
        EchoService::start_command(command, &format!("pod {}", self.name), ports, log_path)
    }
}

/// Addresses and namespace of a second node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    /// Name of its network namespace.
    pub netns: String,
    /// Its address, the gateway of its pods.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// A pod's resources; the veth goes first on drop, then the namespace,
/// then the cgroup.
#[derive(Debug)]
struct PodGuard {
    veth: LinkGuard,
    netns_name: String,
    _netns: NetnsGuard,
    _cgroup: CgroupGuard,
}

/// A second node's resources. Drop order is the field order: its pods,
/// the link to this node, its namespace, its cgroup, its addresses.
#[derive(Debug)]
struct RemoteGuard {
    pods: Vec<PodGuard>,
    _uplink: LinkGuard,
    netns: NetnsGuard,
    cgroup: CgroupGuard,
    block: AddressBlock,
    info: RemoteNode,
}

/// The node under test. Drop order is the field order: pods, second nodes,
/// host-network pods, then the cgroups above them, then the addresses.
#[derive(Debug)]
pub struct Node {
    pods: Vec<PodGuard>,
    remotes: Vec<RemoteGuard>,
    host_network_pods: Vec<CgroupGuard>,
    pods_cgroup: CgroupGuard,
    top_cgroup: CgroupGuard,
    block: AddressBlock,
    id: String,
    next_device: usize,
    forwards_ipv6: bool,
}

impl Node {
    /// Reserves the node's address block and creates its cgroups
    /// (`<cgroup2 root>/tgn<id>/pods`). No device changes yet.
    pub fn create() -> Result<Self> {
        let id = unique_id();
        let block = AddressBlock::allocate()?;
        let root = cgroup2_root()?;
        let top_cgroup = CgroupGuard::create(&root.join(format!("{NAME_PREFIX}{id}")))?;
        let pods_cgroup = CgroupGuard::create(&top_cgroup.path().join("pods"))?;

        Ok(Self {
            pods: Vec::new(),
            remotes: Vec::new(),
            host_network_pods: Vec::new(),
            pods_cgroup,
            top_cgroup,
            block,
            id,
            next_device: 0,
            forwards_ipv6: true,
        })
    }

    /// Unique id of this node, part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns the node's IPv4 address, the source address of host-network
    /// callers' connections to pods.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.block.v4(NODE_HOST)
    }

    /// Returns the node's IPv6 address, as [`Node::ipv4`] does for IPv4.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.block.v6(u16::from(NODE_HOST))
    }

    /// Returns whether the node forwards IPv6 between its devices, which
    /// pod-to-pod and second-node IPv6 traffic needs. It is false on
    /// kernels before 6.17, which lack per-device IPv6 forwarding; the
    /// harness does not switch on the host's global forwarding instead.
    pub fn forwards_ipv6(&self) -> bool {
        self.forwards_ipv6
    }

    /// Returns the `pods` cgroup, the parent of every pod cgroup of this
    /// node.
    pub fn pods_cgroup(&self) -> &Path {
        self.pods_cgroup.path()
    }

    /// Returns the host namespace as a caller, in the test's own cgroup.
    pub fn host(&self) -> Pod {
        Pod {
            name: "host".to_owned(),
            location: Location::Host,
            netns: None,
            cgroup: None,
            ipv4: Some(self.ipv4()),
            ipv6: Some(self.ipv6()),
        }
    }

    /// Adds a host-network pod: the host namespace with its own cgroup
    /// under the `pods` cgroup.
    pub fn add_host_network_pod(&mut self, name: &str) -> Result<Pod> {
        let cgroup = CgroupGuard::create(&self.pods_cgroup.path().join(name))?;
        let pod = Pod {
            name: name.to_owned(),
            location: Location::HostNetwork,
            netns: None,
            cgroup: Some(cgroup.path().to_owned()),
            ipv4: Some(self.ipv4()),
            ipv6: Some(self.ipv6()),
        };
        self.host_network_pods.push(cgroup);
        Ok(pod)
    }

    /// Adds a pod of this node with the IP families of `stack`.
    pub fn add_pod(&mut self, name: &str, stack: Stack) -> Result<Pod> {
        let index = self.pods.len();
        let host = pod_host(index)?;
        let netns = format!("{NAME_PREFIX}{}-{name}", self.id);
        let cgroup_path = self.pods_cgroup.path().join(name);
        let node = Gateway {
            netns: None,
            ipv4: self.ipv4(),
            ipv6: self.ipv6(),
        };
        let ipv4 = stack.has_v4().then(|| self.block.v4(host));
        let ipv6 = stack.has_v6().then(|| self.block.v6(u16::from(host)));
        let device = self.device_name("p")?;

        let (guard, forwards_ipv6) = attach_pod(&node, &device, &netns, &cgroup_path, ipv4, ipv6)?;
        self.forwards_ipv6 &= forwards_ipv6;
        self.pods.push(guard);
        Ok(Pod {
            name: name.to_owned(),
            location: Location::Node,
            netns: Some(netns),
            cgroup: Some(cgroup_path),
            ipv4,
            ipv6,
        })
    }

    /// Adds a second node: a namespace that forwards between its pods and
    /// this node, with its own address block, and that runs no agent.
    pub fn add_remote_node(&mut self, name: &str) -> Result<RemoteNode> {
        let block = AddressBlock::allocate()?;
        let netns_name = format!("{NAME_PREFIX}{}-{name}", self.id);
        let netns = NetnsGuard::create(&netns_name)?;
        let cgroup = CgroupGuard::create(&self.top_cgroup.path().join(name))?;
        let device = self.device_name("r")?;
        let uplink = LinkGuard::create_veth(&device, None, REMOTE_UPLINK, &netns_name)?;

        let info = RemoteNode {
            name: name.to_owned(),
            netns: netns_name.clone(),
            ipv4: block.v4(NODE_HOST),
            ipv6: block.v6(u16::from(NODE_HOST)),
        };
        // The node's end: the node's addresses, and the second node's
        // block routed through the second node.
        let remote_ns = Some(netns_name.as_str());
        configure_end(None, uplink.name(), self.ipv4(), self.ipv6())?;
        route_block_via(None, uplink.name(), &block, info.ipv4, info.ipv6)?;
        self.forwards_ipv6 &= enable_forwarding(None, uplink.name())?;

        // The second node's end: its own addresses, everything else via
        // this node, and forwarding for its pods.
        configure_end(remote_ns, REMOTE_UPLINK, info.ipv4, info.ipv6)?;
        add_gateway_routes(remote_ns, REMOTE_UPLINK, self.ipv4(), self.ipv6())?;
        write_sysctl(remote_ns, "net/ipv4/ip_forward", "1")?;
        write_sysctl(remote_ns, "net/ipv6/conf/all/forwarding", "1")?;

        self.remotes.push(RemoteGuard {
            pods: Vec::new(),
            _uplink: uplink,
            netns,
            cgroup,
            block,
            info: info.clone(),
        });
        Ok(info)
    }

    /// Adds a pod behind the second node `remote`, in a cgroup under
    /// `<cgroup2 root>/tgn<id>/<remote name>`, outside the `pods` cgroup.
    pub fn add_remote_pod(&mut self, remote: &RemoteNode, name: &str, stack: Stack) -> Result<Pod> {
        let device = self.device_name("q")?;
        let Some(guard) = self.remotes.iter_mut().find(|guard| guard.info == *remote) else {
            bail!("second node {} does not belong to this node", remote.name);
        };
        let host = pod_host(guard.pods.len())?;
        let netns = format!("{NAME_PREFIX}{}-{}-{name}", self.id, remote.name);
        let cgroup_path = guard.cgroup.path().join(name);
        let gateway = Gateway {
            netns: Some(guard.netns.name().to_owned()),
            ipv4: remote.ipv4,
            ipv6: remote.ipv6,
        };
        let ipv4 = stack.has_v4().then(|| guard.block.v4(host));
        let ipv6 = stack.has_v6().then(|| guard.block.v6(u16::from(host)));

        let (pod_guard, _) = attach_pod(&gateway, &device, &netns, &cgroup_path, ipv4, ipv6)?;
        guard.pods.push(pod_guard);
        Ok(Pod {
            name: name.to_owned(),
            location: Location::RemoteNode(remote.name.clone()),
            netns: Some(netns),
            cgroup: Some(cgroup_path),
            ipv4,
            ipv6,
        })
    }

    /// Returns the name of the node end of `pod`'s veth, for a scope id or
    /// a per-device setting. Pods of a second node and host-network pods
    /// have none.
    pub fn pod_device(&self, pod: &Pod) -> Option<String> {
        let netns = pod.netns.as_deref()?;
        if pod.location != Location::Node {
            return None;
        }
        let index = self
            .pods
            .iter()
            .position(|guard| guard.netns_name == netns)?;
        Some(self.pods[index].veth.name().to_owned())
    }

    /// Switches IPv6 off inside `pod` (`net.ipv6.conf.all.disable_ipv6`),
    /// which removes `::1` from its loopback, as in clusters that disable
    /// IPv6 in pods. Only for IPv4 pods of this node or a second node.
    pub fn disable_ipv6(&self, pod: &Pod) -> Result<()> {
        let Some(netns) = pod.netns.as_deref() else {
            bail!(
                "pod {} runs in the host namespace, whose IPv6 stays as it is",
                pod.name
            );
        };
        if pod.ipv6.is_some() {
            bail!(
                "pod {} has an IPv6 address: create it with Stack::V4",
                pod.name
            );
        }
        write_sysctl(Some(netns), "net/ipv6/conf/all/disable_ipv6", "1")?;
        write_sysctl(Some(netns), "net/ipv6/conf/default/disable_ipv6", "1")?;
        write_sysctl(Some(netns), "net/ipv6/conf/lo/disable_ipv6", "1")
    }

    /// Builds a device name unique to this node and call: `tgn<id><kind><n>`.
    fn device_name(&mut self, kind: &str) -> Result<String> {
        let name = format!("{NAME_PREFIX}{}{kind}{}", self.id, self.next_device);
        self.next_device += 1;
        if name.len() > MAX_IFNAME_LEN {
            bail!("device name {name} is longer than {MAX_IFNAME_LEN} bytes: too many devices on one test node");
        }
        Ok(name)
    }
}

/// The namespace a pod's veth starts in (`None` for the host) and the
/// addresses its end gets: the pod's gateway.
struct Gateway {
    netns: Option<String>,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

/// Host part of the pod with creation index `index`.
fn pod_host(index: usize) -> Result<u8> {
    u8::try_from(usize::from(FIRST_POD_HOST) + index)
        .ok()
        .filter(|host| *host < u8::MAX)
        .context("too many pods on one node: a block fits 245 pods")
}

/// Creates a pod's namespace, cgroup and veth, and routes it through
/// `gateway`. Also returns whether the gateway forwards the pod's IPv6
/// packets (see [`enable_forwarding`]).
fn attach_pod(
    gateway: &Gateway,
    device: &str,
    netns: &str,
    cgroup_path: &Path,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
) -> Result<(PodGuard, bool)> {
    let cgroup = CgroupGuard::create(cgroup_path)?;
    let netns_guard = NetnsGuard::create(netns)?;
    let gateway_ns = gateway.netns.as_deref();
    let veth = LinkGuard::create_veth(device, gateway_ns, POD_INTERFACE, netns)?;

    configure_end(gateway_ns, veth.name(), gateway.ipv4, gateway.ipv6)?;
    if let Some(ip) = ipv4 {
        ip_in(
            gateway_ns,
            &["route", "add", &format!("{ip}/32"), "dev", veth.name()],
        )?;
    }
    if let Some(ip) = ipv6 {
        ip_in(
            gateway_ns,
            &[
                "-6",
                "route",
                "add",
                &format!("{ip}/128"),
                "dev",
                veth.name(),
            ],
        )?;
    }
    let forwards_ipv6 = enable_forwarding(gateway_ns, veth.name())?;

    let pod_ns = Some(netns);
    if let Some(ip) = ipv4 {
        ip_in(
            pod_ns,
            &["addr", "add", &format!("{ip}/32"), "dev", POD_INTERFACE],
        )?;
    }
    if let Some(ip) = ipv6 {
        ip_in(
            pod_ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{ip}/128"),
                "dev",
                POD_INTERFACE,
                "nodad",
            ],
        )?;
    }
    ip_in(pod_ns, &["link", "set", POD_INTERFACE, "up"])?;
    add_gateway_routes(pod_ns, POD_INTERFACE, gateway.ipv4, gateway.ipv6)?;

    let guard = PodGuard {
        veth,
        netns_name: netns.to_owned(),
        _netns: netns_guard,
        _cgroup: cgroup,
    };
    Ok((guard, forwards_ipv6))
}

/// Gives the device `device` in `netns` the host addresses `ipv4`/32 and
/// `ipv6`/128 and brings it up. Its IPv6 addresses skip duplicate address
/// detection, so they are usable at once.
fn configure_end(netns: Option<&str>, device: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<()> {
    ip_in(
        netns,
        &["addr", "add", &format!("{ipv4}/32"), "dev", device],
    )?;
    ip_in(
        netns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/128"),
            "dev",
            device,
            "nodad",
        ],
    )?;
    // Set before the device comes up, so its link-local address skips
    // duplicate address detection as well.
    write_sysctl(netns, &format!("net/ipv6/conf/{device}/accept_dad"), "0")?;
    ip_in(netns, &["link", "set", device, "up"])?;
    Ok(())
}

/// Adds a default route for each family through the gateway addresses,
/// which are on the link `device` but in no subnet of it.
fn add_gateway_routes(
    netns: Option<&str>,
    device: &str,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> Result<()> {
    let ipv4 = ipv4.to_string();
    let ipv6 = ipv6.to_string();
    ip_in(
        netns,
        &["route", "add", &ipv4, "dev", device, "scope", "link"],
    )?;
    ip_in(
        netns,
        &["route", "add", "default", "via", &ipv4, "dev", device],
    )?;
    ip_in(netns, &["-6", "route", "add", &ipv6, "dev", device])?;
    ip_in(
        netns,
        &["-6", "route", "add", "default", "via", &ipv6, "dev", device],
    )?;
    Ok(())
}

/// Routes the whole `block` through `ipv4`/`ipv6` on `device`.
fn route_block_via(
    netns: Option<&str>,
    device: &str,
    block: &AddressBlock,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> Result<()> {
    let ipv4 = ipv4.to_string();
    let ipv6 = ipv6.to_string();
    ip_in(
        netns,
        &["route", "add", &ipv4, "dev", device, "scope", "link"],
    )?;
    ip_in(
        netns,
        &[
            "route",
            "add",
            &block.cidr_v4(),
            "via",
            &ipv4,
            "dev",
            device,
        ],
    )?;
    ip_in(netns, &["-6", "route", "add", &ipv6, "dev", device])?;
    ip_in(
        netns,
        &[
            "-6",
            "route",
            "add",
            &block.cidr_v6(),
            "via",
            &ipv6,
            "dev",
            device,
        ],
    )?;
    Ok(())
}

/// Lets packets that arrive on `device` be forwarded, and returns whether
/// IPv6 packets are forwarded too. In the host namespace this is the
/// per-device switch, so the host's global forwarding setting stays as it
/// is; IPv6 has one only from Linux 6.17 (`force_forwarding`).
fn enable_forwarding(netns: Option<&str>, device: &str) -> Result<bool> {
    write_sysctl(netns, &format!("net/ipv4/conf/{device}/forwarding"), "1")?;
    if netns.is_some() {
        return Ok(true);
    }
    let key = format!("net/ipv6/conf/{device}/force_forwarding");
    if !Path::new("/proc/sys").join(&key).exists() {
        return Ok(false);
    }
    write_sysctl(netns, &key, "1")?;
    Ok(true)
}
