//! JWKS fetching and caching per issuer.
//!
//! Fetches the key set at start, refreshes it periodically, refetches on an
//! unknown `kid` at most once per configured interval, and keeps the last
//! good set when a fetch fails. Verification itself lives in `verify`.

mod fetch;
mod keyset;
#[cfg(test)]
pub(crate) mod test_server;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::config::IssuerConfig;

pub use fetch::{FetchError, MAX_JWKS_BYTES, MAX_JWKS_REDIRECTS};
pub use keyset::{KeyKind, KeySet, KeySetError, SkippedKey, VerifyKey, MIN_RSA_MODULUS_BITS};

/// First wait before retrying a failed fetch. Short, because until the
/// first fetch succeeds every protected request is denied.
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Maximum wait between retries of failed fetches; the delay doubles up to
/// this so that an unreachable issuer gets one request per half minute.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Keys of one issuer: the current snapshot plus the fetch state.
pub struct IssuerKeys {
    pub config: IssuerConfig,
    /// `None` until the first successful fetch. Readers clone the `Arc`
    /// under a short read lock; a fetch swaps in a whole new set.
    current: RwLock<Option<Arc<KeySet>>>,
    client: Result<reqwest::Client, String>,
    /// Serialises fetches, so an older response cannot replace a newer one.
    fetch_lock: Mutex<()>,
    /// Start of the last unknown-`kid` refetch. Holding this lock makes the
    /// refetch single-flight.
    last_refetch: Mutex<Option<Instant>>,
    fetch_success: AtomicU64,
    fetch_failure: AtomicU64,
    unknown_kid_refetches: AtomicU64,
    /// Unix time of the last successful fetch, 0 before the first.
    last_success_unix: AtomicU64,
}

/// Counters of one issuer's key store, read by the metrics module at scrape
/// time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksStats {
    pub fetch_success: u64,
    pub fetch_failure: u64,
    /// Unknown-`kid` refetches that ran, failed ones included; rate-limited
    /// requests are not counted.
    pub unknown_kid_refetches: u64,
    pub keys: usize,
    pub last_success_unix: Option<u64>,
}

impl IssuerKeys {
    pub fn new(config: IssuerConfig) -> Self {
        // A client that cannot be built (no TLS backend) is kept as an
        // error, so every fetch reports it instead of the agent stopping.
        let client = fetch::client(Duration::from_secs(config.jwks_timeout_seconds))
            .map_err(|error| error.to_string());
        Self {
            config,
            current: RwLock::new(None),
            client,
            fetch_lock: Mutex::new(()),
            last_refetch: Mutex::new(None),
            fetch_success: AtomicU64::new(0),
            fetch_failure: AtomicU64::new(0),
            unknown_kid_refetches: AtomicU64::new(0),
            last_success_unix: AtomicU64::new(0),
        }
    }

    /// True once a key set has been fetched successfully.
    pub fn is_ready(&self) -> bool {
        self.keys().is_some()
    }

    /// Number of keys in the current set.
    pub fn key_count(&self) -> usize {
        self.keys().map_or(0, |keys| keys.len())
    }

