//! Privileged test of the `sk_lookup` steering against the real kernel.
//!
//! It builds a pod: a network namespace with a veth pair to the host
//! (addresses from 198.19.0.0/16, the benchmarking range), a plain TCP server
//! in it, and the agent's listeners made through `PodNetns`. Then it attaches
//! the program with `Steering` and checks which socket each kind of caller
//! reaches, what happens when the agent's listener is gone, what a restarted
//! agent does with the pins, and that the counters match.
//!
//! Needs root and a kernel with `sk_lookup` (5.9). Without them it prints
//! `SKIP: <reason>` and passes, except with `CI=true`, where it fails.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokengate::bpf::inspect::{self, PinnedKind};
use tokengate::bpf::{PodSteering, SteerCounters, Steering, LOG_THREAD_NAME};
use tokengate::config::{InterceptionConfig, WorkloadConfig};
use tokengate::netns::PodNetns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Bound on every connect and read; a dropped connection fails by then.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// The agent's reserved source, as in the default configuration.
const RESERVED_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// An IPv6 reserved source that no test connection uses, so that `::1`
/// counts only as loopback.
const UNUSED_RESERVED_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 6);

/// Banner of the pod's own server.
const SERVER_BANNER: &str = "server";

/// Banner of the agent's listener; the accepted socket's local address
/// follows it.
const AGENT_BANNER: &str = "agent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steering_in_pod_namespace() {
    if let Err(reason) = preflight() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "steering test cannot run in CI: {reason}"
        );
        println!("SKIP: {reason}");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug,aya=info,aya_obj=info")
        .with_test_writer()
        .try_init();

    let bed = TestBed::create().await;

    let (agent, pod_steering) = check_agent_up(&bed).await;
    let before_death = check_agent_dead(&bed, agent, pod_steering).await;
    let (agent, steering, pin_dir) = check_agent_restart(&bed, before_death).await;
    check_new_namespace(&bed, &steering, &agent, &pin_dir).await;
    check_port_change_and_detach(&bed, &steering, agent, &pin_dir).await;

    // Each attach started a log reader; every program is gone now, and so
    // must be every reader.
    let deadline = Instant::now() + Duration::from_secs(2);
    while log_reader_threads() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        log_reader_threads(),
        0,
        "eBPF log readers outlived their programs"
    );

    bed.stop_servers();
}

/// Counts this process's eBPF log reader threads.
fn log_reader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list threads")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == LOG_THREAD_NAME)
        })
        .count()
}

/// Agent up with loopback exempt: only outside callers reach the agent.
async fn check_agent_up(bed: &TestBed) -> (Agent, PodSteering) {
    let agent = Agent::start(&bed.netns).await;
    let steering = Steering::new(&interception(&bed.pins.path, true)).expect("prepare steering");
    let pod_steering = attach(&steering, bed, &agent, &[bed.protected]);
    let start = counters(&pod_steering);

    let protected = bed.pod_addr(bed.protected);
    assert_eq!(host_call(protected).await, Reached::Agent(protected));
    assert_eq!(
        host_call(bed.pod_addr(bed.unprotected)).await,
        Reached::Server
    );
    assert_eq!(reserved_call(&bed.netns, protected).await, Reached::Server);
    assert_eq!(
        pod_call(&bed.netns, bed.loopback_v4()).await,
        Reached::Server
    );
    assert_eq!(
        pod_call(&bed.netns, bed.loopback_v6()).await,
        Reached::Server
    );
    assert_eq!(delta(start, counters(&pod_steering)), counts(1, 4, 0));
    assert_eq!(log_reader_threads(), 1, "attach started no eBPF log reader");

    (agent, pod_steering)
}

