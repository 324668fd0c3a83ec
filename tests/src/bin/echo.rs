//! `tg-echo`: an HTTP/1.1 service for end-to-end tests, run inside a pod's
//! network namespace.
//!
//! It responds to every request with 200 and a JSON body describing what it
//! received (method, target, headers, body length and SHA-256), and appends
//! the same JSON as one line to a log file. On `/echo-body` it streams the
//! request body back instead. It has no tokengate code.

use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};
use tokengate_tests::echo::{EchoRecord, ECHO_BODY_PATH, READY_LINE_PREFIX};
use tokengate_tests::hex;
use tokio::net::TcpListener;

#[path = "echo/body.rs"]
mod body;

use body::{EchoBody, Finish};

/// Backlog of the IPv6 listeners; the same as tokio's for the IPv4 ones.
const LISTEN_BACKLOG: i32 = 1024;

/// Echo HTTP service that logs every request it receives.
#[derive(Parser, Debug)]
struct Args {
    /// File to append one JSON line per request to.
    #[arg(long)]
    log: PathBuf,
    /// TCP port to listen on, on every address of the namespace; repeat
    /// for several ports.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Also listen on every IPv6 address of the namespace, with IPv6-only
    /// sockets so that IPv4 peers keep their plain IPv4 addresses.
    #[arg(long)]
    ipv6: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .with_context(|| format!("failed to open log file {}", args.log.display()))?;
    let log = Arc::new(Mutex::new(log_file));

    let mut listeners = Vec::new();
    for port in &args.ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to bind {addr}"))?;
        listeners.push(listener);
        if args.ipv6 {
            listeners.push(bind_ipv6_only(*port)?);
        }
    }
    let ports: Vec<String> = args.ports.iter().map(ToString::to_string).collect();
    println!("{READY_LINE_PREFIX} ports={}", ports.join(","));
    std::io::stdout()
        .flush()
        .context("failed to flush standard output")?;

    let mut tasks = Vec::new();
    for listener in listeners {
        tasks.push(tokio::spawn(accept_loop(listener, Arc::clone(&log))));
    }
    for task in tasks {
        task.await.context("accept loop panicked")??;
    }
    Ok(())
}

/// Binds `[::]:port` with `IPV6_V6ONLY`, which the IPv4 listener on the
/// same port needs beside it whatever the `net.ipv6.bindv6only` setting.
fn bind_ipv6_only(port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
        .context("failed to create an IPv6 socket")?;
    socket
        .set_only_v6(true)
        .context("failed to set IPV6_V6ONLY")?;
    socket
        .set_reuse_address(true)
        .context("failed to set SO_REUSEADDR")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("failed to bind {addr}"))?;
    socket
        .listen(LISTEN_BACKLOG)
        .with_context(|| format!("failed to listen on {addr}"))?;
    socket
        .set_nonblocking(true)
        .context("failed to make the IPv6 listener non-blocking")?;
    TcpListener::from_std(socket.into()).context("failed to register the IPv6 listener")
}

async fn accept_loop(listener: TcpListener, log: Arc<Mutex<File>>) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await.context("accept failed")?;
        let local = stream
            .local_addr()
            .context("failed to read local address")?;
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let log = Arc::clone(&log);
                async move { Ok::<_, Infallible>(respond(request, local, peer, log).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("tg-echo: connection from {peer} failed: {error}");
            }
        });
    }
}

/// Streams the request body back on [`ECHO_BODY_PATH`], and describes the
/// request everywhere else. Both log the request.
async fn respond(
    request: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
    log: Arc<Mutex<File>>,
) -> Response<Either<Full<Bytes>, EchoBody>> {
    if request.uri().path() != ECHO_BODY_PATH {
        return echo(request, local, peer, &log).await.map(Either::Left);
    }

    let mut record = EchoRecord {
        time_unix_ms: unix_millis(),
        local: local.to_string(),
        peer: peer.to_string(),
        method: request.method().to_string(),
        target: request.uri().to_string(),
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: 0,
        body_sha256: String::new(),
        body_complete: false,
    };
    let finish: Finish = Box::new(move |length, sha256, complete| {
        record.body_len = length;
        record.body_sha256 = sha256;
        record.body_complete = complete;
        let json = serde_json::to_string(&record).expect("an echo record serializes");
        if let Err(error) = append_line(&log, &json) {
            eprintln!("tg-echo: failed to write the request log: {error}");
        }
    });

    // No content-length: hyper sends the streamed body chunked.
    Response::builder()
        .status(200)
        .header("content-type", "application/octet-stream")
        .body(Either::Right(EchoBody::new(request.into_body(), finish)))
        .expect("a static response builds")
}

async fn echo(
    request: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
    log: &Mutex<File>,
) -> Response<Full<Bytes>> {
    let method = request.method().to_string();
    let target = request.uri().to_string();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();

    let mut body = request.into_body();
    let mut hasher = Sha256::new();
    let mut body_len: u64 = 0;
    let mut body_complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    body_len += data.len() as u64;
                }
            }
            Err(error) => {
                eprintln!("tg-echo: body from {peer} failed: {error}");
                body_complete = false;
                break;
            }
        }
    }

    let record = EchoRecord {
        time_unix_ms: unix_millis(),
        local: local.to_string(),
        peer: peer.to_string(),
        method,
        target,
        headers,
        body_len,
        body_sha256: hex(&hasher.finalize()),
        body_complete,
    };
    let json = serde_json::to_string(&record).expect("an echo record serializes");
    if let Err(error) = append_line(log, &json) {
        eprintln!("tg-echo: failed to write the request log: {error}");
    }

    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .expect("a static response builds")
}

fn append_line(log: &Mutex<File>, line: &str) -> std::io::Result<()> {
    let mut file = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    file.write_all(format!("{line}\n").as_bytes())?;
    file.flush()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}
