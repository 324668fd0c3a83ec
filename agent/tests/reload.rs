//! In-process tests of configuration reload, without root: the agent's core
//! and its workloads on 127.0.0.1 port 0 behind the loopback upstream, a
//! real JWKS server and a real configuration file that each test rewrites.
//! Every wait is on a condition with the [`WAIT`] bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1 as client;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use tokengate::app::{Agent, Core, Enroll};
use tokengate::config::WorkloadConfig;
use tokengate::proxy::{self, LoopbackUpstream, ProxySlot, Shutdown};
use tokengate::reload::{ConfigFile, ReloadMetrics, RESULT_FAILURE, RESULT_SUCCESS};

#[path = "support/lib.rs"]
mod support;

use support::http::{bind_loopback, serve_http, JwksServer};
use support::tokens::{sign, user_claims};

/// Upper bound of every wait on a condition. A reload is seen within one
/// poll period (one second); the rest is slack for a loaded machine.
const WAIT: Duration = Duration::from_secs(10);

const ISSUER: &str = "https://issuer.reload.test";

// ---------------------------------------------------------------- harness

/// Serves each workload on a loopback listener bound before the
/// configuration was written, so the configuration can name its port.
struct LoopbackEnroll {
    listeners: Mutex<HashMap<String, std::net::TcpListener>>,
    service: SocketAddr,
    ports_changes: Arc<AtomicUsize>,
}

impl Enroll for LoopbackEnroll {
    type Enrolled = String;

    async fn enroll(
        &self,
        _core: &Core,
        workload: &WorkloadConfig,
        slot: Arc<ProxySlot>,
        shutdown: Shutdown,
    ) -> anyhow::Result<String> {
        let listener = self
            .listeners
            .lock()
            .unwrap()
            .remove(&workload.name)
            .ok_or_else(|| anyhow::anyhow!("no listener for workload {}", workload.name))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let upstream = Arc::new(LoopbackUpstream::new(self.service));
        tokio::spawn(proxy::serve_slot(listener, upstream, slot, shutdown));
        Ok(workload.name.clone())
    }

    fn set_ports(
        &self,
        _core: &Core,
        _enrolled: &mut String,
        _workload: &WorkloadConfig,
    ) -> anyhow::Result<()> {
        self.ports_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn detach(&self, _core: &Core, _enrolled: String) -> anyhow::Result<()> {
        Ok(())
    }

    fn release(&self, _enrolled: String) {}
}

/// The agent watching its configuration file, plus what the tests talk to.
struct Harness {
    dir: tempfile::TempDir,
    jwks: SocketAddr,
    jwks_server: JwksServer,
    /// Port of each workload's listener by name.
    ports: HashMap<String, u16>,
    ports_changes: Arc<AtomicUsize>,
    reload_requests: mpsc::UnboundedSender<()>,
    stop: Option<oneshot::Sender<()>>,
    agent: Option<JoinHandle<Agent<LoopbackEnroll>>>,
    reload_metrics: ReloadMetrics,
}

impl Harness {
    /// Starts the agent with the configuration `yaml` builds for the
    /// harness's JWKS address and workload ports. `workloads` names every
    /// workload any version of the configuration uses.
    async fn start(workloads: &[&str], yaml: impl Fn(&Self) -> String) -> Self {
        let jwks_server = JwksServer::start().await;
        let service = start_service().await;

        let mut listeners = HashMap::new();
        let mut ports = HashMap::new();
        for name in workloads {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            ports.insert((*name).to_owned(), listener.local_addr().unwrap().port());
            listeners.insert((*name).to_owned(), listener);
        }

        let (reload_requests, requests) = mpsc::unbounded_channel();
        let ports_changes = Arc::new(AtomicUsize::new(0));
        let registry = prometheus::Registry::new();
        let mut harness = Self {
            dir: tempfile::tempdir().unwrap(),
            jwks: jwks_server.address,
            jwks_server,
            ports,
            ports_changes: Arc::clone(&ports_changes),
            reload_requests,
            stop: None,
            agent: None,
            reload_metrics: ReloadMetrics::register(&registry).unwrap(),
        };
        harness.write(&yaml(&harness));

        let mut file = ConfigFile::new(&harness.path());
        let loaded = file.load().expect("initial configuration is valid");
        let core = Core::start(&loaded.config, Some(Box::new(tokio::io::sink())))
            .await
            .unwrap();
        harness.reload_metrics = core.reload_metrics.clone();
        let enroll = LoopbackEnroll {
            listeners: Mutex::new(listeners),
            service,
            ports_changes,
        };
        let mut agent = Agent::new(core, enroll, file, loaded);
        agent.protect_all().await;

        let (stop, stopped) = oneshot::channel();
        harness.stop = Some(stop);
        harness.agent = Some(tokio::spawn(async move {
            let mut requests = requests;
            agent.watch(&mut requests, stopped).await.ok();
            agent
        }));
        harness
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("tokengate.yaml")
    }

