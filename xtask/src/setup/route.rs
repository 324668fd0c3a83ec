//! Choice of the rustc that builds the eBPF program (the route), and the
//! packages each route needs.
//!
//! Debian's `rustc-web` ships a prebuilt `core` for `bpfel-unknown-none`, so
//! the stable-versioned compiler at `/usr/bin/rustc` builds the program
//! without `-Z build-std`. The upstream route is a rustup nightly with
//! `rust-src`, which rebuilds `core` for the target. Setup can install the
//! Debian route. The upstream one needs rustup's servers, so setup only
//! recognises it.

use std::env;

use anyhow::Context;

use super::apt::Package;
use crate::ebpf::{self, Route};

/// Packages of the Debian route.
pub const DEBIAN_PACKAGES: &[Package] = &[
    Package {
        name: "rustc-web",
        reason: "rustc at /usr/bin/rustc that builds the eBPF program",
    },
    Package {
        name: "libstd-rust-web-dev-bpf",
        reason: "prebuilt `core` for bpfel-unknown-none, so no build-std",
    },
];

/// Command that sets up the upstream route, for users without Debian's
/// packages.
pub const UPSTREAM_HINT: &str = "rustup toolchain install nightly --component rust-src";

/// Picks the route that the eBPF build will take. When neither route is
/// present, that is the Debian route, which setup installs, unless
/// `TOKENGATE_EBPF_ROUTE=upstream` selects the other.
pub fn detect() -> anyhow::Result<Route> {
    match ebpf::detect_route() {
        Ok(route) => Ok(route),
        Err(error) if upstream_forced() => Err(error).context(format!(
            "setup cannot install the upstream route; run `{UPSTREAM_HINT}` or unset {}",
            ebpf::ROUTE_ENV
        )),
        Err(_) => Ok(Route::Debian),
    }
}

/// Returns the route in words, for setup's output.
pub fn describe(route: Route) -> &'static str {
    match route {
        Route::Debian => {
            "Debian route: rustc-web at /usr/bin/rustc with prebuilt core for bpfel-unknown-none"
        }
        Route::Upstream => "upstream route: rustup nightly with rust-src (build-std)",
    }
}

/// Returns the Debian packages that `route` needs beyond the common ones.
pub fn packages(route: Route) -> &'static [Package] {
    match route {
        Route::Debian => DEBIAN_PACKAGES,
        Route::Upstream => &[],
    }
}

/// Tells whether `name` is a package of the Debian route.
pub fn is_toolchain_package(name: &str) -> bool {
    DEBIAN_PACKAGES.iter().any(|package| package.name == name)
}

fn upstream_forced() -> bool {
    env::var(ebpf::ROUTE_ENV).is_ok_and(|value| value == "upstream")
}
