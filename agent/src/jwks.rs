//! JWKS fetching and caching per issuer.
//!
//! Loads the key set at start from the issuer's key source (JWKS URL, OIDC
//! discovery, file or inline), refreshes it before its lifetime ends,
//! refetches on an unknown `kid` at most once per configured interval, and
//! keeps the last good set when a refresh fails, up to the configured
//! maximum staleness. Verification itself lives in `verify`.

mod fetch;
mod keyset;
mod source;
#[cfg(test)]
pub(crate) mod test_server;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Mutex};

use crate::config::IssuerConfig;

pub use fetch::{FetchError, DISCOVERY_PATH, MAX_JWKS_BYTES, MAX_JWKS_REDIRECTS};
pub use keyset::{KeyKind, KeySet, KeySetError, SkippedKey, VerifyKey, MIN_RSA_MODULUS_BITS};
use source::KeySource;

/// First wait before retrying a failed fetch. Short, because until the
/// first fetch succeeds every protected request is denied.
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Maximum wait between retries of failed fetches; the delay doubles up to
/// this so that an unreachable issuer gets one request per half minute.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Share of a key set's lifetime after which the background refresh runs
/// (numerator over 4). Refreshing at three quarters leaves a quarter of the
/// lifetime for retries before the set counts as stale.
const REFRESH_AT_QUARTERS: u32 = 3;

/// Keys of one issuer: the current snapshot plus the fetch state.
pub struct IssuerKeys {
    pub config: IssuerConfig,
    source: KeySource,
    /// `None` until the first successful load. Readers clone the `Arc`
    /// under a short read lock; a load swaps in a whole new set.
    current: RwLock<Option<Current>>,
    client: Result<reqwest::Client, String>,
    /// Serialises fetches, so an older response cannot replace a newer one.
    fetch_lock: Mutex<()>,
    /// Start of the last unknown-`kid` refetch. Holding this lock makes the
    /// refetch single-flight.
    last_refetch: Mutex<Option<tokio::time::Instant>>,
    fetch_success: AtomicU64,
    fetch_failure: AtomicU64,
    unknown_kid_refetches: AtomicU64,
    unknown_kid_refetches_limited: AtomicU64,
    /// Unix time of the last successful fetch, 0 before the first.
    last_success_unix: AtomicU64,
    /// Set once the expiry of the whole set has been logged, so the error
    /// is written once per outage.
    expiry_logged: AtomicBool,
}

/// The installed key set with the time it was loaded and how long it is
/// fresh.
struct Current {
    keys: Arc<KeySet>,
    loaded_at: Instant,
    lifetime: Duration,
}

/// Counters of one issuer's key store, read by the metrics module at scrape
/// time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksStats {
    pub fetch_success: u64,
    pub fetch_failure: u64,
    /// Unknown-`kid` refetches that ran, failed ones included.
    pub unknown_kid_refetches: u64,
    /// Unknown-`kid` refetches skipped because one ran less than
    /// `unknown_kid_refetch_seconds` ago.
    pub unknown_kid_refetches_limited: u64,
    /// Keys in use now: 0 before the first load and after the set expired.
    pub keys: usize,
    pub last_success_unix: Option<u64>,
    /// Seconds since the installed set was last loaded successfully, also
    /// after it expired; `None` before the first load.
    pub key_set_age_seconds: Option<u64>,
    /// The set is past its lifetime because refreshes fail, but still
    /// within `jwks_max_stale_seconds`, so its keys are still used.
    pub stale: bool,
}

impl IssuerKeys {
    /// Creates the key store of `config`. A local source (file, inline
    /// keys, HMAC secret alone) is loaded at once, so those keys are ready
    /// without [`IssuerKeys::run`]; a failure there is logged and retried
    /// by `run`.
    pub fn new(config: IssuerConfig) -> Self {
        // A client that cannot be built (no TLS backend) is kept as an
        // error, so every fetch reports it instead of the agent stopping.
        let client = fetch::client(Duration::from_secs(config.jwks_timeout_seconds.max(1)))
            .map_err(|error| error.to_string());
        let source = KeySource::of(&config);
        let keys = Self {
            config,
            source,
            current: RwLock::new(None),
            client,
            fetch_lock: Mutex::new(()),
            last_refetch: Mutex::new(None),
            fetch_success: AtomicU64::new(0),
            fetch_failure: AtomicU64::new(0),
            unknown_kid_refetches: AtomicU64::new(0),
            unknown_kid_refetches_limited: AtomicU64::new(0),
            last_success_unix: AtomicU64::new(0),
            expiry_logged: AtomicBool::new(false),
        };

        if keys.source.is_local() {
            let loaded = source::load_local(&keys.source, &keys.config);
            // The outcome is logged and counted inside.
            let _ = keys.store(loaded);
        }
        keys
    }

