//! Summaries of the measured runs: a table on standard output and a JSON
//! document under `target/bench/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

use crate::bench::idle::IdleMemory;
use crate::bench::wrk::WrkResult;

/// A scenario that did not run, and why.
pub type Unavailable = (String, String);

/// The idle-connection measurement of one proxy.
pub type IdleResult = (String, IdleMemory);

/// One measured run of one scenario.
#[derive(Clone, Debug)]
pub struct Run {
    pub scenario: String,
    pub round: u32,
    pub wrk: WrkResult,
    /// CPU seconds of the proxy per 10,000 requests; `None` for direct.
    pub cpu_seconds_per_10k: Option<f64>,
    /// Peak resident set size of the proxy during the run, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Agent token-cache hits and misses during the run.
    pub cache: Option<(u64, u64)>,
}

/// The runs of one scenario, averaged over rounds.
#[derive(Clone, Debug)]
pub struct Summary {
    pub scenario: String,
    pub requests_per_second: f64,
    /// Lowest and highest requests/s over the rounds: the spread.
    pub requests_per_second_range: (f64, f64),
    /// Lowest and highest p50 over the rounds.
    pub p50_us_range: (f64, f64),
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub cpu_seconds_per_10k: Option<f64>,
    /// The largest peak over the rounds.
    pub peak_rss_kib: Option<u64>,
    /// Non-2xx responses and socket errors over all rounds.
    pub errors: u64,
    /// Share of cache hits among the agent's lookups.
    pub cache_hit_ratio: Option<f64>,
    pub rounds: usize,
}

/// Averages the runs of each scenario, in the order the scenarios first ran.
pub fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        if !names.contains(&run.scenario.as_str()) {
            names.push(&run.scenario);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mine: Vec<&Run> = runs.iter().filter(|run| run.scenario == name).collect();
            summarize_one(name, &mine)
        })
        .collect()
}

#[expect(
    clippy::cast_precision_loss,
    reason = "round and request counts are far below 2^52"
)]
fn summarize_one(name: &str, runs: &[&Run]) -> Summary {
    let count = runs.len() as f64;
    let mean = |value: fn(&Run) -> f64| runs.iter().map(|run| value(run)).sum::<f64>() / count;
    let range = |value: fn(&Run) -> f64| {
        runs.iter()
            .map(|run| value(run))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), x| {
                (low.min(x), high.max(x))
            })
    };
    let cpu: Vec<f64> = runs
        .iter()
        .filter_map(|run| run.cpu_seconds_per_10k)
        .collect();
    let (hits, misses) = runs
        .iter()
        .filter_map(|run| run.cache)
        .fold((0, 0), |(h, m), (hit, miss)| (h + hit, m + miss));

    Summary {
        scenario: name.to_owned(),
        requests_per_second: mean(|run| run.wrk.requests_per_second),
        requests_per_second_range: range(|run| run.wrk.requests_per_second),
        p50_us_range: range(|run| run.wrk.p50_us),
        p50_us: mean(|run| run.wrk.p50_us),
        p90_us: mean(|run| run.wrk.p90_us),
        p99_us: mean(|run| run.wrk.p99_us),
        cpu_seconds_per_10k: (!cpu.is_empty()).then(|| cpu.iter().sum::<f64>() / cpu.len() as f64),
        peak_rss_kib: runs.iter().filter_map(|run| run.peak_rss_kib).max(),
        errors: runs
            .iter()
            .map(|run| run.wrk.non_success + run.wrk.socket_errors)
            .sum(),
        cache_hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        rounds: runs.len(),
    }
}

/// Returns `value / base` when both exist and `base` is not zero.
fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(value), Some(base)) if base != 0.0 => Some(value / base),
        _ => None,
    }
}

/// Lists the figures of a summary that get ratios, by name.
#[expect(clippy::cast_precision_loss, reason = "RSS in KiB is far below 2^52")]
fn figures(summary: &Summary) -> [(&'static str, Option<f64>); 6] {
    [
        ("requests_per_second", Some(summary.requests_per_second)),
        ("p50_us", Some(summary.p50_us)),
        ("p90_us", Some(summary.p90_us)),
        ("p99_us", Some(summary.p99_us)),
        ("cpu_seconds_per_10k", summary.cpu_seconds_per_10k),
        ("peak_rss_kib", summary.peak_rss_kib.map(|kib| kib as f64)),
    ]
}

fn find<'a>(summaries: &'a [Summary], name: &str) -> Option<&'a Summary> {
    summaries.iter().find(|summary| summary.scenario == name)
}

