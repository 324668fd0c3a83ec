//! Pod enrolment as a container runtime drives it. The real `tokengate-cni`
//! binary runs with the CNI environment and a network configuration taken
//! from a conflist (with a `prevResult`). The agent it calls looks pods up
//! in a fake Kubernetes API server on loopback. Pods are
//! network namespaces of the node harness, with `tg-echo` started after
//! ADD returns, as a runtime starts containers after the sandbox is set up.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokengate_tests::agent::agent_binary;
use tokengate_tests::cases::valid_claims;
use tokengate_tests::echo::{EchoService, REQUEST_ID_HEADER};
use tokengate_tests::http::Request;
use tokengate_tests::ids::unique_id;
use tokengate_tests::issuer::{Issuer, ISSUER};
use tokengate_tests::node::{Node, Pod, Stack};
use tokengate_tests::skip::{require_root_and_ebpf, BPFFS};
use tokengate_tests::tokens::{mint, Key};

/// The protected port of every selected pod.
const PROTECTED_PORT: u16 = 8080;

/// A port of the same service that no selector lists.
const OTHER_PORT: u16 = 9090;

/// Service-account token the fake API server requires.
const API_TOKEN: &str = "test-service-account-token";

/// Time allowed for the agent to log that enrolment started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed for one plugin run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(40);

/// Time allowed for the sweep (every second in these tests) to act.
const SWEEP_WAIT: Duration = Duration::from_secs(10);

/// Connect timeout of a check that a port is closed: a dropped SYN is
/// retried after 1 s, so 2 s covers one retry.
const CLOSED_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Message of the agent's log line once the plugin socket listens.
const ENROLMENT_STARTED: &str = "pod enrolment started";

// ---------------------------------------------------------------------------
// Fake Kubernetes API server

/// An HTTP server on 127.0.0.1 that serves
/// `GET /api/v1/namespaces/{ns}/pods/{name}` from a map, to requests with
/// the bearer token [`API_TOKEN`].
struct FakeApi {
    addr: SocketAddr,
    pods: Arc<Mutex<HashMap<String, Value>>>,
    /// Request targets in arrival order.
    lookups: Arc<Mutex<Vec<String>>>,
    unauthorized: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake API");
        let addr = listener.local_addr().expect("fake API address");
        let pods: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let lookups: Arc<Mutex<Vec<String>>> = Arc::default();
        let unauthorized = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));

        let thread = {
            let pods = Arc::clone(&pods);
            let lookups = Arc::clone(&lookups);
            let unauthorized = Arc::clone(&unauthorized);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    serve_api(&stream, &pods, &lookups, &unauthorized);
                }
            })
        };
        Self {
            addr,
            pods,
            lookups,
            unauthorized,
            stop,
            thread: Some(thread),
        }
    }

    fn lookups(&self) -> Vec<String> {
        self.lookups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn add_pod(&self, pod: Value) {
        let key = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().expect("namespace"),
            pod["metadata"]["name"].as_str().expect("name")
        );
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, pod);
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it reads the stop flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_api(
    stream: &TcpStream,
    pods: &Mutex<HashMap<String, Value>>,
    lookups: &Mutex<Vec<String>>,
    unauthorized: &AtomicUsize,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("authorization") {
                        authorization = Some(value.trim().to_owned());
                    }
                }
            }
        }
    }

    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    lookups
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(target.to_owned());
    let authorized = authorization.as_deref() == Some(&format!("Bearer {API_TOKEN}"));
    let (status, body) = if authorized {
        let pod = target
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.split_once("/pods/"))
            .and_then(|(namespace, name)| {
                pods.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&format!("{namespace}/{name}"))
                    .cloned()
            });
        match pod {
            Some(pod) => (200, pod),
            None => (404, json!({"kind": "Status", "code": 404})),
        }
    } else {
        unauthorized.fetch_add(1, Ordering::SeqCst);
        (401, json!({"kind": "Status", "code": 401}))
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut writer = stream;
    let _ = writer.write_all(response.as_bytes());
}

/// A Pod object as the API server returns it.
fn pod_object(namespace: &str, name: &str, labels: &Value, annotations: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("uid-{namespace}-{name}"),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"containers": [{
            "name": "app",
            "image": "tg-echo",
            "ports": [{"name": "http", "containerPort": PROTECTED_PORT}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": PROTECTED_PORT, "scheme": "HTTP"}},
            "startupProbe": {"tcpSocket": {"port": PROTECTED_PORT}},
        }]}
    })
}