/// Agent dead: its listeners close and the pinned link stays, so the
/// protected port drops while the unprotected one still works. Returns the
/// counters from before the death.
async fn check_agent_dead(bed: &TestBed, agent: Agent, pod_steering: PodSteering) -> SteerCounters {
    let before_death = counters(&pod_steering);
    drop(pod_steering);
    agent.stop().await;

    assert_eq!(
        host_call(bed.pod_addr(bed.protected)).await,
        Reached::Nothing
    );
    assert_eq!(
        host_call(bed.pod_addr(bed.unprotected)).await,
        Reached::Server
    );

    before_death
}

/// Agent restarted with loopback not exempt: the pinned maps are reused (the
/// counters go on) and the new link replaces the old one.
async fn check_agent_restart(
    bed: &TestBed,
    before_death: SteerCounters,
) -> (Agent, Steering, PathBuf) {
    let agent = Agent::start(&bed.netns).await;
    let steering = Steering::new(&interception(&bed.pins.path, false)).expect("prepare steering");
    let pod_steering = attach(&steering, bed, &agent, &[bed.protected]);
    let restarted = counters(&pod_steering);

    assert_eq!(delta(before_death, restarted), counts(0, 1, 1));

    let protected = bed.pod_addr(bed.protected);
    assert_eq!(host_call(protected).await, Reached::Agent(protected));
    assert_eq!(reserved_call(&bed.netns, protected).await, Reached::Server);
    assert_eq!(
        pod_call(&bed.netns, bed.loopback_v4()).await,
        Reached::Agent(bed.loopback_v4())
    );
    assert_eq!(
        pod_call(&bed.netns, bed.loopback_v6()).await,
        Reached::Agent(bed.loopback_v6())
    );
    // Exact deltas also show that only one program runs: the old link, had
    // it stayed, would count every connection a second time.
    assert_eq!(delta(restarted, counters(&pod_steering)), counts(3, 1, 0));

    (agent, steering, pod_steering.pin_dir().to_owned())
}

/// Another port list releases the old port and protects the new one; detach
/// removes the pins and every port reaches the pod's server again.
///
/// The new program replaces the old one inside the pinned link
/// (`BPF_LINK_UPDATE`): the link keeps its id and runs another program, so
/// there is never a second link whose release the kernel could delay.
async fn check_port_change_and_detach(
    bed: &TestBed,
    steering: &Steering,
    agent: Agent,
    pin_dir: &Path,
) {
    let before = pinned_link(pin_dir);
    let pod_steering = attach(steering, bed, &agent, &[bed.unprotected]);
    let after = pinned_link(pin_dir);

    assert_eq!(
        after.0, before.0,
        "the pinned link was replaced, not updated"
    );
    assert_ne!(
        after.1, before.1,
        "the pinned link still runs the old program"
    );

    let unprotected = bed.pod_addr(bed.unprotected);
    assert_eq!(
        host_call(bed.pod_addr(bed.protected)).await,
        Reached::Server
    );
    assert_eq!(host_call(unprotected).await, Reached::Agent(unprotected));

    let pin_dir = pod_steering.pin_dir().to_owned();
    pod_steering.detach().expect("detach");

    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    assert_eq!(host_call(unprotected).await, Reached::Server);

    agent.stop().await;
}

