//! Types and constants of the egress object (`tokengate-egress`): the
//! `cgroup/connect4` and `cgroup/connect6` programs that steer a selected
//! pod's calls to chosen destinations into the agent, and the `sock_ops`
//! program that records each steered connection's original destination.
//!
//! Addresses follow the kernel contexts: IPv4 as a network-order `u32`,
//! IPv6 as four network-order `u32` words. Ports in [`FlowKey`] and
//! [`Origin`] are in host order.

use crate::{AF_INET, AF_INET6};

/// Name of the `cgroup/connect4` program in the object file.
pub const PROGRAM_CONNECT4: &str = "tokengate_egress_connect4";
/// Name of the `cgroup/connect6` program in the object file.
pub const PROGRAM_CONNECT6: &str = "tokengate_egress_connect6";
/// Name of the `sock_ops` program in the object file.
pub const PROGRAM_SOCK_OPS: &str = "tokengate_egress_record";

/// Hash of enrolled pods: key `u64` network namespace cookie, value [`Pod`].
pub const MAP_PODS: &str = "TG_EGRESS_PODS";
/// LPM trie of IPv4 destinations: key `Key<Dest4>`, value `u8` (unused, 1).
pub const MAP_DEST4: &str = "TG_EGRESS_DEST4";
/// LPM trie of IPv6 destinations: key `Key<Dest6>`, value `u8` (unused, 1).
pub const MAP_DEST6: &str = "TG_EGRESS_DEST6";
/// LRU hash from the caller's socket cookie to its [`Origin`], written at
/// connect time and moved to [`MAP_FLOWS`] once the connection is up.
pub const MAP_PENDING: &str = "TG_EGRESS_PENDING";
/// LRU hash from [`FlowKey`] to [`Origin`]; the agent reads and deletes the
/// entry when it accepts the connection.
pub const MAP_FLOWS: &str = "TG_EGRESS_FLOWS";
/// One-element array holding [`Settings`].
pub const MAP_SETTINGS: &str = "TG_EGRESS_SETTINGS";
/// Per-CPU array of `u64` counters indexed by `COUNTER_*`.
pub const MAP_COUNTERS: &str = "TG_EGRESS_COUNTERS";

/// Maximum number of pods with egress steering on one node.
pub const MAX_PODS: u32 = 1024;
/// Maximum number of (destination prefix, port) entries per address family,
/// over all pods.
pub const MAX_DESTINATIONS: u32 = 16_384;
/// Capacity of [`MAP_PENDING`] and [`MAP_FLOWS`]. An entry lives from
/// connect until the agent accepts (milliseconds); 16 Ki entries cover a
/// burst of 16 Ki connections that the agent has not accepted yet. Beyond
/// that the LRU evicts the oldest, whose connection the agent then closes.
pub const MAX_FLOWS: u32 = 16_384;

/// Connections rewritten to the agent's egress listener.
pub const COUNTER_STEERED: u32 = 0;
/// Connections left alone: not TCP, pod not enrolled, or destination not
/// configured.
pub const COUNTER_PASSED: u32 = 1;
/// Connections left alone because they are the agent's own (its cgroup or
/// its socket mark), which would otherwise loop.
pub const COUNTER_AGENT_SKIPPED: u32 = 2;
/// Connections rejected (`EPERM`): a configured destination of a family for
/// which the pod has no egress listener, or an invalid settings record.
pub const COUNTER_REJECTED: u32 = 3;
/// Original destinations moved into [`MAP_FLOWS`].
pub const COUNTER_RECORDED: u32 = 4;
/// Map updates that failed (map full or out of memory); the agent closes
/// such a connection because it finds no record.
pub const COUNTER_MAP_ERRORS: u32 = 5;
/// Number of slots in [`MAP_COUNTERS`].
pub const COUNTER_SLOTS: u32 = 6;

/// Layout version of [`Settings`], [`Pod`], [`Origin`] and [`FlowKey`];
/// bump it when one of them changes.
pub const LAYOUT_VERSION: u32 = 1;

/// `SOL_SOCKET` from the Linux UAPI.
pub const SOL_SOCKET: i32 = 1;
/// `SO_MARK` from the Linux UAPI.
pub const SO_MARK: i32 = 36;
/// `SOCK_STREAM` from the Linux UAPI.
pub const SOCK_STREAM: u32 = 1;
/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` from the Linux UAPI: the client side
/// of a connection got its SYN-ACK, before it sends the final ACK.
pub const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;

/// Node-wide settings of the egress programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Always [`LAYOUT_VERSION`]; the programs reject connections to
    /// configured destinations while the record is missing or foreign.
    pub version: u32,
    /// `SO_MARK` of the agent's own upstream sockets; 0 disables the check.
    pub agent_mark: u32,
    /// cgroup v2 id of the agent's cgroup; 0 disables the check.
    pub agent_cgroup_id: u64,
}

const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// One enrolled pod: the ports of its egress listeners on its own loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// Always [`LAYOUT_VERSION`].
    pub version: u32,
    /// Port of the listener on 127.0.0.1, host order; 0 when there is none.
    pub port_v4: u16,
    /// Port of the listener on ::1, host order; 0 when there is none.
    pub port_v6: u16,
}

const _: () = assert!(core::mem::size_of::<Pod>() == 8);

/// Data part of an IPv4 destination key: the pod, the destination port and
/// the address, matched as one bit string. An entry for prefix `p/len` on
/// port `n` has prefix length `DEST_PREFIX_BITS + len`, so it only matches
/// that pod's connections to that port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dest4 {
    /// Network namespace cookie, native byte order.
    pub netns_cookie: [u8; 8],
    /// Destination port, network order.
    pub port: [u8; 2],
    /// Destination address, network order.
    pub addr: [u8; 4],
}

/// IPv6 counterpart of [`Dest4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dest6 {
    /// Network namespace cookie, native byte order.
    pub netns_cookie: [u8; 8],
    /// Destination port, network order.
    pub port: [u8; 2],
    /// Destination address, network order.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<Dest4>() == 14);
const _: () = assert!(core::mem::size_of::<Dest6>() == 26);

/// Bits of a destination key before the address: cookie and port.
pub const DEST_PREFIX_BITS: u32 = 80;

impl Dest4 {
    pub fn new(netns_cookie: u64, port: u16, addr: [u8; 4]) -> Self {
        Self {
            netns_cookie: netns_cookie.to_ne_bytes(),
            port: port.to_be_bytes(),
            addr,
        }
    }
}

impl Dest6 {
    pub fn new(netns_cookie: u64, port: u16, addr: [u8; 16]) -> Self {
        Self {
            netns_cookie: netns_cookie.to_ne_bytes(),
            port: port.to_be_bytes(),
            addr,
        }
    }
}

/// The original destination of a steered connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Destination port, host order.
    pub port: u16,
    /// Explicit padding so that the layout has no implicit holes.
    pub padding: u16,
    /// Destination address: IPv4 in word 0, the rest 0.
    pub addr: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<Origin>() == 24);

