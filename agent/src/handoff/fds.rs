//! Taking ownership of file descriptors received with `SCM_RIGHTS`.
//!
//! nix returns received descriptors as raw integers; turning them into
//! `OwnedFd` is the one step here that the compiler cannot check.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Wraps descriptors that `recvmsg` has just installed in this process.
#[expect(
    unsafe_code,
    reason = "descriptors received with SCM_RIGHTS arrive as raw integers"
)]
pub(super) fn adopt(received: Vec<RawFd>) -> Vec<OwnedFd> {
    received
        .into_iter()
        // SAFETY: the only caller, `protocol::receive`, passes the
        // descriptors that `recvmsg` has just installed in this process and
        // owns no other copy of them, so each one is open and owned once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}
