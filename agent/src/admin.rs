//! The admin HTTP listener: `/metrics`, `/healthz` and `/readyz`.
//!
//! Owns the admin routes and the readiness state (issuers with keys,
//! workloads attached). It binds nothing itself; `app` passes the listener.

use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::proxy::{Shutdown, ACCEPT_ERROR_BACKOFF};

/// Time a client has to send a request's header section.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Readiness state for `/readyz`: every issuer has keys and every
/// workload's program is attached with the proxy serving its listener. A
/// configuration reload changes both lists.
pub struct Readiness {
    issuers: RwLock<Vec<Arc<IssuerKeys>>>,
    /// Configured workloads in configuration order, with whether each one
    /// is attached and served.
    workloads: RwLock<Vec<(String, bool)>>,
}

impl Readiness {
    /// Starts with every workload not attached.
    pub fn new(issuers: Vec<Arc<IssuerKeys>>, workloads: impl IntoIterator<Item = String>) -> Self {
        let workloads = workloads.into_iter().map(|name| (name, false)).collect();
        Self {
            issuers: RwLock::new(issuers),
            workloads: RwLock::new(workloads),
        }
    }

    /// Records whether `workload` is attached and served.
    pub fn set_attached(&self, workload: &str, attached: bool) {
        let mut workloads = self
            .workloads
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for (name, flag) in workloads.iter_mut() {
            if name == workload {
                *flag = attached;
            }
        }
    }

    /// Adds `workload`, not attached, unless it is listed already.
    pub fn add_workload(&self, workload: &str) {
        let mut workloads = self
            .workloads
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !workloads.iter().any(|(name, _)| name == workload) {
            workloads.push((workload.to_owned(), false));
        }
    }

    /// Removes a workload that left the configuration.
    pub fn remove_workload(&self, workload: &str) {
        self.workloads
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(name, _)| name != workload);
    }

    /// Replaces the issuers whose keys readiness requires.
    pub fn set_issuers(&self, issuers: Vec<Arc<IssuerKeys>>) {
        *self.issuers.write().unwrap_or_else(PoisonError::into_inner) = issuers;
    }

    /// Lists what is not ready, one short line each; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let issuers = self.issuers.read().unwrap_or_else(PoisonError::into_inner);
        let workloads = self
            .workloads
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let issuers = issuers
            .iter()
            .filter(|keys| !keys.is_ready())
            .map(|keys| format!("issuer {} has no keys yet", keys.config.issuer));
        let workloads = workloads
            .iter()
            .filter(|(_, attached)| !attached)
            .map(|(name, _)| format!("workload {name} is not attached"));

        issuers.chain(workloads).collect()
    }
}

/// State that the admin routes read.
pub struct AdminState {
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
}

/// Serves the admin routes on `listener` until `shutdown` is signalled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.signalled() => break,
        };

        match accepted {
            Ok((stream, peer)) => {
                let state = Arc::clone(&state);
                let mut shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let response = route(&state, &request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);

                    let result = tokio::select! {
                        result = connection.as_mut() => result,
                        () = shutdown.signalled() => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(client.addr = %peer, %error, "admin connection ended with an error");
                    }
                });
            }
            Err(error) => {
                tracing::error!(%error, "failed to accept an admin connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }

    tracing::info!("admin listener stopped");
}

fn route<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }

    match path {
        "/metrics" => metrics(&state.metrics),
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        _ => readiness(&state.readiness),
    }
}

fn metrics(metrics: &Metrics) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(error) = encoder.encode(&metrics.registry().gather(), &mut body) {
        tracing::error!(%error, "failed to encode metrics");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to encode metrics\n".to_owned(),
        );
    }

    let mut response = Response::new(Full::new(Bytes::from(body)));
    let content_type = HeaderValue::from_str(encoder.format_type())
        .expect("the text format type is a valid header value");
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

fn readiness(readiness: &Readiness) -> Response<Full<Bytes>> {
    let missing = readiness.not_ready();
    if missing.is_empty() {
        return text(StatusCode::OK, "ready\n".to_owned());
    }

    let mut body = String::from("not ready:\n");
    for line in missing {
        body.push_str(&line);
        body.push('\n');
    }
    text(StatusCode::SERVICE_UNAVAILABLE, body)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn state(workloads: &[&str]) -> AdminState {
        AdminState {
            metrics: Metrics::new().unwrap(),
            readiness: Arc::new(Readiness::new(
                Vec::new(),
                workloads.iter().map(|name| (*name).to_owned()),
            )),
        }
    }

    async fn body_text(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn readyz_names_unattached_workload() {
        let state = state(&["orders", "billing"]);
        state.readiness.set_attached("orders", true);

        let response = route(&state, &Request::get("/readyz").body(()).unwrap());

        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body_text(response).await,
            "not ready:\nworkload billing is not attached\n"
        );
    }

    #[tokio::test]
    async fn readyz_ok_when_all_attached() {
        let state = state(&["orders"]);
        state.readiness.set_attached("orders", true);

        let response = route(&state, &Request::get("/readyz").body(()).unwrap());

        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_use_text_format() {
        let state = state(&[]);
        state
            .metrics
            .record_decision("orders", crate::decision::Reason::Allowed);

        let response = route(&state, &Request::get("/metrics").body(()).unwrap());

        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert!(body_text(response)
            .await
            .contains("tokengate_decisions_total"));
    }

    #[test]
    fn readyz_follows_workload_changes() {
        let state = state(&["orders"]);
        state.readiness.set_attached("orders", true);

        state.readiness.add_workload("billing");
        state.readiness.add_workload("orders");
        assert_eq!(
            state.readiness.not_ready(),
            ["workload billing is not attached"]
        );
        state.readiness.remove_workload("billing");

        assert!(state.readiness.not_ready().is_empty());
        let response = route(&state, &Request::get("/readyz").body(()).unwrap());
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn unknown_path_is_not_found() {
        let response = route(&state(&[]), &Request::get("/admin").body(()).unwrap());

        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn post_is_not_allowed() {
        let response = route(&state(&[]), &Request::post("/healthz").body(()).unwrap());

        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
    }
}