// ---------------------------------------------------------------------------
// The agent with enrolment

/// Paths an agent and the plugin share. They stay the same across agent
/// restarts, as on a node.
struct Site {
    dir: tempfile::TempDir,
    pin_path: PathBuf,
    config_path: PathBuf,
}

impl Site {
    fn new(issuer: &Issuer, api: &FakeApi) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-enrol-")
            .tempdir()
            .expect("temp dir");
        let pin_path = Path::new(BPFFS).join(format!("tokengate-enrol-{}", unique_id()));
        let token_file = dir.path().join("sa-token");
        std::fs::write(&token_file, format!("{API_TOKEN}\n")).expect("token file");
        let config_path = dir.path().join("tokengate.yaml");
        let config = format!(
            "\
admin:
  listen: 127.0.0.1:0
audit:
  file: {audit}
interception:
  pin_path: {pins}
  handoff:
    socket: {handoff}
drain_seconds: 1
issuers:
  - issuer: {ISSUER}
    jwks_uri: {jwks}
    audiences: [orders]
    algorithms: [RS256, ES256, EdDSA]
enrollment:
  socket: {socket}
  state_dir: {state}
  sweep_seconds: 1
  kubernetes:
    api_server: {api}
    token_file: {token}
  selectors:
    - name: shop
      namespaces: [shop]
      match_labels: {{app: orders}}
      ports: [{PROTECTED_PORT}]
      rules:
        - path_prefix: /orders
          methods: [GET, POST]
          roles: [orders.read]
    - name: opt-in
      namespaces: [annotated]
      require_annotation: true
      allow_probes: false
      ports: [{PROTECTED_PORT}]
      rules:
        - path_prefix: /orders
          roles: [orders.read]
",
            audit = dir.path().join("audit.log").display(),
            pins = pin_path.display(),
            jwks = issuer.jwks_uri(),
            socket = dir.path().join("run").join("cni.sock").display(),
            handoff = dir.path().join("run").join("handoff.sock").display(),
            state = dir.path().join("pods").display(),
            api = api.url(),
            token = token_file.display(),
        );
        std::fs::write(&config_path, config).expect("agent config");
        Self {
            dir,
            pin_path,
            config_path,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("cni.sock")
    }

    fn state_file(&self, container_id: &str) -> PathBuf {
        self.dir
            .path()
            .join("pods")
            .join(format!("{container_id}.json"))
    }

    fn pin_dir(&self, workload: &str) -> PathBuf {
        self.pin_path.join("pods").join(workload)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.pin_path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "cleanup: failed to remove {}: {error}",
                    self.pin_path.display()
                );
            }
        }
    }
}

/// A running agent process; drop kills it.
struct RunningAgent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl RunningAgent {
    /// Starts the agent and waits until its plugin socket listens.
    fn start(site: &Site) -> Self {
        let mut child = Command::new(agent_binary())
            .arg("run")
            .arg("--config")
            .arg(&site.config_path)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("TOKENGATE_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let thread_logs = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                thread_logs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });

        let mut agent = Self { child, logs };
        let deadline = Instant::now() + START_TIMEOUT;
        while !agent.logged(ENROLMENT_STARTED) {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited with {status}:{}", agent.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not log {ENROLMENT_STARTED:?} within {START_TIMEOUT:?}:{}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn logged(&self, message: &str) -> bool {
        self.lines_with(message) > 0
    }

    fn lines_with(&self, message: &str) -> usize {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|line| line.contains(message))
            .count()
    }

    fn log_tail(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let start = logs.len().saturating_sub(80);
        format!(
            "\n--- agent log ---\n{}\n--- end ---",
            logs[start..].join("\n")
        )
    }

    /// Kills the agent with SIGKILL and waits for it.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------
// The plugin, run as a runtime runs it

/// What one plugin run produced.
#[derive(Debug)]
struct PluginRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl PluginRun {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|error| panic!("plugin output is not JSON ({error}): {self:?}"))
    }
}

fn plugin_binary() -> PathBuf {
    agent_binary().with_file_name("tokengate-cni")
}

