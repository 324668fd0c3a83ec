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
pub mod config;
pub mod decision;
pub mod explain;
pub mod extract;
pub mod http_client;
pub mod jwks;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod revocation;
pub mod verify;
