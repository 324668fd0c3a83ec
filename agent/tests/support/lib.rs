//! Harness shared by the in-process integration tests: HTTP servers on
//! 127.0.0.1 port 0, the agent's proxy and admin listeners, audit capture,
//! metric scraping and tokens signed with the fixture keys.
//!
//! Each test target includes this directory with
//! `#[path = "support/lib.rs"] mod support;`. A directory without `main.rs`
//! is not a test target of its own, so Cargo builds no extra binary for it.
#![allow(
    dead_code,
    reason = "each test target compiles the whole harness but uses only part of it"
)]

pub mod agent;
pub mod http;
pub mod metrics;
pub mod tokens;

use std::time::{Duration, Instant};

/// Pause between two checks of a condition.
const POLL: Duration = Duration::from_millis(5);

/// Polls `condition` until it holds, failing the test after `bound`.
pub async fn wait_until(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(POLL).await;
    }
}