/// Checks a pod that got a new namespace under the same workload name. The
/// pinned link belongs to the old namespace, so it cannot be updated.
/// Attach gives the new namespace a new link, replaces the pin by `rename`
/// and waits until the kernel has released the old link, so the old
/// namespace is no longer steered. Attaching to the first namespace again
/// does the same back.
async fn check_new_namespace(bed: &TestBed, steering: &Steering, agent: &Agent, pin_dir: &Path) {
    let other = SpareNetns::create();
    let other_netns = PodNetns::open(&other.path()).expect("open the second namespace");
    let other_agent = Agent::start(&other_netns).await;
    let first_link = pinned_link(pin_dir);

    let yaml = format!(
        "name: {}\nnetns: {}\nports: [{}]\n",
        bed.pod.workload,
        other.path().display(),
        bed.protected
    );
    let workload: WorkloadConfig = serde_yaml::from_str(&yaml).expect("workload config");
    let moved = steering
        .attach(
            &workload,
            other_netns.file(),
            &other_agent.listener_v4,
            Some(&other_agent.listener_v6),
        )
        .expect("attach in the second namespace");
    let second_link = pinned_link(pin_dir);
    let protected = bed.pod_addr(bed.protected);
    let reached_after_move = host_call(protected).await;
    drop(moved);
    let back = attach(steering, bed, agent, &[bed.protected]);
    let third_link = pinned_link(pin_dir);
    let reached_after_return = host_call(protected).await;

    assert_ne!(
        second_link.0, first_link.0,
        "the link of the old namespace was kept"
    );
    assert_eq!(reached_after_move, Reached::Server);
    assert_ne!(third_link.0, second_link.0);
    assert_eq!(reached_after_return, Reached::Agent(protected));

    drop(back);
    other_agent.stop().await;
}

/// A bare network namespace with loopback up, deleted on drop.
struct SpareNetns {
    name: String,
}

impl SpareNetns {
    fn create() -> Self {
        let name = format!("tgsx{}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for SpareNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Returns the id of the link pinned in `pin_dir` and of its program.
fn pinned_link(pin_dir: &Path) -> (u32, u32) {
    let programs = inspect::program_index();
    match inspect::identify(&pin_dir.join("link"), &programs) {
        PinnedKind::Link {
            id,
            program: Some(program),
            ..
        } => (id, program.id),
        other => panic!(
            "no readable link pinned in {}: {other:?}",
            pin_dir.display()
        ),
    }
}

/// The pod with its own service: a server on a protected and an unprotected
/// port, and on the protected port over IPv6 loopback too.
struct TestBed {
    servers: Vec<JoinHandle<()>>,
    netns: PodNetns,
    protected: u16,
    unprotected: u16,
    // Dropped last, in this order: pins first, then the pod.
    pins: PinDir,
    pod: Pod,
}

impl TestBed {
    async fn create() -> Self {
        let pod = Pod::create();
        let pins = PinDir::new();
        let netns = PodNetns::open(&pod.netns_path()).expect("open pod namespace");

        let (server_v4, protected) = serve(&netns, any_v4(0), SERVER_BANNER).await;
        let (server_unprotected, unprotected) = serve(&netns, any_v4(0), SERVER_BANNER).await;
        let any_v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), protected);
        let (server_v6, _) = serve(&netns, any_v6, SERVER_BANNER).await;

        Self {
            servers: vec![server_v4, server_unprotected, server_v6],
            netns,
            protected,
            unprotected,
            pins,
            pod,
        }
    }

    fn pod_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod.address.into(), port)
    }

    fn loopback_v4(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.protected)
    }

    fn loopback_v6(&self) -> SocketAddr {
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.protected)
    }

    fn stop_servers(&self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// Which socket accepted a connection, judged by the banner it sent.
#[derive(Debug, PartialEq, Eq)]
enum Reached {
    /// The pod's own server.
    Server,
    /// The agent's listener; the accepted socket's local address.
    Agent(SocketAddr),
    /// No socket: the connection failed or timed out.
    Nothing,
}

impl Reached {
    fn from_banner(banner: &str) -> Self {
        let mut words = banner.split_whitespace();
        match (words.next(), words.next()) {
            (Some(SERVER_BANNER), None) => Self::Server,
            (Some(AGENT_BANNER), Some(addr)) => {
                Self::Agent(addr.parse().expect("agent banner address"))
            }
            _ => panic!("unexpected banner {banner:?}"),
        }
    }
}

/// Connects from the host namespace.
async fn host_call(dst: SocketAddr) -> Reached {
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(dst).await?;
        read_banner(&mut stream).await
    };
    match tokio::time::timeout(IO_TIMEOUT, call).await {
        Ok(Ok(banner)) => Reached::from_banner(&banner),
        Ok(Err(_)) | Err(_) => Reached::Nothing,
    }
}

