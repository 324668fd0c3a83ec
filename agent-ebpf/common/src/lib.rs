//! Types and constants shared by the eBPF programs and the agent.
//!
//! Everything the kernel side and user space must agree on lives here: map
//! names and capacities, counter slots, listener slots and the layout of the
//! configuration record. Pinned maps outlive the process that created them,
//! so the configuration record carries a layout version.
#![cfg_attr(not(test), no_std)]

/// Egress mode: types and map names of the `tokengate-egress` object.
pub mod egress;

/// Sockmap fast path: types and map names of the `tokengate-sockmap` object.
pub mod sockmap;

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

/// `AF_INET` from the Linux UAPI, the `family` of an IPv4 lookup.
pub const AF_INET: u32 = 2;
/// `AF_INET6` from the Linux UAPI, the `family` of an IPv6 lookup.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP` from the Linux UAPI.
pub const IPPROTO_TCP: u32 = 6;

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
/// Connections to a protected port dropped: no listener in the slot of their
/// family (agent down), or no valid configuration record (see [`DropReason`]).
pub const COUNTER_DROPPED: u32 = 2;
/// Number of slots in [`MAP_COUNTERS`].
pub const COUNTER_SLOTS: u32 = 3;

/// Layout version of [`SteerConfig`]; bump it when the layout changes.
pub const CONFIG_VERSION: u32 = 1;

/// Version of the per-pod map set as pinned (names, types, key and value
/// sizes, capacities, [`CONFIG_VERSION`]). The agent pins the maps in a
/// directory named after it, so an agent of another version creates and
/// fills a new set instead of adopting maps it cannot read. Bump it with
/// any of those changes.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// First source port of the agent's own IPv6 upstream connections.
///
/// IPv6 has one loopback address, so the reserved source `::1` is also the
/// source of every in-pod IPv6 loopback caller, and only the port
/// distinguishes the agent's connections. The range lies above Linux's default
/// ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999, which
/// IPv6 shares), so the kernel never picks such a port for a client that
/// binds none.
///
/// NOTE: in a pod that widens its ephemeral range into these ports, an
/// in-pod IPv6 loopback client may get one and pass unverified even with
/// `loopback_exempt` off.
pub const RESERVED_PORT_FIRST_V6: u16 = 61000;
/// Last source port of the agent's own IPv6 upstream connections.
pub const RESERVED_PORT_LAST_V6: u16 = 65535;

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

impl SteerConfig {
    /// Builds the record for the current layout, storing the addresses in
    /// network byte order as the program compares them.
    pub fn new(
        flags: u32,
        reserved_source_v4: core::net::Ipv4Addr,
        reserved_source_v6: core::net::Ipv6Addr,
    ) -> Self {
        let v6 = reserved_source_v6.octets();
        let mut words = [0u32; 4];
        for (word, chunk) in words.iter_mut().zip(v6.chunks_exact(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Self {
            version: CONFIG_VERSION,
            flags,
            reserved_source_v4: u32::from_ne_bytes(reserved_source_v4.octets()),
            padding: 0,
            reserved_source_v6: words,
        }
    }
}

/// Cause of a dropped connection to a protected port. The value is
/// what the program's debug log prints.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// [`MAP_CONFIG`] contains no record of [`CONFIG_VERSION`].
    ConfigInvalid = 1,
    /// The listener slot of the connection's family is empty (agent down) or
    /// the kernel rejected the assignment.
    ListenerMissing = 2,
    /// The lookup is neither IPv4 nor IPv6.
    UnknownFamily = 3,
}

/// The program's decision for a TCP connection to a protected port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the connection to the normal socket lookup.
    Pass,
    /// Hand the connection to the listener in this `LISTENER_*` slot.
    Steer(u32),
    /// Drop the connection (fail closed).
    Drop(DropReason),
}

/// The peer of a lookup as `bpf_sk_lookup` presents it: `family` is
/// [`AF_INET`] or [`AF_INET6`], addresses are in network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub family: u32,
    pub remote_ip4: u32,
    pub remote_ip6: [u32; 4],
    /// Source port in host byte order.
    pub remote_port: u16,
}

