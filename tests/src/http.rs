//! A small blocking HTTP/1.1 client.
//!
//! It works on any `TcpStream`, so a test can create the socket inside a
//! pod's namespace and send requests on it from any thread. It keeps the
//! connection alive between requests, sends fixed-length and chunked
//! bodies, and reads responses framed by `Content-Length`, by chunked
//! transfer coding or by the end of the connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Read and write timeout of a connection. Generous, because the agent
/// shares two cores with parallel tests, yet bounded so a hang fails a test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Connect timeout used by [`get`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Maximum size of a response head; a larger one means a broken peer.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Size of one read from the socket.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// How a request body is sent.
#[derive(Clone, Debug, Default)]
pub enum Body {
    /// No body and no framing headers.
    #[default]
    Empty,
    /// A body framed by `Content-Length`.
    Fixed(Vec<u8>),
    /// A body sent with `Transfer-Encoding: chunked`, in chunks of
    /// `chunk_size` bytes.
    Chunked { data: Vec<u8>, chunk_size: usize },
}

/// An HTTP/1.1 request.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Self {
        Self {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    /// Adds a header; repeated names are sent as separate lines.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds `Authorization: Bearer TOKEN`.
    #[must_use]
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    /// Sets a body framed by `Content-Length`.
    #[must_use]
    pub fn body(mut self, data: Vec<u8>) -> Self {
        self.body = Body::Fixed(data);
        self
    }

    /// Sets a body sent with chunked transfer coding.
    #[must_use]
    pub fn chunked_body(mut self, data: Vec<u8>, chunk_size: usize) -> Self {
        self.body = Body::Chunked {
            data,
            chunk_size: chunk_size.max(1),
        };
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(key, _)| key.eq_ignore_ascii_case(name))
    }

    fn encode_head(&self, host: &str) -> Vec<u8> {
        let mut lines = vec![format!("{} {} HTTP/1.1", self.method, self.target)];
        if !self.has_header("host") {
            lines.push(format!("Host: {host}"));
        }
        for (name, value) in &self.headers {
            lines.push(format!("{name}: {value}"));
        }
        match &self.body {
            Body::Empty => {}
            Body::Fixed(data) => lines.push(format!("Content-Length: {}", data.len())),
            Body::Chunked { .. } => lines.push("Transfer-Encoding: chunked".to_owned()),
        }
        let mut head = lines.join("\r\n");
        head.push_str("\r\n\r\n");
        head.into_bytes()
    }
}

/// A parsed HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns the body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parses the body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {}", self.text()))
    }

    /// Returns whether the server announced that it closes the connection.
    pub fn closes_connection(&self) -> bool {
        let connection = self
            .header("connection")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if self.version == "HTTP/1.0" {
            return !connection.contains("keep-alive");
        }
        connection.split(',').any(|token| token.trim() == "close")
    }
}

/// One client connection that can carry several requests in sequence.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
    host: String,
    closed: bool,
}

