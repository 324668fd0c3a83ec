//! Types and names of the `tokengate-sockmap` object. Its `sock_ops`
//! program puts both ends of the agent's loopback hop to a pod's service
//! into a sockhash. Its `sk_msg` program moves each message straight to the
//! peer socket's receive queue.
//!
//! Keys hold the netns cookie besides the 4-tuple, because every pod uses
//! the same loopback addresses. Addresses are in network byte order as the
//! kernel presents them, ports in host byte order. IPv4-mapped IPv6
//! addresses are stored as IPv4, so a dual-stack service socket and the
//! agent's IPv4 socket produce matching keys.

use crate::{AF_INET, AF_INET6};

/// Name of the `sock_ops` program in the object file.
pub const PROGRAM_SOCK_OPS: &str = "tokengate_sockops";
/// Name of the `sk_msg` program in the object file.
pub const PROGRAM_SK_MSG: &str = "tokengate_sk_msg";

/// Sockhash of the hop's sockets, keyed by [`SockKey`].
pub const MAP_SOCKETS: &str = "TG_SOCKMAP_SOCKS";
/// Hash of enrolled pods: key netns cookie (`u64`), value `u8` (unused, 1).
pub const MAP_PODS: &str = "TG_SOCKMAP_PODS";
/// One-element array holding [`SockmapConfig`].
pub const MAP_CONFIG: &str = "TG_SOCKMAP_CONFIG";
/// LRU hash of sockets that sent a message through the TCP stack, keyed by
/// [`SockKey`]: they never redirect afterwards (see [`decide_message`]).
pub const MAP_DIRECT: &str = "TG_SOCKMAP_DIRECT";
/// Per-CPU array of `u64` counters indexed by `COUNTER_*` below.
pub const MAP_COUNTERS: &str = "TG_SOCKMAP_COUNTERS";

/// Capacity of [`MAP_SOCKETS`]: two sockets per agent-to-service
/// connection, so 32 768 concurrent upstream connections on the node. The
/// connections beyond it use the TCP/IP stack and count as map-full errors.
pub const MAX_SOCKETS: u32 = 65_536;
/// Capacity of [`MAP_PODS`]: the kubelet's default `maxPods` is 110, this
/// leaves room for nodes configured far above it.
pub const MAX_PODS: u32 = 4096;
/// Capacity of [`MAP_DIRECT`]. Only connections whose first message raced
/// the peer's insertion land here, a small share of [`MAX_SOCKETS`].
///
/// NOTE: an entry evicted while its connection lives lets that socket
/// redirect again, which can reorder the connection's bytes.
pub const MAX_DIRECT: u32 = 16_384;

/// Sockets added to [`MAP_SOCKETS`].
pub const COUNTER_SOCKETS_ADDED: u32 = 0;
/// Messages moved to the peer socket by `bpf_msg_redirect_hash`.
pub const COUNTER_MSG_REDIRECTED: u32 = 1;
/// Payload bytes of the redirected messages.
pub const COUNTER_BYTES_REDIRECTED: u32 = 2;
/// Messages left to the TCP stack: no peer socket in the map, or the
/// sending socket used the TCP stack before.
pub const COUNTER_MSG_PASSED: u32 = 3;
/// Payload bytes of the passed messages.
pub const COUNTER_BYTES_PASSED: u32 = 4;
/// Sockhash updates rejected because the map is full (`E2BIG`).
pub const COUNTER_MAP_FULL: u32 = 5;
/// Sockhash updates rejected for another reason (see the debug log).
pub const COUNTER_UPDATE_FAILED: u32 = 6;
/// Number of slots in [`MAP_COUNTERS`].
pub const COUNTER_SLOTS: u32 = 7;

/// Layout version of the pinned maps and [`SockmapConfig`]; bump it when a
/// map's key, value, type or capacity changes, so that an agent of another
/// version does not reuse them.
pub const SOCKMAP_LAYOUT_VERSION: u32 = 1;

/// `E2BIG`, which `bpf_sock_hash_update` returns when the map is full.
pub const E2BIG: i64 = 7;

/// Settings of the `sock_ops` program, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapConfig {
    /// Always [`SOCKMAP_LAYOUT_VERSION`]; the program adds no socket
    /// without it.
    pub version: u32,
    /// Source address of the agent's upstream connections (IPv4), network
    /// byte order.
    pub reserved_source_v4: u32,
    /// Source address of the agent's upstream connections (IPv6), four
    /// network-order words.
    pub reserved_source_v6: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<SockmapConfig>() == 24);

impl SockmapConfig {
    /// Builds the record for the current layout.
    pub fn new(
        reserved_source_v4: core::net::Ipv4Addr,
        reserved_source_v6: core::net::Ipv6Addr,
    ) -> Self {
        Self {
            version: SOCKMAP_LAYOUT_VERSION,
            reserved_source_v4: u32::from_ne_bytes(reserved_source_v4.octets()),
            reserved_source_v6: ipv6_words(reserved_source_v6),
        }
    }
}

