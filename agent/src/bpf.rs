//! Loading, pinning and attaching the `sk_lookup` steering program.
//!
//! One program instance per pod, attached to the pod's network namespace
//! with its link and maps pinned under `<pin_path>/pods/<workload>`, so that
//! a dead agent leaves the port closed instead of open.

use std::net::TcpListener;

use crate::config::{InterceptionConfig, WorkloadConfig};

/// Per-CPU counter sums of one pod's program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerCounters {
    pub steered: u64,
    pub passed: u64,
    pub dropped: u64,
}

/// The node-wide loader.
pub struct Steering {
    _private: (),
}

/// One pod's attached program and its maps; dropping it leaves the pinned
/// link in place (fail closed).
pub struct PodSteering {
    _private: (),
}

impl Steering {
    /// Mounts bpffs at the pin path's filesystem if needed and prepares the
    /// embedded object.
    pub fn new(_config: &InterceptionConfig) -> Result<Self, anyhow::Error> {
        todo!()
    }

    /// Loads the program for `workload`, fills its maps (ports, config,
    /// listeners), attaches it to the namespace and pins link and maps.
    pub fn attach(
        &self,
        _workload: &WorkloadConfig,
        _netns: &std::fs::File,
        _listener_v4: &TcpListener,
        _listener_v6: Option<&TcpListener>,
    ) -> Result<PodSteering, anyhow::Error> {
        todo!()
    }
}

impl PodSteering {
    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<SteerCounters, anyhow::Error> {
        todo!()
    }
}
