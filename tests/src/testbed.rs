//! The standard testbed: pods `orders` and `client` on one bridge, `tg-echo`
//! in `orders` on a protected and an unprotected port, the issuer on
//! loopback, and the agent protecting `orders`.
//!
//! Fields drop in declaration order, so the agent stops first, then the
//! issuer and the service, then the namespaces and the bridge go.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent::{
    agent_binary, Agent, AgentConfig, HeaderSpec, IssuerSpec, RuleSpec, WorkloadSpec,
};
use crate::echo::{EchoService, REQUEST_ID_HEADER};
use crate::http::{Connection, Request};
use crate::ids::unique_id;
use crate::issuer::{Issuer, ISSUER};
use crate::netns::{Caller, Network, PodInfo};

/// Port of the service that the agent protects.
pub const PROTECTED_PORT: u16 = 8080;

/// Port of the same service that the agent leaves alone.
pub const UNPROTECTED_PORT: u16 = 9090;

/// Workload name in the agent config, audit lines and metrics.
pub const WORKLOAD: &str = "orders";

/// `aud` the agent accepts.
pub const AUDIENCE: &str = "orders";

/// Role that the `/orders` rule requires.
pub const ORDERS_ROLE: &str = "orders.read";

/// Scope that the `/reports` rule requires.
pub const REPORTS_SCOPE: &str = "reports.read";

/// Cookie that may carry the token besides the `Authorization` header.
pub const TOKEN_COOKIE: &str = "tg_token";

/// Source address of the agent's connections to the service, the agent's
/// default `reserved_source_v4`.
pub const RESERVED_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Signing algorithms the agent accepts: one per fixture key type.
pub const ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

/// Drain time of test agents, in seconds: short, so a SIGTERM test does not
/// wait the agent's production default.
const DRAIN_SECONDS: u64 = 5;

/// Connect timeout of [`probe`]: a dropped SYN is retried after 1 s, so 2 s
/// covers one retry and still keeps fail-closed checks quick.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Read timeout of [`probe`] once connected.
const PROBE_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// How to build a testbed.
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    pub echo_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// Namespace names for the `orders` and `client` pods; unique names
    /// derived from the process id when `None`.
    pub netns_names: Option<(String, String)>,
}

impl TestbedOptions {
    /// Options for an e2e test: unique namespace names and the agent from
    /// [`agent_binary`].
    pub fn for_tests(echo_bin: &str) -> Self {
        Self {
            echo_bin: PathBuf::from(echo_bin),
            agent_bin: agent_binary(),
            netns_names: None,
        }
    }
}

/// A running testbed.
#[derive(Debug)]
pub struct Testbed {
    agent: Option<Agent>,
    pub issuer: Issuer,
    pub echo: EchoService,
    pub orders: PodInfo,
    pub client: PodInfo,
    network: Network,
    dir: Option<tempfile::TempDir>,
    agent_bin: PathBuf,
}

impl Testbed {
    /// Creates the network, both pods, the service and the issuer. The
    /// agent is not started yet.
    pub fn new(options: &TestbedOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-testbed-")
            .tempdir()
            .context("failed to create the testbed directory")?;
        let mut network = Network::create()?;
        let (orders, client) = match &options.netns_names {
            Some((orders_netns, client_netns)) => (
                network.add_pod_with_netns("orders", orders_netns)?,
                network.add_pod_with_netns("client", client_netns)?,
            ),
            None => (network.add_pod("orders")?, network.add_pod("client")?),
        };
        let echo = EchoService::start(
            &options.echo_bin,
            &orders.netns,
            &[PROTECTED_PORT, UNPROTECTED_PORT],
            &dir.path().join("echo.log"),
        )?;
        let issuer = Issuer::start()?;

        Ok(Self {
            agent: None,
            issuer,
            echo,
            orders,
            client,
            network,
            dir: Some(dir),
            agent_bin: options.agent_bin.clone(),
        })
    }

    /// Builds the agent config every test starts from. It has one issuer and
    /// the `orders` workload on [`PROTECTED_PORT`], with the token in
    /// `Authorization: Bearer` or the [`TOKEN_COOKIE`] cookie. Its rules:
    /// `/orders` (GET, POST) needs [`ORDERS_ROLE`], `/reports` (GET) needs
    /// [`REPORTS_SCOPE`], and everything else is denied by default.
    pub fn default_agent_config(&self) -> AgentConfig {
        AgentConfig {
            issuers: vec![IssuerSpec {
                issuer: ISSUER.to_owned(),
                jwks_uri: self.issuer.jwks_uri(),
                audiences: vec![AUDIENCE.to_owned()],
                algorithms: ALGORITHMS.iter().map(|alg| (*alg).to_owned()).collect(),
                unknown_kid_refetch_seconds: None,
                jwks_refresh_seconds: None,
            }],
            workloads: vec![WorkloadSpec {
                name: WORKLOAD.to_owned(),
                netns: self.orders.netns_path(),
                ports: vec![PROTECTED_PORT],
                from_headers: vec![HeaderSpec {
                    name: "Authorization".to_owned(),
                    value_prefix: "Bearer ".to_owned(),
                }],
                from_cookies: vec![TOKEN_COOKIE.to_owned()],
                rules: vec![
                    RuleSpec {
                        path_prefix: "/orders".to_owned(),
                        methods: vec!["GET".to_owned(), "POST".to_owned()],
                        roles: vec![ORDERS_ROLE.to_owned()],
                        ..RuleSpec::default()
                    },
                    RuleSpec {
                        path_prefix: "/reports".to_owned(),
                        methods: vec!["GET".to_owned()],
                        scopes: vec![REPORTS_SCOPE.to_owned()],
                        ..RuleSpec::default()
                    },
                ],
            }],
            loopback_exempt: true,
            drain_seconds: DRAIN_SECONDS,
        }
    }