fn cell(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.precision$}"))
}

/// Renders the tables: absolute figures with the spread over rounds,
/// ratios to direct and to nginx+njs, and the idle-connection memory.
pub fn table(summaries: &[Summary], unavailable: &[Unavailable], idle: &[IdleResult]) -> String {
    let direct = find(summaries, "direct");
    let njs = find(summaries, "nginx-njs");
    let mut text = String::new();

    let _ = writeln!(
        text,
        "{:<22} {:>10} {:>15} {:>9} {:>9} {:>9} {:>11} {:>9} {:>7} {:>6}",
        "scenario",
        "req/s",
        "req/s range",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU s/10k",
        "RSS MiB",
        "errors",
        "hit %"
    );
    for summary in summaries {
        #[expect(clippy::cast_precision_loss, reason = "RSS in KiB is far below 2^52")]
        let rss = summary.peak_rss_kib.map(|kib| kib as f64 / 1024.0);
        let (low, high) = summary.requests_per_second_range;
        let _ = writeln!(
            text,
            "{:<22} {:>10.0} {:>15} {:>9.3} {:>9.3} {:>9.3} {:>11} {:>9} {:>7} {:>6}",
            summary.scenario,
            summary.requests_per_second,
            format!("{low:.0}-{high:.0}"),
            summary.p50_us / 1e3,
            summary.p90_us / 1e3,
            summary.p99_us / 1e3,
            cell(summary.cpu_seconds_per_10k, 3),
            cell(rss, 1),
            summary.errors,
            cell(summary.cache_hit_ratio.map(|ratio| ratio * 100.0), 1),
        );
    }
    for (name, reason) in unavailable {
        let _ = writeln!(text, "{name:<22} not run: {reason}");
    }

    let _ = writeln!(
        text,
        "\n{:<22} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "ratio", "req/s /dir", "req/s /njs", "p50 /dir", "p50 /njs", "CPU /njs", "RSS /njs"
    );
    for summary in summaries {
        let mine = figures(summary);
        let of = |base: Option<&Summary>, index: usize| {
            ratio(mine[index].1, base.and_then(|base| figures(base)[index].1))
        };
        let _ = writeln!(
            text,
            "{:<22} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
            summary.scenario,
            cell(of(direct, 0), 3),
            cell(of(njs, 0), 2),
            cell(of(direct, 1), 2),
            cell(of(njs, 1), 3),
            cell(of(njs, 4), 3),
            cell(of(njs, 5), 2),
        );
    }

    if !idle.is_empty() {
        let _ = writeln!(
            text,
            "\n{:<22} {:>11} {:>13} {:>13} {:>13}",
            "idle connections", "count", "RSS before", "RSS idle", "KiB per conn"
        );
        for (name, memory) in idle {
            let _ = writeln!(
                text,
                "{name:<22} {:>11} {:>10} KiB {:>9} KiB {:>13.2}",
                memory.connections,
                memory.rss_before_kib,
                memory.rss_idle_kib,
                memory.kib_per_connection(),
            );
        }
    }
    text
}

