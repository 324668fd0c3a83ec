//! In-process tests of the request path, without root: the agent's core and
//! one workload proxy on 127.0.0.1 port 0, a real JWKS server, a real
//! service behind the loopback upstream, and a real admin listener. Every
//! wait is on a condition with the [`WAIT`] bound.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

use tokengate::app::Core;
use tokengate::proxy::DrainController;
use tokengate::verify;

#[path = "support/lib.rs"]
mod support;

use support::http::{bind_loopback, serve_http, JwksServer};
use support::tokens::sign;
use support::wait_until;

/// Upper bound of every wait on a condition.
const WAIT: Duration = Duration::from_secs(10);

const ISSUER: &str = "https://issuer.tokengate.test";
const WORKLOAD: &str = "orders";
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------- harness

/// What a test changes in the standard setup.
#[derive(Clone, Copy)]
struct Options {
    /// The JWKS server returns 503 instead of the key set.
    jwks_down: bool,
    /// The proxy connects to a closed port instead of the service.
    service_down: bool,
    /// The workload protects another port than the proxy listener's.
    listener_port_unprotected: bool,
}

impl Options {
    const STANDARD: Self = Self {
        jwks_down: false,
        service_down: false,
        listener_port_unprotected: false,
    };
}

struct Harness {
    proxy: SocketAddr,
    admin: SocketAddr,
    service: TestService,
    jwks: JwksServer,
    audit: mpsc::UnboundedReceiver<String>,
    drain: Option<DrainController>,
    _admin_drain: DrainController,
    core: Core,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(Options::STANDARD).await
    }

    async fn start_with(options: Options) -> Self {
        let jwks = JwksServer::start_with(!options.jwks_down).await;
        let service = TestService::start().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_address = listener.local_addr().unwrap();

        let protected_port = if options.listener_port_unprotected {
            1
        } else {
            proxy_address.port()
        };
        let config =
            tokengate::config::parse(&config_yaml(jwks.address, protected_port), "test.yaml")
                .unwrap();

        let service_address = if options.service_down {
            support::http::closed_port().await
        } else {
            service.address
        };
        let (audit_output, audit) = support::agent::capture_audit(64 * 1024);
        let serving = support::agent::start_serving(
            &config,
            Box::new(audit_output),
            listener,
            service_address,
        )
        .await;

        let harness = Self {
            proxy: proxy_address,
            admin: serving.admin,
            service,
            jwks,
            audit,
            drain: Some(serving.drain),
            _admin_drain: serving.admin_drain,
            core: serving.core,
        };
        if !options.jwks_down {
            support::agent::wait_for_keys(&harness.core, WAIT).await;
        }
        harness
    }

    /// Sends `request` on a new connection to the proxy.
    async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        let mut sender = open(self.proxy).await;
        send(&mut sender, request).await
    }

    /// Waits for the next audit line and returns it raw and parsed.
    async fn next_audit(&mut self) -> (String, Value) {
        let line = support::agent::next_audit_line(&mut self.audit, WAIT).await;
        let value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("audit line {line:?}: {error}"));
        (line, value)
    }

    /// Fetches an admin route and returns its status and body.
    async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let mut sender = open(self.admin).await;
        let reply = send(&mut sender, get(path, None)).await;
        (
            reply.status,
            String::from_utf8(reply.body.to_vec()).unwrap(),
        )
    }
}

fn config_yaml(jwks: SocketAddr, port: u16) -> String {
    format!(
        r"
issuers:
  - issuer: {ISSUER}
    jwks_uri: http://{jwks}/jwks.json
    audiences: [orders]
    algorithms: [RS256, ES256, EdDSA]
    jwks_refresh_seconds: 3600
    unknown_kid_refetch_seconds: 3600
workloads:
  - name: {WORKLOAD}
    netns: /var/run/netns/tokengate-in-process-unused
    ports: [{port}]
    rules:
      - path_prefix: /orders
        methods: [GET, POST]
        roles: [reader]
"
    )
}

// ---------------------------------------------------------- test service

/// What the service saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    headers: HeaderMap,
    peer: SocketAddr,
}

