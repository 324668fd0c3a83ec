//! tokengate: a per-node agent that verifies the JWT of every request to a
//! protected pod port, after eBPF has steered the connection into it.
//!
//! The decision code (`config`, `extract`, `verify`, `policy`, `decision`)
//! opens no socket and writes no log sink. The shell around it (`jwks`,
//! `bpf`, `netns`, `proxy`, `admin`) does the I/O; `audit` and `metrics` are
//! sinks that nothing decides through; `app` wires them together.

pub mod admin;
pub mod app;
pub mod audit;
pub mod bpf;
pub mod cache;
pub mod cni;
pub mod config;
pub mod decision;
pub mod egress;
pub mod enrollment;
pub mod explain;
pub mod extract;
pub mod handoff;
pub mod http_client;
pub mod jwks;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod revocation;
pub mod sockmap;
pub mod status;
pub mod uninstall;
pub mod verify;

/// Formats `error` with its sources, outermost first, joined by `: `, for
/// a log field or a message that has no room for a multi-line report.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