/// Builds the JSON document: settings, machine, every run, and each
/// summary with its ratios to direct and to nginx+njs.
pub fn document(
    settings: &Value,
    machine: &Value,
    runs: &[Run],
    summaries: &[Summary],
    unavailable: &[Unavailable],
    idle: &[IdleResult],
) -> Value {
    let direct = find(summaries, "direct");
    let njs = find(summaries, "nginx-njs");
    let ratios_to = |summary: &Summary, base: Option<&Summary>| -> Value {
        let mine = figures(summary);
        let Some(base) = base else {
            return Value::Null;
        };
        let theirs = figures(base);
        let mut object = serde_json::Map::new();
        for ((name, value), (_, base_value)) in mine.iter().zip(theirs.iter()) {
            object.insert((*name).to_owned(), json!(ratio(*value, *base_value)));
        }
        Value::Object(object)
    };

    json!({
        "settings": settings,
        "machine": machine,
        "not_available": unavailable
            .iter()
            .map(|(name, reason)| json!({ "scenario": name, "reason": reason }))
            .collect::<Vec<_>>(),
        "idle_connections": idle.iter().map(|(name, memory)| json!({
            "proxy": name,
            "connections": memory.connections,
            "rss_before_kib": memory.rss_before_kib,
            "rss_idle_kib": memory.rss_idle_kib,
            "kib_per_connection": memory.kib_per_connection(),
            "open_seconds": memory.open_seconds,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(|run| json!({
            "scenario": run.scenario,
            "round": run.round,
            "requests": run.wrk.requests,
            "seconds": run.wrk.seconds,
            "requests_per_second": run.wrk.requests_per_second,
            "p50_us": run.wrk.p50_us,
            "p90_us": run.wrk.p90_us,
            "p99_us": run.wrk.p99_us,
            "non_success_responses": run.wrk.non_success,
            "socket_errors": run.wrk.socket_errors,
            "cpu_seconds_per_10k": run.cpu_seconds_per_10k,
            "peak_rss_kib": run.peak_rss_kib,
            "cache_hits": run.cache.map(|(hits, _)| hits),
            "cache_misses": run.cache.map(|(_, misses)| misses),
        })).collect::<Vec<_>>(),
        "summaries": summaries.iter().map(|summary| json!({
            "scenario": summary.scenario,
            "rounds": summary.rounds,
            "requests_per_second": summary.requests_per_second,
            "requests_per_second_min": summary.requests_per_second_range.0,
            "requests_per_second_max": summary.requests_per_second_range.1,
            "p50_us": summary.p50_us,
            "p50_us_min": summary.p50_us_range.0,
            "p50_us_max": summary.p50_us_range.1,
            "p90_us": summary.p90_us,
            "p99_us": summary.p99_us,
            "cpu_seconds_per_10k": summary.cpu_seconds_per_10k,
            "peak_rss_kib": summary.peak_rss_kib,
            "errors": summary.errors,
            "cache_hit_ratio": summary.cache_hit_ratio,
            "ratio_to_direct": ratios_to(summary, direct),
            "ratio_to_nginx_njs": ratios_to(summary, njs),
        })).collect::<Vec<_>>(),
    })
}

/// Writes `document` to `target/bench/bench-UNIXTIME.json` and
/// `target/bench/latest.json`, and returns the first path.
pub fn write(root: &Path, unix_time: u64, document: &Value) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(document)?;
    let path = dir.join(format!("bench-{unix_time}.json"));
    for target in [&path, &dir.join("latest.json")] {
        std::fs::write(target, &text)
            .with_context(|| format!("failed to write {}", target.display()))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, round: u32, requests_per_second: f64, p50_us: f64) -> Run {
        Run {
            scenario: scenario.to_owned(),
            round,
            wrk: WrkResult {
                requests_per_second,
                p50_us,
                ..WrkResult::default()
            },
            cpu_seconds_per_10k: None,
            peak_rss_kib: None,
            cache: None,
        }
    }

    #[test]
    fn summary_has_mean_and_spread() {
        let runs = [
            run("direct", 1, 60_000.0, 300.0),
            run("nginx-njs", 1, 4_000.0, 5_000.0),
            run("direct", 2, 70_000.0, 320.0),
        ];

        let summaries = summarize(&runs);

        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[0].scenario, "direct");
        assert!((summaries[0].requests_per_second - 65_000.0).abs() < 1e-9);
        assert_eq!(summaries[0].requests_per_second_range, (60_000.0, 70_000.0));
        assert_eq!(summaries[0].p50_us_range, (300.0, 320.0));
        assert_eq!(summaries[0].rounds, 2);
    }

    #[test]
    fn document_has_ratios_to_njs() {
        let runs = [
            run("direct", 1, 60_000.0, 300.0),
            run("nginx-njs", 1, 4_000.0, 5_000.0),
        ];
        let summaries = summarize(&runs);
        let unavailable = vec![("apache-openidc".to_owned(), "not installed".to_owned())];

        let document = document(&json!({}), &json!({}), &runs, &summaries, &unavailable, &[]);

        let direct = &document["summaries"][0];
        assert_eq!(direct["ratio_to_nginx_njs"]["requests_per_second"], 15.0);
        assert_eq!(direct["ratio_to_direct"]["p50_us"], 1.0);
        assert_eq!(document["not_available"][0]["reason"], "not installed");
    }
}
