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
mod egress;
mod forward;
mod headers;
mod identity;
mod respond;
mod upstream;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::audit::AuditSink;
use crate::cache::TokenCache;
use crate::config::{ForwardMode, WorkloadConfig};
use crate::extract::TokenSources;
use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::revocation::Revocations;
use crate::verify::Verifier;

pub use self::authorize::Authorization;
pub use self::drain::{DrainController, Shutdown};
pub use self::egress::{serve_egress, OriginLookup};
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
    /// Verified tokens by SHA-256, consulted before the verifier.
    pub token_cache: Arc<TokenCache>,
    /// The revocation list in force, checked for cached and fresh tokens.
    pub revocations: Arc<Revocations>,
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
    /// Forwarding mode of the verified token, from the workload config.
    forward: ForwardMode,
    /// Claim path and header name of each `claim_to_headers` entry.
    claim_headers: Vec<(String, http::HeaderName)>,
    /// True when `Authorization` is not one of the token sources. A bearer
    /// credential there was then never verified, so it is removed before
    /// the service could act on it.
    strip_unverified_bearer: bool,
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

        // Validation rejects invalid header names; one that slips through
        // is left out rather than failing the whole workload.
        let claim_headers = config
            .claim_to_headers
            .iter()
            .filter_map(|entry| {
                let name = http::HeaderName::from_bytes(entry.header.as_bytes()).ok()?;
                Some((entry.claim.clone(), name))
            })
            .collect();

        let strip_unverified_bearer = !token_headers
            .iter()
            .any(|name| name == http::header::AUTHORIZATION.as_str());

        Self {
            name: config.name.clone(),
            ports: config.ports.clone(),
            sources: TokenSources::new(config),
            policy: Policy::for_workload(config),
            token_headers,
            strip_unverified_bearer,
            forward: config.forward,
            claim_headers,
            shared,
        }
    }

    /// Returns the workload's name, as in audit events and metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A workload's current request path, replaced by a config reload. Each
/// request loads the current [`WorkloadProxy`] when it starts and keeps that
/// `Arc` to its end, so a reload never changes a request in flight.
pub struct ProxySlot {
    current: RwLock<Arc<WorkloadProxy>>,
}

impl ProxySlot {
    pub fn new(proxy: Arc<WorkloadProxy>) -> Self {
        Self {
            current: RwLock::new(proxy),
        }
    }

    /// Returns the current request path.
    pub fn load(&self) -> Arc<WorkloadProxy> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `proxy` the request path of every request that starts from now.
    pub fn store(&self, proxy: Arc<WorkloadProxy>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = proxy;
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
    shutdown: Shutdown,
) {
    serve_slot(
        listener,
        upstream,
        Arc::new(ProxySlot::new(proxy)),
        shutdown,
    )
    .await;
}

/// Like [`serve`], with the request path read from `slot` for each request,
/// so that a config reload applies to connections already open.
pub async fn serve_slot<U: Upstream>(
    listener: TcpListener,
    upstream: Arc<U>,
    slot: Arc<ProxySlot>,
    mut shutdown: Shutdown,
) {
    let local = listener.local_addr().ok();
    let name = slot.load().name.clone();
    tracing::info!(workload = %name, listener.addr = ?local, "proxy accepting connections");

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };

        match accepted {
            Ok((stream, peer)) => {
                let span =
                    tracing::debug_span!("connection", workload = %name, client.addr = %peer);
                let task = connection::serve_connection(
                    Arc::clone(&slot),
                    Arc::clone(&upstream),
                    stream,
                    peer,
                    shutdown.clone(),
                );
                tokio::spawn(task.instrument(span));
            }
            Err(error) => {
                tracing::error!(workload = %name, %error, "failed to accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }

    drop(listener);
    tracing::info!(workload = %name, listener.addr = ?local, "proxy stopped accepting connections");
}
