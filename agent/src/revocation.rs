//! Revocation (forced logout): a list of revoked `jti`s and of subjects
//! revoked before a point in time, read from a file and/or polled from a
//! URL, and checked on every request with two hash lookups.
//!
//! The poller rebuilds the list in the background and swaps it in whole. The
//! request path only reads the current list and never waits on a source.
//! The format is described in `document`.

mod document;
mod list;
mod source;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::config::{IssuerConfig, RevocationConfig};
use crate::verify::VerifiedToken;

pub use document::{DocumentError, JtiEntry, RevocationDocument, SubjectEntry, MAX_DOCUMENT_BYTES};
pub use list::{BuildCounts, Retention, RevocationList, FALLBACK_MAX_LIFETIME_SECONDS};
pub use source::{Refreshed, Source, SourceError, MAX_REDIRECTS};

/// The list in force, shared by every workload's request path.
pub struct Revocations {
    current: RwLock<Arc<RevocationList>>,
    /// True when a file or URL is configured; otherwise the list stays
    /// empty and no age is reported.
    configured: AtomicBool,
    /// Unix time from which the list's age counts: the oldest of the
    /// sources' last successful refreshes, or the poller's start while a
    /// source has never been read.
    fresh_since_unix: AtomicU64,
    refresh_success: AtomicU64,
    refresh_failure: AtomicU64,
}

/// Numbers about the list, read by the metrics module at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevocationStats {
    pub jtis: usize,
    pub subjects: usize,
    /// Seconds since every source was last read successfully; `None` when no
    /// source is configured.
    pub age_seconds: Option<u64>,
    /// Source refreshes that succeeded, unchanged ones included.
    pub refresh_success: u64,
    pub refresh_failure: u64,
}

impl Revocations {
    /// Creates an empty list. `configured` is true when a source will fill it.
    pub fn new(configured: bool) -> Self {
        Self {
            current: RwLock::new(Arc::new(RevocationList::default())),
            configured: AtomicBool::new(configured),
            fresh_since_unix: AtomicU64::new(unix_now()),
            refresh_success: AtomicU64::new(0),
            refresh_failure: AtomicU64::new(0),
        }
    }

    /// Returns the list in force. The `Arc` is cloned under a short read
    /// lock, so no lock is held while the caller decides.
    pub fn current(&self) -> Arc<RevocationList> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// True when `token` is on the list in force.
    pub fn is_revoked(&self, token: &VerifiedToken) -> bool {
        self.current().is_revoked(token)
    }

    /// Installs `list` and returns true when it differs from the one in
    /// force.
    pub fn replace(&self, list: RevocationList) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if **current == list {
            return false;
        }
        *current = Arc::new(list);
        true
    }

    pub fn stats(&self) -> RevocationStats {
        let list = self.current();
        let age_seconds = self
            .configured
            .load(Ordering::Relaxed)
            .then(|| unix_now().saturating_sub(self.fresh_since_unix.load(Ordering::Relaxed)));
        RevocationStats {
            jtis: list.jti_count(),
            subjects: list.subject_count(),
            age_seconds,
            refresh_success: self.refresh_success.load(Ordering::Relaxed),
            refresh_failure: self.refresh_failure.load(Ordering::Relaxed),
        }
    }
}

/// Refreshes the sources and installs the rebuilt list.
pub struct RevocationPoller {
    revocations: Arc<Revocations>,
    sources: Vec<SourceState>,
    retention: Retention,
    refresh: Duration,
}

struct SourceState {
    source: Source,
    /// Unix time of the last successful refresh, `None` before the first.
    last_success_unix: Option<u64>,
    /// Consecutive failures, so a long outage logs one warning, not one per
    /// refresh.
    failures_in_row: u64,
}

impl RevocationPoller {
    /// Builds the poller of `config` and the shared list it fills. The
    /// retention of entries follows each issuer's `max_lifetime_seconds`
    /// and `clock_skew_seconds`.
    pub fn new(config: &RevocationConfig, issuers: &[IssuerConfig]) -> (Self, Arc<Revocations>) {
        let configured = config.file.is_some() || config.url.is_some();
        let revocations = Arc::new(Revocations::new(configured));
        (Self::for_state(config, issuers, &revocations), revocations)
    }

    /// Builds a poller of `config` that fills an existing list, for a
    /// configuration reload. The old poller must be stopped, and the list
    /// keeps its entries until this poller's first [`Self::refresh`].
    pub fn for_state(
        config: &RevocationConfig,
        issuers: &[IssuerConfig],
        revocations: &Arc<Revocations>,
    ) -> Self {
        let mut sources = Vec::new();
        if let Some(path) = &config.file {
            sources.push(Source::file(path));
        }
        if let Some(url) = &config.url {
            sources.push(Source::url(
                url,
                Duration::from_secs(config.timeout_seconds),
            ));
        }
        let retention = Retention::new(issuers.iter().map(|issuer| {
            (
                issuer.issuer.as_str(),
                issuer.max_lifetime_seconds,
                issuer.clock_skew_seconds,
            )
        }));
        revocations
            .configured
            .store(!sources.is_empty(), Ordering::Relaxed);
        revocations
            .fresh_since_unix
            .store(unix_now(), Ordering::Relaxed);

        Self {
            revocations: Arc::clone(revocations),
            sources: sources
                .into_iter()
                .map(|source| SourceState {
                    source,
                    last_success_unix: None,
                    failures_in_row: 0,
                })
                .collect(),
            retention,
            refresh: Duration::from_secs(config.refresh_seconds.max(1)),
        }
    }

