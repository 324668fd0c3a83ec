//! Short names that are unique per process and per call.
//!
//! Linux interface names hold at most 15 bytes, so ids are the process id in
//! base 36 padded to a fixed width (the maximum pid, 2^22, fits in 5 digits)
//! followed by a per-process counter in base 36. The fixed width keeps two
//! processes from producing the same id.

use std::sync::atomic::{AtomicU32, Ordering};

/// Width of the process id part of an id.
const PID_DIGITS: usize = 5;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Returns an id that no other call in any running process returns, 6 to 9
/// characters of `[0-9a-z]`.
pub fn unique_id() -> String {
    let counter = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:0>width$}{}",
        base36(std::process::id()),
        base36(counter),
        width = PID_DIGITS
    )
}

fn base36(mut value: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("base 36 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_encodes_boundaries() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(1 << 22), "2hwcg");
    }

    #[test]
    fn ids_are_distinct_and_short() {
        let first = unique_id();
        let second = unique_id();
        assert_ne!(first, second);
        assert!(first.len() <= 9, "{first}");
        assert!(first.chars().all(|c| c.is_ascii_alphanumeric()), "{first}");
    }
}
