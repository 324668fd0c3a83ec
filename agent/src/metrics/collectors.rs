//! Collectors that read counters owned elsewhere at scrape time: the JWKS
//! fetch state of each issuer and the per-CPU counters of each pod's
//! `sk_lookup` program.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use super::NAMESPACE;
use crate::bpf::PodSteering;
use crate::jwks::IssuerKeys;

/// `tokengate_jwks_*` series, one set per configured issuer.
pub(super) struct IssuerCollector {
    issuers: Vec<Arc<IssuerKeys>>,
    /// Scratch series rebuilt under the lock at every scrape, so two
    /// concurrent scrapes cannot interleave their resets.
    series: Mutex<IssuerSeries>,
    descs: Vec<Desc>,
}

struct IssuerSeries {
    fetches: IntCounterVec,
    unknown_kid_refetches: IntCounterVec,
    keys: IntGaugeVec,
    last_success: GaugeVec,
    key_set_age: GaugeVec,
    stale: IntGaugeVec,
}

impl IssuerCollector {
    pub(super) fn new(issuers: Vec<Arc<IssuerKeys>>) -> Self {
        let series = IssuerSeries {
            fetches: IntCounterVec::new(
                Opts::new("jwks_fetches_total", "JWKS fetches by issuer and result (success or failure).")
                    .namespace(NAMESPACE),
                &["issuer", "result"],
            )
            .expect("static metric options are valid"),
            unknown_kid_refetches: IntCounterVec::new(
                Opts::new(
                    "jwks_unknown_kid_refetches_total",
                    "JWKS refetches requested by a token with an unknown kid, by outcome \
                     (fetched, or rate_limited when one ran less than unknown_kid_refetch_seconds ago).",
                )
                .namespace(NAMESPACE),
                &["issuer", "outcome"],
            )
            .expect("static metric options are valid"),
            keys: IntGaugeVec::new(
                Opts::new("jwks_keys", "Keys in the issuer's current key set.").namespace(NAMESPACE),
                &["issuer"],
            )
            .expect("static metric options are valid"),
            key_set_age: GaugeVec::new(
                Opts::new(
                    "jwks_key_set_age_seconds",
                    "Seconds since the issuer's key set was last loaded successfully; absent before the first load.",
                )
                .namespace(NAMESPACE),
                &["issuer"],
            )
            .expect("static metric options are valid"),
            stale: IntGaugeVec::new(
                Opts::new(
                    "jwks_key_set_stale",
                    "1 while the issuer's key set is past its lifetime but still used because refreshes fail.",
                )
                .namespace(NAMESPACE),
                &["issuer"],
            )
            .expect("static metric options are valid"),
            last_success: GaugeVec::new(
                Opts::new(
                    "jwks_last_success_timestamp_seconds",
                    "Unix time of the issuer's last successful JWKS fetch; absent before the first.",
                )
                .namespace(NAMESPACE),
                &["issuer"],
            )
            .expect("static metric options are valid"),
        };
        let descs = [
            series.fetches.desc(),
            series.unknown_kid_refetches.desc(),
            series.keys.desc(),
            series.last_success.desc(),
            series.key_set_age.desc(),
            series.stale.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();

        Self {
            issuers,
            series: Mutex::new(series),
            descs,
        }
    }
}

impl Collector for IssuerCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.fetches.reset();
        series.unknown_kid_refetches.reset();
        series.keys.reset();
        series.last_success.reset();
        series.key_set_age.reset();
        series.stale.reset();