/// Key of one socket in [`MAP_SOCKETS`] and [`MAP_DIRECT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `bpf_get_netns_cookie` of the socket's network namespace.
    pub netns_cookie: u64,
    /// [`AF_INET`] (also for IPv4-mapped IPv6) or [`AF_INET6`].
    pub family: u32,
    pub local_port: u32,
    pub remote_port: u32,
    /// Explicit padding so that the layout has no implicit holes.
    pub padding: u32,
    /// IPv4 in the first word, the other words zero.
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<SockKey>() == 56);

/// One socket's addresses as `bpf_sock_ops` and `sk_msg_md` present them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddrs {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// As the context stores it: the 16-bit port in network byte order in
    /// the high bytes of the word, so `u32::from_be` yields the port.
    pub remote_port_raw: u32,
}

impl SockKey {
    /// Builds the key of the socket with `addrs` in the namespace `cookie`,
    /// or `None` for a family other than IPv4 and IPv6.
    pub fn new(netns_cookie: u64, addrs: &SockAddrs) -> Option<Self> {
        let (family, local_ip, remote_ip) = match addrs.family {
            AF_INET => (
                AF_INET,
                [addrs.local_ip4, 0, 0, 0],
                [addrs.remote_ip4, 0, 0, 0],
            ),
            AF_INET6 => match (mapped_ipv4(addrs.local_ip6), mapped_ipv4(addrs.remote_ip6)) {
                (Some(local), Some(remote)) => (AF_INET, [local, 0, 0, 0], [remote, 0, 0, 0]),
                _ => (AF_INET6, addrs.local_ip6, addrs.remote_ip6),
            },
            _ => return None,
        };
        Some(Self {
            netns_cookie,
            family,
            local_port: addrs.local_port,
            remote_port: u32::from_be(addrs.remote_port_raw),
            padding: 0,
            local_ip,
            remote_ip,
        })
    }

    /// Returns the key of the socket at the other end of the connection in
    /// the same namespace.
    pub fn peer(&self) -> Self {
        Self {
            local_port: self.remote_port,
            remote_port: self.local_port,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            ..*self
        }
    }

    /// Tells whether `address` (the local address for the connecting side,
    /// the remote one for the accepting side) is the agent's reserved
    /// source in `config`.
    pub fn is_from_reserved(&self, address: [u32; 4], config: &SockmapConfig) -> bool {
        match self.family {
            AF_INET => address[0] == config.reserved_source_v4,
            AF_INET6 => address == config.reserved_source_v6,
            _ => false,
        }
    }
}

/// The end of a connection that a `sock_ops` callback reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The connecting socket (`BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`).
    Active,
    /// The accepted socket (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`).
    Passive,
}

/// Decides whether a newly established socket joins the sockhash: it must
/// be in an enrolled pod's namespace (`pod_enrolled`), and the connecting
/// side must be the agent, which alone uses the reserved source address.
/// A missing or foreign configuration adds nothing.
pub fn should_add(
    key: &SockKey,
    side: Side,
    pod_enrolled: bool,
    config: Option<&SockmapConfig>,
) -> bool {
    let Some(config) = config.filter(|config| config.version == SOCKMAP_LAYOUT_VERSION) else {
        return false;
    };
    if !pod_enrolled {
        return false;
    }
    match side {
        Side::Active => key.is_from_reserved(key.local_ip, config),
        Side::Passive => key.is_from_reserved(key.remote_ip, config),
    }
}

/// The `sk_msg` program's action for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageAction {
    /// Try `bpf_msg_redirect_hash` to the peer's key.
    Redirect,
    /// Leave the message to the TCP stack.
    Pass,
}

/// Decides whether a message may take the fast path.
///
/// A socket that sent one message through the TCP stack (`sent_direct`,
/// because the peer was not in the map yet) must keep doing so. That
/// message waits in the peer's TCP receive queue, and the peer reads its
/// redirect queue first, so a later redirected message would overtake it.
pub fn decide_message(sent_direct: bool) -> MessageAction {
    if sent_direct {
        MessageAction::Pass
    } else {
        MessageAction::Redirect
    }
}

/// Returns the IPv4 address inside an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), in network byte order.
pub fn mapped_ipv4(words: [u32; 4]) -> Option<u32> {
    let prefix = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    (words[0] == 0 && words[1] == 0 && words[2] == prefix).then_some(words[3])
}

