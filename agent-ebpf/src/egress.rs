//! Egress steering. `cgroup/connect4` and `cgroup/connect6` rewrite a
//! selected pod's TCP connections to configured destinations so that they
//! reach the agent's egress listener on the pod's own loopback. A
//! `sock_ops` program records each such connection's original destination
//! for the agent to read when it accepts.
//!
//! The programs are attached to the cgroups of the selected pods only. The
//! agent's own sockets belong to the agent's cgroup, so they never run these
//! programs. The cgroup id and socket mark checks guard against a
//! configuration that puts the agent into a pod's cgroup anyway.
#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::{bpf_sock_addr, bpf_sock_ops};
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt,
};
use aya_ebpf::macros::{cgroup_sock_addr, map, sock_ops};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext};
use tokengate_common::egress::{
    is_v4_mapped, v4_mapped, Dest4, Dest6, FlowKey, Origin, Pod, Settings, COUNTER_AGENT_SKIPPED,
    COUNTER_MAP_ERRORS, COUNTER_PASSED, COUNTER_RECORDED, COUNTER_REJECTED, COUNTER_SLOTS,
    COUNTER_STEERED, DEST_PREFIX_BITS, LAYOUT_VERSION, MAX_DESTINATIONS, MAX_FLOWS, MAX_PODS,
    SOCK_OPS_ACTIVE_ESTABLISHED, SOCK_STREAM, SOL_SOCKET, SO_MARK,
};
use tokengate_common::{AF_INET, AF_INET6, IPPROTO_TCP};

// The static names are the map names user space looks up
// (`tokengate_common::egress::MAP_*`); `pinned` makes the loader pin them by
// name under `<pin_path>/egress/`.

#[map]
static TG_EGRESS_PODS: HashMap<u64, Pod> = HashMap::pinned(MAX_PODS, 0);

#[map]
static TG_EGRESS_DEST4: LpmTrie<Dest4, u8> = LpmTrie::pinned(MAX_DESTINATIONS, 0);

#[map]
static TG_EGRESS_DEST6: LpmTrie<Dest6, u8> = LpmTrie::pinned(MAX_DESTINATIONS, 0);

#[map]
static TG_EGRESS_PENDING: LruHashMap<u64, Origin> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map]
static TG_EGRESS_FLOWS: LruHashMap<FlowKey, Origin> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map]
static TG_EGRESS_SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map]
static TG_EGRESS_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Return value of a `cgroup/connect*` program that lets `connect` go on.
const CONNECT_ALLOW: i32 = 1;
/// Return value that fails `connect` with `EPERM`.
const CONNECT_REJECT: i32 = 0;

/// `127.0.0.1` in network order.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1` in network-order words.
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// The decision for one `connect` call.
enum Step {
    /// Leave the destination as it is; the value is the counter to bump.
    Pass(u32),
    /// Rewrite the destination to the pod's listener on this port.
    Steer(u16),
    /// Fail the call with `EPERM`.
    Reject,
}

#[cgroup_sock_addr(connect4)]
pub fn tokengate_egress_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the whole run.
    unsafe { connect4(&ctx) }
}

#[cgroup_sock_addr(connect6)]
pub fn tokengate_egress_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { connect6(&ctx) }
}

/// # Safety
/// `ctx.sock_addr` must be the context the kernel passed.
unsafe fn connect4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    let dest_ip = read_field(addr_of!((*addr).user_ip4));
    let dest_port = port_from_context(read_field(addr_of!((*addr).user_port)));

    let step = decide(ctx, |cookie, pod| {
        let key = Key::new(
            DEST_PREFIX_BITS + 32,
            Dest4::new(cookie, dest_port, dest_ip.to_ne_bytes()),
        );
        TG_EGRESS_DEST4.get(&key).map(|_| pod.port_v4)
    });
    finish(step, |port| {
        save_origin(ctx, AF_INET, dest_port, [dest_ip, 0, 0, 0])?;
        write_field(addr_of_mut!((*addr).user_ip4), LOOPBACK_V4);
        write_field(addr_of_mut!((*addr).user_port), port_to_context(port));
        Ok(())
    })
}