    /// True while a key set is in use: loaded, and not past its lifetime
    /// plus `jwks_max_stale_seconds`. `/readyz` reports this.
    pub fn is_ready(&self) -> bool {
        self.keys().is_some()
    }

    /// Number of keys in the current set.
    pub fn key_count(&self) -> usize {
        self.keys().map_or(0, |keys| keys.len())
    }

    /// Returns the key set in use. Returns `None` before the first
    /// successful load, and once the set is older than its lifetime plus
    /// `jwks_max_stale_seconds`, so requests then fail with `keys_unavailable`.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let current = current.as_ref()?;
        if current.loaded_at.elapsed() > self.usable_for(current.lifetime) {
            return None;
        }
        Some(Arc::clone(&current.keys))
    }

    pub fn stats(&self) -> JwksStats {
        let last_success = self.last_success_unix.load(Ordering::Relaxed);
        let (age, stale) = {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            current.as_ref().map_or((None, false), |current| {
                let age = current.loaded_at.elapsed();
                let stale = age > current.lifetime && age <= self.usable_for(current.lifetime);
                (Some(age.as_secs()), stale)
            })
        };
        JwksStats {
            fetch_success: self.fetch_success.load(Ordering::Relaxed),
            fetch_failure: self.fetch_failure.load(Ordering::Relaxed),
            unknown_kid_refetches: self.unknown_kid_refetches.load(Ordering::Relaxed),
            unknown_kid_refetches_limited: self
                .unknown_kid_refetches_limited
                .load(Ordering::Relaxed),
            keys: self.key_count(),
            last_success_unix: (last_success != 0).then_some(last_success),
            key_set_age_seconds: age,
            stale,
        }
    }

    /// Installs `keys` as the current set, fresh for `jwks_refresh_seconds`,
    /// and returns true when they differ from the previous set. Tests and
    /// tools may call this with keys they parsed themselves.
    pub fn replace_keys(&self, keys: KeySet) -> bool {
        self.install(keys, source::lifetime(&self.config, None))
    }

    /// Loads the keys now, whatever the refresh schedule, for tools such
    /// as `explain` that do not run the refresh task. Returns whether the
    /// set changed.
    pub async fn refresh_now(&self) -> Result<bool, FetchError> {
        self.fetch_and_store().await.map(|(changed, _)| changed)
    }

    /// Time for which a set of `lifetime` stays usable: the lifetime plus
    /// the tolerated staleness (compare HTTP's `stale-if-error`, RFC 5861).
    fn usable_for(&self, lifetime: Duration) -> Duration {
        lifetime.saturating_add(Duration::from_secs(self.config.jwks_max_stale_seconds))
    }

    fn install(&self, keys: KeySet, lifetime: Duration) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let expired = current
            .as_ref()
            .is_some_and(|old| old.loaded_at.elapsed() > self.usable_for(old.lifetime));
        let same = current
            .as_ref()
            .is_some_and(|old| old.keys.same_keys(&keys));
        self.expiry_logged.store(false, Ordering::Relaxed);

        if same && !expired {
            // Refresh the age and lifetime but keep the `Arc`, so readers
            // and caches keyed on it see no change.
            if let Some(old) = current.as_mut() {
                old.loaded_at = Instant::now();
                old.lifetime = lifetime;
            }
            return false;
        }

        tracing::info!(
            jwt.iss = %self.config.issuer,
            jwks.keys = keys.len(),
            jwks.kids = ?keys.kids(),
            jwks.lifetime_seconds = lifetime.as_secs(),
            "jwks key set changed"
        );
        *current = Some(Current {
            keys: Arc::new(keys),
            loaded_at: Instant::now(),
            lifetime,
        });
        true
    }

    /// Loads keys now, and again before each set's lifetime ends, until
    /// `shutdown` becomes true or its sender is dropped.
    ///
    /// A failed load is retried after [`INITIAL_RETRY_DELAY`], and the delay
    /// doubles up to [`MAX_RETRY_DELAY`] but never beyond the last lifetime.
    /// The last good set stays in use meanwhile, until it is older than its
    /// lifetime plus `jwks_max_stale_seconds`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut lifetime = source::lifetime(&self.config, None);
        let mut retry_delay = INITIAL_RETRY_DELAY;
        tracing::info!(jwt.iss = %self.config.issuer, jwks.source = %self.source.describe(), "jwks refresh started");

        loop {
            let outcome = tokio::select! {
                outcome = self.fetch_and_store() => outcome,
                () = shutdown_requested(&mut shutdown) => break,
            };

            let delay = if let Ok((_, fresh_for)) = outcome {
                lifetime = fresh_for;
                retry_delay = INITIAL_RETRY_DELAY;
                lifetime * REFRESH_AT_QUARTERS / 4
            } else {
                self.log_expiry_once();
                let delay = retry_delay.min(lifetime);
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
    /// any other fetch meanwhile) brought `kid`. A refetch that runs is
    /// counted in [`JwksStats::unknown_kid_refetches`] even when it fails,
    /// one that is skipped in [`JwksStats::unknown_kid_refetches_limited`].
    pub async fn refetch_for_unknown_kid(&self, kid: &str) -> bool {
        let mut last_refetch = self.last_refetch.lock().await;
        if self.keys().is_some_and(|keys| keys.contains_kid(kid)) {
            return true;
        }

        let interval = Duration::from_secs(self.config.unknown_kid_refetch_seconds);
        if last_refetch.is_some_and(|at| at.elapsed() < interval) {
            self.unknown_kid_refetches_limited
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(jwt.iss = %self.config.issuer, jwt.kid = %kid, "jwks refetch rate-limited");
            return false;
        }

        *last_refetch = Some(tokio::time::Instant::now());
        self.unknown_kid_refetches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(jwt.iss = %self.config.issuer, jwt.kid = %kid, "jwks refetch for unknown kid");
        matches!(self.fetch_and_store().await, Ok((true, _)))
            && self.keys().is_some_and(|keys| keys.contains_kid(kid))
    }

    /// Loads once and installs the result. Returns whether the set changed
    /// and the new set's lifetime; on failure the current set stays and a
    /// warning is logged.
    ///
    /// NOTE: a JWKS with no usable key counts as a failure, so an issuer
    /// that withdraws every key keeps its last keys trusted here until
    /// `jwks_max_stale_seconds` past their lifetime.
    async fn fetch_and_store(&self) -> Result<(bool, Duration), FetchError> {
        let _one_at_a_time = self.fetch_lock.lock().await;

        let client = self.client.as_ref().map_err(|message| FetchError::Client {
            message: message.clone(),
        });
        let loaded = match client {
            Ok(client) => source::load(&self.source, client, &self.config).await,
            Err(error) => Err(error),
        };
        self.store(loaded)
    }

    /// Installs a load's result, counts it and logs it.
    fn store(
        &self,
        loaded: Result<fetch::Fetched, FetchError>,
    ) -> Result<(bool, Duration), FetchError> {
        match loaded {
            Ok(fetched) => {
                self.fetch_success.fetch_add(1, Ordering::Relaxed);
                self.last_success_unix.store(unix_now(), Ordering::Relaxed);
                let lifetime = source::lifetime(&self.config, fetched.max_age);
                let changed = self.install(fetched.keys, lifetime);
                self.log_skipped(&fetched.skipped, changed);
                Ok((changed, lifetime))
            }
            Err(error) => {
                self.fetch_failure.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    jwt.iss = %self.config.issuer,
                    jwks.source = %self.source.describe(),
                    error = %ErrorChain(&error),
                    ready = self.is_ready(),
                    "jwks fetch failed, keeping the last good keys"
                );
                Err(error)
            }
        }
    }

    /// Logs an error the first time a refresh fails after the set has
    /// outlived its lifetime plus the tolerated staleness.
    fn log_expiry_once(&self) {
        let has_set = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if has_set && !self.is_ready() && !self.expiry_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                jwt.iss = %self.config.issuer,
                jwks.max_stale_seconds = self.config.jwks_max_stale_seconds,
                "jwks keys dropped after exceeding the maximum staleness, tokens of this issuer are rejected"
            );
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
        config(json!({
            "issuer": "https://idp.example",
            "jwks_uri": uri,
            "algorithms": ["RS256"],
            "clock_skew_seconds": 0,
            "jwks_refresh_seconds": refresh_seconds,
            "unknown_kid_refetch_seconds": refetch_seconds,
        }))
    }

    fn config(value: serde_json::Value) -> IssuerConfig {
        serde_json::from_value(value).expect("issuer config")
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
        assert!(matches!(keys.fetch_and_store().await, Ok((true, _))));
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
        assert!(matches!(keys.fetch_and_store().await, Ok((true, _))));
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
        assert!(matches!(keys.fetch_and_store().await, Ok((true, _))));
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
        assert!(matches!(keys.fetch_and_store().await, Ok((true, _))));
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

        let (first, _) = keys.fetch_and_store().await.expect("fetch");
        let (second, _) = keys.fetch_and_store().await.expect("fetch");

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

    #[tokio::test]
    async fn max_age_sets_lifetime_within_bounds() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "jwks_uri": server.uri(),
            "algorithms": ["RS256"],
            "jwks_refresh_seconds": 42,
            "jwks_min_refresh_seconds": 10,
            "jwks_max_refresh_seconds": 20,
        })));
        let cases = [
            (Some("max-age=15"), 15),
            (Some("public, max-age=5"), 10),
            (Some("max-age=86400"), 20),
            (Some("no-store"), 10),
            (None, 42),
        ];

        for (header, expected) in cases {
            server.set_cache_control(header);

            let (_, lifetime) = keys.fetch_and_store().await.expect("fetch");

            assert_eq!(lifetime, Duration::from_secs(expected), "{header:?}");
        }
    }

    #[tokio::test]
    async fn stale_keys_kept_then_dropped() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = Arc::new(IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "jwks_uri": server.uri(),
            "algorithms": ["RS256"],
            "jwks_refresh_seconds": 1,
            "jwks_max_stale_seconds": 2,
        }))));
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&keys).run(shutdown));
        wait_until("first fetch", || keys.is_ready()).await;
        assert!(!keys.stats().stale);

        server.set_reply(503, b"down");
        wait_until("stale set", || keys.stats().stale).await;
        assert!(keys.is_ready(), "stale keys stay in use");
        assert_eq!(keys.key_count(), 3);
        wait_until("expired set", || !keys.is_ready()).await;

        let stats = keys.stats();
        assert_eq!(stats.keys, 0);
        assert!(!stats.stale);
        assert!(
            stats.key_set_age_seconds.is_some_and(|age| age >= 3),
            "{stats:?}"
        );
        server.set_reply(200, FIXTURE.as_bytes());
        wait_until("recovery", || keys.is_ready()).await;
        assert_eq!(keys.stats().key_set_age_seconds, Some(0));
        task.abort();
    }

    #[tokio::test]
    async fn slow_issuer_times_out_and_keeps_keys() {
        let server = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let keys = IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "jwks_uri": server.uri(),
            "algorithms": ["RS256"],
            "jwks_timeout_seconds": 1,
        })));
        assert!(keys.fetch_and_store().await.is_ok());
        server.set_delay(Duration::from_secs(3));
        let started = Instant::now();

        let outcome = keys.fetch_and_store().await;

        assert!(
            matches!(outcome, Err(FetchError::Request { .. })),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(2500));
        assert_eq!(keys.key_count(), 3);
        assert_eq!(keys.stats().fetch_failure, 1);
    }

    #[tokio::test]
    async fn discovery_finds_jwks() {
        let jwks = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let discovery = JwksServer::start(200, b"").await;
        let issuer = discovery.base();
        let document = json!({"issuer": issuer, "jwks_uri": jwks.uri()});
        discovery.set_reply(200, &serde_json::to_vec(&document).expect("JSON"));
        let keys = IssuerKeys::new(config(json!({
            "issuer": issuer,
            "discovery": true,
            "algorithms": ["RS256"],
        })));

        let outcome = keys.fetch_and_store().await;

        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(keys.key_count(), 3);
        assert_eq!(discovery.hits(), 1);
        assert_eq!(jwks.hits(), 1);
    }

    #[tokio::test]
    async fn discovery_rejects_other_issuer() {
        let jwks = JwksServer::start(200, FIXTURE.as_bytes()).await;
        let discovery = JwksServer::start(200, b"").await;
        let cases = [
            json!({"issuer": "https://evil.example", "jwks_uri": jwks.uri()}),
            json!({"issuer": "https://idp.example/", "jwks_uri": jwks.uri()}),
            json!({"issuer": "https://idp.example", "jwks_uri": "file:///etc/passwd"}),
            json!({"issuer": "https://idp.example"}),
        ];

        for document in cases {
            discovery.set_reply(200, &serde_json::to_vec(&document).expect("JSON"));
            let keys = IssuerKeys::new(config(json!({
                "issuer": "https://idp.example",
                "discovery_uri": format!("{}{DISCOVERY_PATH}", discovery.base()),
                "algorithms": ["RS256"],
            })));

            let outcome = keys.fetch_and_store().await;

            assert!(
                matches!(
                    outcome,
                    Err(FetchError::DiscoveryIssuer { .. }
                        | FetchError::DiscoveryJwksUri { .. }
                        | FetchError::DiscoveryDocument { .. })
                ),
                "{document}: {outcome:?}"
            );
            assert!(!keys.is_ready());
        }
        assert_eq!(jwks.hits(), 0, "no JWKS fetched for a rejected document");
    }

    #[tokio::test]
    async fn file_source_is_read_again() {
        let all = fixture_keys();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, document(&all[..1])).expect("write");
        let keys = IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "jwks_file": path,
            "algorithms": ["RS256"],
        })));
        assert_eq!(keys.key_count(), 1, "loaded at construction");

        std::fs::write(&path, document(&all)).expect("write");
        let changed = keys.refresh_now().await.expect("read");
        std::fs::remove_file(&path).expect("remove");
        let missing = keys.refresh_now().await;

        assert!(changed);
        assert!(
            matches!(missing, Err(FetchError::File { .. })),
            "{missing:?}"
        );
        assert_eq!(keys.key_count(), 3);
    }

    #[test]
    fn inline_source_as_mapping_or_string() {
        let mapping: serde_json::Value = serde_json::from_str(FIXTURE).expect("JSON");
        for inline in [mapping, json!(FIXTURE)] {
            let keys = IssuerKeys::new(config(json!({
                "issuer": "https://idp.example",
                "jwks": inline,
                "algorithms": ["RS256"],
            })));

            assert!(keys.is_ready());
            assert_eq!(keys.key_count(), 3);
        }
    }

    #[test]
    fn hmac_secret_becomes_oct_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        let secret = b"0123456789abcdef0123456789abcdef-secret-marker";
        std::fs::write(&path, secret).expect("write");
        let keys = IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "hmac_secret_file": path,
            "jwks": serde_json::from_str::<serde_json::Value>(FIXTURE).expect("JSON"),
            "algorithms": ["HS256", "RS256"],
        })));

        let set = keys.keys().expect("keys");
        let hmac: Vec<&VerifyKey> = set
            .keys()
            .iter()
            .filter(|key| matches!(key.kind, KeyKind::Hmac { .. }))
            .collect();
        assert_eq!(set.len(), 4);
        assert_eq!(hmac.len(), 1);
        assert_eq!(
            hmac[0].kind,
            KeyKind::Hmac {
                bytes: secret.len()
            }
        );
        assert!(hmac[0].fits(jsonwebtoken::Algorithm::HS256));
        assert!(
            !hmac[0].fits(jsonwebtoken::Algorithm::HS512),
            "shorter than 64 bytes"
        );
        assert!(!format!("{set:?}").contains("secret-marker"));
    }

    #[test]
    fn missing_secret_file_leaves_no_keys() {
        let keys = IssuerKeys::new(config(json!({
            "issuer": "https://idp.example",
            "hmac_secret_file": "/nonexistent/tokengate-test/secret",
            "algorithms": ["HS256"],
        })));

        assert!(!keys.is_ready());
        assert_eq!(keys.stats().fetch_failure, 1);
    }
}