impl Connection {
    /// Wraps a connected stream and sets its timeouts to [`IO_TIMEOUT`].
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let host = stream.peer_addr()?.to_string();
        Ok(Self {
            stream,
            buffer: Vec::new(),
            host,
            closed: false,
        })
    }

    /// Opens a connection from the current thread's namespace.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Self::new(TcpStream::connect_timeout(&addr, timeout)?)
    }

    /// Whether another request may be sent: the server has not closed the
    /// connection or announced that it will.
    pub fn is_reusable(&self) -> bool {
        !self.closed
    }

    /// Returns the underlying stream, for raw writes in tests of malformed
    /// input.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends a request and reads its response.
    ///
    /// If the server closes the connection while the body is still being
    /// written (an early rejection), the response it sent before closing is
    /// read and returned.
    pub fn send(&mut self, request: &Request) -> Result<Response> {
        if self.closed {
            bail!("connection to {} is closed", self.host);
        }

        let write_result = self.write_request(request);
        let response = self.read_response(&request.method);
        match (write_result, response) {
            (_, Ok(response)) => {
                if response.closes_connection() {
                    self.closed = true;
                }
                Ok(response)
            }
            (Err(write_error), Err(read_error)) => {
                self.closed = true;
                Err(write_error)
                    .context(format!("no response after a failed write: {read_error:#}"))
            }
            (Ok(()), Err(read_error)) => {
                self.closed = true;
                Err(read_error)
            }
        }
    }

    /// Reads one more response without sending a request, for tests that
    /// write raw bytes with [`Connection::stream`].
    pub fn read_raw_response(&mut self) -> Result<Response> {
        let response = self.read_response("GET");
        if response.as_ref().map_or(true, Response::closes_connection) {
            self.closed = true;
        }
        response
    }

    fn write_request(&mut self, request: &Request) -> io::Result<()> {
        let head = request.encode_head(&self.host);
        match &request.body {
            Body::Empty => self.stream.write_all(&head)?,
            Body::Fixed(data) => {
                self.stream.write_all(&head)?;
                self.stream.write_all(data)?;
            }
            Body::Chunked { data, chunk_size } => {
                self.stream.write_all(&head)?;
                for chunk in data.chunks(*chunk_size) {
                    self.stream
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                    self.stream.write_all(chunk)?;
                    self.stream.write_all(b"\r\n")?;
                }
                self.stream.write_all(b"0\r\n\r\n")?;
            }
        }
        self.stream.flush()
    }

    fn read_response(&mut self, method: &str) -> Result<Response> {
        loop {
            let head = self.read_head()?;
            let mut response = parse_head(&head)?;
            // 1xx responses other than 101 are interim: the final one follows.
            if (100..200).contains(&response.status) && response.status != 101 {
                continue;
            }
            response.body = self.read_body(method, &response)?;
            return Ok(response);
        }
    }

    fn read_head(&mut self) -> Result<String> {
        loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                let head: Vec<u8> = self.buffer.drain(..end + 4).collect();
                return Ok(String::from_utf8_lossy(&head).into_owned());
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                bail!(
                    "response head from {} exceeds {MAX_HEAD_BYTES} bytes",
                    self.host
                );
            }
            if self.fill()? == 0 {
                self.closed = true;
                if self.buffer.is_empty() {
                    bail!("connection to {} closed before a response", self.host);
                }
                bail!("connection to {} closed inside a response head", self.host);
            }
        }
    }

    fn read_body(&mut self, method: &str, response: &Response) -> Result<Vec<u8>> {
        if method.eq_ignore_ascii_case("HEAD") || matches!(response.status, 204 | 304) {
            return Ok(Vec::new());
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
        if chunked {
            return self.read_chunked_body();
        }
        if let Some(length) = response.header("content-length") {
            let length: usize = length
                .trim()
                .parse()
                .with_context(|| format!("invalid Content-Length {length:?}"))?;
            return self.read_exact_body(length);
        }

        // Without framing the body ends when the server closes.
        while self.fill()? > 0 {}
        self.closed = true;
        Ok(std::mem::take(&mut self.buffer))
    }

    fn read_exact_body(&mut self, length: usize) -> Result<Vec<u8>> {
        while self.buffer.len() < length {
            if self.fill()? == 0 {
                self.closed = true;
                bail!(
                    "connection to {} closed after {} of {length} body bytes",
                    self.host,
                    self.buffer.len()
                );
            }
        }
        Ok(self.buffer.drain(..length).collect())
    }

    fn read_chunked_body(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("invalid chunk size line {line:?}"))?;
            if size == 0 {
                // Trailer fields end with an empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact_body(size)?);
            let end = self.read_line()?;
            if !end.is_empty() {
                bail!("chunk of {size} bytes is not followed by CRLF");
            }
        }
    }

    fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = find(&self.buffer, b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if self.fill()? == 0 {
                self.closed = true;
                bail!("connection to {} closed inside a chunked body", self.host);
            }
        }
    }

    fn fill(&mut self) -> Result<usize> {
        let mut chunk = [0_u8; READ_CHUNK_BYTES];
        let read = match self.stream.read(&mut chunk) {
            Ok(read) => read,
            // A reset after the last byte arrived ends the stream like a FIN.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(error) => {
                return Err(error).with_context(|| format!("failed to read from {}", self.host))
            }
        };
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(read)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn parse_head(head: &str) -> Result<Response> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("invalid status line {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("invalid status code in {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_owned();

    let mut headers = Vec::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("invalid header line {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Response {
        version: version.to_owned(),
        status,
        reason,
        headers,
        body: Vec::new(),
    })
}