    /// The current key set, `None` before the first successful fetch.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stats(&self) -> JwksStats {
        let last_success = self.last_success_unix.load(Ordering::Relaxed);
        JwksStats {
            fetch_success: self.fetch_success.load(Ordering::Relaxed),
            fetch_failure: self.fetch_failure.load(Ordering::Relaxed),
            unknown_kid_refetches: self.unknown_kid_refetches.load(Ordering::Relaxed),
            keys: self.key_count(),
            last_success_unix: (last_success != 0).then_some(last_success),
        }
    }

    /// Installs `keys` as the current set and returns true when they differ
    /// from the previous set. The fetcher calls this after each successful
    /// fetch; tests and tools may call it with keys read from a file.
    pub fn replace_keys(&self, keys: KeySet) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|old| old.same_keys(&keys)) {
            return false;
        }

        tracing::info!(
            jwt.iss = %self.config.issuer,
            jwks.keys = keys.len(),
            jwks.kids = ?keys.kids(),
            "jwks key set changed"
        );
        *current = Some(Arc::new(keys));
        true
    }

    /// Fetches keys now, and then every `jwks_refresh_seconds`, until
    /// `shutdown` becomes true or its sender is dropped.
    ///
    /// A failed fetch is retried after [`INITIAL_RETRY_DELAY`], and the delay
    /// doubles up to [`MAX_RETRY_DELAY`] but never beyond the refresh period.
    /// This applies before the first success and after a later failure. The
    /// last good set stays in use meanwhile.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let refresh = Duration::from_secs(self.config.jwks_refresh_seconds.max(1));
        let mut retry_delay = INITIAL_RETRY_DELAY;
        tracing::info!(jwt.iss = %self.config.issuer, jwks.uri = %self.redacted_uri(), "jwks refresh started");

        loop {
            let outcome = tokio::select! {
                outcome = self.fetch_and_store() => outcome,
                () = shutdown_requested(&mut shutdown) => break,
            };

            let delay = if outcome.is_ok() {
                retry_delay = INITIAL_RETRY_DELAY;
                refresh
            } else {
                let delay = retry_delay.min(refresh);
                retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                delay
            };

            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown_requested(&mut shutdown) => break,
            }
        }
        tracing::info!(jwt.iss = %self.config.issuer, "jwks refresh stopped");
    }

    /// Fetches the key set now, unless an unknown-`kid` refetch ran less than
    /// `unknown_kid_refetch_seconds` ago. Returns true when a fetch ran and
    /// the set changed so that it now contains `kid`: the caller should then
    /// verify the token again.
    ///
    /// Concurrent callers wait for the one refetch in flight instead of
    /// starting their own; each of them then gets true if that refetch (or
    /// any other fetch meanwhile) brought `kid`. The attempt is counted in
    /// [`JwksStats::unknown_kid_refetches`] even when the fetch fails.
    pub async fn refetch_for_unknown_kid(&self, kid: &str) -> bool {
        let mut last_refetch = self.last_refetch.lock().await;
        if self.keys().is_some_and(|keys| keys.contains_kid(kid)) {
            return true;
        }

        let interval = Duration::from_secs(self.config.unknown_kid_refetch_seconds);
        if last_refetch.is_some_and(|at| at.elapsed() < interval) {
            tracing::debug!(jwt.iss = %self.config.issuer, jwt.kid = %kid, "jwks refetch rate-limited");
            return false;
        }

        *last_refetch = Some(Instant::now());
        self.unknown_kid_refetches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(jwt.iss = %self.config.issuer, jwt.kid = %kid, "jwks refetch for unknown kid");
        matches!(self.fetch_and_store().await, Ok(true))
            && self.keys().is_some_and(|keys| keys.contains_kid(kid))
    }

    /// Fetches once and installs the result. Returns whether the set
    /// changed; on failure the current set stays and a warning is logged.
    ///
    /// NOTE: a JWKS with no usable key counts as a failure, so an issuer
    /// that withdraws every key keeps its last keys trusted here until it
    /// publishes a new one.
    async fn fetch_and_store(&self) -> Result<bool, FetchError> {
        let _one_at_a_time = self.fetch_lock.lock().await;

        let client = self.client.as_ref().map_err(|message| FetchError::Client {
            message: message.clone(),
        });
        let fetched = match client {
            Ok(client) => fetch::fetch(client, &self.config.jwks_uri).await,
            Err(error) => Err(error),
        };

        match fetched {
            Ok((keys, skipped)) => {
                self.fetch_success.fetch_add(1, Ordering::Relaxed);
                self.last_success_unix.store(unix_now(), Ordering::Relaxed);
                let changed = self.replace_keys(keys);
                self.log_skipped(&skipped, changed);
                Ok(changed)
            }
            Err(error) => {
                self.fetch_failure.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    jwt.iss = %self.config.issuer,
                    jwks.uri = %self.redacted_uri(),
                    error = %ErrorChain(&error),
                    ready = self.is_ready(),
                    "jwks fetch failed, keeping the last good keys"
                );
                Err(error)
            }
        }
    }

    /// Warns about skipped JWKs when the set changed, so an unchanged set
    /// does not repeat the same warnings at every refresh.
    fn log_skipped(&self, skipped: &[SkippedKey], changed: bool) {
        for key in skipped {
            let kid = key.kid.as_deref().unwrap_or("-");
            if changed {
                tracing::warn!(jwt.iss = %self.config.issuer, jwt.kid = %kid, reason = %key.reason, "jwks key skipped");
            } else {
                tracing::debug!(jwt.iss = %self.config.issuer, jwt.kid = %kid, reason = %key.reason, "jwks key skipped");
            }
        }
    }

    fn redacted_uri(&self) -> String {
        crate::config::redact_url(&self.config.jwks_uri)
    }
}

