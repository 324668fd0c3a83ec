//! The sockmap fast path for the agent's hop to a pod's service.
//!
//! `tokengate_sockops` runs for every TCP socket of the cgroup it is
//! attached to. When a connection is established it adds the socket to a
//! sockhash if the socket is in an enrolled pod's namespace and belongs to
//! the agent's upstream connection. The connecting end of that connection
//! has the reserved source as local address, the accepting end as remote
//! address.
//! `tokengate_sk_msg` runs on each `sendmsg` of those sockets and moves the
//! message into the peer socket's receive queue, past the TCP/IP stack. A
//! message whose peer is not in the map goes through the stack as usual.
//!
//! The decisions are in `tokengate_common::sockmap`, tested on the host;
//! this file reads the contexts, counts, and calls the helpers.
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::bindings::{
    bpf_sock_ops, sk_msg_md, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
};
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::{map, sk_msg, sock_ops};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use tokengate_common::sockmap::{
    decide_message, should_add, MessageAction, Side, SockAddrs, SockKey, SockmapConfig,
    COUNTER_BYTES_PASSED, COUNTER_BYTES_REDIRECTED, COUNTER_MAP_FULL, COUNTER_MSG_PASSED,
    COUNTER_MSG_REDIRECTED, COUNTER_SLOTS, COUNTER_SOCKETS_ADDED, COUNTER_UPDATE_FAILED, E2BIG,
    MAX_DIRECT, MAX_PODS, MAX_SOCKETS,
};

/// `TCP_CLOSE` from include/net/tcp_states.h, the last state of a socket.
const TCP_CLOSE: u32 = 7;

// The static names are the map names user space looks up (`MAP_*` in
// tokengate_common::sockmap); `pinned` makes the loader pin them by name in
// `<pin_path>/sockmap/`.

#[map]
static TG_SOCKMAP_SOCKS: SockHash<SockKey> = SockHash::pinned(MAX_SOCKETS, 0);

#[map]
static TG_SOCKMAP_PODS: HashMap<u64, u8> = HashMap::pinned(MAX_PODS, 0);

#[map]
static TG_SOCKMAP_CONFIG: Array<SockmapConfig> = Array::pinned(1, 0);

#[map]
static TG_SOCKMAP_DIRECT: LruHashMap<SockKey, u8> = LruHashMap::pinned(MAX_DIRECT, 0);

#[map]
static TG_SOCKMAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[sock_ops]
pub fn tokengate_sockops(ctx: SockOpsContext) -> u32 {
    // A sock_ops program's return value is only read by the callbacks that
    // ask for a reply; established and state callbacks ignore it.
    try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the whole run.
    let op = unsafe { read_field(addr_of!((*ops).op)) };
    let side = match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => Side::Active,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => Side::Passive,
        BPF_SOCK_OPS_STATE_CB => {
            forget_closed(ctx);
            return;
        }
        _ => return,
    };

    let Some(key) = sock_ops_key(ctx) else {
        return;
    };
    let enrolled = TG_SOCKMAP_PODS.get_ptr(&key.netns_cookie).is_some();
    if !should_add(&key, side, enrolled, TG_SOCKMAP_CONFIG.get(0)) {
        return;
    }

    let mut key = key;
    // SAFETY: `ops` is the context of this run; the helper only reads it
    // and the socket it points to.
    let result = TG_SOCKMAP_SOCKS.update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY));
    match result {
        Ok(()) => {
            count(COUNTER_SOCKETS_ADDED, 1);
            // The state callback removes the socket's `TG_SOCKMAP_DIRECT`
            // entry, if any, when it closes; the kernel itself removes it
            // from the sockhash.
            // SAFETY: as above.
            let flags = unsafe { read_field(addr_of!((*ops).bpf_sock_ops_cb_flags)) };
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        Err(error) if error == -E2BIG => count(COUNTER_MAP_FULL, 1),
        Err(error) => {
            count(COUNTER_UPDATE_FAILED, 1);
            debug!(ctx, "tokengate: sockhash update failed, error {}", error);
        }
    }
}

/// Drops the `TG_SOCKMAP_DIRECT` entry of a socket that reached
/// `TCP_CLOSE`, so a later connection with the same 4-tuple starts afresh.
fn forget_closed(ctx: &SockOpsContext) {
    // `args[1]` of a state callback is the new state.
    if ctx.arg(1) != TCP_CLOSE {
        return;
    }
    if let Some(key) = sock_ops_key(ctx) {
        let _ = TG_SOCKMAP_DIRECT.remove(&key);
    }
}

