//! `tokengate status`: what the agent has set up on this node, read from
//! the bpffs pins (so it works with no agent running) and, when an agent
//! responds on its hand-off socket, from that agent's admin endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::bpf::features::KernelFeatures;
use crate::bpf::inspect::{self, PinnedKind, PinnedObject, PodPins};
use crate::config::InterceptionConfig;
use crate::handoff::{self, RunningAgent};

/// Time allowed for each admin request and for the ping.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Prefix of the agent's own metric names.
const METRIC_PREFIX: &str = "tokengate_";

/// Everything `status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_path: PathBuf,
    pub handoff_socket: PathBuf,
    /// The agent that replied on the hand-off socket.
    pub agent: Option<RunningAgent>,
    /// Error of the ping, when the agent could not be queried.
    pub agent_error: Option<String>,
    /// Status code and body of `/readyz`.
    pub readiness: Option<(u16, String)>,
    /// The agent's counters (`tokengate_*_total`), summed over labels.
    pub counters: BTreeMap<String, f64>,
    pub features: KernelFeatures,
    pub pods: Vec<PodPins>,
    pub pins: Vec<PinnedObject>,
    /// Error of the pin walk, when the pins could not be read.
    pub pins_error: Option<String>,
}

/// Collects the status of the agent whose interception settings are
/// `interception`.
pub fn collect(interception: &InterceptionConfig) -> Status {
    let pin_path = interception.pin_path.clone();
    let handoff_socket = interception.handoff.socket_path(&pin_path);

    let (agent, agent_error) = match handoff::ping(&handoff_socket, QUERY_TIMEOUT) {
        Ok(agent) => (agent, None),
        Err(error) => (None, Some(crate::error_chain(&error))),
    };
    let admin = agent.as_ref().and_then(|agent| agent.admin);
    let readiness = admin.and_then(|admin| http_get(admin, "/readyz").ok());
    let counters = admin
        .and_then(|admin| http_get(admin, "/metrics").ok())
        .map(|(_, text)| sum_counters(&text))
        .unwrap_or_default();

    let (tree, pins_error) = match inspect::walk(&pin_path) {
        Ok(tree) => (tree, None),
        Err(error) => (inspect::PinTree::default(), Some(error.to_string())),
    };
    Status {
        features: KernelFeatures::probe(&pin_path),
        pods: inspect::pods(&pin_path, &tree),
        pins: tree.objects,
        pin_path,
        handoff_socket,
        agent,
        agent_error,
        readiness,
        counters,
        pins_error,
    }
}