/// The node's conflist: a main plugin, then tokengate chained after it.
fn conflist(socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local", "subnet": "198.18.0.0/24"}},
            {
                "type": "tokengate-cni",
                "agentSocket": socket,
                "excludeNamespaces": ["kube-system"],
                "timeoutSeconds": 20
            }
        ]
    })
}

/// Builds the network configuration of the tokengate entry as libcni does
/// for a chained plugin: the entry plus the list's `name` and `cniVersion`,
/// and the previous plugin's result.
fn plugin_config(conflist: &Value, pod: &Pod) -> Value {
    let mut entry = conflist["plugins"][1].clone();
    entry["name"] = conflist["name"].clone();
    entry["cniVersion"] = conflist["cniVersion"].clone();
    let address = pod.ipv4.map(|ip| format!("{ip}/32")).unwrap_or_default();
    entry["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
        "ips": [{"address": address, "interface": 0}],
    });
    entry
}

/// Runs the plugin binary with `command` for the sandbox `container_id`
/// of pod `namespace`/`name`.
fn run_plugin(
    command: &str,
    container_id: &str,
    netns: Option<&Path>,
    pod_name: (&str, &str),
    config: &Value,
) -> PluginRun {
    let (namespace, name) = pod_name;
    let mut process = Command::new(plugin_binary());
    process
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{namespace}-{name}"
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(netns) = netns {
        process.env("CNI_NETNS", netns);
    }
    let mut child = process.spawn().expect("start tokengate-cni");
    child
        .stdin
        .take()
        .expect("plugin stdin")
        .write_all(config.to_string().as_bytes())
        .expect("write the network configuration");

    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll plugin") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tokengate-cni {command} did not finish within {PLUGIN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    PluginRun {
        code: status.code(),
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------
// Requests

fn token() -> String {
    mint(Key::Rsa1, &valid_claims())
}

/// Sends `method path` from `from` to `addr` and returns the status and
/// whether the response came from `tg-echo` (its body echoes the request
/// id).
fn send(
    from: &Pod,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, bool) {
    let id = unique_id();
    let mut request = Request::new(method, path).header(REQUEST_ID_HEADER, &id);
    if let Some(token) = token {
        request = request.bearer(token);
    }
    let response = from
        .send(addr, &request)
        .unwrap_or_else(|error| panic!("{method} {path} to {addr}: {error:#}"));
    (response.status, response.text().contains(&id))
}

fn assert_closed(from: &Pod, addr: SocketAddr) {
    let result = from.connect(addr, CLOSED_CONNECT_TIMEOUT);
    assert!(
        result.is_err(),
        "{addr} accepted a connection while no agent serves it"
    );
}

fn wait_until(timeout: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything a test needs; fields drop in order, agent first.
struct Setup {
    agent: Option<RunningAgent>,
    site: Site,
    api: FakeApi,
    _issuer: Issuer,
    node: Node,
    conflist: Value,
}

impl Setup {
    fn new() -> Self {
        let issuer = Issuer::start().expect("issuer");
        let api = FakeApi::start();
        let site = Site::new(&issuer, &api);
        let conflist = conflist(&site.socket());
        Self {
            agent: None,
            site,
            api,
            _issuer: issuer,
            node: Node::create().expect("node"),
            conflist,
        }
    }

    fn start_agent(&mut self) {
        self.agent = Some(RunningAgent::start(&self.site));
    }

    fn agent(&self) -> &RunningAgent {
        self.agent.as_ref().expect("agent started")
    }

    /// Adds a pod netns and its object in the fake API.
    fn add_pod(&mut self, namespace: &str, name: &str, labels: &Value, annotations: &Value) -> Pod {
        let pod = self
            .node
            .add_pod(&format!("p{}", unique_id()), Stack::Dual)
            .expect("pod");
        self.api
            .add_pod(pod_object(namespace, name, labels, annotations));
        pod
    }

    fn plugin(
        &self,
        command: &str,
        container_id: &str,
        pod: &Pod,
        name: (&str, &str),
    ) -> PluginRun {
        let config = plugin_config(&self.conflist, pod);
        run_plugin(
            command,
            container_id,
            Some(&pod.netns_path()),
            name,
            &config,
        )
    }

    fn echo(&self, pod: &Pod) -> EchoService {
        pod.start_echo(
            Path::new(env!("CARGO_BIN_EXE_tg-echo")),
            &[PROTECTED_PORT, OTHER_PORT],
            &self.site.dir.path().join(format!("echo-{}.log", pod.name)),
        )
        .expect("tg-echo")
    }
}

fn container_id() -> String {
    format!("c{}", unique_id())
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn add_protects_selected_pod_before_it_serves() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    let id = container_id();

    let run = setup.plugin("ADD", &id, &pod, ("shop", "orders-1"));

    assert_eq!(run.code, Some(0), "{run:?}");
    let result = run.json();
    assert_eq!(
        result["ips"][0]["address"],
        format!("{}/32", pod.ipv4.expect("ipv4"))
    );
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    // Right after ADD, before the service listens: the agent rejects a
    // request without a token, so nothing reaches the pod unverified.
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );
    assert!(setup.site.state_file(&id).exists());
    assert!(setup.site.pin_dir("shop_orders-1").exists());

    let _echo = setup.echo(&pod);
    let token = token();
    for addr in pod.socket_addrs(PROTECTED_PORT) {
        assert_eq!(
            send(&host, addr, "GET", "/orders/1", None),
            (401, false),
            "{addr}"
        );
        assert_eq!(
            send(&host, addr, "GET", "/orders/1", Some(&token)),
            (200, true),
            "{addr}"
        );
    }
    assert_eq!(
        send(&host, pod.v4(OTHER_PORT), "GET", "/orders/1", None),
        (200, true)
    );
    assert_eq!(
        setup.api.lookups(),
        ["/api/v1/namespaces/shop/pods/orders-1"]
    );
    assert_eq!(setup.api.unauthorized.load(Ordering::SeqCst), 0);

    let again = setup.plugin("ADD", &id, &pod, ("shop", "orders-1"));
    assert_eq!(again.code, Some(0), "repeated ADD: {again:?}");
    let check = setup.plugin("CHECK", &id, &pod, ("shop", "orders-1"));
    assert_eq!(check.code, Some(0), "CHECK: {check:?}");
    assert!(check.stdout.trim().is_empty(), "{check:?}");
}

#[test]
fn unselected_pods_pass_untouched() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let host = setup.node.host();
    let cases = [
        (
            "other",
            "orders-1",
            json!({"app": "orders"}),
            json!({}),
            "other namespace",
        ),
        (
            "shop",
            "billing-1",
            json!({"app": "billing"}),
            json!({}),
            "other labels",
        ),
        (
            "annotated",
            "orders-2",
            json!({"app": "orders"}),
            json!({}),
            "no annotation",
        ),
        (
            "annotated",
            "orders-3",
            json!({}),
            json!({"tokengate.io/protect": "false"}),
            "annotation false",
        ),
        (
            "kube-system",
            "coredns-1",
            json!({"app": "orders"}),
            json!({}),
            "excluded namespace",
        ),
    ];

    for (namespace, name, labels, annotations, case) in cases {
        let pod = setup.add_pod(namespace, name, &labels, &annotations);
        let id = container_id();

        let run = setup.plugin("ADD", &id, &pod, (namespace, name));

        assert_eq!(run.code, Some(0), "{case}: {run:?}");
        assert_eq!(
            run.json()["ips"][0]["address"],
            format!("{}/32", pod.ipv4.expect("ipv4")),
            "{case}"
        );
        let _echo = setup.echo(&pod);
        assert_eq!(
            send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None),
            (200, true),
            "{case}"
        );
        assert!(!setup.site.state_file(&id).exists(), "{case}");
    }
    // The namespace filter leaves `other` out without an API lookup, and
    // the plugin passes `kube-system` without calling the agent.
    assert_eq!(setup.agent().lines_with("pod matches no selector"), 3);
    assert_eq!(
        setup.api.lookups(),
        [
            "/api/v1/namespaces/shop/pods/billing-1",
            "/api/v1/namespaces/annotated/pods/orders-2",
            "/api/v1/namespaces/annotated/pods/orders-3",
        ]
    );

    let pod = setup.add_pod(
        "annotated",
        "orders-4",
        &json!({}),
        &json!({"tokengate.io/protect": "true"}),
    );
    let run = setup.plugin("ADD", &container_id(), &pod, ("annotated", "orders-4"));
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );
}

