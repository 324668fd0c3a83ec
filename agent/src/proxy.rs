//! The request path: accepting steered connections, deciding each request
//! and forwarding the allowed ones to the service.
//!
//! One accept loop runs per workload listener. Each accepted connection is
//! an HTTP/1.1 server connection with keep-alive; each request is decided by
//! `extract`, `verify` and `policy`, then forwarded over the connection's own
//! upstream connection or rejected with 401/403 without contacting the
//! service. Every decision goes to `audit` and `metrics`. Creating listeners
//! and attaching eBPF programs belong to `app`.

mod authorize;
mod connection;
mod drain;
mod forward;
mod headers;
mod respond;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::audit::AuditSink;
use crate::config::WorkloadConfig;
use crate::extract::TokenSources;
use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::verify::Verifier;

pub use self::drain::{DrainController, Shutdown};
pub use self::upstream::{LoopbackUpstream, NetnsUpstream, Upstream};

/// Pause after a failed `accept`, so that running out of file descriptors
/// does not turn the accept loop into a busy loop.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Parts that every workload's proxy shares: keys, verifier and sinks.
#[derive(Clone)]
pub struct Shared {
    pub verifier: Arc<Verifier>,
    /// Key stores of the configured issuers, for unknown-`kid` refetches.
    pub issuers: Vec<Arc<IssuerKeys>>,
    pub audit: AuditSink,
    pub metrics: Metrics,
}

/// One workload's request path: its ports, token sources and rules, plus
/// the shared parts.
pub struct WorkloadProxy {
    name: String,
    ports: Vec<u16>,
    sources: TokenSources,
    policy: Policy,
    /// Lower-case names of the headers that carry the token. A caller cannot
    /// have them removed through `Connection`, so the service receives the
    /// token that was verified.
    token_headers: Vec<String>,
    shared: Shared,
}

impl WorkloadProxy {
    /// Compiles the workload's token sources and rules.
    pub fn new(config: &WorkloadConfig, shared: Shared) -> Self {
        let mut token_headers: Vec<String> = config
            .from_headers
            .iter()
            .map(|source| source.name.to_ascii_lowercase())
            .collect();
        if config.from_headers.is_empty() && config.from_cookies.is_empty() {
            token_headers.push(http::header::AUTHORIZATION.as_str().to_owned());
        }
        if !config.from_cookies.is_empty() {
            token_headers.push(http::header::COOKIE.as_str().to_owned());
        }

        Self {
            name: config.name.clone(),
            ports: config.ports.clone(),
            sources: TokenSources::new(config),
            policy: Policy::new(&config.rules),
            token_headers,
            shared,
        }
    }

    /// Returns the workload's name, as in audit events and metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Accepts connections on `listener` until `shutdown` is signalled, serving
/// each on its own task. Returns once the loop has stopped accepting and
/// the listener is closed. Connections still in flight keep their own
/// [`Shutdown`] handles, so [`DrainController::drain`] waits for them.
pub async fn serve<U: Upstream>(
    listener: TcpListener,
    upstream: Arc<U>,
    proxy: Arc<WorkloadProxy>,
    mut shutdown: Shutdown,
) {
    let local = listener.local_addr().ok();
    tracing::info!(workload = %proxy.name, listener.addr = ?local, "proxy accepting connections");

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };

        match accepted {
            Ok((stream, peer)) => {
                let span =
                    tracing::debug_span!("connection", workload = %proxy.name, client.addr = %peer);
                let task = connection::serve_connection(
                    Arc::clone(&proxy),
                    Arc::clone(&upstream),
                    stream,
                    peer,
                    shutdown.clone(),
                );
                tokio::spawn(task.instrument(span));
            }
            Err(error) => {
                tracing::error!(workload = %proxy.name, %error, "failed to accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }

    drop(listener);
    tracing::info!(workload = %proxy.name, listener.addr = ?local, "proxy stopped accepting connections");
}