    fn port(&self, workload: &str) -> u16 {
        self.ports[workload]
    }

    /// Replaces the configuration file the way a `ConfigMap` update does: a
    /// new file renamed over the old one.
    fn write(&self, yaml: &str) {
        let staging = self.dir.path().join("tokengate.yaml.next");
        std::fs::write(&staging, yaml).unwrap();
        std::fs::rename(&staging, self.path()).unwrap();
    }

    fn reloads(&self, result: &str) -> u64 {
        self.reload_metrics.count(result)
    }

    /// Stops the watch loop and returns the agent.
    async fn stop(mut self) -> Agent<LoopbackEnroll> {
        self.stop.take().unwrap().send(()).unwrap();
        self.agent.take().unwrap().await.unwrap()
    }
}

/// Renders a configuration with one workload `orders` on `port` with one rule on `/orders` requiring
/// `role`; `extra` is appended to the workload list.
fn orders_config(jwks: SocketAddr, port: u16, role: &str, extra: &str) -> String {
    format!(
        r"
issuers:
  - issuer: {ISSUER}
    jwks_uri: http://{jwks}/jwks.json
    audiences: [orders]
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/tokengate-reload-unused
    ports: [{port}]
    rules:
      - path_prefix: /orders
        roles: [{role}]
{extra}"
    )
}

fn billing_workload(port: u16) -> String {
    format!(
        r"  - name: billing
    netns: /var/run/netns/tokengate-reload-unused
    ports: [{port}]
    rules:
      - path_prefix: /
"
    )
}

/// Polls `check` until it returns true, failing the test after [`WAIT`].
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ----------------------------------------------------- servers and tokens

async fn start_service() -> SocketAddr {
    let (listener, address) = bind_loopback().await;
    serve_http(listener, |_request, _peer| async {
        Response::new(Full::new(Bytes::from_static(b"hello")))
    });
    address
}

fn token(roles: &[&str]) -> String {
    sign("rsa-1", &user_claims(ISSUER, roles, 300))
}

/// An HTTP/1.1 client connection to a proxy listener.
struct Connection {
    sender: client::SendRequest<Empty<Bytes>>,
}

impl Connection {
    async fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let (sender, connection) = client::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn get(&mut self, path: &str, token: Option<&str>) -> StatusCode {
        let mut request = Request::get(path).header("host", "orders.test");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .sender
            .send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    }
}

/// Sends one GET on a new connection.
async fn get(port: u16, path: &str, token: Option<&str>) -> StatusCode {
    Connection::open(port)
        .await
        .expect("proxy listener accepts")
        .get(path, token)
        .await
}

async fn wait_for_status(port: u16, path: &str, token: &str, expected: StatusCode) {
    wait_for(&format!("GET {path} returns {expected}"), || async move {
        get(port, path, Some(token)).await == expected
    })
    .await;
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_applies_new_rule() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    let reader = token(&["reader"]);
    wait_for_status(port, "/orders", &reader, StatusCode::OK).await;
    let fetches_before = harness.jwks_server.fetches();

    harness.write(&orders_config(harness.jwks, port, "admin", ""));
    wait_for_status(port, "/orders", &reader, StatusCode::FORBIDDEN).await;

    assert_eq!(
        get(port, "/orders", Some(&token(&["admin"]))).await,
        StatusCode::OK
    );
    assert_eq!(harness.reloads(RESULT_SUCCESS), 1);
    assert_eq!(harness.reloads(RESULT_FAILURE), 0);
    assert_eq!(
        harness.jwks_server.fetches(),
        fetches_before,
        "an unchanged issuer keeps its keys and fetches nothing"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_keeps_old_config() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    let reader = token(&["reader"]);
    wait_for_status(port, "/orders", &reader, StatusCode::OK).await;

    // Valid YAML, but a rule with no path matcher fails validation.
    let invalid = orders_config(harness.jwks, port, "admin", "")
        .replace("      - path_prefix: /orders\n", "      - methods: [GET]\n");
    harness.write(&invalid);
    wait_for("the failed reload is counted", || async {
        harness.reloads(RESULT_FAILURE) == 1
    })
    .await;

    assert_eq!(get(port, "/orders", Some(&reader)).await, StatusCode::OK);
    assert_eq!(
        get(port, "/orders", Some(&token(&["admin"]))).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(harness.reloads(RESULT_SUCCESS), 0);

    harness.write("issuers: [");
    wait_for("the second failed reload is counted", || async {
        harness.reloads(RESULT_FAILURE) == 2
    })
    .await;
    assert_eq!(get(port, "/orders", Some(&reader)).await, StatusCode::OK);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_request_rereads_file() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    wait_for_status(port, "/orders", &token(&["reader"]), StatusCode::OK).await;

    // The content is unchanged, so only the request (what SIGHUP sends)
    // can cause this reload.
    harness.reload_requests.send(()).unwrap();
    wait_for("the requested reload is counted", || async {
        harness.reloads(RESULT_SUCCESS) == 1
    })
    .await;

    assert_eq!(
        get(port, "/orders", Some(&token(&["reader"]))).await,
        StatusCode::OK
    );
    let agent = harness.stop().await;
    assert_eq!(agent.running_config().workloads.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connection_gets_new_rule() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    let reader = token(&["reader"]);
    wait_for_status(port, "/orders", &reader, StatusCode::OK).await;
    let mut connection = Connection::open(port).await.unwrap();
    assert_eq!(
        connection.get("/orders", Some(&reader)).await,
        StatusCode::OK
    );

    harness.write(&orders_config(harness.jwks, port, "admin", ""));
    wait_for("the reload is applied", || async {
        harness.reloads(RESULT_SUCCESS) == 1
    })
    .await;

    assert_eq!(
        connection.get("/orders", Some(&reader)).await,
        StatusCode::FORBIDDEN,
        "the next request on a kept-alive connection uses the new rule"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_added_then_removed() {
    let harness = Harness::start(&["orders", "billing"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let billing = harness.port("billing");
    let reader = token(&["reader"]);
    wait_for_status(harness.port("orders"), "/orders", &reader, StatusCode::OK).await;

    harness.write(&orders_config(
        harness.jwks,
        harness.port("orders"),
        "reader",
        &billing_workload(billing),
    ));
    wait_for_status(billing, "/anything", &reader, StatusCode::OK).await;
    assert_eq!(
        get(billing, "/anything", None).await,
        StatusCode::UNAUTHORIZED
    );

    harness.write(&orders_config(
        harness.jwks,
        harness.port("orders"),
        "reader",
        "",
    ));
    wait_for("the removed workload's listener is closed", || async {
        Connection::open(billing).await.is_err()
    })
    .await;

    assert_eq!(harness.reloads(RESULT_SUCCESS), 2);
    assert_eq!(
        get(harness.port("orders"), "/orders", Some(&reader)).await,
        StatusCode::OK
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_change_reaches_enroller() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    wait_for_status(port, "/orders", &token(&["reader"]), StatusCode::OK).await;

    let two_ports = orders_config(harness.jwks, port, "reader", "")
        .replace(&format!("ports: [{port}]"), &format!("ports: [{port}, 1]"));
    harness.write(&two_ports);
    wait_for("the reload is applied", || async {
        harness.reloads(RESULT_SUCCESS) == 1
    })
    .await;

    assert_eq!(harness.ports_changes.load(Ordering::SeqCst), 1);
    assert_eq!(
        get(port, "/orders", Some(&token(&["reader"]))).await,
        StatusCode::OK
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_issuer_fetches_again() {
    let harness = Harness::start(&["orders"], |h| {
        orders_config(h.jwks, h.port("orders"), "reader", "")
    })
    .await;
    let port = harness.port("orders");
    let reader = token(&["reader"]);
    wait_for_status(port, "/orders", &reader, StatusCode::OK).await;
    let fetches_before = harness.jwks_server.fetches();

    // Another audience: the token's `aud` no longer fits.
    harness.write(
        &orders_config(harness.jwks, port, "reader", "")
            .replace("audiences: [orders]", "audiences: [billing]"),
    );
    wait_for_status(port, "/orders", &reader, StatusCode::UNAUTHORIZED).await;

    assert!(harness.jwks_server.fetches() > fetches_before);
    harness.stop().await;
}