#[test]
fn add_fails_closed_without_agent() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));

    // No agent has ever run: the socket does not exist.
    let run = setup.plugin("ADD", &container_id(), &pod, ("shop", "orders-1"));
    assert_eq!(run.code, Some(1), "{run:?}");
    let error = run.json();
    assert_eq!(error["code"], 11, "{run:?}");
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(
        error["msg"].as_str().expect("msg").contains("unreachable"),
        "{run:?}"
    );

    // A killed agent leaves its socket file behind, with no listener.
    setup.start_agent();
    setup.agent.take().expect("agent").kill();
    let run = setup.plugin("ADD", &container_id(), &pod, ("shop", "orders-1"));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.json()["code"], 11);

    // The agent runs, but the API does not know the pod.
    setup.start_agent();
    let unknown = setup.node.add_pod("unknown", Stack::V4).expect("pod");
    let id = container_id();
    let run = setup.plugin("ADD", &id, &unknown, ("shop", "ghost"));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.json()["details"]
            .as_str()
            .expect("details")
            .contains("not found"),
        "{run:?}"
    );
    assert!(!setup.site.state_file(&id).exists());

    // STATUS follows the agent.
    let status = run_plugin(
        "STATUS",
        "",
        None,
        ("", ""),
        &plugin_config(&setup.conflist, &pod),
    );
    assert_eq!(status.code, Some(0), "{status:?}");
    setup.agent.take().expect("agent").kill();
    let status = run_plugin(
        "STATUS",
        "",
        None,
        ("", ""),
        &plugin_config(&setup.conflist, &pod),
    );
    assert_eq!(status.code, Some(1), "{status:?}");
    assert_eq!(status.json()["code"], 50);
}

