//! In-process tests of revocation and the verified-token cache on the real
//! request path. They start the agent's core and one workload proxy on
//! 127.0.0.1 port 0, a JWKS server and a revocation list server whose
//! replies the test changes, a service, and the admin listener whose
//! `/metrics` the tests read. Cache hits are observed through the metrics
//! counters, never through timing. Every wait is on a condition with a
//! bound.
#![expect(
    clippy::float_cmp,
    reason = "metric samples compared here are whole counts, exact in f64"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use tokengate::app::Core;
use tokengate::proxy::DrainController;

#[path = "support/lib.rs"]
mod support;

use support::http::ReplyServer;
use support::tokens::{jwks_document, read_fixture, sign, unix_now};

/// Upper bound of every wait on a condition.
const WAIT: Duration = Duration::from_secs(15);

/// Period of the revocation refresh in these tests.
const REVOCATION_REFRESH: Duration = Duration::from_secs(1);

/// Time allowed beyond a deadline for scheduling on a loaded test machine:
/// a refresh that is due runs within this.
const SCHEDULING_MARGIN: Duration = Duration::from_millis(1500);

const ISSUER: &str = "https://issuer.revocation.test";
const WORKLOAD: &str = "orders";

// ---------------------------------------------------------------- harness

struct Harness {
    proxy: SocketAddr,
    admin: SocketAddr,
    jwks: ReplyServer,
    revocation: ReplyServer,
    client: reqwest::Client,
    _service: ReplyServer,
    _drain: DrainController,
    _admin_drain: DrainController,
    core: Core,
}

impl Harness {
    /// Starts the agent with the fixture JWKS, an empty revocation list, and
    /// a JWKS refresh every `jwks_refresh_seconds`.
    async fn start(jwks_refresh_seconds: u64) -> Self {
        let jwks = ReplyServer::start(jwks_document(&["rsa-1", "ec-1", "ed-1"])).await;
        let revocation = ReplyServer::start("{}").await;
        let service = ReplyServer::start("served").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_address = listener.local_addr().unwrap();

        let yaml = format!(
            r"
issuers:
  - issuer: {ISSUER}
    jwks_uri: http://{jwks}/jwks.json
    audiences: [orders]
    algorithms: [RS256, ES256, EdDSA]
    clock_skew_seconds: 0
    jwks_refresh_seconds: {jwks_refresh_seconds}
    unknown_kid_refetch_seconds: 3600
workloads:
  - name: {WORKLOAD}
    netns: /var/run/netns/tokengate-in-process-unused
    ports: [{port}]
    rules:
      - path_prefix: /orders
        methods: [GET]
        roles: [reader]
revocation:
  url: http://{revocation}/revoked.json
  refresh_seconds: {refresh}
cache:
  max_entries: 100
",
            jwks = jwks.address,
            port = proxy_address.port(),
            revocation = revocation.address,
            refresh = REVOCATION_REFRESH.as_secs(),
        );
        let config = tokengate::config::parse(&yaml, "test.yaml").unwrap();
        let serving = support::agent::start_serving(
            &config,
            Box::new(tokio::io::sink()),
            listener,
            service.address,
        )
        .await;

        let harness = Self {
            proxy: proxy_address,
            admin: serving.admin,
            jwks,
            revocation,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            _service: service,
            _drain: serving.drain,
            _admin_drain: serving.admin_drain,
            core: serving.core,
        };
        support::agent::wait_for_keys(&harness.core, WAIT).await;
        harness
    }

    /// Sends `GET /orders` with `token` and returns the status and the
    /// `reason` of a JSON error body (empty for a forwarded request).
    async fn get(&self, token: &str) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("http://{}/orders", self.proxy))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.bytes().await.unwrap();
        let reason = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|value| value["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, reason)
    }

    /// Returns the value of the sample `series` (name with labels, as
    /// printed) in `/metrics`, or `None` when it is absent.
    async fn metric(&self, series: &str) -> Option<f64> {
        support::metrics::sample(&support::metrics::scrape(self.admin).await, series)
    }

    async fn cache_counts(&self) -> (f64, f64, f64) {
        (
            self.metric("tokengate_token_cache_hits_total")
                .await
                .unwrap(),
            self.metric("tokengate_token_cache_misses_total")
                .await
                .unwrap(),
            self.metric("tokengate_token_cache_entries").await.unwrap(),
        )
    }
}

