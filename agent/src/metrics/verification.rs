//! Collectors of the verified-token cache and the revocation list, read
//! from their owners at scrape time.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::NAMESPACE;
use crate::cache::TokenCache;
use crate::revocation::Revocations;

/// `tokengate_token_cache_*` series.
pub(super) struct CacheCollector {
    cache: Arc<TokenCache>,
    /// Scratch series rebuilt under the lock at every scrape, so two
    /// concurrent scrapes cannot interleave their updates.
    series: Mutex<CacheSeries>,
    descs: Vec<Desc>,
}

struct CacheSeries {
    entries: IntGauge,
    hits: IntCounter,
    misses: IntCounter,
}

impl CacheCollector {
    pub(super) fn new(cache: Arc<TokenCache>) -> Self {
        let series = CacheSeries {
            entries: IntGauge::with_opts(
                Opts::new("token_cache_entries", "Verified tokens in the cache.").namespace(NAMESPACE),
            )
            .expect("static metric options are valid"),
            hits: IntCounter::with_opts(
                Opts::new(
                    "token_cache_hits_total",
                    "Token lookups answered by the cache without a signature check.",
                )
                .namespace(NAMESPACE),
            )
            .expect("static metric options are valid"),
            misses: IntCounter::with_opts(
                Opts::new(
                    "token_cache_misses_total",
                    "Token lookups not in the cache (absent, expired or dropped after a key change).",
                )
                .namespace(NAMESPACE),
            )
            .expect("static metric options are valid"),
        };
        let descs = [
            series.entries.desc(),
            series.hits.desc(),
            series.misses.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();

        Self {
            cache,
            series: Mutex::new(series),
            descs,
        }
    }
}

impl Collector for CacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = self.cache.stats();

        series
            .entries
            .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        series.hits.reset();
        series.hits.inc_by(stats.hits);
        series.misses.reset();
        series.misses.inc_by(stats.misses);

        let mut families = series.entries.collect();
        families.extend(series.hits.collect());
        families.extend(series.misses.collect());
        families
    }
}

/// `tokengate_revocation_*` series.
pub(super) struct RevocationCollector {
    revocations: Arc<Revocations>,
    series: Mutex<RevocationSeries>,
    descs: Vec<Desc>,
}

struct RevocationSeries {
    entries: IntGaugeVec,
    age: Gauge,
    refreshes: IntCounterVec,
}

impl RevocationCollector {
    pub(super) fn new(revocations: Arc<Revocations>) -> Self {
        let series = RevocationSeries {
            entries: IntGaugeVec::new(
                Opts::new(
                    "revocation_entries",
                    "Entries on the revocation list in force, by kind (jti or subject).",
                )
                .namespace(NAMESPACE),
                &["kind"],
            )
            .expect("static metric options are valid"),
            age: Gauge::with_opts(
                Opts::new(
                    "revocation_list_age_seconds",
                    "Seconds since every revocation source was last read successfully, or since \
                     start while one never was; absent when no source is configured.",
                )
                .namespace(NAMESPACE),
            )
            .expect("static metric options are valid"),
            refreshes: IntCounterVec::new(
                Opts::new(
                    "revocation_refreshes_total",
                    "Revocation source reads by result (success or failure).",
                )
                .namespace(NAMESPACE),
                &["result"],
            )
            .expect("static metric options are valid"),
        };
        let descs = [
            series.entries.desc(),
            series.age.desc(),
            series.refreshes.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();

        Self {
            revocations,
            series: Mutex::new(series),
            descs,
        }
    }
}

impl Collector for RevocationCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = self.revocations.stats();

        series
            .entries
            .with_label_values(&["jti"])
            .set(i64::try_from(stats.jtis).unwrap_or(i64::MAX));
        series
            .entries
            .with_label_values(&["subject"])
            .set(i64::try_from(stats.subjects).unwrap_or(i64::MAX));
        series.refreshes.reset();
        series
            .refreshes
            .with_label_values(&["success"])
            .inc_by(stats.refresh_success);
        series
            .refreshes
            .with_label_values(&["failure"])
            .inc_by(stats.refresh_failure);

        let mut families = series.entries.collect();
        if let Some(age) = stats.age_seconds {
            #[expect(
                clippy::cast_precision_loss,
                reason = "an age in seconds fits a 53-bit mantissa"
            )]
            series.age.set(age as f64);
            families.extend(series.age.collect());
        }
        families.extend(series.refreshes.collect());
        families
    }
}