    /// True when a file or URL is configured.
    pub fn is_configured(&self) -> bool {
        !self.sources.is_empty()
    }

    /// Refreshes every source once, rebuilds the list at the current time
    /// (dropping entries that aged out) and installs it.
    pub async fn refresh(&mut self) {
        let now = unix_now();
        let mut changed_sources = 0;
        for state in &mut self.sources {
            if refresh_source(state, &self.revocations, now).await == Some(Refreshed::Changed) {
                changed_sources += 1;
            }
        }
        if self.sources.is_empty() {
            self.revocations.replace(RevocationList::default());
            return;
        }

        let oldest_success = self
            .sources
            .iter()
            .map(|state| state.last_success_unix)
            .min()
            .flatten();
        if let Some(oldest) = oldest_success {
            self.revocations
                .fresh_since_unix
                .store(oldest, Ordering::Relaxed);
        }

        let documents = self
            .sources
            .iter()
            .filter_map(|state| state.source.document());
        let (list, counts) = RevocationList::build(documents, &self.retention, now);
        let (jtis, subjects) = (list.jti_count(), list.subject_count());
        if self.revocations.replace(list) {
            tracing::info!(
                revocation.jtis = jtis,
                revocation.subjects = subjects,
                revocation.aged_out = counts.aged_out,
                revocation.changed_sources = changed_sources,
                "revocation list changed"
            );
        }
    }