/// Decides what happens to a TCP connection to a protected port.
///
/// The agent's own upstream connections (from the reserved source) pass,
/// loopback callers pass when [`FLAG_LOOPBACK_EXEMPT`] is set, every other
/// caller is steered to the listener of its family. A missing or foreign
/// configuration record drops, so that a half-written pod never opens up.
pub fn decide_protected(peer: &Peer, config: Option<&SteerConfig>) -> Verdict {
    let Some(config) = config.filter(|config| config.version == CONFIG_VERSION) else {
        return Verdict::Drop(DropReason::ConfigInvalid);
    };
    let loopback_exempt = config.flags & FLAG_LOOPBACK_EXEMPT != 0;

    match peer.family {
        AF_INET => {
            if peer.remote_ip4 == config.reserved_source_v4
                || (loopback_exempt && is_loopback_v4(peer.remote_ip4))
            {
                Verdict::Pass
            } else {
                Verdict::Steer(LISTENER_V4)
            }
        }
        AF_INET6 => {
            let from_agent = peer.remote_ip6 == config.reserved_source_v6
                && is_reserved_port_v6(peer.remote_port);
            if from_agent || (loopback_exempt && is_loopback_v6(peer.remote_ip6)) {
                Verdict::Pass
            } else {
                Verdict::Steer(LISTENER_V6)
            }
        }
        _ => Verdict::Drop(DropReason::UnknownFamily),
    }
}

/// Tells whether a network-order IPv4 address is in 127.0.0.0/8.
pub fn is_loopback_v4(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
}

/// Tells whether a host-order port is one of the agent's IPv6 upstream
/// source ports.
pub fn is_reserved_port_v6(port: u16) -> bool {
    (RESERVED_PORT_FIRST_V6..=RESERVED_PORT_LAST_V6).contains(&port)
}

/// Tells whether a network-order IPv6 address is `::1`.
pub fn is_loopback_v6(addr: [u32; 4]) -> bool {
    addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
}