/// Sends `GET path` to the admin listener and returns the status code and
/// body.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, QUERY_TIMEOUT)?;
    stream.set_read_timeout(Some(QUERY_TIMEOUT))?;
    stream.set_write_timeout(Some(QUERY_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;

    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((status, body.to_owned()))
}

/// Sums the samples of each `tokengate_*_total` counter over its labels.
fn sum_counters(text: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !name.starts_with(METRIC_PREFIX) || !name.ends_with("_total") {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *sums.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    sums
}

/// Renders `status` as text for people.
pub fn render_text(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pin path:        {}", status.pin_path.display());
    let _ = writeln!(out, "hand-off socket: {}", status.handoff_socket.display());
    match (&status.agent, &status.agent_error) {
        (Some(agent), _) => {
            let admin = agent
                .admin
                .map_or_else(|| "none".to_owned(), |admin| admin.to_string());
            let _ = writeln!(
                out,
                "agent:           running, pid {}, version {}, admin {admin}",
                agent.pid, agent.version
            );
        }
        (None, Some(error)) => {
            let _ = writeln!(out, "agent:           unknown ({error})");
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "agent:           not running (protected ports stay closed while pins remain)"
            );
        }
    }
    if let Some((code, body)) = &status.readiness {
        let _ = writeln!(
            out,
            "readiness:       {code} {}",
            body.trim().replace('\n', "; ")
        );
    }

    let _ = writeln!(out, "\npods ({}):", status.pods.len());
    for pod in &status.pods {
        render_pod(&mut out, pod);
    }

    if !status.counters.is_empty() {
        let _ = writeln!(out, "\ncounters:");
        for (name, value) in &status.counters {
            let _ = writeln!(out, "  {name} {value}");
        }
    }

    let _ = writeln!(out, "\npins ({}):", status.pins.len());
    if let Some(error) = &status.pins_error {
        let _ = writeln!(out, "  unreadable: {error}");
    }
    for pin in &status.pins {
        let path = pin
            .path
            .strip_prefix(&status.pin_path)
            .unwrap_or(&pin.path)
            .display();
        let _ = writeln!(out, "  {path}: {}", describe(&pin.kind));
    }

    let _ = writeln!(out, "\nkernel features:");
    for (name, support) in status.features.entries() {
        let _ = writeln!(out, "  {name:<16} {support}");
    }
    out
}

fn render_pod(out: &mut String, pod: &PodPins) {
    let _ = writeln!(out, "  {}", pod.workload);
    match &pod.link {
        Some(link) => {
            let _ = writeln!(out, "    link:     {}", describe(link));
        }
        None => {
            let _ = writeln!(out, "    link:     none (ports not steered)");
        }
    }
    let _ = writeln!(
        out,
        "    layout:   {:?}{}",
        pod.layout_versions,
        if pod.current_layout {
            ""
        } else {
            " (not this agent's version)"
        }
    );
    let _ = writeln!(out, "    ports:    {:?}", pod.ports);
    if let Some(counters) = pod.counters {
        let _ = writeln!(
            out,
            "    counters: steered {}, passed {}, dropped {}",
            counters.steered, counters.passed, counters.dropped
        );
    }
}

fn describe(kind: &PinnedKind) -> String {
    match kind {
        PinnedKind::Link {
            id,
            link_type,
            program,
            netns_ino,
        } => {
            let program = program.as_ref().map_or_else(
                || "program unknown".to_owned(),
                |program| {
                    format!(
                        "program {} id {} tag {}",
                        program.name, program.id, program.tag
                    )
                },
            );
            let netns = netns_ino.map_or_else(String::new, |ino| format!(", netns {ino}"));
            format!("{link_type} link id {id}, {program}{netns}")
        }
        PinnedKind::Map {
            id,
            name,
            map_type,
            max_entries,
            entries,
            ..
        } => {
            let fill = entries.map_or_else(|| "?".to_owned(), |entries| entries.to_string());
            format!("map {name} ({map_type}) id {id}, entries {fill}/{max_entries}")
        }
        PinnedKind::Program(program) => format!(
            "program {} ({}) id {} tag {}",
            program.name, program.program_type, program.id, program.tag
        ),
        PinnedKind::Unreadable { error } => format!("unreadable: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels() {
        let text = "# HELP tokengate_decisions_total x\n\
                    tokengate_decisions_total{reason=\"allowed\"} 3\n\
                    tokengate_decisions_total{reason=\"missing_token\"} 2\n\
                    tokengate_verify_seconds_bucket{le=\"0.1\"} 9\n\
                    process_cpu_seconds_total 4\n";

        let sums = sum_counters(text);

        assert_eq!(sums.get("tokengate_decisions_total"), Some(&5.0));
        assert_eq!(sums.len(), 1);
    }

    #[test]
    fn status_of_empty_pin_path() {
        let dir = tempfile::tempdir().unwrap();
        let interception = InterceptionConfig {
            pin_path: dir.path().join("pins"),
            handoff: crate::config::HandoffConfig {
                socket: Some(dir.path().join("handoff.sock")),
                ..crate::config::HandoffConfig::default()
            },
            ..InterceptionConfig::default()
        };

        let status = collect(&interception);
        let text = render_text(&status);

        assert!(status.agent.is_none());
        assert!(status.pods.is_empty());
        assert!(text.contains("not running"), "{text}");
        assert!(text.contains("sk_lookup"), "{text}");
    }
}