/// Completes when `shutdown` holds true or its sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which also means stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Formats an error with its sources, `outer: inner: innermost`, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::test_server::JwksServer;
    use super::*;

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/jwks.json"
    ));

    /// Upper bound on waiting for the refresh task, so a broken task fails
    /// the test instead of hanging it.
    const WAIT_LIMIT: Duration = Duration::from_secs(20);

    fn fixture_keys() -> Vec<serde_json::Value> {
        let document: serde_json::Value = serde_json::from_str(FIXTURE).expect("fixture JSON");
        document["keys"].as_array().expect("keys array").clone()
    }

    fn document(keys: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).expect("serialize")
    }

    fn issuer(uri: &str, refresh_seconds: u64, refetch_seconds: u64) -> IssuerConfig {
        IssuerConfig {
            issuer: "https://idp.example".to_owned(),
            jwks_uri: uri.to_owned(),
            audiences: Vec::new(),
            algorithms: vec!["RS256".to_owned()],
            clock_skew_seconds: 0,
            jwks_refresh_seconds: refresh_seconds,
            unknown_kid_refetch_seconds: refetch_seconds,
            jwks_timeout_seconds: 5,
            roles_claim: "roles".to_owned(),
        }
    }

    /// Polls `condition` every 20 ms until it is true or [`WAIT_LIMIT`]
    /// passes.
    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn initial_fetch_loads_keys() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = Arc::new(IssuerKeys::new(issuer(&server.uri(), 3600, 3600)));
        let (stop, shutdown) = watch::channel(false);
        assert!(!keys.is_ready());

        let task = tokio::spawn(Arc::clone(&keys).run(shutdown));
        wait_until("first fetch", || keys.is_ready()).await;

        assert_eq!(keys.key_count(), 3);
        let stats = keys.stats();
        assert_eq!(stats.fetch_success, 1);
        assert_eq!(stats.fetch_failure, 0);
        assert_eq!(stats.keys, 3);
        assert!(stats.last_success_unix.is_some());
        assert_eq!(server.hits(), 1);
        stop.send(true).expect("task is listening");
        tokio::time::timeout(WAIT_LIMIT, task)
            .await
            .expect("task stops")
            .expect("task did not panic");
    }

    #[tokio::test]
    async fn first_fetch_retried_until_success() {
        let server = JwksServer::start(503, b"unavailable").await;
        let keys = Arc::new(IssuerKeys::new(issuer(&server.uri(), 3600, 3600)));
        let (_stop, shutdown) = watch::channel(false);

        let task = tokio::spawn(Arc::clone(&keys).run(shutdown));
        wait_until("two failed fetches", || keys.stats().fetch_failure >= 2).await;
        assert!(!keys.is_ready());
        server.set_reply(200, FIXTURE.as_bytes());
        wait_until("fetch after recovery", || keys.is_ready()).await;

        assert_eq!(keys.key_count(), 3);
        assert_eq!(keys.stats().fetch_success, 1);
        task.abort();
    }

    #[tokio::test]
    async fn refresh_picks_up_new_key() {
        let all = fixture_keys();
        let server = JwksServer::start(200, &document(&all[..1])).await;
        let keys = Arc::new(IssuerKeys::new(issuer(&server.uri(), 1, 3600)));
        let (_stop, shutdown) = watch::channel(false);

        let task = tokio::spawn(Arc::clone(&keys).run(shutdown));
        wait_until("first fetch", || keys.is_ready()).await;
        assert_eq!(keys.keys().expect("keys").kids(), ["rsa-1"]);
        server.set_reply(200, &document(&all[..2]));
        wait_until("refresh with the new key", || keys.key_count() == 2).await;

        assert_eq!(keys.keys().expect("keys").kids(), ["rsa-1", "ec-1"]);
        assert!(keys.stats().fetch_success >= 2);
        task.abort();
    }

    #[tokio::test]
    async fn unknown_kid_refetch_is_rate_limited() {
        let all = fixture_keys();
        let server = JwksServer::start(200, &document(&all[..1])).await;
        let keys = IssuerKeys::new(issuer(&server.uri(), 3600, 3600));
        assert!(matches!(keys.fetch_and_store().await, Ok(true)));
        assert_eq!(server.hits(), 1);

        server.set_reply(200, &document(&all));
        let first = keys.refetch_for_unknown_kid("ec-1").await;
        let second = keys.refetch_for_unknown_kid("never-published").await;
        let third = keys.refetch_for_unknown_kid("never-published").await;

        assert!(first, "the refetch brought ec-1");
        assert!(!second, "rate-limited");
        assert!(!third, "rate-limited");
        assert_eq!(server.hits(), 2, "one initial fetch and one refetch");
        assert_eq!(keys.stats().unknown_kid_refetches, 1);
        assert_eq!(keys.key_count(), 3);
    }

    #[tokio::test]
    async fn concurrent_refetches_share_one_fetch() {
        let all = fixture_keys();
        let server = JwksServer::start(200, &document(&all[..1])).await;
        let keys = Arc::new(IssuerKeys::new(issuer(&server.uri(), 3600, 3600)));
        assert!(matches!(keys.fetch_and_store().await, Ok(true)));
        server.set_reply(200, &document(&all));

        let callers: Vec<_> = (0..8)
            .map(|_| {
                let keys = Arc::clone(&keys);
                tokio::spawn(async move { keys.refetch_for_unknown_kid("ed-1").await })
            })
            .collect();
        let mut results = Vec::new();
        for caller in callers {
            results.push(caller.await.expect("caller did not panic"));
        }

        assert!(results.iter().all(|found| *found), "{results:?}");
        assert_eq!(server.hits(), 2, "one initial fetch and one refetch");
        assert_eq!(keys.stats().unknown_kid_refetches, 1);
    }

    #[tokio::test]
    async fn failed_refetch_counts_and_keeps_keys() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = IssuerKeys::new(issuer(&server.uri(), 3600, 3600));
        assert!(matches!(keys.fetch_and_store().await, Ok(true)));
        server.set_reply(500, b"internal error");

        let found = keys.refetch_for_unknown_kid("rotated").await;

        assert!(!found);
        let stats = keys.stats();
        assert_eq!(stats.unknown_kid_refetches, 1);
        assert_eq!(stats.fetch_failure, 1);
        assert_eq!(stats.keys, 3);
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn bad_responses_keep_last_good_keys() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = IssuerKeys::new(issuer(&server.uri(), 3600, 3600));
        assert!(matches!(keys.fetch_and_store().await, Ok(true)));
        let oversized = vec![b' '; MAX_JWKS_BYTES + 1];
        let replies: [(u16, &[u8]); 6] = [
            (500, b"internal error"),
            (404, b"{\"keys\": []}"),
            (200, b"<html>maintenance</html>"),
            (200, b"{\"keys\": []}"),
            (
                200,
                b"{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
            ),
            (200, &oversized),
        ];

        for (count, (status, body)) in replies.into_iter().enumerate() {
            server.set_reply(status, body);

            let outcome = keys.fetch_and_store().await;

            assert!(outcome.is_err(), "status {status} must fail");
            assert_eq!(keys.key_count(), 3, "status {status}");
            assert_eq!(keys.stats().fetch_failure, count as u64 + 1);
        }
        assert!(keys.is_ready());
        assert_eq!(keys.stats().fetch_success, 1);
    }

    #[tokio::test]
    async fn unchanged_set_is_not_a_change() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = IssuerKeys::new(issuer(&server.uri(), 3600, 3600));

        let first = keys.fetch_and_store().await.expect("fetch");
        let second = keys.fetch_and_store().await.expect("fetch");

        assert!(first);
        assert!(!second);
        assert_eq!(keys.stats().fetch_success, 2);
    }

    #[tokio::test]
    async fn unreachable_server_is_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let uri = format!("http://{}/jwks", listener.local_addr().expect("address"));
        drop(listener);
        let keys = IssuerKeys::new(issuer(&uri, 3600, 3600));

        let outcome = keys.fetch_and_store().await;

        assert!(
            matches!(outcome, Err(FetchError::Request { .. })),
            "{outcome:?}"
        );
        assert!(!keys.is_ready());
        assert_eq!(keys.stats().last_success_unix, None);
    }
}