/// # Safety
/// `ctx.sock_addr` must be the context the kernel passed.
unsafe fn connect6(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    let dest_ip = [
        read_field(addr_of!((*addr).user_ip6[0])),
        read_field(addr_of!((*addr).user_ip6[1])),
        read_field(addr_of!((*addr).user_ip6[2])),
        read_field(addr_of!((*addr).user_ip6[3])),
    ];
    let dest_port = port_from_context(read_field(addr_of!((*addr).user_port)));
    // An IPv6 socket that connects to `::ffff:a.b.c.d` talks IPv4: it is
    // matched against the IPv4 destinations and steered to the IPv4
    // listener through its mapped address.
    let mapped = is_v4_mapped(dest_ip);

    let step = decide(ctx, |cookie, pod| {
        if mapped {
            let key = Key::new(
                DEST_PREFIX_BITS + 32,
                Dest4::new(cookie, dest_port, dest_ip[3].to_ne_bytes()),
            );
            TG_EGRESS_DEST4.get(&key).map(|_| pod.port_v4)
        } else {
            let key = Key::new(
                DEST_PREFIX_BITS + 128,
                Dest6::new(cookie, dest_port, words_to_bytes(dest_ip)),
            );
            TG_EGRESS_DEST6.get(&key).map(|_| pod.port_v6)
        }
    });
    finish(step, |port| {
        let (family, origin_addr, listener) = if mapped {
            (AF_INET, [dest_ip[3], 0, 0, 0], v4_mapped(LOOPBACK_V4))
        } else {
            (AF_INET6, dest_ip, LOOPBACK_V6)
        };
        save_origin(ctx, family, dest_port, origin_addr)?;
        for (index, word) in listener.iter().enumerate() {
            write_field(addr_of_mut!((*addr).user_ip6[index]), *word);
        }
        write_field(addr_of_mut!((*addr).user_port), port_to_context(port));
        Ok(())
    })
}

/// Decides a `connect` call; `lookup` returns the listener port for the
/// destination when it is one of the pod's configured destinations.
///
/// # Safety
/// `ctx.sock_addr` must be the context the kernel passed.
unsafe fn decide(ctx: &SockAddrContext, lookup: impl FnOnce(u64, &Pod) -> Option<u16>) -> Step {
    let addr = ctx.sock_addr;
    if read_field(addr_of!((*addr).protocol)) != IPPROTO_TCP
        || read_field(addr_of!((*addr).type_)) != SOCK_STREAM
    {
        return Step::Pass(COUNTER_PASSED);
    }

    let cookie = bpf_get_netns_cookie(addr.cast::<c_void>());
    let Some(pod) = TG_EGRESS_PODS.get(&cookie) else {
        return Step::Pass(COUNTER_PASSED);
    };
    let Some(port) = lookup(cookie, pod) else {
        return Step::Pass(COUNTER_PASSED);
    };

    // From here on the connection goes to a configured destination, so a
    // missing record or listener fails closed.
    let Some(settings) = TG_EGRESS_SETTINGS
        .get(0)
        .filter(|settings| settings.version == LAYOUT_VERSION && pod.version == LAYOUT_VERSION)
    else {
        return Step::Reject;
    };
    if is_agent_socket(ctx, settings) {
        return Step::Pass(COUNTER_AGENT_SKIPPED);
    }
    if port == 0 {
        return Step::Reject;
    }
    Step::Steer(port)
}

/// Applies `step`; `steer` saves the origin and rewrites the address.
fn finish(step: Step, steer: impl FnOnce(u16) -> Result<(), ()>) -> i32 {
    match step {
        Step::Pass(counter) => {
            count(counter);
            CONNECT_ALLOW
        }
        Step::Reject => {
            count(COUNTER_REJECTED);
            CONNECT_REJECT
        }
        Step::Steer(port) => {
            if steer(port).is_err() {
                // Without a saved origin the agent could not forward, so the
                // connection fails now rather than at the agent.
                count(COUNTER_MAP_ERRORS);
                return CONNECT_REJECT;
            }
            count(COUNTER_STEERED);
            CONNECT_ALLOW
        }
    }
}

/// Tells whether the connecting task or socket is the agent's.
///
/// # Safety
/// `ctx.sock_addr` must be the context the kernel passed.
unsafe fn is_agent_socket(ctx: &SockAddrContext, settings: &Settings) -> bool {
    if settings.agent_cgroup_id != 0 && bpf_get_current_cgroup_id() == settings.agent_cgroup_id {
        return true;
    }
    if settings.agent_mark == 0 {
        return false;
    }
    let mut mark: u32 = 0;
    let result = bpf_getsockopt(
        ctx.sock_addr.cast::<c_void>(),
        SOL_SOCKET,
        SO_MARK,
        addr_of_mut!(mark).cast::<c_void>(),
        core::mem::size_of::<u32>() as i32,
    );
    result == 0 && mark == settings.agent_mark
}

/// Stores the original destination under the socket's cookie until the
/// `sock_ops` program moves it to the flow map.
///
/// # Safety
/// `ctx.sock_addr` must be the context the kernel passed.
unsafe fn save_origin(
    ctx: &SockAddrContext,
    family: u32,
    port: u16,
    addr: [u32; 4],
) -> Result<(), ()> {
    let cookie = bpf_get_socket_cookie(ctx.sock_addr.cast::<c_void>());
    let origin = Origin {
        family,
        port,
        padding: 0,
        addr,
    };
    TG_EGRESS_PENDING
        .insert(&cookie, &origin, 0)
        .map_err(|_| ())
}

