//! HTTP/1.1 servers on 127.0.0.1 port 0 that stand in for the issuer, the
//! revocation list and the protected service.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::tokens;

/// Serves every request on `listener` with `handler`, which also receives
/// the peer address, one task per connection. The accept loop runs until
/// the returned task is aborted or the test ends.
pub fn serve_http<F, Fut, B>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = handler(request, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                // A client that closes or times out mid-response ends the
                // connection with an error that no test checks.
                let _ = server::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Binds a listener on 127.0.0.1 port 0 and returns it with its address.
pub async fn bind_loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

/// Returns an address on which nothing listens.
pub async fn closed_port() -> SocketAddr {
    bind_loopback().await.1
}

/// A JWKS server that serves the fixture `jwks.json` and counts fetches.
pub struct JwksServer {
    pub address: SocketAddr,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    /// Starts a server that returns the fixture key set.
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// Starts a server that returns the fixture key set when `available`,
    /// or 503 with an empty body otherwise.
    pub async fn start_with(available: bool) -> Self {
        let (listener, address) = bind_loopback().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let document = Bytes::from(std::fs::read(tokens::fixture_path("jwks.json")).unwrap());

        let counter = Arc::clone(&fetches);
        serve_http(listener, move |_request, _peer| {
            counter.fetch_add(1, Ordering::SeqCst);
            let document = document.clone();
            async move {
                let (status, body) = if available {
                    (StatusCode::OK, document)
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, Bytes::new())
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap()
            }
        });

        Self { address, fetches }
    }

    /// Returns how many requests the server received.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Status, body and delay of the next replies of a [`ReplyServer`].
#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: Bytes,
    delay: Duration,
}

/// An HTTP server that responds to every request, after the delay the
/// test last set, with that status and body as `application/json`. It
/// counts requests and stops accepting when dropped.
pub struct ReplyServer {
    pub address: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ReplyServer {
    /// Starts a server that responds 200 with `body` and no delay.
    pub async fn start(body: impl Into<Bytes>) -> Self {
        let (listener, address) = bind_loopback().await;
        let reply = Arc::new(Mutex::new(Reply {
            status: StatusCode::OK,
            body: body.into(),
            delay: Duration::ZERO,
        }));
        let hits = Arc::new(AtomicUsize::new(0));

        let shared = Arc::clone(&reply);
        let counter = Arc::clone(&hits);
        let task = serve_http(listener, move |_request, _peer| {
            counter.fetch_add(1, Ordering::SeqCst);
            let reply = shared.lock().unwrap().clone();
            async move {
                tokio::time::sleep(reply.delay).await;
                Response::builder()
                    .status(reply.status)
                    .header("content-type", "application/json")
                    .body(Full::new(reply.body))
                    .unwrap()
            }
        });

        Self {
            address,
            reply,
            hits,
            task,
        }
    }

    /// Returns `http://ADDRESS` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Makes later replies `status` with `body`, without delay.
    pub fn set(&self, status: StatusCode, body: impl Into<Bytes>) {
        self.set_delayed(status, body, Duration::ZERO);
    }

    /// Makes later replies wait `delay`, then send `status` with `body`.
    pub fn set_delayed(&self, status: StatusCode, body: impl Into<Bytes>, delay: Duration) {
        *self.reply.lock().unwrap() = Reply {
            status,
            body: body.into(),
            delay,
        };
    }

    /// Returns how many requests the server received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for ReplyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
