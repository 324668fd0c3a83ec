//! A JWKS server on 127.0.0.1 port 0 for tests: serves whatever status,
//! body, `Cache-Control` and delay the test sets, and counts the requests
//! it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the server sends back.
#[derive(Clone, Default)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    cache_control: Option<String>,
    delay: Duration,
}

pub(crate) struct JwksServer {
    addr: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    /// Starts the server, which responds to every request with `status` and `body`
    /// until `set_reply` changes them.
    pub(crate) async fn start(status: u16, body: &[u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let reply = Arc::new(Mutex::new(Reply {
            status,
            body: body.to_vec(),
            ..Reply::default()
        }));
        let hits = Arc::new(AtomicUsize::new(0));

        let task = tokio::spawn({
            let reply = Arc::clone(&reply);
            let hits = Arc::clone(&hits);
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let reply = Arc::clone(&reply);
                    let hits = Arc::clone(&hits);
                    let service = service_fn(move |_request: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = reply.lock().expect("reply lock").clone();
                        let mut response = Response::builder()
                            .status(reply.status)
                            .header("content-type", "application/json");
                        if let Some(value) = &reply.cache_control {
                            response = response.header("cache-control", value);
                        }
                        let response = response
                            .body(Full::new(Bytes::from(reply.body)))
                            .expect("response");
                        async move {
                            tokio::time::sleep(reply.delay).await;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    tokio::spawn(async move {
                        // A client that goes away mid-request is not a test failure.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            reply,
            hits,
            task,
        }
    }

    pub(crate) fn uri(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// Returns the server's base URL, without a path.
    pub(crate) fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn set_reply(&self, status: u16, body: &[u8]) {
        let mut reply = self.reply.lock().expect("reply lock");
        reply.status = status;
        reply.body = body.to_vec();
    }

    /// Sends `value` as `Cache-Control` from now on, or no such header.
    pub(crate) fn set_cache_control(&self, value: Option<&str>) {
        self.reply.lock().expect("reply lock").cache_control = value.map(str::to_owned);
    }

    /// Waits `delay` before each response from now on.
    pub(crate) fn set_delay(&self, delay: Duration) {
        self.reply.lock().expect("reply lock").delay = delay;
    }

    /// Returns the number of requests served so far.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