    /// Refreshes every `refresh_seconds`, starting one period from now,
    /// until `shutdown` becomes true or its sender is dropped. Call
    /// [`Self::refresh`] first to load the list before serving.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        if self.sources.is_empty() {
            return;
        }
        let origins: Vec<String> = self
            .sources
            .iter()
            .map(|state| state.source.origin())
            .collect();
        tracing::info!(revocation.sources = ?origins, refresh_seconds = self.refresh.as_secs(), "revocation refresh started");

        loop {
            tokio::select! {
                () = tokio::time::sleep(self.refresh) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            tokio::select! {
                () = self.refresh() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tracing::info!("revocation refresh stopped");
    }
}

/// Refreshes one source, counts and logs the outcome, and returns it, or
/// `None` on failure.
async fn refresh_source(
    state: &mut SourceState,
    revocations: &Revocations,
    now: u64,
) -> Option<Refreshed> {
    match state.source.refresh().await {
        Ok(refreshed) => {
            revocations.refresh_success.fetch_add(1, Ordering::Relaxed);
            if state.failures_in_row > 0 {
                tracing::info!(
                    revocation.source = %state.source.origin(),
                    failures = state.failures_in_row,
                    "revocation list source recovered"
                );
            }
            state.last_success_unix = Some(now);
            state.failures_in_row = 0;
            Some(refreshed)
        }
        Err(error) => {
            revocations.refresh_failure.fetch_add(1, Ordering::Relaxed);
            state.failures_in_row += 1;
            let has_list = state.source.document().is_some();
            if state.failures_in_row == 1 {
                tracing::warn!(
                    revocation.source = %state.source.origin(),
                    error = %ErrorChain(&error),
                    has_list,
                    "revocation list refresh failed, keeping the last good list"
                );
            } else {
                tracing::debug!(
                    revocation.source = %state.source.origin(),
                    error = %ErrorChain(&error),
                    failures = state.failures_in_row,
                    "revocation list refresh failed again"
                );
            }
            None
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Formats an error with its sources, `outer: inner: innermost`, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

    use super::*;
    use crate::jwks::test_server::JwksServer;

    const ISS: &str = "https://idp.example";

    fn config(file: Option<&std::path::Path>, url: Option<&str>) -> RevocationConfig {
        RevocationConfig {
            file: file.map(std::path::Path::to_owned),
            url: url.map(str::to_owned),
            refresh_seconds: 1,
            timeout_seconds: 5,
        }
    }

    fn token(jti: &str, sub: &str, iat: u64) -> VerifiedToken {
        let claims = json!({"iss": ISS, "sub": sub, "jti": jti, "iat": iat});
        VerifiedToken {
            issuer: ISS.to_owned(),
            subject: Some(sub.to_owned()),
            kid: None,
            algorithm: "RS256".to_owned(),
            claims: claims.as_object().expect("object").clone(),
            roles_claim: "roles".to_owned(),
        }
    }

    fn far_future() -> u64 {
        unix_now() + 3600
    }

    #[tokio::test]
    async fn file_and_url_are_merged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.json");
        let exp = far_future();
        std::fs::write(
            &path,
            format!(r#"{{"jtis": [{{"jti": "from-file", "exp": {exp}}}]}}"#),
        )
        .expect("write");
        let now = unix_now();
        let server = JwksServer::start(
            200,
            format!(
                r#"{{"subjects": [{{"iss": "{ISS}", "sub": "bob", "revoked_before": {now}}}]}}"#
            )
            .as_bytes(),
        )
        .await;
        let (mut poller, revocations) =
            RevocationPoller::new(&config(Some(&path), Some(&server.uri())), &[]);

        poller.refresh().await;

        let stats = revocations.stats();
        assert_eq!(stats.jtis, 1);
        assert_eq!(stats.subjects, 1);
        assert_eq!(stats.refresh_success, 2);
        assert!(stats.age_seconds.is_some_and(|age| age <= 1), "{stats:?}");
        assert!(revocations.is_revoked(&token("from-file", "alice", now)));
        assert!(revocations.is_revoked(&token("x", "bob", now - 10)));
        assert!(!revocations.is_revoked(&token("x", "alice", now - 10)));
    }

    #[tokio::test]
    async fn failed_source_keeps_list_and_age_grows() {
        let server = JwksServer::start(
            200,
            format!(r#"{{"jtis": [{{"jti": "a", "exp": {}}}]}}"#, far_future()).as_bytes(),
        )
        .await;
        let (mut poller, revocations) =
            RevocationPoller::new(&config(None, Some(&server.uri())), &[]);
        poller.refresh().await;
        assert_eq!(revocations.stats().jtis, 1);

        server.set_reply(500, b"internal error");
        poller.sources[0].last_success_unix = Some(unix_now() - 100);
        poller.refresh().await;

        let stats = revocations.stats();
        assert_eq!(stats.jtis, 1, "last good list kept");
        assert_eq!(stats.refresh_failure, 1);
        assert!(stats.age_seconds.is_some_and(|age| age >= 100), "{stats:?}");
    }

    #[tokio::test]
    async fn never_loaded_source_reports_age_since_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut poller, revocations) =
            RevocationPoller::new(&config(Some(&dir.path().join("absent.json")), None), &[]);
        revocations
            .fresh_since_unix
            .store(unix_now() - 30, Ordering::Relaxed);

        poller.refresh().await;

        let stats = revocations.stats();
        assert_eq!(stats.refresh_failure, 1);
        assert!(stats.age_seconds.is_some_and(|age| age >= 30), "{stats:?}");
        assert_eq!(stats.jtis, 0);
    }

    #[tokio::test]
    async fn unconfigured_list_has_no_age() {
        let (mut poller, revocations) = RevocationPoller::new(&config(None, None), &[]);

        poller.refresh().await;

        assert!(!poller.is_configured());
        assert_eq!(revocations.stats(), RevocationStats::default());
    }

    #[tokio::test]
    async fn aged_entries_leave_at_refresh() {
        let issuer: IssuerConfig = serde_yaml::from_str(&format!(
            "issuer: {ISS}\njwks_uri: http://127.0.0.1:9/jwks\nalgorithms: [RS256]\nclock_skew_seconds: 0\nmax_lifetime_seconds: 60\n"
        ))
        .expect("issuer config");
        let now = unix_now();
        let body = format!(
            r#"{{"jtis": [{{"jti": "old", "exp": {}}}, {{"jti": "live", "exp": {}}}],
                "subjects": [{{"iss": "{ISS}", "sub": "old", "revoked_before": {}}}]}}"#,
            now - 1,
            now + 600,
            now - 61
        );
        let server = JwksServer::start(200, body.as_bytes()).await;
        let (mut poller, revocations) =
            RevocationPoller::new(&config(None, Some(&server.uri())), &[issuer]);

        poller.refresh().await;

        let stats = revocations.stats();
        assert_eq!(stats.jtis, 1);
        assert_eq!(stats.subjects, 0);
    }

    #[tokio::test]
    async fn reload_without_sources_empties_list() {
        let server = JwksServer::start(
            200,
            format!(r#"{{"jtis": [{{"jti": "a", "exp": {}}}]}}"#, far_future()).as_bytes(),
        )
        .await;
        let (mut poller, revocations) =
            RevocationPoller::new(&config(None, Some(&server.uri())), &[]);
        poller.refresh().await;
        assert_eq!(revocations.stats().jtis, 1);

        let mut reloaded = RevocationPoller::for_state(&config(None, None), &[], &revocations);
        reloaded.refresh().await;

        assert_eq!(
            revocations.stats(),
            RevocationStats {
                refresh_success: 1,
                ..RevocationStats::default()
            }
        );
    }

    #[tokio::test]
    async fn run_picks_up_changes_and_stops() {
        let server = JwksServer::start(200, b"{}").await;
        let (mut poller, revocations) =
            RevocationPoller::new(&config(None, Some(&server.uri())), &[]);
        poller.refresh().await;
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(poller.run(shutdown));

        server.set_reply(
            200,
            format!(r#"{{"jtis": [{{"jti": "a", "exp": {}}}]}}"#, far_future()).as_bytes(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while revocations.stats().jtis == 0 {
            assert!(tokio::time::Instant::now() < deadline, "list not refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).expect("task is listening");

        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("task stops")
            .expect("task did not panic");
    }
}