// ----------------------------------------------------------------- tokens

/// Signs a reader's token with the fixture RSA key.
fn token(subject: &str, jti: &str, iat: u64, exp: u64) -> String {
    let claims = json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": "orders",
        "jti": jti,
        "iat": iat,
        "exp": exp,
        "roles": ["reader"],
    });
    sign("rsa-1", &claims)
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_is_cache_hit() {
    let harness = Harness::start(3600).await;
    let now = unix_now();
    let token = token("alice", "hit-1", now, now + 300);

    let first = harness.get(&token).await;
    let after_first = harness.cache_counts().await;
    let second = harness.get(&token).await;
    let after_second = harness.cache_counts().await;

    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(second.0, StatusCode::OK);
    assert_eq!(after_first, (0.0, 1.0, 1.0), "(hits, misses, entries)");
    assert_eq!(after_second, (1.0, 1.0, 1.0), "(hits, misses, entries)");
    let hit_series = format!(
        r#"tokengate_verification_duration_seconds_count{{algorithm="RS256",cache="hit",issuer="{ISSUER}",result="valid"}}"#
    );
    let miss_series = format!(
        r#"tokengate_verification_duration_seconds_count{{algorithm="RS256",cache="miss",issuer="{ISSUER}",result="valid"}}"#
    );
    assert_eq!(harness.metric(&hit_series).await, Some(1.0));
    assert_eq!(harness.metric(&miss_series).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_token_revoked_within_refresh() {
    let harness = Harness::start(3600).await;
    let now = unix_now();
    let stolen = token("alice", "stolen-1", now, now + 300);
    let other = token("alice", "other-1", now, now + 300);
    assert_eq!(harness.get(&stolen).await.0, StatusCode::OK);
    assert_eq!(harness.get(&stolen).await.0, StatusCode::OK);
    assert_eq!(harness.cache_counts().await.0, 1.0, "the token is cached");

    harness.revocation.set(
        StatusCode::OK,
        format!(
            r#"{{"jtis": [{{"jti": "stolen-1", "exp": {}}}]}}"#,
            now + 300
        ),
    );
    let published = Instant::now();
    let mut denied = None;
    while denied.is_none() {
        assert!(published.elapsed() < WAIT, "the revocation never applied");
        let (status, reason) = harness.get(&stolen).await;
        if status == StatusCode::UNAUTHORIZED {
            denied = Some((published.elapsed(), reason));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (elapsed, reason) = denied.unwrap();
    assert_eq!(reason, "revoked");
    assert!(
        elapsed <= REVOCATION_REFRESH + SCHEDULING_MARGIN,
        "revoked after {elapsed:?}"
    );
    assert_eq!(
        harness.get(&other).await.0,
        StatusCode::OK,
        "other tokens pass"
    );
    let revoked_hit = format!(
        r#"tokengate_verification_duration_seconds_count{{algorithm="RS256",cache="hit",issuer="{ISSUER}",result="revoked"}}"#
    );
    assert!(
        harness.metric(&revoked_hit).await >= Some(1.0),
        "the revocation applied to a cache hit"
    );
    assert_eq!(
        harness
            .metric(r#"tokengate_revocation_entries{kind="jti"}"#)
            .await,
        Some(1.0)
    );
    let age = harness
        .metric("tokengate_revocation_list_age_seconds")
        .await
        .expect("the list age is exported");
    assert!(age <= 5.0, "list age {age}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_revoked_before_time() {
    let harness = Harness::start(3600).await;
    let now = unix_now();
    let old = token("bob", "bob-old", now - 10, now + 300);
    let missing_iat = {
        let claims = json!({
            "iss": ISSUER, "sub": "bob", "aud": "orders", "exp": now + 300, "roles": ["reader"],
        });
        let key = EncodingKey::from_rsa_pem(read_fixture("rsa-1.pem").as_bytes()).unwrap();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".to_owned());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    assert_eq!(harness.get(&old).await.0, StatusCode::OK);
    assert_eq!(harness.get(&missing_iat).await.0, StatusCode::OK);

    harness.revocation.set(
        StatusCode::OK,
        format!(
            r#"{{"subjects": [{{"iss": "{ISSUER}", "sub": "bob", "revoked_before": {now}}}]}}"#
        ),
    );
    let deadline = Instant::now() + WAIT;
    while harness.get(&old).await.0 == StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the subject revocation never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh = token("bob", "bob-new", now, now + 300);

    assert_eq!(
        harness.get(&old).await,
        (StatusCode::UNAUTHORIZED, "revoked".to_owned())
    );
    assert_eq!(
        harness.get(&missing_iat).await,
        (StatusCode::UNAUTHORIZED, "revoked".to_owned())
    );
    assert_eq!(
        harness.get(&fresh).await.0,
        StatusCode::OK,
        "issued at the cut-off"
    );
    assert_eq!(
        harness
            .metric(r#"tokengate_revocation_entries{kind="subject"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_outage_keeps_last_list() {
    let harness = Harness::start(3600).await;
    let now = unix_now();
    let stolen = token("carol", "carol-1", now, now + 300);
    harness.revocation.set(
        StatusCode::OK,
        format!(
            r#"{{"jtis": [{{"jti": "carol-1", "exp": {}}}]}}"#,
            now + 300
        ),
    );
    let deadline = Instant::now() + WAIT;
    while harness.get(&stolen).await.0 == StatusCode::OK {
        assert!(Instant::now() < deadline, "the revocation never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    harness
        .revocation
        .set(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let deadline = Instant::now() + WAIT;
    loop {
        let failures = harness
            .metric(r#"tokengate_revocation_refreshes_total{result="failure"}"#)
            .await
            .unwrap();
        if failures >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no failed refresh seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(
        harness.get(&stolen).await,
        (StatusCode::UNAUTHORIZED, "revoked".to_owned())
    );
    assert_eq!(
        harness
            .metric(r#"tokengate_revocation_entries{kind="jti"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_clears_cache() {
    let harness = Harness::start(1).await;
    let now = unix_now();
    let token = token("dave", "dave-1", now, now + 300);
    assert_eq!(harness.get(&token).await.0, StatusCode::OK);
    assert_eq!(harness.get(&token).await.0, StatusCode::OK);
    let (hits, misses, _) = harness.cache_counts().await;
    assert_eq!((hits, misses), (1.0, 1.0));

    // Another key is withdrawn and the token's key stays: the cached token
    // is verified again, once, and passes.
    harness
        .jwks
        .set(StatusCode::OK, jwks_document(&["rsa-1", "ec-1"]));
    let keys_series = format!(r#"tokengate_jwks_keys{{issuer="{ISSUER}"}}"#);
    let deadline = Instant::now() + WAIT;
    while harness.metric(&keys_series).await != Some(2.0) {
        assert!(Instant::now() < deadline, "the key set never changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(harness.get(&token).await.0, StatusCode::OK);
    let (hits, misses, entries) = harness.cache_counts().await;
    assert_eq!(
        (hits, misses, entries),
        (1.0, 2.0, 1.0),
        "verified again after the change"
    );

    // The token's key is withdrawn: the cached entry must not let it pass.
    harness.jwks.set(StatusCode::OK, jwks_document(&["ec-1"]));
    let deadline = Instant::now() + WAIT;
    while harness.metric(&keys_series).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the key set never changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, reason) = harness.get(&token).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(reason, "unknown_key");
    let (hits, misses, entries) = harness.cache_counts().await;
    assert_eq!((hits, misses, entries), (1.0, 3.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_entry_expires_at_exp() {
    let harness = Harness::start(3600).await;
    let now = unix_now();
    let exp = now + 2;
    let token = token("erin", "erin-1", now, exp);
    assert_eq!(harness.get(&token).await.0, StatusCode::OK);
    assert_eq!(harness.get(&token).await.0, StatusCode::OK);
    assert_eq!(harness.cache_counts().await.0, 1.0, "the token is cached");

    let deadline = Instant::now() + WAIT;
    let (status, reason) = loop {
        let checked_at = unix_now();
        let (status, reason) = harness.get(&token).await;
        if status != StatusCode::OK {
            break (status, reason);
        }
        assert!(checked_at < exp, "accepted at {checked_at}, exp is {exp}");
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(reason, "expired");
    assert!(unix_now() >= exp);
    let (_, _, entries) = harness.cache_counts().await;
    assert_eq!(entries, 0.0, "the expired entry left the cache");
}
