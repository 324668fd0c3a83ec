//! `bench_service`: the minimal HTTP/1.1 service of `cargo xtask bench`,
//! run inside a pod's network namespace.
//!
//! It responds to every request with the same small 200 response and keeps the
//! connection open, so that a benchmark measures the proxy in front of it and
//! not the service. It reads request heads and skips `Content-Length` bodies;
//! chunked request bodies are not supported and close the connection. One
//! thread serves every connection, because the benchmark gives the service a
//! share of one core.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First line on standard output once every port listens.
const READY_LINE: &str = "bench_service listening";

/// Largest request head accepted, in bytes: far above what the benchmark's
/// clients send (one ~800-byte token header), small enough to bound memory.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Read buffer size per connection.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// The one response; `Content-Length` lets the client reuse the connection.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

/// Response to a head that is too large or unreadable, before closing.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Minimal HTTP/1.1 service that responds to every request with 200.
#[derive(Parser, Debug)]
struct Args {
    /// TCP port to listen on, on every address of the namespace; repeat
    /// for several ports.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();

    let mut listeners = Vec::new();
    for port in &args.ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to bind {addr}"))?;
        listeners.push(listener);
    }
    println!("{READY_LINE} on ports {:?}", args.ports);

    let mut tasks = Vec::new();
    for listener in listeners {
        tasks.push(tokio::spawn(accept_loop(listener)));
    }
    for task in tasks {
        task.await.context("accept loop panicked")??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("accept failed")?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // A client that goes away mid-request is normal under load.
            let _ = serve(stream).await;
        });
    }
}

/// What the connection does after one request head.
enum Next {
    /// Skip this many body bytes, then read the next head.
    Body(usize),
    /// Send the response, then close.
    Close,
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0_u8; READ_CHUNK_BYTES];
    let mut skip = 0_usize;

    loop {
        // Respond to every complete head in the buffer, so pipelined requests
        // get one response each and in order.
        loop {
            if skip > 0 {
                let taken = skip.min(buffer.len());
                buffer.drain(..taken);
                skip -= taken;
                if skip > 0 {
                    break;
                }
            }
            let Some(head_end) = find_head_end(&buffer) else {
                break;
            };
            let next = read_head(&buffer[..head_end]);
            buffer.drain(..head_end);
            match next {
                Some(Next::Body(length)) => {
                    stream.write_all(RESPONSE).await?;
                    skip = length;
                }
                Some(Next::Close) => {
                    stream.write_all(RESPONSE).await?;
                    return stream.shutdown().await;
                }
                None => {
                    stream.write_all(BAD_REQUEST).await?;
                    return stream.shutdown().await;
                }
            }
        }
        if buffer.len() > MAX_HEAD_BYTES {
            stream.write_all(BAD_REQUEST).await?;
            return stream.shutdown().await;
        }

        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Returns the length of the head at the start of `buffer`, including the
/// blank line, once it is complete.
fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|position| position + 4)
}

/// Reads the header fields that decide what follows the head: the body
/// length and whether the client asked to close. Returns `None` for a body
/// this service cannot skip (chunked) or an invalid length.
fn read_head(head: &[u8]) -> Option<Next> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?;
    let http10 = request_line.ends_with("HTTP/1.0");

    let mut length = 0_usize;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }

    if close {
        Some(Next::Close)
    } else {
        Some(Next::Body(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_found_after_blank_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    #[test]
    fn head_with_body_length() {
        let next = read_head(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n");

        assert!(matches!(next, Some(Next::Body(12))));
    }

    #[test]
    fn head_asking_to_close() {
        let next = read_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");

        assert!(matches!(next, Some(Next::Close)));
    }

    #[test]
    fn head_chunked_is_rejected() {
        let next = read_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");

        assert!(next.is_none());
    }
}