/// The protected service, with these routes:
/// - `/orders/upload` reads the body, publishes the bytes read so far in
///   `uploaded` and replies with the length;
/// - `/orders/echo` streams the body back;
/// - `/orders/download` sends 64 KiB, then the rest of 1 MiB after `release`;
/// - anything else replies `hello`.
struct TestService {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    uploaded: watch::Receiver<usize>,
    release: Arc<Notify>,
}

type ServiceBody = Either<Either<Incoming, Full<Bytes>>, Channel<Bytes>>;

impl TestService {
    async fn start() -> Self {
        let (listener, address) = bind_loopback().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (uploaded_sender, uploaded) = watch::channel(0);
        let uploaded_sender = Arc::new(uploaded_sender);
        let release = Arc::new(Notify::new());

        let state = (Arc::clone(&seen), uploaded_sender, Arc::clone(&release));
        serve_http(listener, move |request: Request<Incoming>, peer| {
            let (seen, uploaded, release) = state.clone();
            async move {
                seen.lock().unwrap().push(Seen {
                    target: request.uri().to_string(),
                    headers: request.headers().clone(),
                    peer,
                });
                let body: ServiceBody = match request.uri().path() {
                    "/orders/upload" => {
                        let mut body = request.into_body();
                        let mut total = 0;
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame.unwrap().into_data() {
                                total += data.len();
                                uploaded.send_replace(total);
                            }
                        }
                        Either::Left(Either::Right(Full::new(Bytes::from(total.to_string()))))
                    }
                    "/orders/echo" => Either::Left(Either::Left(request.into_body())),
                    "/orders/download" => {
                        let (mut sender, body) = Channel::new(1);
                        tokio::spawn(async move {
                            sender
                                .send_data(Bytes::from(vec![b'a'; 64 * 1024]))
                                .await
                                .unwrap();
                            release.notified().await;
                            sender
                                .send_data(Bytes::from(vec![b'b'; MIB - 64 * 1024]))
                                .await
                                .unwrap();
                        });
                        Either::Right(body)
                    }
                    _ => Either::Left(Either::Right(Full::new(Bytes::from_static(b"hello")))),
                };
                Response::new(body)
            }
        });