/// Connects from inside the pod with the agent's reserved source.
async fn reserved_call(netns: &PodNetns, dst: SocketAddr) -> Reached {
    let call = async {
        let mut stream = netns.connect(RESERVED_SOURCE_V4.into(), dst).await?;
        assert_eq!(stream.local_addr()?.ip(), IpAddr::from(RESERVED_SOURCE_V4));
        read_banner(&mut stream).await
    };
    match tokio::time::timeout(IO_TIMEOUT, call).await {
        Ok(Ok(banner)) => Reached::from_banner(&banner),
        Ok(Err(_)) | Err(_) => Reached::Nothing,
    }
}

/// Connects from a thread inside the pod, as a process in the pod would.
async fn pod_call(netns: &PodNetns, dst: SocketAddr) -> Reached {
    let call = netns.run(move || {
        let mut stream = StdTcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut banner = String::new();
        stream.read_to_string(&mut banner)?;
        Ok(banner)
    });
    match call.await {
        Ok(banner) => Reached::from_banner(&banner),
        Err(_) => Reached::Nothing,
    }
}

async fn read_banner(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut banner = String::new();
    stream.read_to_string(&mut banner).await?;
    Ok(banner)
}

/// Listens on `addr` inside the pod and answers every connection with
/// `banner`. Returns the accept task and the bound port.
async fn serve(netns: &PodNetns, addr: SocketAddr, banner: &'static str) -> (JoinHandle<()>, u16) {
    let listener = netns.listen(addr).await.expect("listen in pod");
    let port = listener.local_addr().unwrap().port();
    let listener = TcpListener::from_std(listener).unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(banner.as_bytes()).await;
        }
    });
    (task, port)
}

/// The agent's side: IPv4 and IPv6 listeners on the pod's loopback, which
/// answer with their banner and the accepted socket's local address.
struct Agent {
    listener_v4: std::net::TcpListener,
    listener_v6: std::net::TcpListener,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    async fn start(netns: &PodNetns) -> Self {
        assert!(
            netns.has_ipv6_loopback().await.unwrap(),
            "pod has no IPv6 loopback"
        );
        let listener_v4 = netns
            .listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
            .await
            .unwrap();
        let listener_v6 = netns
            .listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0))
            .await
            .unwrap();

        let mut tasks = Vec::new();
        for listener in [&listener_v4, &listener_v6] {
            let listener = TcpListener::from_std(listener.try_clone().unwrap()).unwrap();
            tasks.push(tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let local = stream.local_addr().unwrap();
                    let _ = stream
                        .write_all(format!("{AGENT_BANNER} {local}").as_bytes())
                        .await;
                }
            }));
        }
        Self {
            listener_v4,
            listener_v6,
            tasks,
        }
    }

    /// Closes the listeners, as the kernel does when the agent dies. The
    /// sockmap drops a socket when its last descriptor closes, so this waits
    /// until the accept tasks have dropped their copies.
    async fn stop(self) {
        let Self {
            listener_v4,
            listener_v6,
            tasks,
        } = self;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        drop((listener_v4, listener_v6));
    }
}

fn attach(steering: &Steering, bed: &TestBed, agent: &Agent, ports: &[u16]) -> PodSteering {
    let yaml = format!(
        "name: {}\nnetns: {}\nports: {:?}\n",
        bed.pod.workload,
        bed.pod.netns_path().display(),
        ports
    );
    let workload: WorkloadConfig = serde_yaml::from_str(&yaml).expect("workload config");
    steering
        .attach(
            &workload,
            bed.netns.file(),
            &agent.listener_v4,
            Some(&agent.listener_v6),
        )
        .expect("attach steering")
}