        for keys in &self.issuers {
            let issuer = keys.config.issuer.as_str();
            let stats = keys.stats();
            series
                .fetches
                .with_label_values(&[issuer, "success"])
                .inc_by(stats.fetch_success);
            series
                .fetches
                .with_label_values(&[issuer, "failure"])
                .inc_by(stats.fetch_failure);
            series
                .unknown_kid_refetches
                .with_label_values(&[issuer, "fetched"])
                .inc_by(stats.unknown_kid_refetches);
            series
                .unknown_kid_refetches
                .with_label_values(&[issuer, "rate_limited"])
                .inc_by(stats.unknown_kid_refetches_limited);
            series
                .keys
                .with_label_values(&[issuer])
                .set(i64::try_from(stats.keys).unwrap_or(i64::MAX));
            series
                .stale
                .with_label_values(&[issuer])
                .set(i64::from(stats.stale));
            if let Some(age) = stats.key_set_age_seconds {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "an age in seconds fits a 53-bit mantissa"
                )]
                series
                    .key_set_age
                    .with_label_values(&[issuer])
                    .set(age as f64);
            }
            if let Some(unix) = stats.last_success_unix {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "Unix seconds fit a 53-bit mantissa"
                )]
                series
                    .last_success
                    .with_label_values(&[issuer])
                    .set(unix as f64);
            }
        }

        let mut families = series.fetches.collect();
        families.extend(series.unknown_kid_refetches.collect());
        families.extend(series.keys.collect());
        families.extend(series.last_success.collect());
        families.extend(series.key_set_age.collect());
        families.extend(series.stale.collect());
        families
    }
}

/// `tokengate_steering_connections_total` and
/// `tokengate_ebpf_log_records_suppressed_total`, one set per attached
/// workload.
#[derive(Clone)]
pub(super) struct SteeringCollector {
    inner: Arc<SteeringInner>,
}

struct SteeringInner {
    pods: Mutex<Vec<(String, Arc<PodSteering>)>>,
    series: Mutex<IntCounterVec>,
    suppressed: Mutex<IntCounterVec>,
    descs: [Desc; 2],
}

impl SteeringCollector {
    pub(super) fn new() -> Self {
        let series = IntCounterVec::new(
            Opts::new(
                "steering_connections_total",
                "New connections seen by the pod's sk_lookup program, by verdict (steered, passed, dropped).",
            )
            .namespace(NAMESPACE),
            &["workload", "verdict"],
        )
        .expect("static metric options are valid");
        let suppressed = IntCounterVec::new(
            Opts::new(
                "ebpf_log_records_suppressed_total",
                "Log records of the pod's eBPF program dropped by the agent's rate limit.",
            )
            .namespace(NAMESPACE),
            &["workload"],
        )
        .expect("static metric options are valid");
        let descs = [series.desc()[0].clone(), suppressed.desc()[0].clone()];

        Self {
            inner: Arc::new(SteeringInner {
                pods: Mutex::new(Vec::new()),
                series: Mutex::new(series),
                suppressed: Mutex::new(suppressed),
                descs,
            }),
        }
    }

    pub(super) fn add(&self, workload: &str, steering: Arc<PodSteering>) {
        let mut pods = self
            .inner
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pods.retain(|(name, _)| name != workload);
        pods.push((workload.to_owned(), steering));
    }

    pub(super) fn remove(&self, workload: &str) {
        self.inner
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(name, _)| name != workload);
    }
}

impl Collector for SteeringCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let pods = self
            .inner
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let series = self
            .inner
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        series.reset();
        let suppressed = self
            .inner
            .suppressed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        suppressed.reset();

        for (workload, steering) in &pods {
            suppressed
                .with_label_values(&[workload])
                .inc_by(steering.log_records_suppressed());
            match steering.counters() {
                Ok(counters) => {
                    series
                        .with_label_values(&[workload, "steered"])
                        .inc_by(counters.steered);
                    series
                        .with_label_values(&[workload, "passed"])
                        .inc_by(counters.passed);
                    series
                        .with_label_values(&[workload, "dropped"])
                        .inc_by(counters.dropped);
                }
                Err(error) => {
                    tracing::warn!(workload = %workload, error = format!("{error:#}"), "failed to read steering counters");
                }
            }
        }

        let mut families = series.collect();
        families.extend(suppressed.collect());
        families
    }
}