    /// Starts the agent with [`Testbed::default_agent_config`] and waits
    /// until it is ready.
    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        let config = self.default_agent_config();
        self.start_agent_with(&config)
    }

    /// Starts the agent with `config` and waits until it is ready. A
    /// previous agent is killed first.
    pub fn start_agent_with(&mut self, config: &AgentConfig) -> Result<&mut Agent> {
        self.agent = None;
        let agent = Agent::start(&self.agent_bin, config)?;
        Ok(self.agent.insert(agent))
    }

    /// Starts the agent with `config` without waiting for readiness.
    pub fn spawn_agent_with(&mut self, config: &AgentConfig) -> Result<&mut Agent> {
        self.agent = None;
        let agent = Agent::spawn(&self.agent_bin, config)?;
        Ok(self.agent.insert(agent))
    }

    /// Returns the running agent; panics if none was started.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent was started")
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the agent was started")
    }

    /// Returns the host namespace as a caller.
    pub fn host(&self) -> Caller {
        Caller::Host {
            source: self.network.gateway(),
        }
    }

    /// Returns the `client` pod as a caller.
    pub fn client_pod(&self) -> Caller {
        Caller::Pod(self.client.clone())
    }

    /// Returns the `orders` pod itself as a caller, for in-pod loopback
    /// traffic.
    pub fn orders_pod(&self) -> Caller {
        Caller::Pod(self.orders.clone())
    }

    /// Returns the two callers outside the protected pod: host and `client`
    /// pod.
    pub fn outside_callers(&self) -> Vec<Caller> {
        vec![self.host(), self.client_pod()]
    }

    pub fn protected_addr(&self) -> SocketAddr {
        self.orders.socket_addr(PROTECTED_PORT)
    }

    pub fn unprotected_addr(&self) -> SocketAddr {
        self.orders.socket_addr(UNPROTECTED_PORT)
    }

    /// Name of the bridge, for messages.
    pub fn bridge_name(&self) -> &str {
        self.network.bridge_name()
    }

    /// Leaves everything in place after drop except the agent process, and
    /// returns a description with the commands that remove it.
    pub fn keep(&mut self) -> String {
        self.network.keep();
        self.echo.keep();
        let mut lines = Vec::new();
        let mut remove = vec![
            format!("kill {}", self.echo.pid()),
            format!("ip netns del {}", self.orders.netns),
            format!("ip netns del {}", self.client.netns),
            format!("ip link del {}", self.network.bridge_name()),
        ];
        if let Some(agent) = self.agent.as_mut() {
            agent.keep_files();
            lines.push(format!(
                "agent config {}, audit log {}, pins {}",
                agent.config_path().display(),
                agent.audit_path().display(),
                agent.pin_path().display()
            ));
            remove.push(format!("rm -r {}", agent.pin_path().display()));
        }
        if let Some(dir) = self.dir.take() {
            let kept_dir = dir.keep();
            lines.push(format!("echo log {}", kept_dir.join("echo.log").display()));
        }
        lines.push(format!("remove with: {}", remove.join("; ")));
        lines.join("\n")
    }
}

/// Result of trying a port from a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// The connection was refused (RST).
    Refused,
    /// No SYN-ACK within [`PROBE_CONNECT_TIMEOUT`].
    TimedOut,
    /// Connected and got an HTTP response with this status.
    Answered(u16),
    /// Connected, but no HTTP response arrived.
    ConnectedWithoutResponse(String),
    /// Some other connect error, such as an unreachable network.
    Failed(String),
}

impl Reachability {
    /// Returns whether no connection could be made: refused or timed out.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Refused | Self::TimedOut)
    }
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused => write!(f, "connection refused"),
            Self::TimedOut => write!(f, "connect timed out after {PROBE_CONNECT_TIMEOUT:?}"),
            Self::Answered(status) => write!(f, "answered {status}"),
            Self::ConnectedWithoutResponse(error) => write!(f, "connected, no response: {error}"),
            Self::Failed(error) => write!(f, "connect failed: {error}"),
        }
    }
}

/// Connects from `caller` to `addr` with a bounded timeout and, if that
/// works, sends one GET without a token.
pub fn probe(caller: &Caller, addr: SocketAddr) -> Reachability {
    let stream = match caller.connect(addr, PROBE_CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(error) => {
            return match error.kind() {
                io::ErrorKind::ConnectionRefused => Reachability::Refused,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Reachability::TimedOut,
                _ => Reachability::Failed(error.to_string()),
            }
        }
    };
    let request = Request::new("GET", "/orders/probe")
        .header(REQUEST_ID_HEADER, &format!("probe-{}", unique_id()));
    let result = Connection::new(stream)
        .map_err(anyhow::Error::from)
        .and_then(|mut connection| {
            connection
                .stream()
                .set_read_timeout(Some(PROBE_READ_TIMEOUT))?;
            connection.send(&request)
        });
    match result {
        Ok(response) => Reachability::Answered(response.status),
        Err(error) => Reachability::ConnectedWithoutResponse(format!("{error:#}")),
    }
}
