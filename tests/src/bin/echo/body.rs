//! The response body of the echo-body endpoint: the request body, streamed
//! back frame by frame as it arrives, hashed on the way so that the request
//! log still records its length and SHA-256.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use sha2::{Digest, Sha256};

/// Called once when the request body ends: with its length, its SHA-256
/// (lower-case hex) and whether it ended without an error.
pub type Finish = Box<dyn FnOnce(u64, String, bool) + Send>;

/// Streams `inner` unchanged and calls `finish` at its end.
pub struct EchoBody {
    inner: Incoming,
    hasher: Sha256,
    length: u64,
    finish: Option<Finish>,
}

impl EchoBody {
    pub fn new(inner: Incoming, finish: Finish) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            length: 0,
            finish: Some(finish),
        }
    }

    fn complete(&mut self, ok: bool) {
        if let Some(finish) = self.finish.take() {
            let hash = tokengate_tests::hex(&std::mem::take(&mut self.hasher).finalize());
            finish(self.length, hash, ok);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.update(data);
                    this.length += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.complete(false);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                this.complete(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        // A connection that breaks before the end drops the body unfinished.
        self.complete(false);
    }
}