#[test]
fn del_releases_and_is_idempotent() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    let id = container_id();
    let run = setup.plugin("ADD", &id, &pod, ("shop", "orders-1"));
    assert_eq!(run.code, Some(0), "{run:?}");
    let _echo = setup.echo(&pod);
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );

    let del = setup.plugin("DEL", &id, &pod, ("shop", "orders-1"));

    assert_eq!(del.code, Some(0), "{del:?}");
    assert!(del.stdout.trim().is_empty(), "{del:?}");
    assert!(!setup.site.state_file(&id).exists());
    assert!(!setup.site.pin_dir("shop_orders-1").exists());
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None),
        (200, true)
    );

    for attempt in 0..2 {
        let del = setup.plugin("DEL", &id, &pod, ("shop", "orders-1"));
        assert_eq!(del.code, Some(0), "DEL {attempt}: {del:?}");
    }
    let without_netns = run_plugin(
        "DEL",
        &id,
        None,
        ("shop", "orders-1"),
        &plugin_config(&setup.conflist, &pod),
    );
    assert_eq!(without_netns.code, Some(0), "{without_netns:?}");
    let check = setup.plugin("CHECK", &id, &pod, ("shop", "orders-1"));
    assert_eq!(
        check.code,
        Some(1),
        "CHECK of a selected pod that is not enrolled: {check:?}"
    );

    // DEL while the agent is down succeeds, and the next agent finds the
    // namespace gone and releases the pod.
    let other = setup.add_pod("shop", "orders-2", &json!({"app": "orders"}), &json!({}));
    let other_id = container_id();
    assert_eq!(
        setup
            .plugin("ADD", &other_id, &other, ("shop", "orders-2"))
            .code,
        Some(0)
    );
    setup.agent.take().expect("agent").kill();
    let del = setup.plugin("DEL", &other_id, &other, ("shop", "orders-2"));
    assert_eq!(del.code, Some(0), "{del:?}");
    assert!(del.stderr.contains("unreachable"), "{del:?}");
    tokengate_tests::netns::run_ip(&["netns", "del", other.netns.as_deref().expect("netns")])
        .expect("delete netns");
    setup.start_agent();
    assert!(!setup.site.state_file(&other_id).exists());
    assert!(!setup.site.pin_dir("shop_orders-2").exists());
}

#[test]
fn vanished_netns_is_released_by_sweep() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let id = container_id();
    assert_eq!(
        setup.plugin("ADD", &id, &pod, ("shop", "orders-1")).code,
        Some(0)
    );
    assert!(setup.site.pin_dir("shop_orders-1").exists());

    tokengate_tests::netns::run_ip(&["netns", "del", pod.netns.as_deref().expect("netns")])
        .expect("delete netns");

    let site = &setup.site;
    wait_until(SWEEP_WAIT, "release of the pod", || {
        !site.state_file(&id).exists() && !site.pin_dir("shop_orders-1").exists()
    });
    assert!(setup
        .agent()
        .logged("network namespace of an enrolled pod is gone"));
}

