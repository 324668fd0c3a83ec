//! One steered caller connection: the destination check, the HTTP/1.1
//! server connection and the handling of each request on it.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::authorize::Authorization;
use super::forward::Forwarder;
use super::headers::{prepare_request, prepare_response};
use super::respond::{deny, ProxyBody};
use super::{ProxySlot, Shutdown, Upstream, WorkloadProxy};
use crate::audit::AuditEvent;
use crate::decision::{Decision, Reason};

/// Time a caller has to send a request's header section. hyper's default;
/// it bounds how long a slow caller can hold a connection open without
/// sending a request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum size of a request's header section, in bytes. Envoy's default
/// limit is 60 KiB; 64 KiB leaves room for a token at the largest
/// `max_token_bytes` an issuer is likely to set. Because hyper's own URI
/// limit is just below this, an oversized head is always answered 431,
/// which is what the audit event records.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// Serves one accepted connection until the caller closes it, an error
/// ends it, or shutdown lets its current request finish.
pub(super) async fn serve_connection<U: Upstream>(
    slot: Arc<ProxySlot>,
    upstream: Arc<U>,
    stream: TcpStream,
    source: SocketAddr,
    shutdown: Shutdown,
) {
    let proxy = slot.load();
    // With sk_lookup steering the accepted socket's local address is the
    // address the caller connected to.
    let destination = match stream.local_addr() {
        Ok(local) => canonical(local),
        Err(error) => {
            tracing::warn!(%error, "failed to read the original destination, closing");
            return;
        }
    };
    let source = canonical(source);

    if !proxy.ports.contains(&destination.port()) {
        // Only a caller that found the listener's own address gets here; the
        // program steers protected ports only.
        tracing::warn!(%destination, "connection to a port the workload does not protect, closing");
        proxy.record(AuditEvent::new(
            &proxy.name,
            Reason::UnprotectedPort,
            source,
            destination,
        ));
        return;
    }
    serve_http(slot, upstream, stream, source, destination, shutdown).await;
}

/// Serves HTTP/1.1 on an accepted connection whose original destination is
/// known, until the caller closes it, an error ends it, or shutdown lets
/// its current request finish.
pub(super) async fn serve_http<U: Upstream>(
    slot: Arc<ProxySlot>,
    upstream: Arc<U>,
    stream: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
    mut shutdown: Shutdown,
) {
    let proxy = slot.load();
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "failed to set TCP_NODELAY on the caller connection");
    }

    let context = Arc::new(RequestContext {
        forwarder: Forwarder::new(upstream, destination),
        proxy: slot,
        source,
        destination,
    });
    let draining = shutdown.clone();
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        let draining = draining.clone();
        async move {
            let mut response = context.handle(request).await;
            if draining.is_signalled() {
                // The caller learns before sending again that this
                // connection is done, and opens its next one to the new agent.
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(response)
        }
    });

    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .keep_alive(true)
        // A caller may shut down its write side after the request and wait
        // for the response (half close). Without this, hyper closes the
        // connection as soon as it reads the EOF.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.signalled() => {
            if !shutdown.keeps_idle() {
                // Finish the request in flight, then close instead of
                // waiting for the next one.
                connection.as_mut().graceful_shutdown();
            }
            // Otherwise an idle connection waits for its next request, whose
            // response carries `Connection: close`, so that the caller never
            // sends into a connection that is being closed.
            connection.await
        }
    };

    match result {
        Ok(()) => tracing::debug!("connection closed"),
        Err(error) if error.is_parse() || error.is_incomplete_message() => {
            // hyper has already sent 400 (or 431, 414) unless the bytes
            // looked like an HTTP/2 preface or the caller left mid-request.
            tracing::debug!(%error, "malformed request, connection closed");
            let mut event =
                AuditEvent::new(&proxy.name, Reason::MalformedRequest, source, destination);
            if error.is_parse_too_large() {
                event.status = Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16());
            } else if error.is_parse() && !error.is_parse_version_h2() {
                event.status = Some(StatusCode::BAD_REQUEST.as_u16());
            }
            proxy.record(event);
        }
        Err(error) if error.is_timeout() => {
            tracing::debug!(%error, "caller too slow to send a request");
        }
        Err(error) => tracing::debug!(%error, "connection ended with an error"),
    }
}

