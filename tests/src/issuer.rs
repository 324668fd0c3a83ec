//! A token issuer on loopback: serves the fixture JWKS over HTTP and counts
//! how often it was fetched.
//!
//! It runs in the namespace of the thread that starts it (the host in every
//! test), on its own thread with a single-threaded tokio runtime, so
//! synchronous tests can use it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// `iss` of every token the tests mint.
pub const ISSUER: &str = "https://issuer.tokengate.test";

/// Path of the JWKS document.
pub const JWKS_PATH: &str = "/jwks.json";

/// Public halves of the fixture signing keys `rsa-1`, `ec-1` and `ed-1`.
pub const JWKS_JSON: &str = include_str!("../fixtures/jwks.json");

/// What the server threads share with the [`Issuer`] handle.
#[derive(Debug)]
struct State {
    fetches: AtomicUsize,
    /// While false, the JWKS path returns 503, as an issuer that is down.
    available: AtomicBool,
}

/// A running issuer. Drop stops it.
#[derive(Debug)]
pub struct Issuer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Issuer {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("failed to bind the issuer on 127.0.0.1")?;
        listener
            .set_nonblocking(true)
            .context("failed to make the issuer socket non-blocking")?;
        let addr = listener
            .local_addr()
            .context("failed to read the issuer address")?;
        let state = Arc::new(State {
            fetches: AtomicUsize::new(0),
            available: AtomicBool::new(true),
        });
        let (shutdown, shutdown_signal) = oneshot::channel();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to build the issuer runtime")?;
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("issuer".to_owned())
            .spawn(move || runtime.block_on(serve(listener, thread_state, shutdown_signal)))
            .context("failed to start the issuer thread")?;

        Ok(Self {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Socket address of the issuer.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// URL of the JWKS, for the agent's `jwks_uri`.
    pub fn jwks_uri(&self) -> String {
        format!("http://{}{JWKS_PATH}", self.addr)
    }

    /// Number of successful JWKS fetches so far.
    pub fn fetch_count(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Makes the JWKS path return 503 (`false`) or the keys (`true`).
    pub fn set_available(&self, available: bool) {
        self.state.available.store(available, Ordering::SeqCst);
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("issuer: failed to register the listener: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        eprintln!("issuer: accept failed: {error}");
                        continue;
                    }
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(respond(&request, &state)) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}

fn respond(request: &Request<hyper::body::Incoming>, state: &State) -> Response<Full<Bytes>> {
    let builder = Response::builder();
    let is_jwks = request.method() == Method::GET && request.uri().path() == JWKS_PATH;
    let response = if is_jwks && !state.available.load(Ordering::SeqCst) {
        builder
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Full::new(Bytes::from_static(b"down\n")))
    } else if is_jwks {
        state.fetches.fetch_add(1, Ordering::SeqCst);
        builder
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(JWKS_JSON.as_bytes())))
    } else {
        builder
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found\n")))
    };
    response.expect("a static response builds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http;

    #[test]
    fn serves_jwks_and_counts_fetches() {
        let issuer = Issuer::start().expect("issuer");

        let first = http::get(issuer.addr(), JWKS_PATH).expect("first fetch");
        let missing = http::get(issuer.addr(), "/other").expect("other path");
        let second = http::get(issuer.addr(), JWKS_PATH).expect("second fetch");

        assert_eq!(first.status, 200);
        assert_eq!(second.status, 200);
        assert_eq!(missing.status, 404);
        let keys = first.json().expect("json")["keys"]
            .as_array()
            .expect("keys")
            .len();
        assert_eq!(keys, 3);
        assert_eq!(issuer.fetch_count(), 2);
    }

    #[test]
    fn unavailable_issuer_returns_503() {
        let issuer = Issuer::start().expect("issuer");

        issuer.set_available(false);
        let down = http::get(issuer.addr(), JWKS_PATH).expect("fetch while down");
        issuer.set_available(true);
        let up = http::get(issuer.addr(), JWKS_PATH).expect("fetch while up");

        assert_eq!(down.status, 503);
        assert_eq!(up.status, 200);
        assert_eq!(issuer.fetch_count(), 1);
    }
}
