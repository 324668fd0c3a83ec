//! CPU time and peak memory of the proxy's processes, from `/proc`.

use std::process::Command;

use anyhow::{bail, Context};

use crate::process;

/// Clock ticks per second when `getconf CLK_TCK` cannot tell; the value
/// Linux reports on x86-64 and arm64 (`USER_HZ`).
const DEFAULT_CLOCK_TICKS: f64 = 100.0;

/// Returns the clock ticks per second that `/proc/PID/stat` counts in.
pub fn clock_ticks() -> f64 {
    process::probe(Command::new("getconf").arg("CLK_TCK"))
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_CLOCK_TICKS)
}

/// Returns `pid` and its children, recursively: nginx's master and workers.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut index = 0;
    while index < pids.len() {
        let parent = pids[index];
        let path = format!("/proc/{parent}/task/{parent}/children");
        if let Ok(text) = std::fs::read_to_string(path) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|word| word.parse::<u32>().ok()),
            );
        }
        index += 1;
    }
    pids
}

/// Returns the user plus system CPU time of `pids`, in clock ticks, with
/// every thread of each process counted.
pub fn cpu_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
        total += parse_cpu_ticks(&text).with_context(|| format!("invalid {path}"))?;
    }
    Ok(total)
}

/// Reads `utime` and `stime`, fields 14 and 15 of `proc_pid_stat(5)`. The
/// command name in field 2 may contain spaces, so fields count from the
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no `)` after the command name");
    };
    // `rest` starts at field 3 (state), so utime is its 12th word.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let [utime, stime] = [11, 12].map(|index| fields.get(index).copied());
    let (Some(utime), Some(stime)) = (utime, stime) else {
        bail!("fewer than 15 fields");
    };
    let utime: u64 = utime.parse().context("invalid utime")?;
    let stime: u64 = stime.parse().context("invalid stime")?;
    Ok(utime + stime)
}

/// Resets the peak resident set size (`VmHWM`) of `pids` to their current
/// size by writing 5 to `clear_refs` (`proc_pid_clear_refs(5)`, Linux 4.0 or
/// later), so the next reading is the peak of the measured run alone.
pub fn reset_peak_rss(pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        let path = format!("/proc/{pid}/clear_refs");
        std::fs::write(&path, "5").with_context(|| format!("failed to write {path}"))?;
    }
    Ok(())
}

/// Returns the sum of one field of `/proc/PID/status` over `pids`, in KiB:
/// `VmHWM` for the peak or `VmRSS` for the current resident set size.
pub fn status_kib(pids: &[u32], field: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
        total += parse_status_kib(&text, field).with_context(|| format!("invalid {path}"))?;
    }
    Ok(total)
}

fn parse_status_kib(status: &str, field: &str) -> anyhow::Result<u64> {
    for line in status.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name == field {
            let number = value.trim().trim_end_matches("kB").trim();
            return number
                .parse()
                .with_context(|| format!("invalid {field} value {value:?}"));
        }
    }
    bail!("no {field} line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_read_after_command_name() {
        let stat = "42 (tokio (worker)) S 1 42 42 0 -1 4194560 100 0 0 0 \
                    250 37 0 0 20 0 4 0 100 1000 200";

        assert_eq!(parse_cpu_ticks(stat).expect("parses"), 287);
    }

    #[test]
    fn status_field_read_in_kib() {
        let status = "Name:\tnginx\nVmHWM:\t   12345 kB\nVmRSS:\t    2345 kB\n";

        assert_eq!(parse_status_kib(status, "VmHWM").expect("VmHWM"), 12345);
        assert_eq!(parse_status_kib(status, "VmRSS").expect("VmRSS"), 2345);
        assert!(parse_status_kib(status, "VmPeak").is_err());
    }

    #[test]
    fn own_process_has_cpu_and_rss() {
        let pid = std::process::id();

        assert!(cpu_ticks(&[pid]).is_ok());
        assert!(status_kib(&[pid], "VmHWM").expect("VmHWM") > 0);
    }
}