/// Sends one GET request on a new connection from the current namespace.
pub fn get(addr: SocketAddr, target: &str) -> Result<Response> {
    let mut connection = Connection::connect(addr, CONNECT_TIMEOUT)
        .with_context(|| format!("failed to connect to {addr}"))?;
    connection.send(&Request::new("GET", target))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    /// Serves each canned reply on one accepted connection after reading
    /// one more request head, then closes the connection.
    fn serve_replies(replies: Vec<&'static [u8]>) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let handle = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            for (index, reply) in replies.into_iter().enumerate() {
                while count_heads(&received) <= index {
                    let mut chunk = [0_u8; 4096];
                    let read = stream.read(&mut chunk).expect("read");
                    assert!(read > 0, "client closed early");
                    received.extend_from_slice(&chunk[..read]);
                }
                stream.write_all(reply).expect("write");
            }
        });
        (addr, handle)
    }

    fn count_heads(data: &[u8]) -> usize {
        data.windows(4)
            .filter(|window| *window == b"\r\n\r\n")
            .count()
    }

    #[test]
    fn reads_content_length_and_chunked_on_one_connection() {
        let (addr, server) = serve_replies(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n",
        ]);
        let mut connection = Connection::connect(addr, CONNECT_TIMEOUT).expect("connect");

        let first = connection
            .send(&Request::new("GET", "/one"))
            .expect("first");
        let second = connection
            .send(&Request::new("GET", "/two"))
            .expect("second");

        assert_eq!(first.status, 200);
        assert_eq!(first.body, b"hello");
        assert_eq!(second.status, 201);
        assert_eq!(second.body, b"abcde");
        assert!(connection.is_reusable());
        server.join().expect("server");
    }

    #[test]
    fn skips_interim_and_reads_until_close() {
        let (addr, server) = serve_replies(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nX-A: b\r\n\r\nuntil close",
        ]);
        let mut connection = Connection::connect(addr, CONNECT_TIMEOUT).expect("connect");

        let response = connection
            .send(&Request::new("GET", "/"))
            .expect("response");
        server.join().expect("server");

        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-a"), Some("b"));
        assert_eq!(response.body, b"until close");
        assert!(response.closes_connection());
        assert!(!connection.is_reusable());
    }

    #[test]
    fn sends_chunked_request_body() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            while find(&received, b"0\r\n\r\n").is_none() {
                let mut chunk = [0_u8; 4096];
                let read = stream.read(&mut chunk).expect("read");
                assert!(read > 0, "client closed early");
                received.extend_from_slice(&chunk[..read]);
            }
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .expect("write");
            String::from_utf8(received).expect("utf-8")
        });
        let mut connection = Connection::connect(addr, CONNECT_TIMEOUT).expect("connect");

        let response = connection
            .send(&Request::new("POST", "/up").chunked_body(b"abcdefg".to_vec(), 3))
            .expect("response");
        let received = server.join().expect("server");

        assert_eq!(response.status, 204);
        assert!(
            received.contains("Transfer-Encoding: chunked\r\n"),
            "{received}"
        );
        assert!(
            received.ends_with("3\r\nabc\r\n3\r\ndef\r\n1\r\ng\r\n0\r\n\r\n"),
            "{received}"
        );
    }

    #[test]
    fn rejects_truncated_body() {
        let (addr, server) =
            serve_replies(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]);
        let mut connection = Connection::connect(addr, CONNECT_TIMEOUT).expect("connect");

        let error = connection
            .send(&Request::new("GET", "/"))
            .expect_err("truncated body");
        server.join().expect("server");

        assert!(
            format!("{error:#}").contains("closed after 5 of 10"),
            "{error:#}"
        );
    }
}
