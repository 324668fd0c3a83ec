//! SVG plots of a benchmark document: throughput as a share of the direct
//! path, latency percentiles on a log scale, and memory per idle
//! connection. They read only the JSON document, so `--plot FILE` redraws
//! them from an earlier run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// Width of every plot, in pixels.
const WIDTH: f64 = 860.0;

/// Width of the scenario-name column on the left.
const LABEL_WIDTH: f64 = 190.0;

/// Width of the value column on the right.
const VALUE_WIDTH: f64 = 250.0;

/// Height of one scenario's row.
const ROW_HEIGHT: f64 = 26.0;

/// Space above the rows for the title and below them for the axis.
const TOP: f64 = 48.0;
const BOTTOM: f64 = 40.0;

/// Colours: the agent, the sidecars, the direct path, and the target line.
const AGENT_COLOUR: &str = "#1f77b4";
const SIDECAR_COLOUR: &str = "#ff7f0e";
const DIRECT_COLOUR: &str = "#7f7f7f";
const TARGET_COLOUR: &str = "#d62728";

/// Memory target per idle keep-alive connection, in KiB.
const IDLE_TARGET_KIB: f64 = 16.0;

/// Writes the plots of `document` into `target/bench/` and returns their
/// paths. With `docs` also copies them to `docs/bench/`, where
/// `docs/benchmarks.md` links them.
pub fn write_all(root: &Path, document: &Value, docs: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = vec![root.join("target/bench")];
    if docs {
        dirs.push(root.join("docs/bench"));
    }
    let plots = [
        ("throughput.svg", throughput(document)),
        ("latency.svg", latency(document)),
        ("idle-memory.svg", idle_memory(document)),
    ];
    let mut written = Vec::new();
    for dir in &dirs {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        for (name, svg) in &plots {
            let Some(svg) = svg else { continue };
            let path = dir.join(name);
            std::fs::write(&path, svg)
                .with_context(|| format!("failed to write {}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Returns the colour of a scenario's bars.
fn colour(scenario: &str) -> &'static str {
    if scenario == "direct" {
        DIRECT_COLOUR
    } else if scenario.starts_with("tokengate") {
        AGENT_COLOUR
    } else {
        SIDECAR_COLOUR
    }
}

fn summaries(document: &Value) -> Vec<&Value> {
    document["summaries"]
        .as_array()
        .map(|list| list.iter().collect())
        .unwrap_or_default()
}

fn number(value: &Value, name: &str) -> Option<f64> {
    value[name].as_f64()
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Opens an SVG of `rows` rows with a title and a subtitle.
fn open(rows: usize, title: &str, subtitle: &str) -> (String, f64) {
    #[expect(clippy::cast_precision_loss, reason = "a handful of rows")]
    let height = TOP + rows as f64 * ROW_HEIGHT + BOTTOM;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="15" font-weight="bold">{}</text><text x="10" y="37" fill="#555">{}</text>"##,
        escape(title),
        escape(subtitle)
    );
    (svg, height)
}

/// Returns the y of the top of row `index`.
fn row_top(index: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a handful of rows")]
    let index = index as f64;
    TOP + index * ROW_HEIGHT
}

/// Writes the scenario name left of row `index`.
fn row_label(svg: &mut String, index: usize, name: &str) {
    let y = row_top(index) + ROW_HEIGHT * 0.65;
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{y:.1}" text-anchor="end">{}</text>"#,
        LABEL_WIDTH - 8.0,
        escape(name)
    );
}

/// Throughput of each scenario as a share of direct, as bars on a linear
/// axis from 0 to the largest share, with req/s and the ratio to nginx+njs
/// written beside each bar.
fn throughput(document: &Value) -> Option<String> {
    let rows = summaries(document);
    let direct = rows
        .iter()
        .find(|row| row["scenario"] == "direct")
        .and_then(|row| number(row, "requests_per_second"))?;
    let shares: Vec<f64> = rows
        .iter()
        .map(|row| number(row, "requests_per_second").unwrap_or(0.0) / direct)
        .collect();
    let max_share = shares.iter().copied().fold(1.0_f64, f64::max);
    let plot_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let x = |share: f64| LABEL_WIDTH + share / max_share * plot_width;

    let (mut svg, height) = open(
        rows.len(),
        "Throughput as a share of the direct path (higher is better)",
        "bars: requests/s ÷ direct; text: requests/s, ratio to nginx+njs; mean over rounds, range in whiskers",
    );
    for (index, (row, share)) in rows.iter().zip(&shares).enumerate() {
        let name = row["scenario"].as_str().unwrap_or("?");
        row_label(&mut svg, index, name);
        let top = row_top(index) + 5.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{LABEL_WIDTH}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
            x(*share) - LABEL_WIDTH,
            ROW_HEIGHT - 10.0,
            colour(name)
        );
        if let (Some(low), Some(high)) = (
            number(row, "requests_per_second_min"),
            number(row, "requests_per_second_max"),
        ) {
            let middle = top + (ROW_HEIGHT - 10.0) / 2.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{middle:.1}" y2="{middle:.1}" stroke="black"/>"#,
                x(low / direct),
                x(high / direct)
            );
        }
        let njs = row["ratio_to_nginx_njs"]["requests_per_second"].as_f64();
        let text = format!(
            "{:.0} req/s · {share:.2}× direct{}",
            number(row, "requests_per_second").unwrap_or(0.0),
            njs.map(|ratio| format!(" · {ratio:.1}× njs"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            WIDTH - VALUE_WIDTH + 6.0,
            row_top(index) + ROW_HEIGHT * 0.65,
            escape(&text)
        );
    }
    axis(&mut svg, height, &[0.0, 0.25, 0.5, 0.75, 1.0], |share| {
        (share <= max_share).then(|| (x(share), format!("{share}×")))
    });
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Latency percentiles of each scenario on a log axis: a line from p50 to
/// p99 with a dot at p50 and ticks at p90 and p99.
fn latency(document: &Value) -> Option<String> {
    let rows = summaries(document);
    if rows.is_empty() {
        return None;
    }
    let values: Vec<[f64; 3]> = rows
        .iter()
        .map(|row| {
            ["p50_us", "p90_us", "p99_us"].map(|name| number(row, name).unwrap_or(1.0) / 1e3)
        })
        .collect();
    let low = values
        .iter()
        .map(|v| v[0])
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let high = values.iter().map(|v| v[2]).fold(0.0_f64, f64::max);
    let (log_low, log_high) = (
        low.log10().floor(),
        high.log10().ceil().max(low.log10().floor() + 1.0),
    );
    let plot_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let x = |ms: f64| {
        LABEL_WIDTH + (ms.max(1e-3).log10() - log_low) / (log_high - log_low) * plot_width
    };

    let (mut svg, height) = open(
        rows.len(),
        "Latency per scenario, log scale (lower is better)",
        "dot: p50; bar: p50 to p99 with a tick at p90; text in milliseconds; mean over rounds",
    );
    for (index, (row, [p50, p90, p99])) in rows.iter().zip(&values).enumerate() {
        let name = row["scenario"].as_str().unwrap_or("?");
        row_label(&mut svg, index, name);
        let middle = row_top(index) + ROW_HEIGHT / 2.0;
        let fill = colour(name);
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="8" fill="{fill}" opacity="0.45"/>"#,
            x(*p50),
            middle - 4.0,
            (x(*p99) - x(*p50)).max(1.0)
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="{fill}" stroke-width="2"/><line x1="{3:.1}" x2="{3:.1}" y1="{1:.1}" y2="{2:.1}" stroke="{fill}" stroke-width="2"/><circle cx="{4:.1}" cy="{5:.1}" r="5" fill="{fill}"/>"#,
            x(*p90),
            middle - 7.0,
            middle + 7.0,
            x(*p99),
            x(*p50),
            middle
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">p50 {p50:.2} · p90 {p90:.2} · p99 {p99:.2}</text>"#,
            WIDTH - VALUE_WIDTH + 6.0,
            row_top(index) + ROW_HEIGHT * 0.65
        );
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "decades of a latency axis are small integers"
    )]
    let decades: Vec<f64> = ((log_low as i32)..=(log_high as i32))
        .map(|power| 10_f64.powi(power))
        .collect();
    axis(&mut svg, height, &decades, |ms| {
        (ms <= 10_f64.powf(log_high) && ms >= 10_f64.powf(log_low))
            .then(|| (x(ms), format!("{ms} ms")))
    });
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Memory per idle keep-alive connection of each proxy, with the target
/// as a line.
fn idle_memory(document: &Value) -> Option<String> {
    let rows: Vec<&Value> = document["idle_connections"].as_array()?.iter().collect();
    if rows.is_empty() {
        return None;
    }
    let per_connection: Vec<f64> = rows
        .iter()
        .map(|row| number(row, "kib_per_connection").unwrap_or(0.0))
        .collect();
    let max = per_connection
        .iter()
        .copied()
        .fold(IDLE_TARGET_KIB * 1.25, f64::max);
    let plot_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let x = |kib: f64| LABEL_WIDTH + kib / max * plot_width;
    let count = rows[0]["connections"].as_u64().unwrap_or(0);

    let (mut svg, height) = open(
        rows.len(),
        "Memory per idle keep-alive connection (lower is better)",
        &format!(
            "RSS growth ÷ {count} idle connections after one request each; red line: 16 KiB target"
        ),
    );
    for (index, (row, kib)) in rows.iter().zip(&per_connection).enumerate() {
        let name = row["proxy"].as_str().unwrap_or("?");
        row_label(&mut svg, index, name);
        let _ = writeln!(
            svg,
            r#"<rect x="{LABEL_WIDTH}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
            row_top(index) + 5.0,
            x(*kib) - LABEL_WIDTH,
            ROW_HEIGHT - 10.0,
            colour(name)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{kib:.1} KiB per connection</text>"#,
            WIDTH - VALUE_WIDTH + 6.0,
            row_top(index) + ROW_HEIGHT * 0.65
        );
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="{TARGET_COLOUR}" stroke-width="2" stroke-dasharray="5,3"/>"#,
        x(IDLE_TARGET_KIB),
        TOP - 4.0,
        height - BOTTOM + 4.0
    );
    axis(
        &mut svg,
        height,
        &[0.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0],
        |kib| (kib <= max).then(|| (x(kib), format!("{kib}"))),
    );
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Draws the x axis at the bottom with grid lines at `ticks`. `place`
/// returns the x and the label of a tick, or `None` to leave it out.
fn axis(
    svg: &mut String,
    height: f64,
    ticks: &[f64],
    place: impl Fn(f64) -> Option<(f64, String)>,
) {
    let bottom = height - BOTTOM;
    let _ = writeln!(
        svg,
        r##"<line x1="{LABEL_WIDTH}" x2="{:.1}" y1="{bottom:.1}" y2="{bottom:.1}" stroke="#333"/>"##,
        WIDTH - VALUE_WIDTH
    );
    for tick in ticks {
        let Some((x, label)) = place(*tick) else {
            continue;
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP:.1}" y2="{bottom:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
            bottom + 16.0,
            escape(&label)
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn document() -> Value {
        json!({
            "summaries": [
                {"scenario": "direct", "requests_per_second": 60000.0,
                 "requests_per_second_min": 58000.0, "requests_per_second_max": 62000.0,
                 "p50_us": 350.0, "p90_us": 420.0, "p99_us": 900.0,
                 "ratio_to_nginx_njs": {"requests_per_second": 14.0}},
                {"scenario": "tokengate-rs256-hit", "requests_per_second": 45000.0,
                 "p50_us": 700.0, "p90_us": 900.0, "p99_us": 2500.0,
                 "ratio_to_nginx_njs": {"requests_per_second": 10.5}},
                {"scenario": "nginx-njs", "requests_per_second": 4300.0,
                 "p50_us": 5500.0, "p90_us": 10000.0, "p99_us": 14000.0,
                 "ratio_to_nginx_njs": {"requests_per_second": 1.0}},
            ],
            "idle_connections": [
                {"proxy": "tokengate", "connections": 9000, "kib_per_connection": 12.5},
            ],
        })
    }

    #[test]
    fn throughput_bars_scaled_to_direct() {
        let svg = throughput(&document()).expect("direct is present");

        assert!(
            svg.contains("45000 req/s · 0.75× direct · 10.5× njs"),
            "{svg}"
        );
        assert_eq!(svg.matches("<rect x=\"190\"").count(), 3);
    }

    #[test]
    fn throughput_needs_direct() {
        let mut document = document();
        document["summaries"]
            .as_array_mut()
            .expect("array")
            .remove(0);

        assert!(throughput(&document).is_none());
    }

    #[test]
    fn latency_axis_spans_every_percentile() {
        let svg = latency(&document()).expect("rows");

        assert!(svg.contains("p50 0.70 · p90 0.90 · p99 2.50"), "{svg}");
        assert!(svg.contains(">0.1 ms<"), "{svg}");
        assert!(svg.contains(">100 ms<"), "{svg}");
    }

    #[test]
    fn idle_plot_marks_target() {
        let svg = idle_memory(&document()).expect("rows");

        assert!(svg.contains("12.5 KiB per connection"));
        assert!(svg.contains(TARGET_COLOUR));
    }

    #[test]
    fn text_escaped() {
        assert_eq!(escape("a<b&c>"), "a&lt;b&amp;c&gt;");
    }
}
