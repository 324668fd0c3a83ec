//! The agent's core behind real listeners: one workload proxy with the
//! loopback upstream, the admin listener, and the audit output as lines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokengate::admin;
use tokengate::app::{self, Core};
use tokengate::config::{Config, WorkloadConfig};
use tokengate::proxy::{self, DrainController, LoopbackUpstream};
use tokio::io::{AsyncBufReadExt, AsyncWrite, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Returns an audit output for `Core::start` and the receiver of its lines.
/// `buffer` is the pipe's capacity in bytes. The agent's audit writes wait
/// while it is full.
pub fn capture_audit(buffer: usize) -> (DuplexStream, mpsc::UnboundedReceiver<String>) {
    let (audit_output, audit_input) = tokio::io::duplex(buffer);
    let (audit_lines, audit) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(audit_input).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if audit_lines.send(line).is_err() {
                break;
            }
        }
    });
    (audit_output, audit)
}

/// Waits up to `bound` for the next audit line.
pub async fn next_audit_line(
    audit: &mut mpsc::UnboundedReceiver<String>,
    bound: Duration,
) -> String {
    tokio::time::timeout(bound, audit.recv())
        .await
        .expect("an audit line within the wait bound")
        .expect("the audit output is open")
}

/// The agent's core serving the first workload of its configuration and
/// the admin listener.
pub struct Serving {
    pub core: Core,
    pub admin: SocketAddr,
    pub drain: DrainController,
    pub admin_drain: DrainController,
}

/// Starts the core for `config` with `audit_output`, serves the first
/// workload on `listener` with `service` behind it, and starts the admin
/// listener. It does not wait for the issuers' keys.
pub async fn start_serving(
    config: &Config,
    audit_output: Box<dyn AsyncWrite + Send + Unpin>,
    listener: TcpListener,
    service: SocketAddr,
) -> Serving {
    let core = Core::start(config, Some(audit_output)).await.unwrap();
    let drain = serve_workload(&core, &config.workloads[0], listener, service);
    let (admin, admin_drain) = serve_admin(&core).await;
    Serving {
        core,
        admin,
        drain,
        admin_drain,
    }
}

/// Serves `workload` on `listener`, forwarding allowed requests to
/// `service`, and marks it attached. Returns the controller that drains
/// the proxy.
pub fn serve_workload(
    core: &Core,
    workload: &WorkloadConfig,
    listener: TcpListener,
    service: SocketAddr,
) -> DrainController {
    let drain = DrainController::new();
    let workload_proxy = core.workload_proxy(workload);
    let upstream = Arc::new(LoopbackUpstream::new(service));
    tokio::spawn(proxy::serve(
        listener,
        upstream,
        workload_proxy,
        drain.handle(),
    ));
    core.readiness.set_attached(&workload.name, true);
    drain
}

/// Starts the admin listener on 127.0.0.1 port 0 and returns its address
/// and drain controller.
pub async fn serve_admin(core: &Core) -> (SocketAddr, DrainController) {
    let admin_listener = app::bind_admin("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin_address = admin_listener.local_addr().unwrap();
    let admin_drain = DrainController::new();
    tokio::spawn(admin::serve(
        admin_listener,
        core.admin_state(),
        admin_drain.handle(),
    ));
    (admin_address, admin_drain)
}

/// Waits up to `bound` until every issuer's keys are fetched.
pub async fn wait_for_keys(core: &Core, bound: Duration) {
    super::wait_until("the issuer's keys are fetched", bound, || {
        core.issuers.iter().all(|keys| keys.is_ready())
    })
    .await;
}