/// Per-connection state that each request's handler reads.
struct RequestContext<U> {
    /// Loaded at the start of each request, so a keep-alive connection
    /// gets the rules of a config reload from its next request on.
    proxy: Arc<ProxySlot>,
    forwarder: Forwarder<U>,
    source: SocketAddr,
    destination: SocketAddr,
}

impl<U: Upstream> RequestContext<U> {
    /// Decides one request, then forwards it or rejects it.
    async fn handle(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let proxy = &self.proxy.load();
        let mut event = AuditEvent::new(
            &proxy.name,
            Reason::MissingToken,
            self.source,
            self.destination,
        );
        event.method = Some(request.method().as_str().to_owned());
        event.path = Some(request.uri().path().to_owned());

        let authorization = proxy
            .authorize(
                request.method().as_str(),
                request.uri().path(),
                request.headers(),
            )
            .await;
        let reason = authorization.reason;
        let allowed = reason.decision() == Decision::Allow;
        if allowed {
            prepare_request(&mut request, self.source.ip(), &proxy.token_headers);
            proxy.rewrite_for_service(&mut request, &authorization);
        }
        fill_event(&mut event, authorization);

        if !allowed {
            tracing::debug!(
                reason = reason.as_str(),
                path = event.path.as_deref(),
                "request denied"
            );
            let response = deny(reason);
            event.status = Some(response.status().as_u16());
            proxy.record(event);
            return response;
        }

        match self.forwarder.send(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                prepare_response(&mut parts.headers);
                event.status = Some(parts.status.as_u16());
                proxy.record(event);
                tracing::debug!(status = parts.status.as_u16(), "request forwarded");
                Response::from_parts(parts, Either::Left(body))
            }
            Err(error) => {
                tracing::warn!(
                    workload = %proxy.name,
                    destination = %self.destination,
                    error = %crate::error_chain(&error),
                    "failed to forward an allowed request"
                );
                let response = deny(Reason::UpstreamUnavailable);
                event.reason = Reason::UpstreamUnavailable;
                event.decision = Reason::UpstreamUnavailable.decision();
                event.status = Some(response.status().as_u16());
                proxy.record(event);
                response
            }
        }
    }
}

fn fill_event(event: &mut AuditEvent, authorization: Authorization) {
    event.reason = authorization.reason;
    event.decision = authorization.reason.decision();
    event.issuer = authorization.issuer;
    event.subject = authorization.subject;
    event.token_fingerprint = authorization.token_fingerprint;
    event.verification_seconds = authorization.verification_seconds;
    event.rule = authorization.rule;
}

/// Maps an IPv4-mapped IPv6 address to plain IPv4, so audit lines and the
/// upstream connection use the family the caller used. Any other IPv6
/// address keeps its scope id, without which a link-local destination
/// cannot be connected to again.
fn canonical(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => address,
        },
        SocketAddr::V4(_) => address,
    }
}

impl WorkloadProxy {
    /// Counts the decision and queues its audit event.
    fn record(&self, event: AuditEvent) {
        self.shared
            .metrics
            .record_decision(&self.name, event.reason);
        self.shared.audit.record(event);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn mapped_address_becomes_ipv4() {
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped()),
            8080,
        );
        let plain_v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 8080);

        assert_eq!(
            canonical(mapped),
            "198.18.0.2:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(canonical(plain_v6), plain_v6);
    }

    #[test]
    fn link_local_keeps_scope_id() {
        let link_local = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            8080,
            0,
            7,
        ));

        assert_eq!(canonical(link_local), link_local);
    }
}
