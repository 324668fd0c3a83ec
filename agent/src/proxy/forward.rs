//! The upstream side of one caller connection: one HTTP/1.1 connection to
//! the service, opened on the first allowed request and reopened when the
//! service has closed it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

use super::Upstream;

/// Failure to forward a request to the service.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    #[error("failed to connect to the service at {destination}")]
    Connect {
        destination: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP/1.1 handshake with the service at {destination} failed")]
    Handshake {
        destination: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the service at {destination} failed to answer the request")]
    Request {
        destination: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// One caller connection's link to the service.
pub(super) struct Forwarder<U> {
    upstream: Arc<U>,
    destination: SocketAddr,
    /// `None` until the first allowed request and after the service closed
    /// the connection. Requests on one caller connection come one at a
    /// time, so the lock is never contended for long.
    sender: Mutex<Option<SendRequest<Incoming>>>,
}

impl<U: Upstream> Forwarder<U> {
    pub(super) fn new(upstream: Arc<U>, destination: SocketAddr) -> Self {
        Self {
            upstream,
            destination,
            sender: Mutex::new(None),
        }
    }

    /// Sends `request` to the service and returns its response head; both
    /// bodies stream. When the kept-alive connection turns out closed before
    /// the request was written, sends it once more on a new connection.
    pub(super) async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut slot = self.sender.lock().await;
        let mut request = request;
        let mut retried = false;

        loop {
            let sender = match slot.take() {
                Some(sender) if !sender.is_closed() => slot.insert(sender),
                _ => slot.insert(self.connect().await?),
            };
            // hyper's `ready` fails only when the connection has closed.
            if sender.ready().await.is_err() && !retried {
                *slot = None;
                retried = true;
                continue;
            }

            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => {
                    *slot = None;
                    match error.take_message() {
                        Some(unsent) if !retried => {
                            tracing::debug!(destination = %self.destination, "service closed the kept-alive connection, reconnecting");
                            request = unsent;
                            retried = true;
                        }
                        _ => {
                            return Err(ForwardError::Request {
                                destination: self.destination,
                                source: error.into_error(),
                            })
                        }
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, ForwardError> {
        let destination = self.destination;
        let stream =
            self.upstream
                .connect(destination)
                .await
                .map_err(|source| ForwardError::Connect {
                    destination,
                    source,
                })?;
        // Requests and small responses should leave at once, not wait for
        // Nagle's algorithm to fill a segment.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%destination, %error, "failed to set TCP_NODELAY on the service connection");
        }

        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ForwardError::Handshake {
                    destination,
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%destination, %error, "service connection ended with an error");
            }
        });

        Ok(sender)
    }
}