/// A steered connection as both ends see it: the pod's network namespace,
/// the caller's address and port, and the egress listener's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network namespace cookie of the pod.
    pub netns_cookie: u64,
    /// [`AF_INET`] or [`AF_INET6`], after IPv4-mapped addresses are
    /// turned into IPv4.
    pub family: u32,
    /// The caller's port, host order.
    pub client_port: u16,
    /// The egress listener's port, host order.
    pub listener_port: u16,
    /// The caller's address: IPv4 in word 0, the rest 0.
    pub client_addr: [u32; 4],
    /// The listener's address: IPv4 in word 0, the rest 0.
    pub listener_addr: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Tells whether network-order IPv6 words hold an IPv4-mapped address
/// (`::ffff:a.b.c.d`).
pub fn is_v4_mapped(addr: [u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Network-order words of `::ffff:127.0.0.1`, where a mapped caller reaches
/// the IPv4 listener.
pub fn v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

impl FlowKey {
    /// Builds the key from the client end's view of a TCP connection. A
    /// connection of an IPv6 socket between IPv4-mapped addresses becomes
    /// IPv4, because the agent accepts it on its IPv4 listener.
    pub fn new(
        netns_cookie: u64,
        family: u32,
        client: ([u32; 4], u16),
        listener: ([u32; 4], u16),
    ) -> Self {
        let (family, client_addr, listener_addr) =
            if family == AF_INET6 && is_v4_mapped(client.0) && is_v4_mapped(listener.0) {
                (AF_INET, [client.0[3], 0, 0, 0], [listener.0[3], 0, 0, 0])
            } else if family == AF_INET {
                (AF_INET, [client.0[0], 0, 0, 0], [listener.0[0], 0, 0, 0])
            } else {
                (family, client.0, listener.0)
            };
        Self {
            netns_cookie,
            family,
            client_port: client.1,
            listener_port: listener.1,
            client_addr,
            listener_addr,
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (each impl): the type is `repr(C)`, `Copy`, made only of
    // integers and byte arrays, and has no implicit padding (the size
    // assertions above check it), so every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Settings {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Pod {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Dest4 {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Dest6 {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Origin {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    #[test]
    fn destination_key_layout() {
        let key = Dest4::new(0x0102_0304_0506_0708, 8080, [198, 18, 7, 1]);

        assert_eq!(key.port, [0x1f, 0x90]);
        assert_eq!(key.addr, [198, 18, 7, 1]);
        assert_eq!(u64::from_ne_bytes(key.netns_cookie), 0x0102_0304_0506_0708);
    }

    #[test]
    fn mapped_detection() {
        let mapped = v4_mapped(word([127, 0, 0, 1]));
        let loopback6 = [0, 0, 0, word([0, 0, 0, 1])];

        assert!(is_v4_mapped(mapped));
        assert!(!is_v4_mapped(loopback6));
        assert_eq!(mapped[3].to_ne_bytes(), [127, 0, 0, 1]);
    }

    #[test]
    fn flow_key_turns_mapped_into_ipv4() {
        let client = word([127, 0, 0, 1]);
        let listener = word([127, 0, 0, 1]);

        let mapped = FlowKey::new(
            7,
            AF_INET6,
            (v4_mapped(client), 40000),
            (v4_mapped(listener), 15001),
        );
        let plain = FlowKey::new(
            7,
            AF_INET,
            ([client, 9, 9, 9], 40000),
            ([listener, 0, 0, 0], 15001),
        );

        assert_eq!(mapped, plain);
        assert_eq!(plain.family, AF_INET);
        assert_eq!(plain.client_addr, [client, 0, 0, 0]);
    }

    #[test]
    fn flow_key_keeps_ipv6() {
        let loopback6 = [0, 0, 0, word([0, 0, 0, 1])];

        let key = FlowKey::new(7, AF_INET6, (loopback6, 40000), (loopback6, 15001));

        assert_eq!(key.family, AF_INET6);
        assert_eq!(key.client_addr, loopback6);
        assert_eq!(key.listener_port, 15001);
    }
}