        Self {
            address,
            seen,
            uploaded,
            release,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

// ----------------------------------------------------------------- client

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn challenge(&self) -> &str {
        self.headers
            .get("www-authenticate")
            .expect("a WWW-Authenticate header")
            .to_str()
            .unwrap()
    }
}

async fn open<B>(address: SocketAddr) -> client::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(address).await.unwrap();
    let (sender, connection) = client::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn send(
    sender: &mut client::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Reply {
    sender.ready().await.unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn get(path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    request("GET", path, token, Bytes::new())
}

fn request(method: &str, path: &str, token: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "orders.test");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(Full::new(body)).unwrap()
}

// ----------------------------------------------------------------- tokens

/// Claims from [`ISSUER`] for the `orders` audience, expiring
/// `expires_in` seconds from now.
fn claims(roles: &[&str], expires_in: i64) -> Value {
    support::tokens::user_claims(ISSUER, roles, expires_in)
}

fn valid_token() -> String {
    sign("rsa-1", &claims(&["reader"], 300))
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_gets_bare_challenge() {
    let mut harness = Harness::start().await;

    let reply = harness.send(get("/orders?id=7", None)).await;

    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.challenge(), r#"Bearer realm="tokengate""#);
    assert_eq!(
        reply.json(),
        json!({ "error": "unauthorized", "reason": "missing_token" })
    );
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a denied request"
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["decision"], "deny");
    assert_eq!(audit["reason"], "missing_token");
    assert_eq!(audit["status"], 401);
    assert_eq!(audit["workload"], WORKLOAD);
    assert_eq!(audit["method"], "GET");
    assert_eq!(audit["path"], "/orders");
    assert_eq!(audit["destination"], harness.proxy.to_string());
    assert_eq!(audit["token_fingerprint"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_rejected() {
    let mut harness = Harness::start().await;
    let token = sign("rsa-1", &claims(&["reader"], -3600));

    let reply = harness.send(get("/orders", Some(&token))).await;

    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.challenge(),
        r#"Bearer realm="tokengate", error="invalid_token", error_description="the token has expired""#
    );
    assert_eq!(
        reply.json(),
        json!({ "error": "invalid_token", "reason": "expired" })
    );
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a denied request"
    );
    let (line, audit) = harness.next_audit().await;
    assert_eq!(audit["reason"], "expired");
    assert_eq!(audit["issuer"], ISSUER);
    assert_eq!(audit["token_fingerprint"], verify::fingerprint(&token));
    assert!(
        audit["verification_seconds"].as_f64().unwrap() > 0.0,
        "{line}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !line.contains(signature),
        "the audit line contains the token: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_refetches_once() {
    let mut harness = Harness::start().await;
    let fetches_before = harness.jwks.fetches();
    let token = sign("rsa-unknown", &claims(&["reader"], 300));

    let first = harness.send(get("/orders", Some(&token))).await;
    let fetches_after_first = harness.jwks.fetches();
    let second = harness.send(get("/orders", Some(&token))).await;

    assert_eq!(first.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        first.challenge(),
        r#"Bearer realm="tokengate", error="invalid_token", error_description="the token's signing key is not known""#
    );
    assert_eq!(second.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        fetches_after_first,
        fetches_before + 1,
        "the first unknown kid refetches the key set"
    );
    assert_eq!(
        harness.jwks.fetches(),
        fetches_after_first,
        "the refetch is rate-limited"
    );
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a denied request"
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["reason"], "unknown_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_role_is_insufficient_scope() {
    let mut harness = Harness::start().await;
    let token = sign("rsa-1", &claims(&["guest"], 300));

    let reply = harness.send(get("/orders", Some(&token))).await;

    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply
            .challenge()
            .starts_with(r#"Bearer realm="tokengate", error="insufficient_scope""#),
        "{}",
        reply.challenge()
    );
    assert_eq!(
        reply.json(),
        json!({ "error": "insufficient_scope", "reason": "missing_role" })
    );
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a denied request"
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["reason"], "missing_role");
    assert_eq!(audit["status"], 403);
    assert_eq!(audit["rule"], 0);
    assert_eq!(audit["subject"], "user-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_forwarded_intact() {
    let mut harness = Harness::start().await;
    let token = valid_token();
    let mut request = get("/orders/7?expand=items", Some(&token));
    request
        .headers_mut()
        .insert("x-forwarded-for", "198.18.0.50".parse().unwrap());
    request
        .headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    request.headers_mut().insert("x-hop", "1".parse().unwrap());

    let reply = harness.send(request).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "hello");
    let seen = harness.service.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/orders/7?expand=items");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {token}"));
    assert_eq!(seen[0].headers["x-forwarded-for"], "198.18.0.50, 127.0.0.1");
    assert_eq!(seen[0].headers["host"], "orders.test");
    assert!(
        !seen[0].headers.contains_key("x-hop"),
        "a field listed in Connection was forwarded"
    );
    let (line, audit) = harness.next_audit().await;
    assert_eq!(audit["decision"], "allow");
    assert_eq!(audit["reason"], "allowed");
    assert_eq!(audit["status"], 200);
    assert_eq!(audit["path"], "/orders/7");
    assert_eq!(audit["issuer"], ISSUER);
    assert_eq!(audit["subject"], "user-7");
    assert_eq!(audit["rule"], 0);
    assert_eq!(audit["token_fingerprint"], verify::fingerprint(&token));
    assert!(
        !line.contains(&token),
        "the audit line contains the token: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_algorithm_accepted() {
    let harness = Harness::start().await;

    for kid in ["rsa-1", "ec-1", "ed-1"] {
        let token = sign(kid, &claims(&["reader"], 300));

        let reply = harness.send(get("/orders", Some(&token))).await;

        assert_eq!(
            reply.status,
            StatusCode::OK,
            "token signed with {kid}: {:?}",
            reply.body
        );
    }
    assert_eq!(harness.service.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_mixed_requests() {
    let mut harness = Harness::start().await;
    let token = valid_token();
    let expired = sign("rsa-1", &claims(&["reader"], -3600));
    let mut sender = open(harness.proxy).await;
    let cases = [
        (Some(token.as_str()), StatusCode::OK),
        (None, StatusCode::UNAUTHORIZED),
        (Some(token.as_str()), StatusCode::OK),
        (Some(expired.as_str()), StatusCode::UNAUTHORIZED),
        (Some(token.as_str()), StatusCode::OK),
        (Some(token.as_str()), StatusCode::OK),
    ];

    for (index, (token, expected)) in cases.iter().enumerate() {
        let reply = send(&mut sender, get(&format!("/orders/{index}"), *token)).await;
        assert_eq!(reply.status, *expected, "request {index}");
    }

    let seen = harness.service.seen();
    let targets: Vec<&str> = seen.iter().map(|seen| seen.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/orders/0", "/orders/2", "/orders/4", "/orders/5"]
    );
    assert!(
        seen.iter().all(|request| request.peer == seen[0].peer),
        "one caller connection should use one service connection: {seen:?}"
    );
    let mut sources = Vec::new();
    for _ in &cases {
        let (_, audit) = harness.next_audit().await;
        sources.push(audit["source"].as_str().unwrap().to_owned());
    }
    assert!(
        sources.iter().all(|source| *source == sources[0]),
        "{sources:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_streams_to_service() {
    let harness = Harness::start().await;
    let token = valid_token();
    let (mut body_sender, body) = Channel::<Bytes>::new(1);
    let mut sender = open(harness.proxy).await;
    let request = Request::post("/orders/upload")
        .header("host", "orders.test")
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    let mut uploaded = harness.service.uploaded.clone();

    // The service must see the first half while the caller still holds the
    // second: a proxy that buffered the body would deliver nothing yet.
    body_sender
        .send_data(Bytes::from(vec![b'x'; MIB / 2]))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, uploaded.wait_for(|bytes| *bytes == MIB / 2))
        .await
        .expect("the first half reaches the service before the second is sent")
        .unwrap();
    body_sender
        .send_data(Bytes::from(vec![b'y'; MIB / 2]))
        .await
        .unwrap();
    drop(body_sender);

    let response = tokio::time::timeout(WAIT, response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, MIB.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mebibyte_body_echoed_intact() {
    let harness = Harness::start().await;
    let body: Vec<u8> = (0..MIB).map(|index| (index % 251) as u8).collect();

    let reply = harness
        .send(request(
            "POST",
            "/orders/echo",
            Some(&valid_token()),
            Bytes::from(body.clone()),
        ))
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), MIB);
    assert!(reply.body == body, "the echoed body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_streams_to_caller() {
    let harness = Harness::start().await;
    let mut sender = open(harness.proxy).await;

    let response = sender
        .send_request(get("/orders/download", Some(&valid_token())))
        .await
        .unwrap();
    let mut body = response.into_body();
    // The first 64 KiB must arrive while the service holds the rest.
    let mut received = 0;
    while received < 64 * 1024 {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("the first part arrives")
            .unwrap()
            .unwrap();
        received += frame.into_data().map_or(0, |data| data.len());
    }
    harness.service.release.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();

    assert_eq!(received, 64 * 1024);
    assert_eq!(received + rest.len(), MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_rejected_and_audited() {
    let mut harness = Harness::start().await;
    let mut stream = TcpStream::connect(harness.proxy).await.unwrap();

    stream
        .write_all(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();

    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a malformed request"
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["decision"], "deny");
    assert_eq!(audit["reason"], "malformed_request");
    assert_eq!(audit["status"], 400);
    assert_eq!(audit["method"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_service_gets_bad_gateway() {
    let mut harness = Harness::start_with(Options {
        service_down: true,
        ..Options::STANDARD
    })
    .await;

    let reply = harness.send(get("/orders", Some(&valid_token()))).await;

    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        reply.json(),
        json!({ "error": "bad_gateway", "reason": "upstream_unavailable" })
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["decision"], "deny");
    assert_eq!(audit["reason"], "upstream_unavailable");
    assert_eq!(audit["status"], 502);
    assert_eq!(audit["subject"], "user-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotected_port_closed_and_audited() {
    let mut harness = Harness::start_with(Options {
        listener_port_unprotected: true,
        ..Options::STANDARD
    })
    .await;
    let mut stream = TcpStream::connect(harness.proxy).await.unwrap();

    // The proxy may close before or after reading this, so a failed write
    // or a reset are as good as a clean end of stream.
    let _ = stream
        .write_all(b"GET /orders HTTP/1.1\r\nhost: orders.test\r\n\r\n")
        .await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .unwrap();

    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["decision"], "deny");
    assert_eq!(audit["status"], Value::Null);
    assert_eq!(audit["destination"], harness.proxy.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_deny_and_not_ready() {
    let mut harness = Harness::start_with(Options {
        jwks_down: true,
        ..Options::STANDARD
    })
    .await;
    wait_until("the agent has tried the JWKS server", WAIT, || {
        harness.jwks.fetches() > 0
    })
    .await;

    let reply = harness.send(get("/orders", Some(&valid_token()))).await;
    let (ready_status, ready_body) = harness.admin_get("/readyz").await;

    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["reason"], "keys_unavailable");
    assert!(
        harness.service.seen().is_empty(),
        "the service saw a denied request"
    );
    assert_eq!(ready_status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready_body.contains(&format!("issuer {ISSUER} has no keys yet")),
        "{ready_body}"
    );
    let (_, audit) = harness.next_audit().await;
    assert_eq!(audit["reason"], "keys_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_and_metrics() {
    let harness = Harness::start().await;
    harness.send(get("/orders", None)).await;
    harness.send(get("/orders", Some(&valid_token()))).await;

    let (health, _) = harness.admin_get("/healthz").await;
    let (ready, _) = harness.admin_get("/readyz").await;
    let (missing, _) = harness.admin_get("/nothing-here").await;
    let (metrics_status, metrics) = harness.admin_get("/metrics").await;

    assert_eq!(health, StatusCode::OK);
    assert_eq!(ready, StatusCode::OK);
    assert_eq!(missing, StatusCode::NOT_FOUND);
    assert_eq!(metrics_status, StatusCode::OK);
    for expected in [
        r#"tokengate_decisions_total{decision="deny",reason="missing_token",workload="orders"} 1"#,
        r#"tokengate_decisions_total{decision="allow",reason="allowed",workload="orders"} 1"#,
        r#"tokengate_decisions_total{decision="deny",reason="expired",workload="orders"} 0"#,
        r#"tokengate_verification_duration_seconds_count{algorithm="RS256",cache="miss",issuer="https://issuer.tokengate.test",result="valid"} 1"#,
        r#"tokengate_jwks_keys{issuer="https://issuer.tokengate.test"} 3"#,
        r#"tokengate_jwks_fetches_total{issuer="https://issuer.tokengate.test",result="success"} 1"#,
        "tokengate_audit_events_dropped_total 0",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("tokengate_jwks_last_success_timestamp_seconds{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_request() {
    let mut harness = Harness::start().await;
    let mut sender = open(harness.proxy).await;
    let response = sender
        .send_request(get("/orders/download", Some(&valid_token())))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.is_data());

    let drain = harness.drain.take().unwrap();
    let drained = tokio::spawn(drain.drain(WAIT));
    let refused = Arc::new(AtomicBool::new(false));
    let proxy = harness.proxy;
    let flag = Arc::clone(&refused);
    tokio::spawn(async move {
        while TcpStream::connect(proxy).await.is_ok() {
            tokio::task::yield_now().await;
        }
        flag.store(true, Ordering::SeqCst);
    });
    wait_until("the proxy stops accepting", WAIT, || {
        refused.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        !drained.is_finished(),
        "drain returned while a response was still streaming"
    );
    harness.service.release.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();

    assert_eq!(first.into_data().unwrap().len() + rest.len(), MIB);
    assert!(
        tokio::time::timeout(WAIT, drained).await.unwrap().unwrap(),
        "drain should finish in time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alive_clients_answered() {
    const CLIENTS: usize = 16;
    const REQUESTS: usize = 10;
    let harness = Harness::start().await;
    let token = valid_token();

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let mut sender = open(harness.proxy).await;
        let token = token.clone();
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for index in 0..REQUESTS {
                let with_token = (index % 2 == 0).then_some(token.as_str());
                let path = format!("/orders/{client}/{index}");
                statuses.push(send(&mut sender, get(&path, with_token)).await.status);
            }
            statuses
        }));
    }

    for client in clients {
        let statuses = client.await.unwrap();
        for (index, status) in statuses.iter().enumerate() {
            let expected = if index % 2 == 0 {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(*status, expected, "request {index}");
        }
    }
    let seen = harness.service.seen();
    assert_eq!(seen.len(), CLIENTS * REQUESTS / 2);
    assert!(
        seen.iter().all(|request| request
            .target
            .rsplit('/')
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap()
            % 2
            == 0),
        "the service saw a request without a token"
    );
}