fn interception(pin_path: &Path, loopback_exempt: bool) -> InterceptionConfig {
    let yaml = format!(
        "pin_path: {}\nreserved_source_v4: {RESERVED_SOURCE_V4}\nreserved_source_v6: \"{UNUSED_RESERVED_SOURCE_V6}\"\nloopback_exempt: {loopback_exempt}\n",
        pin_path.display()
    );
    serde_yaml::from_str(&yaml).expect("interception config")
}

fn counters(pod_steering: &PodSteering) -> SteerCounters {
    pod_steering.counters().expect("read counters")
}

fn counts(steered: u64, passed: u64, dropped: u64) -> SteerCounters {
    SteerCounters {
        steered,
        passed,
        dropped,
    }
}

fn delta(before: SteerCounters, after: SteerCounters) -> SteerCounters {
    SteerCounters {
        steered: after.steered - before.steered,
        passed: after.passed - before.passed,
        dropped: after.dropped - before.dropped,
    }
}

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
}

/// Reasons the test cannot run here.
fn preflight() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|error| format!("cannot read /proc/self/status: {error}"))?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("unknown");
    if effective_uid != "0" {
        return Err(format!("needs root (effective uid {effective_uid})"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => {}
        _ => return Err("needs the `ip` command (Debian package iproute2)".to_owned()),
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        return Err("needs /sys/fs/bpf (sysfs with BPF support)".to_owned());
    }
    Ok(())
}

/// Runs `ip` with `args` and panics with its output if it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The pod: a network namespace joined to the host by a veth pair with a
/// /30 of 198.19.0.0/16. Dropping it deletes the namespace, which deletes
/// both ends of the veth pair.
struct Pod {
    netns: String,
    host_if: String,
    workload: String,
    address: Ipv4Addr,
}

impl Pod {
    fn create() -> Self {
        let pid = std::process::id();
        let subnet = free_subnet(pid);
        let host_ip = Ipv4Addr::new(198, 19, subnet, 1);
        let pod_ip = Ipv4Addr::new(198, 19, subnet, 2);
        let pod = Self {
            netns: format!("tgst{pid}"),
            host_if: format!("tgh{pid}"),
            workload: format!("steer-{pid}"),
            address: pod_ip,
        };
        let veth_in_pod = format!("tgp{pid}");

        ip(&["netns", "add", &pod.netns]);
        ip(&[
            "link",
            "add",
            &pod.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &veth_in_pod,
            "netns",
            &pod.netns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &pod.host_if]);
        ip(&["link", "set", &pod.host_if, "up"]);
        ip(&[
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            &veth_in_pod,
        ]);
        ip(&["-n", &pod.netns, "link", "set", &veth_in_pod, "up"]);
        ip(&["-n", &pod.netns, "link", "set", "lo", "up"]);
        pod
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The host end goes with the namespace; delete it too in case the
        // namespace was half made.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Picks the third octet of a 198.19.N.0/30 that no host address uses,
/// starting from one derived from `pid` so parallel runs differ.
fn free_subnet(pid: u32) -> u8 {
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("run ip addr");
    let addresses = String::from_utf8_lossy(&output.stdout).into_owned();
    (0..=255u32)
        .map(|offset| ((pid + offset) % 256) as u8)
        .find(|subnet| !addresses.contains(&format!(" 198.19.{subnet}.")))
        .expect("a free 198.19.N.0/30 subnet")
}

/// A pin directory of its own in bpffs, removed with everything in it.
struct PinDir {
    path: PathBuf,
}

impl PinDir {
    fn new() -> Self {
        Self {
            path: PathBuf::from(format!("/sys/fs/bpf/tokengate-test-{}", std::process::id())),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unlinking the link pin detaches the program if the test left it.
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!("failed to remove {}: {error}", self.path.display());
            }
        }
    }
}

#[test]
fn banner_parsing() {
    assert_eq!(Reached::from_banner("server"), Reached::Server);
    assert_eq!(
        Reached::from_banner("agent 198.19.0.2:80"),
        Reached::Agent(SocketAddr::new(Ipv4Addr::new(198, 19, 0, 2).into(), 80))
    );
}
