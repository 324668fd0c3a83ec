//! Types and constants shared by the eBPF programs and the agent.
//!
//! Everything the kernel side and user space must agree on lives here: map
//! names and capacities, counter slots, listener slots and the layout of the
//! configuration record. Pinned maps outlive the process that created them,
//! so the configuration record carries a layout version.
#![no_std]

/// Name of the `sk_lookup` program in the object file.
pub const PROGRAM_SK_LOOKUP: &str = "tokengate_steer";

/// Map of the agent's listening sockets for one pod, indexed by `LISTENER_*`.
pub const MAP_LISTENERS: &str = "TG_LISTENERS";
/// Hash of protected destination ports: key `u16` port, value `u8` (unused, 1).
pub const MAP_PORTS: &str = "TG_PORTS";
/// One-element array holding [`SteerConfig`].
pub const MAP_CONFIG: &str = "TG_CONFIG";
/// Per-CPU array of `u64` counters indexed by `COUNTER_*`.
pub const MAP_COUNTERS: &str = "TG_COUNTERS";

/// Listener slot for IPv4 connections.
pub const LISTENER_V4: u32 = 0;
/// Listener slot for IPv6 connections.
pub const LISTENER_V6: u32 = 1;
/// Number of slots in [`MAP_LISTENERS`].
pub const LISTENER_SLOTS: u32 = 2;

/// Maximum number of protected ports per pod.
pub const MAX_PORTS: u32 = 1024;

/// Connections handed to the agent's listener.
pub const COUNTER_STEERED: u32 = 0;
/// Connections left to the normal socket lookup (unprotected port, loopback
/// caller when exempt, or the agent's own upstream connection).
pub const COUNTER_PASSED: u32 = 1;
/// Connections to a protected port dropped because no listener was present.
pub const COUNTER_DROPPED: u32 = 2;
/// Number of slots in [`MAP_COUNTERS`].
pub const COUNTER_SLOTS: u32 = 3;

/// Layout version of [`SteerConfig`]; bump it when the layout changes.
pub const CONFIG_VERSION: u32 = 1;

/// `SteerConfig::flags` bit: let connections whose source is a loopback
/// address (127.0.0.0/8, ::1) through to the pod's own socket.
pub const FLAG_LOOPBACK_EXEMPT: u32 = 1;

/// Per-pod settings of the `sk_lookup` program.
///
/// Addresses are stored as the kernel presents them in `bpf_sk_lookup`:
/// IPv4 in network byte order in a `u32`, IPv6 as four network-order words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// Always [`CONFIG_VERSION`]; the program passes nothing it cannot read.
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Source address of the agent's own upstream connections (IPv4).
    pub reserved_source_v4: u32,
    /// Explicit padding so that the layout has no implicit holes.
    pub padding: u32,
    /// Source address of the agent's own upstream connections (IPv6).
    pub reserved_source_v6: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<SteerConfig>() == 32);

#[cfg(feature = "user")]
// SAFETY: `SteerConfig` is `repr(C)`, `Copy`, made only of integers and has
// explicit padding, so every bit pattern is a valid value.
#[allow(unsafe_code)]
unsafe impl aya::Pod for SteerConfig {}