#[test]
fn restarted_agent_adopts_pods() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let live = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let deleted = setup.add_pod("shop", "orders-2", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    let live_id = container_id();
    let deleted_id = container_id();
    assert_eq!(
        setup
            .plugin("ADD", &live_id, &live, ("shop", "orders-1"))
            .code,
        Some(0)
    );
    assert_eq!(
        setup
            .plugin("ADD", &deleted_id, &deleted, ("shop", "orders-2"))
            .code,
        Some(0)
    );
    let _echo = setup.echo(&live);
    let token = token();
    assert_eq!(
        send(
            &host,
            live.v4(PROTECTED_PORT),
            "GET",
            "/orders/1",
            Some(&token)
        ),
        (200, true)
    );

    setup.agent.take().expect("agent").kill();
    // Without an agent the protected port stays closed, the other is open.
    assert_closed(&host, live.v4(PROTECTED_PORT));
    assert_eq!(
        send(&host, live.v4(OTHER_PORT), "GET", "/orders/1", None),
        (200, true)
    );
    tokengate_tests::netns::run_ip(&["netns", "del", deleted.netns.as_deref().expect("netns")])
        .expect("delete netns");
    setup.start_agent();

    assert!(setup.agent().logged("pod adopted"));
    assert_eq!(
        send(&host, live.v4(PROTECTED_PORT), "GET", "/orders/1", None),
        (401, false)
    );
    assert_eq!(
        send(
            &host,
            live.v4(PROTECTED_PORT),
            "GET",
            "/orders/1",
            Some(&token)
        ),
        (200, true)
    );
    assert!(setup.site.state_file(&live_id).exists());
    assert!(!setup.site.state_file(&deleted_id).exists());
    assert!(!setup.site.pin_dir("shop_orders-2").exists());
    // Adoption needs no API lookup: the state file carries the probes.
    let check = setup.plugin("CHECK", &live_id, &live, ("shop", "orders-1"));
    assert_eq!(check.code, Some(0), "{check:?}");
    assert_eq!(
        send(&host, live.v4(PROTECTED_PORT), "GET", "/healthz", None),
        (200, true)
    );
}

#[test]
fn probe_paths_public_for_get_head() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    assert_eq!(
        setup
            .plugin("ADD", &container_id(), &pod, ("shop", "orders-1"))
            .code,
        Some(0)
    );
    let _echo = setup.echo(&pod);

    for addr in pod.socket_addrs(PROTECTED_PORT) {
        assert_eq!(
            send(&host, addr, "GET", "/healthz", None),
            (200, true),
            "{addr}"
        );
        assert_eq!(
            send(&host, addr, "GET", "/ready?full=1", None),
            (200, true),
            "{addr}"
        );
        assert_eq!(send(&host, addr, "HEAD", "/healthz", None).0, 200, "{addr}");
        assert_eq!(
            send(&host, addr, "POST", "/healthz", None),
            (401, false),
            "{addr}"
        );
        assert_eq!(
            send(&host, addr, "GET", "/healthz/extra", None),
            (401, false),
            "{addr}"
        );
        assert_eq!(
            send(&host, addr, "GET", "/other", None),
            (401, false),
            "{addr}"
        );
    }

    // A selector with allow_probes: false keeps probe paths protected.
    let annotated = setup.add_pod(
        "annotated",
        "orders-9",
        &json!({}),
        &json!({"tokengate.io/protect": "true"}),
    );
    assert_eq!(
        setup
            .plugin(
                "ADD",
                &container_id(),
                &annotated,
                ("annotated", "orders-9")
            )
            .code,
        Some(0)
    );
    let _annotated_echo = setup.echo(&annotated);
    assert_eq!(
        send(&host, annotated.v4(PROTECTED_PORT), "GET", "/healthz", None),
        (401, false)
    );

    // A tcpSocket probe connects to the agent's listener, not the service.
    let stream = host.connect(pod.v4(PROTECTED_PORT), CLOSED_CONNECT_TIMEOUT);
    assert!(stream.is_ok(), "tcpSocket-style connect failed: {stream:?}");
}