#[cfg(feature = "user")]
// SAFETY: `SteerConfig` is `repr(C)`, `Copy`, made only of integers and has
// explicit padding, so every bit pattern is a valid value.
#[allow(unsafe_code)]
unsafe impl aya::Pod for SteerConfig {}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const RESERVED_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
    const RESERVED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 6);

    fn peer_v4(addr: Ipv4Addr) -> Peer {
        Peer {
            family: AF_INET,
            remote_ip4: u32::from_ne_bytes(addr.octets()),
            remote_ip6: [0; 4],
            remote_port: RESERVED_PORT_FIRST_V6,
        }
    }

    /// An IPv6 peer with a source port from the reserved range.
    fn peer_v6(addr: Ipv6Addr) -> Peer {
        peer_v6_port(addr, RESERVED_PORT_FIRST_V6)
    }

    fn peer_v6_port(addr: Ipv6Addr, port: u16) -> Peer {
        let config = SteerConfig::new(0, Ipv4Addr::UNSPECIFIED, addr);
        Peer {
            family: AF_INET6,
            remote_ip4: 0,
            remote_ip6: config.reserved_source_v6,
            remote_port: port,
        }
    }

    #[test]
    fn config_stores_network_order() {
        let config = SteerConfig::new(FLAG_LOOPBACK_EXEMPT, RESERVED_V4, RESERVED_V6);

        assert_eq!(config.version, CONFIG_VERSION);
        assert_eq!(config.reserved_source_v4.to_ne_bytes(), [127, 0, 0, 6]);
        assert_eq!(config.reserved_source_v6[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(config.reserved_source_v6[3].to_ne_bytes(), [0, 0, 0, 6]);
    }

    #[test]
    fn loopback_ranges() {
        assert!(is_loopback_v4(
            peer_v4(Ipv4Addr::new(127, 0, 0, 1)).remote_ip4
        ));
        assert!(is_loopback_v4(
            peer_v4(Ipv4Addr::new(127, 255, 1, 2)).remote_ip4
        ));
        assert!(!is_loopback_v4(
            peer_v4(Ipv4Addr::new(198, 18, 0, 127)).remote_ip4
        ));
        assert!(is_loopback_v6(peer_v6(Ipv6Addr::LOCALHOST).remote_ip6));
        assert!(!is_loopback_v6(
            peer_v6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0x100)).remote_ip6
        ));
    }

    #[test]
    fn decide_without_config_drops() {
        let peer = peer_v4(Ipv4Addr::new(198, 18, 0, 1));

        assert_eq!(
            decide_protected(&peer, None),
            Verdict::Drop(DropReason::ConfigInvalid)
        );
        assert_eq!(
            decide_protected(&peer, Some(&SteerConfig::default())),
            Verdict::Drop(DropReason::ConfigInvalid)
        );
    }

    #[test]
    fn decide_table() {
        let exempt = SteerConfig::new(FLAG_LOOPBACK_EXEMPT, RESERVED_V4, RESERVED_V6);
        let strict = SteerConfig::new(0, RESERVED_V4, RESERVED_V6);
        let cases = [
            (
                peer_v4(Ipv4Addr::new(198, 18, 0, 1)),
                exempt,
                Verdict::Steer(LISTENER_V4),
            ),
            (peer_v4(RESERVED_V4), exempt, Verdict::Pass),
            (peer_v4(RESERVED_V4), strict, Verdict::Pass),
            (peer_v4(Ipv4Addr::LOCALHOST), exempt, Verdict::Pass),
            (
                peer_v4(Ipv4Addr::LOCALHOST),
                strict,
                Verdict::Steer(LISTENER_V4),
            ),
            (
                peer_v6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
                exempt,
                Verdict::Steer(LISTENER_V6),
            ),
            (peer_v6(RESERVED_V6), strict, Verdict::Pass),
            (peer_v6(Ipv6Addr::LOCALHOST), exempt, Verdict::Pass),
            (
                peer_v6(Ipv6Addr::LOCALHOST),
                strict,
                Verdict::Steer(LISTENER_V6),
            ),
        ];

        for (peer, config, expected) in cases {
            assert_eq!(
                decide_protected(&peer, Some(&config)),
                expected,
                "{peer:?} flags {}",
                config.flags
            );
        }
    }

    #[test]
    fn decide_ipv6_loopback_reserved_by_port() {
        // The agent's default IPv6 reserved source is `::1`, the address of
        // every in-pod IPv6 loopback caller too.
        let strict = SteerConfig::new(0, RESERVED_V4, Ipv6Addr::LOCALHOST);
        let exempt = SteerConfig::new(FLAG_LOOPBACK_EXEMPT, RESERVED_V4, Ipv6Addr::LOCALHOST);
        let cases = [
            (RESERVED_PORT_FIRST_V6, strict, Verdict::Pass),
            (RESERVED_PORT_LAST_V6, strict, Verdict::Pass),
            (
                RESERVED_PORT_FIRST_V6 - 1,
                strict,
                Verdict::Steer(LISTENER_V6),
            ),
            (40000, strict, Verdict::Steer(LISTENER_V6)),
            (40000, exempt, Verdict::Pass),
        ];

        for (port, config, expected) in cases {
            let peer = peer_v6_port(Ipv6Addr::LOCALHOST, port);

            assert_eq!(
                decide_protected(&peer, Some(&config)),
                expected,
                "port {port} flags {}",
                config.flags
            );
        }
    }

    #[test]
    fn decide_unknown_family_drops() {
        let config = SteerConfig::new(FLAG_LOOPBACK_EXEMPT, RESERVED_V4, RESERVED_V6);
        let peer = Peer {
            family: 1,
            remote_ip4: 0,
            remote_ip6: [0; 4],
            remote_port: 0,
        };

        assert_eq!(
            decide_protected(&peer, Some(&config)),
            Verdict::Drop(DropReason::UnknownFamily)
        );
    }
}