fn sock_ops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the whole run of
    // the program, and `read_field` only reads fields of it.
    let addrs = unsafe {
        SockAddrs {
            family: read_field(addr_of!((*ops).family)),
            local_ip4: read_field(addr_of!((*ops).local_ip4)),
            remote_ip4: read_field(addr_of!((*ops).remote_ip4)),
            local_ip6: [
                read_field(addr_of!((*ops).local_ip6[0])),
                read_field(addr_of!((*ops).local_ip6[1])),
                read_field(addr_of!((*ops).local_ip6[2])),
                read_field(addr_of!((*ops).local_ip6[3])),
            ],
            remote_ip6: [
                read_field(addr_of!((*ops).remote_ip6[0])),
                read_field(addr_of!((*ops).remote_ip6[1])),
                read_field(addr_of!((*ops).remote_ip6[2])),
                read_field(addr_of!((*ops).remote_ip6[3])),
            ],
            local_port: read_field(addr_of!((*ops).local_port)),
            remote_port_raw: read_field(addr_of!((*ops).remote_port)),
        }
    };
    // SAFETY: the helper reads the namespace of the context's socket.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SockKey::new(cookie, &addrs)
}

#[sk_msg]
pub fn tokengate_sk_msg(ctx: SkMsgContext) -> u32 {
    let size = u64::from(ctx.size());
    let Some(key) = sk_msg_key(&ctx) else {
        count_passed(size);
        return SK_PASS;
    };

    let sent_direct = TG_SOCKMAP_DIRECT.get_ptr(&key).is_some();
    if decide_message(sent_direct) == MessageAction::Pass {
        count_passed(size);
        return SK_PASS;
    }

    let mut peer = key.peer();
    let verdict = TG_SOCKMAP_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if verdict == i64::from(SK_PASS) {
        count(COUNTER_MSG_REDIRECTED, 1);
        count(COUNTER_BYTES_REDIRECTED, size);
    } else {
        // The peer is not in the map (yet, or no longer). The helper
        // returned SK_DROP, but the program's own SK_PASS decides: the
        // message takes the TCP stack, and so does everything after it.
        let _ = TG_SOCKMAP_DIRECT.insert(&key, &1, u64::from(BPF_ANY));
        count_passed(size);
    }
    SK_PASS
}

fn sk_msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let msg: *const sk_msg_md = ctx.msg;
    // SAFETY: the kernel passes a valid `sk_msg_md` for the whole run of the
    // program, and `read_field` only reads fields of it.
    let addrs = unsafe {
        SockAddrs {
            family: read_field(addr_of!((*msg).family)),
            local_ip4: read_field(addr_of!((*msg).local_ip4)),
            remote_ip4: read_field(addr_of!((*msg).remote_ip4)),
            local_ip6: [
                read_field(addr_of!((*msg).local_ip6[0])),
                read_field(addr_of!((*msg).local_ip6[1])),
                read_field(addr_of!((*msg).local_ip6[2])),
                read_field(addr_of!((*msg).local_ip6[3])),
            ],
            remote_ip6: [
                read_field(addr_of!((*msg).remote_ip6[0])),
                read_field(addr_of!((*msg).remote_ip6[1])),
                read_field(addr_of!((*msg).remote_ip6[2])),
                read_field(addr_of!((*msg).remote_ip6[3])),
            ],
            local_port: read_field(addr_of!((*msg).local_port)),
            remote_port_raw: read_field(addr_of!((*msg).remote_port)),
        }
    };
    // SAFETY: the helper reads the namespace of the message's socket.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SockKey::new(cookie, &addrs)
}

/// Reads one context field with a load of exactly its width.
///
/// The verifier rejects context loads wider than a field, and LLVM may merge
/// neighbouring plain loads (the address words) into one 8-byte load, so
/// every read is volatile.
///
/// # Safety
/// `field` must point into the context the kernel passed.
#[inline(always)]
unsafe fn read_field<T: Copy>(field: *const T) -> T {
    read_volatile(field)
}

fn count_passed(size: u64) {
    count(COUNTER_MSG_PASSED, 1);
    count(COUNTER_BYTES_PASSED, size);
}

fn count(slot: u32, amount: u64) {
    if let Some(counter) = TG_SOCKMAP_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer is this CPU's element of the array, valid for
        // the run of the program, which runs with migration disabled. A run
        // nested on the same CPU may lose an increment, which a statistic
        // tolerates.
        unsafe { *counter += amount };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// `bpf_perf_event_output` (aya-log) and the sockhash helpers are GPL-only;
/// the crate is dual-licensed, which the kernel accepts as GPL-compatible.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
