//! The accept loop of an egress listener: each accepted connection gets
//! its original destination from the kernel's record, then the same HTTP
//! handling, verification and rules as a steered ingress connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use super::connection::serve_http;
use super::{ProxySlot, Shutdown, Upstream, ACCEPT_ERROR_BACKOFF};

/// Source of the original destinations of steered egress connections.
pub trait OriginLookup: Send + Sync + 'static {
    /// Returns and deletes the original destination of the connection from
    /// `client` to the egress listener at `listener`, or `None` when the
    /// kernel recorded none (the caller connected to the listener itself).
    fn take_origin(&self, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddr>;

    /// Counts one accepted connection, with or without (`found`) a recorded
    /// origin.
    fn count_accept(&self, found: bool);
}

/// Accepts connections on an egress `listener` until `shutdown` is
/// signalled. A connection without a recorded origin is closed at once,
/// because there is nowhere to forward it.
pub async fn serve_egress<U: Upstream, L: OriginLookup>(
    listener: TcpListener,
    upstream: Arc<U>,
    slot: Arc<ProxySlot>,
    origins: Arc<L>,
    mut shutdown: Shutdown,
) {
    let local = listener.local_addr().ok();
    let name = slot.load().name.clone();
    tracing::info!(workload = %name, listener.addr = ?local, "egress proxy accepting connections");

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::error!(workload = %name, %error, "failed to accept an egress connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };

        let origin = stream
            .local_addr()
            .ok()
            .and_then(|listener_addr| origins.take_origin(client, listener_addr));
        origins.count_accept(origin.is_some());
        let Some(destination) = origin else {
            tracing::debug!(workload = %name, client.addr = %client, "egress connection without a recorded destination, closing");
            continue;
        };

        let span = tracing::debug_span!("egress connection", workload = %name, client.addr = %client, destination = %destination);
        let task = serve_http(
            Arc::clone(&slot),
            Arc::clone(&upstream),
            stream,
            client,
            destination,
            shutdown.clone(),
        );
        tokio::spawn(task.instrument(span));
    }

    drop(listener);
    tracing::info!(workload = %name, listener.addr = ?local, "egress proxy stopped accepting connections");
}