#[sock_ops]
pub fn tokengate_egress_record(ctx: SockOpsContext) -> u32 {
    if ctx.op() == SOCK_OPS_ACTIVE_ESTABLISHED {
        // SAFETY: the kernel passes a valid `bpf_sock_ops` for the whole run.
        unsafe { record(&ctx) };
    }
    1
}

/// Moves a steered connection's origin from its socket cookie to its flow
/// key. The client socket runs this when its SYN-ACK arrives, before it
/// sends the ACK that lets the agent accept, so the record is there first.
///
/// # Safety
/// `ctx.ops` must be the context the kernel passed.
unsafe fn record(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let socket_cookie = bpf_get_socket_cookie(ops.cast::<c_void>());
    let Some(origin) = TG_EGRESS_PENDING.get(&socket_cookie) else {
        return;
    };
    let origin = *origin;

    let family = read_field(addr_of!((*ops).family));
    let (local, remote) = if family == AF_INET6 {
        (
            read_words(addr_of!((*ops).local_ip6)),
            read_words(addr_of!((*ops).remote_ip6)),
        )
    } else {
        (
            [read_field(addr_of!((*ops).local_ip4)), 0, 0, 0],
            [read_field(addr_of!((*ops).remote_ip4)), 0, 0, 0],
        )
    };
    // `local_port` is in host order. `remote_port` contains the
    // network-order port in its upper 16 bits on little-endian hosts, so it
    // reads as a big-endian `u32`.
    let local_port = read_field(addr_of!((*ops).local_port)) as u16;
    let remote_port = u32::from_be(read_field(addr_of!((*ops).remote_port))) as u16;

    let netns_cookie = bpf_get_netns_cookie(ops.cast::<c_void>());
    let key = FlowKey::new(
        netns_cookie,
        family,
        (local, local_port),
        (remote, remote_port),
    );
    if TG_EGRESS_FLOWS.insert(&key, &origin, 0).is_err() {
        count(COUNTER_MAP_ERRORS);
        return;
    }
    let _ = TG_EGRESS_PENDING.remove(&socket_cookie);
    count(COUNTER_RECORDED);
}

/// Converts `user_port` (network order in the low 16 bits) to host order.
fn port_from_context(value: u32) -> u16 {
    u16::from_be(value as u16)
}

/// Converts a host-order port to the `user_port` layout.
fn port_to_context(port: u16) -> u32 {
    u32::from(port.to_be())
}

fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut index = 0;
    while index < 4 {
        let word = words[index].to_ne_bytes();
        bytes[index * 4] = word[0];
        bytes[index * 4 + 1] = word[1];
        bytes[index * 4 + 2] = word[2];
        bytes[index * 4 + 3] = word[3];
        index += 1;
    }
    bytes
}

/// Reads one context field with a load of exactly its width. The verifier
/// rejects context loads wider than a field (IPv6 words allow at most 4
/// bytes), and LLVM may merge neighbouring plain loads, so reads are
/// volatile.
///
/// # Safety
/// `field` must point into the context the kernel passed.
#[inline(always)]
unsafe fn read_field<T: Copy>(field: *const T) -> T {
    read_volatile(field)
}

/// Reads four IPv6 words one at a time.
///
/// # Safety
/// As [`read_field`].
#[inline(always)]
unsafe fn read_words(field: *const [u32; 4]) -> [u32; 4] {
    let first = field.cast::<u32>();
    [
        read_volatile(first),
        read_volatile(first.add(1)),
        read_volatile(first.add(2)),
        read_volatile(first.add(3)),
    ]
}

/// Writes one context field with a store of exactly its width.
///
/// # Safety
/// `field` must point to a writable field of the context the kernel passed.
#[inline(always)]
unsafe fn write_field<T: Copy>(field: *mut T, value: T) {
    write_volatile(field, value);
}

fn count(slot: u32) {
    if let Some(counter) = TG_EGRESS_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer is this CPU's element of the array, valid for
        // the run of the program, which runs with migration disabled. A run
        // nested on the same CPU may lose an increment, which a statistic
        // tolerates.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel accepts the dual licence as GPL-compatible, which GPL-only
/// helpers need.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Named so that a change of the context structs in a new aya-ebpf release
// shows up here as a compile error.
const _: usize = core::mem::size_of::<bpf_sock_addr>() + core::mem::size_of::<bpf_sock_ops>();