#[test]
fn version_lists_supported_versions() {
    let output = Command::new(plugin_binary())
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("run tokengate-cni; `cargo xtask build` builds it with the agent");

    assert!(output.status.success(), "{output:?}");
    let version: Value = serde_json::from_slice(&output.stdout).expect("VERSION output is JSON");
    assert_eq!(version["cniVersion"], "1.1.0");
    let supported: Vec<&str> = version["supportedVersions"]
        .as_array()
        .expect("supportedVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for expected in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&expected), "{supported:?}");
    }
}

#[test]
fn gc_releases_stale_sandboxes() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let live = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let stale = setup.add_pod("shop", "orders-2", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    let live_id = container_id();
    let stale_id = container_id();
    assert_eq!(
        setup
            .plugin("ADD", &live_id, &live, ("shop", "orders-1"))
            .code,
        Some(0)
    );
    assert_eq!(
        setup
            .plugin("ADD", &stale_id, &stale, ("shop", "orders-2"))
            .code,
        Some(0)
    );
    let mut config = plugin_config(&setup.conflist, &live);
    config["cniVersion"] = json!("1.1.0");
    config["cni.dev/valid-attachments"] = json!([{"containerID": live_id, "ifname": "eth0"}]);

    let gc = run_plugin("GC", "", None, ("", ""), &config);

    assert_eq!(gc.code, Some(0), "{gc:?}");
    assert!(setup.site.state_file(&live_id).exists());
    assert!(setup.site.pin_dir("shop_orders-1").exists());
    assert!(!setup.site.state_file(&stale_id).exists());
    assert!(!setup.site.pin_dir("shop_orders-2").exists());
    assert_eq!(
        send(&host, live.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );
}

#[test]
fn reload_applies_selector_changes() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let host = setup.node.host();
    let id = container_id();
    assert_eq!(
        setup.plugin("ADD", &id, &pod, ("shop", "orders-1")).code,
        Some(0)
    );
    let _echo = setup.echo(&pod);
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );
    let original = std::fs::read_to_string(&setup.site.config_path).expect("config");

    // A new public rule in the pod's selector reaches the enrolled pod.
    let opened = original.replace(
        "      rules:\n        - path_prefix: /orders\n          methods: [GET, POST]",
        "      rules:\n        - path: /orders/public\n          public: true\n        - path_prefix: /orders\n          methods: [GET, POST]",
    );
    assert_ne!(opened, original, "the selector's rules were not found");
    std::fs::write(&setup.site.config_path, &opened).expect("rewrite config");
    wait_until(SWEEP_WAIT, "the new rule in force", || {
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/public", None) == (200, true)
    });
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None).0,
        401
    );

    // Removing the selector releases its pods.
    let renamed = opened.replace("    - name: shop\n", "    - name: shop-renamed\n");
    assert_ne!(renamed, opened, "the selector's name was not found");
    std::fs::write(&setup.site.config_path, &renamed).expect("rewrite config");
    let site = &setup.site;
    wait_until(SWEEP_WAIT, "release of the pod", || {
        !site.state_file(&id).exists() && !site.pin_dir("shop_orders-1").exists()
    });
    assert_eq!(
        send(&host, pod.v4(PROTECTED_PORT), "GET", "/orders/1", None),
        (200, true)
    );
}

#[test]
fn install_chains_plugin_into_conflist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin_dir = dir.path().join("bin");
    let conf_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let primary = conf_dir.join("10-calico.conflist");
    let original = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "calico"}, {"type": "portmap"}]});
    std::fs::write(&primary, original.to_string()).expect("conflist");
    let install = |extra: &[&str]| {
        Command::new(plugin_binary())
            .arg("install")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .args(extra)
            .output()
            .expect("run tokengate-cni install")
    };

    let first = install(&[
        "--agent-socket",
        "/run/tg/cni.sock",
        "--exclude-namespace",
        "kube-system",
        "--exclude-namespace",
        "istio-system",
    ]);
    let second = install(&["--agent-socket", "/run/tg/cni.sock"]);

    assert!(first.status.success(), "{first:?}");
    assert!(second.status.success(), "{second:?}");
    let conflist: Value = serde_json::from_slice(&std::fs::read(&primary).expect("read conflist"))
        .expect("conflist JSON");
    let plugins = conflist["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3, "{conflist}");
    assert_eq!(plugins[2]["type"], "tokengate-cni");
    assert_eq!(plugins[2]["agentSocket"], "/run/tg/cni.sock");
    assert_eq!(
        plugins[2]["excludeNamespaces"],
        json!(["kube-system"]),
        "the second install replaces the entry"
    );
    assert!(bin_dir.join("tokengate-cni").exists());

    let uninstall = Command::new(plugin_binary())
        .arg("uninstall")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .output()
        .expect("run tokengate-cni uninstall");
    assert!(uninstall.status.success(), "{uninstall:?}");
    let restored: Value = serde_json::from_slice(&std::fs::read(&primary).expect("read conflist"))
        .expect("conflist JSON");
    assert_eq!(restored, original);
    assert!(!bin_dir.join("tokengate-cni").exists());
}