/// Splits an IPv6 address into four network-order words, as the kernel's
/// contexts store it.
pub fn ipv6_words(address: core::net::Ipv6Addr) -> [u32; 4] {
    let octets = address.octets();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

#[cfg(feature = "user")]
// SAFETY: `SockKey` and `SockmapConfig` are `repr(C)`, `Copy`, made only of
// integers with explicit padding, so every bit pattern is a valid value.
#[allow(unsafe_code)]
unsafe impl aya::Pod for SockKey {}

#[cfg(feature = "user")]
// SAFETY: as for `SockKey`.
#[allow(unsafe_code)]
unsafe impl aya::Pod for SockmapConfig {}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const RESERVED_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
    const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
    const COOKIE: u64 = 4097;

    fn v4(address: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(address.octets())
    }

    /// Encodes a remote port as the context stores it.
    fn raw_port(port: u16) -> u32 {
        u32::from(port).to_be()
    }

    fn agent_side() -> SockAddrs {
        SockAddrs {
            family: AF_INET,
            local_ip4: v4(RESERVED_V4),
            remote_ip4: v4(SERVICE_V4),
            local_port: 40_000,
            remote_port_raw: raw_port(8080),
            ..SockAddrs::default()
        }
    }

    fn service_side() -> SockAddrs {
        SockAddrs {
            family: AF_INET,
            local_ip4: v4(SERVICE_V4),
            remote_ip4: v4(RESERVED_V4),
            local_port: 8080,
            remote_port_raw: raw_port(40_000),
            ..SockAddrs::default()
        }
    }

    fn config() -> SockmapConfig {
        SockmapConfig::new(RESERVED_V4, Ipv6Addr::LOCALHOST)
    }

    #[test]
    fn remote_port_converted_to_host_order() {
        let key = SockKey::new(COOKIE, &agent_side()).unwrap();

        assert_eq!(key.local_port, 40_000);
        assert_eq!(key.remote_port, 8080);
    }

    #[test]
    fn peer_of_agent_end_is_service_end() {
        let agent = SockKey::new(COOKIE, &agent_side()).unwrap();
        let service = SockKey::new(COOKIE, &service_side()).unwrap();

        assert_eq!(agent.peer(), service);
        assert_eq!(service.peer(), agent);
    }

    #[test]
    fn mapped_service_end_matches_ipv4_agent_end() {
        let mut mapped = service_side();
        mapped.family = AF_INET6;
        mapped.local_ip6 = ipv6_words(SERVICE_V4.to_ipv6_mapped());
        mapped.remote_ip6 = ipv6_words(RESERVED_V4.to_ipv6_mapped());
        let agent = SockKey::new(COOKIE, &agent_side()).unwrap();

        let service = SockKey::new(COOKIE, &mapped).unwrap();

        assert_eq!(service.family, AF_INET);
        assert_eq!(agent.peer(), service);
    }

    #[test]
    fn other_namespace_gives_other_key() {
        let first = SockKey::new(COOKIE, &service_side()).unwrap();
        let second = SockKey::new(COOKIE + 1, &service_side()).unwrap();

        assert_ne!(first, second);
    }

    #[test]
    fn unknown_family_has_no_key() {
        let addrs = SockAddrs {
            family: 1,
            ..agent_side()
        };

        assert!(SockKey::new(COOKIE, &addrs).is_none());
    }

    #[test]
    fn add_table() {
        let agent = SockKey::new(COOKIE, &agent_side()).unwrap();
        let service = SockKey::new(COOKIE, &service_side()).unwrap();
        let mut stranger_addrs = service_side();
        stranger_addrs.remote_ip4 = v4(Ipv4Addr::LOCALHOST);
        let stranger = SockKey::new(COOKIE, &stranger_addrs).unwrap();
        let config = config();
        let cases = [
            (agent, Side::Active, true, Some(config), true),
            (service, Side::Passive, true, Some(config), true),
            (agent, Side::Active, false, Some(config), false),
            (service, Side::Passive, false, Some(config), false),
            // The service connecting out or the agent accepting: wrong side.
            (agent, Side::Passive, true, Some(config), false),
            (service, Side::Active, true, Some(config), false),
            // A pod-local caller of the service that is not the agent.
            (stranger, Side::Passive, true, Some(config), false),
            (agent, Side::Active, true, None, false),
            (
                agent,
                Side::Active,
                true,
                Some(SockmapConfig::default()),
                false,
            ),
        ];

        for (index, (key, side, enrolled, config, expected)) in cases.into_iter().enumerate() {
            assert_eq!(
                should_add(&key, side, enrolled, config.as_ref()),
                expected,
                "case {index}"
            );
        }
    }

    #[test]
    fn ipv6_reserved_source_matches() {
        let config = SockmapConfig::new(RESERVED_V4, Ipv6Addr::LOCALHOST);
        let addrs = SockAddrs {
            family: AF_INET6,
            local_ip6: ipv6_words(Ipv6Addr::LOCALHOST),
            remote_ip6: ipv6_words(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 10)),
            local_port: 40_000,
            remote_port_raw: raw_port(8080),
            ..SockAddrs::default()
        };
        let key = SockKey::new(COOKIE, &addrs).unwrap();

        assert_eq!(key.family, AF_INET6);
        assert!(should_add(&key, Side::Active, true, Some(&config)));
        assert!(!should_add(&key, Side::Passive, true, Some(&config)));
    }

    #[test]
    fn direct_sender_keeps_passing() {
        assert_eq!(decide_message(false), MessageAction::Redirect);
        assert_eq!(decide_message(true), MessageAction::Pass);
    }
}
