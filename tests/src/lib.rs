//! End-to-end harness for tokengate.
//!
//! Pods are network namespaces on a bridge, the service is the `tg-echo`
//! binary running inside a pod, the token issuer is an in-process HTTP
//! server on loopback, and the agent is the real `tokengate` binary as a
//! child process. Every resource has a guard that removes it on drop, also
//! when a test panics. The e2e tests in `tests/` and the `tokengate-demo`
//! binary are built on this crate.

pub mod agent;
pub mod cases;
pub mod echo;
pub mod http;
pub mod ids;
pub mod issuer;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod skip;
pub mod testbed;
pub mod tokens;

use std::path::PathBuf;

/// Root of the Cargo workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match manifest_dir.parent() {
        Some(parent) => parent.to_path_buf(),
        None => manifest_dir,
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;

    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

/// Deterministic body bytes of the given length (a repeating byte ramp
/// offset by position, so reordered or lost chunks change the hash).
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|index| (index % 251) as u8 ^ (index / 251 % 256) as u8)
        .collect()
}