/// Upper bound on the requests of the load thread in
/// [`upgrade_hands_enrolled_pods_over`].
const HANDOFF_LOAD_MAX: usize = 4000;

/// Log line of an agent that gave its sockets to a successor.
const HANDED_OFF: &str = "handed off and drained";

/// Log line of an agent that serves sockets of its predecessor.
const INHERITED: &str = "serving the listeners inherited from the previous agent";

/// What the load thread of [`upgrade_hands_enrolled_pods_over`] saw.
#[derive(Debug, Default)]
struct HandoffLoad {
    sent: usize,
    failed: Vec<String>,
    unverified: usize,
}

/// Sends requests on new connections from the node until `stop`, every
/// fourth without a token, and checks each response.
fn handoff_load(addr: SocketAddr, token: &str, stop: &AtomicBool) -> HandoffLoad {
    let mut load = HandoffLoad::default();
    while !stop.load(Ordering::SeqCst) && load.sent < HANDOFF_LOAD_MAX {
        let with_token = load.sent % 4 != 0;
        load.sent += 1;
        let id = unique_id();
        let mut request = Request::new("GET", "/orders/1").header(REQUEST_ID_HEADER, &id);
        if with_token {
            request = request.bearer(token);
        }
        let response = tokengate_tests::http::Connection::connect(addr, CLOSED_CONNECT_TIMEOUT)
            .map_err(anyhow::Error::from)
            .and_then(|mut connection| connection.send(&request));
        match response {
            Ok(response)
                if with_token && response.status == 200 && response.text().contains(&id) => {}
            Ok(response) if !with_token && response.status == 401 => {}
            Ok(response) if !with_token && response.status == 200 => load.unverified += 1,
            Ok(response) => load
                .failed
                .push(format!("request {} got {}", load.sent, response.status)),
            Err(error) => load
                .failed
                .push(format!("request {}: {error:#}", load.sent)),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    load
}

#[test]
fn upgrade_hands_enrolled_pods_over() {
    if !require_root_and_ebpf() {
        return;
    }
    let mut setup = Setup::new();
    setup.start_agent();
    let pod = setup.add_pod("shop", "orders-1", &json!({"app": "orders"}), &json!({}));
    let id = container_id();
    let run = setup.plugin("ADD", &id, &pod, ("shop", "orders-1"));
    assert_eq!(run.code, Some(0), "{run:?}");
    let _echo = setup.echo(&pod);
    let addr = pod.v4(PROTECTED_PORT);
    let token = token();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        let token = token.clone();
        std::thread::spawn(move || handoff_load(addr, &token, &stop))
    };
    std::thread::sleep(Duration::from_millis(300));

    // The successor starts while the first agent runs, as the DaemonSet's
    // surge pod does.
    let first = setup.agent.take().expect("agent");
    setup.start_agent();
    wait_until(START_TIMEOUT, "the hand-off", || first.logged(HANDED_OFF));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let load = load.join().expect("load thread");

    assert!(
        setup.agent().logged(INHERITED),
        "the new agent did not take the pod's listeners:{}",
        setup.agent().log_tail()
    );
    assert!(load.sent > 10, "{load:?}");
    assert!(load.failed.is_empty(), "{load:?}");
    assert_eq!(load.unverified, 0, "{load:?}");

    // With the first agent gone, the successor alone serves the pod.
    first.kill();
    assert_eq!(
        send(&setup.node.host(), addr, "GET", "/orders/1", None),
        (401, false)
    );
    assert_eq!(
        send(&setup.node.host(), addr, "GET", "/orders/1", Some(&token)),
        (200, true)
    );
    assert!(setup.site.state_file(&id).exists());
}
