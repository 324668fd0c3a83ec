//! Client for the agent's `/metrics` on the admin listener.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1 as client;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Fetches `/metrics` from the admin listener at `admin` on a new
/// connection and returns the body, the Prometheus text format.
pub async fn scrape(admin: SocketAddr) -> String {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, connection) = client::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);

    let request = Request::get("/metrics")
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Returns the value of the sample `series` (name with labels, as printed)
/// in the metrics `text`, or `None` when it is absent.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().unwrap())
    })
}
