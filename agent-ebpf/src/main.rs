//! The `sk_lookup` program that steers new TCP connections to a pod's
//! protected ports into the agent's listener inside that pod.
//!
//! It runs in the pod's network namespace before the kernel's own socket
//! lookup. The decision itself is `tokengate_common::decide_protected`, which
//! user space tests on the host; this file only reads the context and maps,
//! counts, and assigns the socket.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::bindings::{bpf_sk_lookup, BPF_SK_LOOKUP_F_REPLACE};
use aya_ebpf::macros::{map, sk_lookup};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, SockMap};
use aya_ebpf::programs::SkLookupContext;
use aya_log_ebpf::debug;
use tokengate_common::{
    decide_protected, DropReason, Peer, SteerConfig, Verdict, COUNTER_DROPPED, COUNTER_PASSED,
    COUNTER_SLOTS, COUNTER_STEERED, IPPROTO_TCP, LISTENER_SLOTS, MAX_PORTS,
};

// The static names are the map names user space looks up (`MAP_*` in
// tokengate-common). `pinned` makes the loader pin them by name in the pod's
// pin directory, so a restarted agent reuses them.

#[map]
static mut TG_LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

#[map]
static TG_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_PORTS, 0);

#[map]
static TG_CONFIG: Array<SteerConfig> = Array::pinned(1, 0);

#[map]
static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[sk_lookup]
pub fn tokengate_steer(ctx: SkLookupContext) -> u32 {
    match try_steer(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(COUNTER_DROPPED);
            debug!(
                &ctx,
                "tokengate: dropped connection, reason {}", reason as u32
            );
            SK_DROP
        }
    }
}

fn try_steer(ctx: &SkLookupContext) -> Result<u32, DropReason> {
    let lookup = ctx.lookup;

    // SAFETY: the kernel passes a valid `bpf_sk_lookup` for the whole run of
    // the program, and `read_field` only reads fields of it.
    let protocol = unsafe { read_field(addr_of!((*lookup).protocol)) };
    if protocol != IPPROTO_TCP {
        return Ok(SK_PASS);
    }

    // `local_port` is in host byte order (unlike `remote_port`), and only
    // the low 16 bits are used.
    // SAFETY: as above.
    let port = unsafe { read_field(addr_of!((*lookup).local_port)) } as u16;
    if TG_PORTS.get_ptr(&port).is_none() {
        count(COUNTER_PASSED);
        return Ok(SK_PASS);
    }

    // SAFETY: as above; the addresses stay in network byte order, as the
    // configuration record stores them.
    let peer = unsafe {
        Peer {
            family: read_field(addr_of!((*lookup).family)),
            remote_ip4: read_field(addr_of!((*lookup).remote_ip4)),
            remote_ip6: [
                read_field(addr_of!((*lookup).remote_ip6[0])),
                read_field(addr_of!((*lookup).remote_ip6[1])),
                read_field(addr_of!((*lookup).remote_ip6[2])),
                read_field(addr_of!((*lookup).remote_ip6[3])),
            ],
            // `remote_port` is a `__be16`; kernels before 5.19 declared it a
            // `__u32`, whose first two bytes a narrow load reads the same way.
            remote_port: u16::from_be(read_field(addr_of!((*lookup).remote_port))),
        }
    };

    match decide_protected(&peer, TG_CONFIG.get(0)) {
        Verdict::Pass => {
            count(COUNTER_PASSED);
            Ok(SK_PASS)
        }
        Verdict::Steer(slot) => {
            assign_listener(ctx, slot)?;
            count(COUNTER_STEERED);
            Ok(SK_PASS)
        }
        Verdict::Drop(reason) => Err(reason),
    }
}

/// Reads one context field with a load of exactly its width.
///
/// The verifier rejects context loads wider than a field (the `remote_ip6`
/// words allow at most 4 bytes), and LLVM may merge neighbouring plain loads
/// into one 8-byte load, so every read is volatile.
///
/// # Safety
/// `field` must point into the `bpf_sk_lookup` the kernel passed.
#[inline(always)]
unsafe fn read_field<T: Copy>(field: *const T) -> T {
    read_volatile(field)
}

/// Selects the listener in `slot` as the connection's socket.
fn assign_listener(ctx: &SkLookupContext, slot: u32) -> Result<(), DropReason> {
    // SAFETY: `redirect_sk_lookup` takes `&mut self` but only passes the map's
    // address to the kernel; nothing in the program writes the static.
    let listeners = unsafe { &mut *addr_of_mut!(TG_LISTENERS) };

    // REPLACE, because a protected port must end at the agent's listener
    // even when an earlier sk_lookup program already selected a socket. That
    // program is the previous agent's during a restart, or a foreign one.
    listeners
        .redirect_sk_lookup(ctx, slot, u64::from(BPF_SK_LOOKUP_F_REPLACE))
        .map_err(|_| DropReason::ListenerMissing)
}

fn count(slot: u32) {
    if let Some(counter) = TG_COUNTERS.get_ptr_mut(slot) {
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

/// `bpf_perf_event_output`, which aya-log uses, is GPL-only; the crate is
/// dual-licensed, which the kernel accepts as GPL-compatible.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// `bpf_sk_lookup` is named so that a change of the context struct in a new
// aya-ebpf release shows up here as a compile error.
const _: usize = core::mem::size_of::<bpf_sk_lookup>();
