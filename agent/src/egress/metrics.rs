//! Egress series: the agent's accepts per pod, the programs' per-CPU
//! counters and the fill of the original-destination maps, read at scrape.

use std::sync::{Arc, Mutex, PoisonError};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::Ebpf;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokengate_common::egress::{
    FlowKey, Origin, COUNTER_AGENT_SKIPPED, COUNTER_MAP_ERRORS, COUNTER_PASSED, COUNTER_RECORDED,
    COUNTER_REJECTED, COUNTER_STEERED, MAP_COUNTERS, MAP_PENDING,
};

use super::maps::{take, EgressMaps};

/// Prefix of every series, as in the rest of the agent.
const NAMESPACE: &str = "tokengate";

/// Label values of the kernel counters, by counter slot.
const KERNEL_EVENTS: [(u32, &str); 6] = [
    (COUNTER_STEERED, "steered"),
    (COUNTER_PASSED, "passed"),
    (COUNTER_AGENT_SKIPPED, "agent_skipped"),
    (COUNTER_REJECTED, "rejected"),
    (COUNTER_RECORDED, "recorded"),
    (COUNTER_MAP_ERRORS, "map_error"),
];

/// Handle on the egress series; clones share them.
#[derive(Clone)]
pub(super) struct EgressMetrics {
    accepts: IntCounterVec,
}

impl EgressMetrics {
    /// Registers the series on `registry`; the collector keeps the counter
    /// and pending maps, taken out of `ebpf`, and shares the flow map.
    pub(super) fn register(
        registry: &Registry,
        ebpf: &mut Ebpf,
        maps: &EgressMaps,
    ) -> Result<Self, prometheus::Error> {
        let accepts = IntCounterVec::new(
            Opts::new(
                "egress_connections_total",
                "Connections accepted on egress listeners, by pod and result \
                 (forwarded: original destination found; no_origin: none recorded, closed).",
            )
            .namespace(NAMESPACE),
            &["pod", "result"],
        )?;
        registry.register(Box::new(accepts.clone()))?;

        let counters = take(ebpf, MAP_COUNTERS).map_err(|error| {
            prometheus::Error::Msg(format!("egress counter map unavailable: {error}"))
        })?;
        let pending = take(ebpf, MAP_PENDING).map_err(|error| {
            prometheus::Error::Msg(format!("egress pending map unavailable: {error}"))
        })?;
        let collector = KernelCollector::new(counters, pending, maps.flows());
        registry.register(Box::new(collector))?;
        Ok(Self { accepts })
    }

    /// Creates the pod's series at 0, so that dashboards see them at once.
    pub(super) fn register_pod(&self, pod: &str) {
        for result in ["forwarded", "no_origin"] {
            self.accepts.with_label_values(&[pod, result]);
        }
    }

    pub(super) fn count_accept(&self, pod: &str, found: bool) {
        let result = if found { "forwarded" } else { "no_origin" };
        self.accepts.with_label_values(&[pod, result]).inc();
    }
}

/// Reads the programs' counters and the map fill levels at scrape time.
struct KernelCollector {
    counters: PerCpuArray<MapData, u64>,
    pending: BpfHashMap<MapData, u64, Origin>,
    flows: Arc<Mutex<BpfHashMap<MapData, FlowKey, Origin>>>,
    /// Scratch series rebuilt under the lock at every scrape.
    series: Mutex<(IntCounterVec, IntGaugeVec)>,
    descs: Vec<Desc>,
}

impl KernelCollector {
    fn new(
        counters: PerCpuArray<MapData, u64>,
        pending: BpfHashMap<MapData, u64, Origin>,
        flows: Arc<Mutex<BpfHashMap<MapData, FlowKey, Origin>>>,
    ) -> Self {
        let events = IntCounterVec::new(
            Opts::new(
                "egress_kernel_events_total",
                "Events of the egress programs, node-wide: connections steered, passed, \
                 skipped as the agent's own (agent_skipped), rejected, origins recorded, map errors.",
            )
            .namespace(NAMESPACE),
            &["event"],
        )
        .expect("static metric options are valid");
        let entries = IntGaugeVec::new(
            Opts::new(
                "egress_map_entries",
                "Entries in the egress original-destination maps: pending (connect seen, not \
                 yet established) and flows (established, not yet accepted by the agent).",
            )
            .namespace(NAMESPACE),
            &["map"],
        )
        .expect("static metric options are valid");
        let mut descs: Vec<Desc> = events.desc().into_iter().cloned().collect();
        descs.extend(entries.desc().into_iter().cloned());
        Self {
            counters,
            pending,
            flows,
            series: Mutex::new((events, entries)),
            descs,
        }
    }
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let (events, entries) = &*series;
        events.reset();
        for (slot, label) in KERNEL_EVENTS {
            let total = self
                .counters
                .get(&slot, 0)
                .map_or(0, |values| values.iter().sum::<u64>());
            events.with_label_values(&[label]).inc_by(total);
        }

        let pending = self.pending.keys().flatten().count();
        let flows = self
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .flatten()
            .count();
        entries
            .with_label_values(&["pending"])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        entries
            .with_label_values(&["flows"])
            .set(i64::try_from(flows).unwrap_or(i64::MAX));

        let mut families = events.collect();
        families.extend(entries.collect());
        families
    }
}
