//! `tokengate_sockmap_*` series, read from the kernel's counters at every
//! scrape. They exist at zero when the fast path is off, so a dashboard or a
//! benchmark can compare both settings with one query.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::Sockmap;
use crate::metrics::{MetricsError, NAMESPACE};

/// `path` label of messages moved by `sk_msg` to the peer socket.
const PATH_REDIRECTED: &str = "redirected";

/// `path` label of messages left to the TCP/IP stack.
const PATH_PASSED: &str = "passed";

/// `reason` label of sockhash updates rejected because the map was full.
const REASON_MAP_FULL: &str = "map_full";

/// `reason` label of sockhash updates rejected for another reason.
const REASON_OTHER: &str = "other";

/// Registers the collector for `sockmap` (`None` when the fast path is off).
pub(super) fn register(
    registry: &Registry,
    sockmap: Option<Arc<Sockmap>>,
) -> Result<(), MetricsError> {
    registry
        .register(Box::new(SockmapCollector::new(sockmap)))
        .map_err(|source| MetricsError::Register {
            name: "sockmap_*",
            source,
        })
}

struct SockmapCollector {
    sockmap: Option<Arc<Sockmap>>,
    /// Scratch series rebuilt under the lock at every scrape.
    series: Mutex<Series>,
    descs: Vec<Desc>,
}

struct Series {
    enabled: IntGauge,
    messages: IntCounterVec,
    bytes: IntCounterVec,
    sockets_added: IntCounter,
    update_errors: IntCounterVec,
    sockets: IntGauge,
    pods: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

impl SockmapCollector {
    fn new(sockmap: Option<Arc<Sockmap>>) -> Self {
        let series = Series {
            enabled: IntGauge::with_opts(opts(
                "sockmap_enabled",
                "1 when the sockmap fast path is attached, 0 when it is off or failed to start.",
            ))
            .expect("static metric options are valid"),
            messages: IntCounterVec::new(
                opts(
                    "sockmap_messages_total",
                    "Messages sent on the agent's sockets to services and on the services' \
                     sockets back, by path: redirected by sk_msg to the peer socket, or passed \
                     to the TCP/IP stack.",
                ),
                &["path"],
            )
            .expect("static metric options are valid"),
            bytes: IntCounterVec::new(
                opts(
                    "sockmap_bytes_total",
                    "Payload bytes of those messages, by path (redirected, passed).",
                ),
                &["path"],
            )
            .expect("static metric options are valid"),
            sockets_added: IntCounter::with_opts(opts(
                "sockmap_sockets_added_total",
                "Sockets added to the sockhash: two per agent-to-service connection.",
            ))
            .expect("static metric options are valid"),
            update_errors: IntCounterVec::new(
                opts(
                    "sockmap_update_errors_total",
                    "Sockets the sock_ops program failed to add to the sockhash, by reason \
                     (map_full, other); their connections use the TCP/IP stack.",
                ),
                &["reason"],
            )
            .expect("static metric options are valid"),
            sockets: IntGauge::with_opts(opts("sockmap_sockets", "Sockets in the sockhash now."))
                .expect("static metric options are valid"),
            pods: IntGauge::with_opts(opts(
                "sockmap_pods",
                "Pod network namespaces registered for the fast path.",
            ))
            .expect("static metric options are valid"),
        };
        let descs = [
            series.enabled.desc(),
            series.messages.desc(),
            series.bytes.desc(),
            series.sockets_added.desc(),
            series.update_errors.desc(),
            series.sockets.desc(),
            series.pods.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();

        Self {
            sockmap,
            series: Mutex::new(series),
            descs,
        }
    }
}

impl Collector for SockmapCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.messages.reset();
        series.bytes.reset();
        series.update_errors.reset();
        series.sockets_added.reset();

        let mut counters = super::SockmapCounters::default();
        let mut sockets = 0;
        let mut pods = 0;
        if let Some(sockmap) = &self.sockmap {
            match sockmap.counters() {
                Ok(read) => counters = read,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "failed to read sockmap counters"
                    );
                }
            }
            sockets = sockmap.socket_count();
            pods = sockmap.pod_count();
        }

        series.enabled.set(i64::from(self.sockmap.is_some()));
        let set = |vec: &IntCounterVec, label: &str, value: u64| {
            vec.with_label_values(&[label]).inc_by(value);
        };
        set(
            &series.messages,
            PATH_REDIRECTED,
            counters.messages_redirected,
        );
        set(&series.messages, PATH_PASSED, counters.messages_passed);
        set(&series.bytes, PATH_REDIRECTED, counters.bytes_redirected);
        set(&series.bytes, PATH_PASSED, counters.bytes_passed);
        set(&series.update_errors, REASON_MAP_FULL, counters.map_full);
        set(&series.update_errors, REASON_OTHER, counters.update_failed);
        series.sockets_added.inc_by(counters.sockets_added);
        series
            .sockets
            .set(i64::try_from(sockets).unwrap_or(i64::MAX));
        series.pods.set(i64::try_from(pods).unwrap_or(i64::MAX));

        let mut families = series.enabled.collect();
        families.extend(series.messages.collect());
        families.extend(series.bytes.collect());
        families.extend(series.sockets_added.collect());
        families.extend(series.update_errors.collect());
        families.extend(series.sockets.collect());
        families.extend(series.pods.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};

    use super::*;

    #[test]
    fn series_at_zero_when_off() {
        let registry = Registry::new();
        register(&registry, None).unwrap();

        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();

        assert!(text.contains("tokengate_sockmap_enabled 0"), "{text}");
        assert!(
            text.contains("tokengate_sockmap_messages_total{path=\"redirected\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_sockmap_bytes_total{path=\"passed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_sockmap_update_errors_total{reason=\"map_full\"} 0"),
            "{text}"
        );
        assert!(text.contains("tokengate_sockmap_sockets 0"), "{text}");
    }
}
