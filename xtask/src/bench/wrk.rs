//! Running wrk and reading its `--latency` report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::process;

/// The Lua script that gives every request the next token of a file, in a
/// cycle. wrk runs `init` once per thread with the arguments after `--`.
const TOKEN_SCRIPT: &str = r#"-- Sends each request with the next token of the file named by the first
-- script argument, cycling through the file in order.
local tokens = {}
local next_index = 1

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      tokens[#tokens + 1] = line
    end
  end
  if #tokens == 0 then
    error("no tokens in " .. args[1])
  end
end

function request()
  local token = tokens[next_index]
  next_index = next_index % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. token })
end
"#;

/// One wrk run.
pub struct Load<'a> {
    pub url: String,
    pub token_file: &'a Path,
    pub connections: u32,
    pub duration: Duration,
    /// CPU list for `taskset -c`.
    pub cpu: &'a str,
}

/// Measurements of one wrk run.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Responses with a status outside 2xx and 3xx.
    pub non_success: u64,
    /// Connect, read, write and timeout errors together.
    pub socket_errors: u64,
}

/// Writes the token script into `dir` and returns its path.
pub fn write_script(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("tokens.lua");
    std::fs::write(&path, TOKEN_SCRIPT)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

/// Runs wrk with one thread pinned to `load.cpu` and parses its report.
pub fn run(load: &Load<'_>, script: &Path) -> anyhow::Result<WrkResult> {
    let mut command = Command::new("taskset");
    command
        .args(["-c", load.cpu, "wrk", "-t1"])
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration.as_secs()))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(&load.url)
        .arg("--")
        .arg(load.token_file);
    let line = process::describe(&command);
    println!("+ {line}");
    let output = command
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "`{line}` failed: {}\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&text).with_context(|| format!("failed to read the report of `{line}`:\n{text}"))
}

/// Parses the report that `wrk --latency` prints.
pub fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    let mut found = [false; 5];
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => (result.p50_us, found[0]) = (duration_us(value)?, true),
            ["90%", value] => (result.p90_us, found[1]) = (duration_us(value)?, true),
            ["99%", value] => (result.p99_us, found[2]) = (duration_us(value)?, true),
            [count, "requests", "in", seconds, ..] => {
                result.requests = count.parse().context("invalid request count")?;
                result.seconds = duration_us(seconds.trim_end_matches(','))? / 1e6;
                found[3] = true;
            }
            ["Requests/sec:", value] => {
                result.requests_per_second = value.parse().context("invalid Requests/sec")?;
                found[4] = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.non_success = count.parse().context("invalid Non-2xx count")?;
            }
            ["Socket", "errors:", rest @ ..] => {
                result.socket_errors = rest
                    .iter()
                    .filter_map(|word| word.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if found.contains(&false) {
        bail!("the report lacks a latency percentile, the request count or Requests/sec");
    }
    Ok(result)
}

/// Converts a wrk duration such as `812.00us`, `1.20ms` or `10.01s` to
/// microseconds.
fn duration_us(text: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(number) = text.strip_suffix("us") {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix("ms") {
        (number, 1e3)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60e6)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1e6)
    } else {
        bail!("invalid duration {text:?}: expected a unit us, ms, s or m");
    };
    let value: f64 = number
        .parse()
        .with_context(|| format!("invalid duration {text:?}"))?;
    Ok(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 10s test @ http://198.18.0.2:8080/orders/1
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  250.00us   9.00ms   90.00%
    Req/Sec    31.00k     1.00k   33.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.50ms
  310000 requests in 10.01s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  30969.03
Transfer/sec:      3.00MB
";

    #[test]
    fn report_parsed() {
        let result = parse(REPORT).expect("parses");

        assert_eq!(result.requests, 310_000);
        assert!((result.seconds - 10.01).abs() < 1e-9);
        assert!((result.requests_per_second - 30969.03).abs() < 1e-6);
        assert!((result.p50_us - 812.0).abs() < 1e-9);
        assert!((result.p90_us - 1500.0).abs() < 1e-9);
        assert!((result.p99_us - 2500.0).abs() < 1e-9);
        assert_eq!(result.non_success, 7);
        assert_eq!(result.socket_errors, 3);
    }

    #[test]
    fn report_without_percentiles_rejected() {
        let text = REPORT.replace("     99%    2.50ms\n", "");

        assert!(parse(&text).is_err());
    }

    #[test]
    fn duration_units_converted() {
        assert!((duration_us("1.5s").expect("s") - 1_500_000.0).abs() < 1e-6);
        assert!((duration_us("2.00ms").expect("ms") - 2000.0).abs() < 1e-9);
        assert!(duration_us("3.0h").is_err());
    }
}
