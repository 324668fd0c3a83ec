//! A parser for the Prometheus text exposition format, enough to read the
//! agent's `/metrics` in tests.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

/// One sample line: a series and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Returns whether every `(name, value)` pair is among this sample's
    /// labels.
    pub fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(name, value)| self.labels.get(*name).is_some_and(|actual| actual == value))
    }
}

/// Parses every sample line; comment lines (`# HELP`, `# TYPE`) and blank
/// lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_line(line).with_context(|| format!("invalid metrics line {line:?}")))
        .collect()
}

/// Sum of the values of every series named `name` that carries all the
/// given labels; 0 when there is none.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name && sample.has_labels(labels))
        .map(|sample| sample.value)
        .sum()
}

/// [`sum`] of counter series as an integer: counters only count whole
/// events. Returns `None` for a negative or non-finite total.
pub fn count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let total = sum(samples, name, labels);
    if !total.is_finite() || total < 0.0 {
        return None;
    }
    #[expect(
        clippy::cast_sign_loss,
        reason = "the total is finite and not negative"
    )]
    Some(total.round() as u64)
}

/// Returns whether any series named `name` has all the given labels.
pub fn contains(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> bool {
    samples
        .iter()
        .any(|sample| sample.name == name && sample.has_labels(labels))
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .context("no value after the metric name")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];

    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remainder;
    }

    // An optional timestamp may follow the value.
    let value_text = rest.split_whitespace().next().context("missing value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        text => text
            .parse()
            .with_context(|| format!("invalid value {text:?}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `name="value",...}` and returns the labels and the text after the
/// closing brace. Values may contain the escapes `\\`, `\"` and `\n`.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after_name) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after_name.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => bail!("label value ends inside an escape"),
                },
                Some((index, '"')) => break index,
                Some((_, other)) => value.push(other),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(name.trim().trim_start_matches(',').trim().to_owned(), value);
        rest = after_name[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP tokengate_decisions_total Decisions.
# TYPE tokengate_decisions_total counter
tokengate_decisions_total{workload="orders",decision="deny",reason="missing_token"} 3
tokengate_decisions_total{workload="orders",decision="allow",reason="allowed"} 2
tokengate_verification_duration_seconds_bucket{issuer="a \"b\"",result="ok",le="+Inf"} 5
process_start_time_seconds 1.7e9 1700000000000
"#;

    #[test]
    fn parses_labels_values_and_escapes() {
        let samples = parse(TEXT).expect("parse");

        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].labels["reason"], "missing_token");
        assert_eq!(samples[2].labels["issuer"], "a \"b\"");
        assert!((samples[3].value - 1.7e9).abs() < 1.0);
    }

    #[test]
    fn sums_matching_series() {
        let samples = parse(TEXT).expect("parse");

        let orders = sum(
            &samples,
            "tokengate_decisions_total",
            &[("workload", "orders")],
        );
        let denied = sum(
            &samples,
            "tokengate_decisions_total",
            &[("decision", "deny")],
        );

        assert!((orders - 5.0).abs() < f64::EPSILON);
        assert!((denied - 3.0).abs() < f64::EPSILON);
        assert!(!contains(
            &samples,
            "tokengate_decisions_total",
            &[("workload", "other")]
        ));
        assert_eq!(
            count(
                &samples,
                "tokengate_decisions_total",
                &[("decision", "allow")]
            ),
            Some(2)
        );
    }

    #[test]
    fn rejects_unterminated_labels() {
        assert!(parse("x{a=\"b} 1").is_err());
    }
}
