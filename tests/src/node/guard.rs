//! Guards for the namespaces and links a test node creates, and the
//! per-namespace and per-device sysctls it sets on them.
//!
//! Addresses, routes and per-device sysctls need no guard of their own: the
//! kernel removes them with their device, and a namespace's own sysctls go
//! with the namespace.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::netns::{netns_exists, netns_path, run_in_netns, run_ip};

/// Runs `ip ARGS` during cleanup and prints a failure instead of raising
/// it, because cleanup runs in `Drop`, possibly while a panic unwinds.
fn run_ip_cleanup(args: &[&str]) {
    if let Err(error) = run_ip(args) {
        let text = format!("{error:#}");
        let already_gone = text.contains("Cannot find device")
            || text.contains("No such file")
            || text.contains("Invalid \"netns\" value");
        if !already_gone {
            eprintln!("cleanup: {text}");
        }
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub(crate) struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// Creates the namespace and brings its loopback up. Fails if the name
    /// exists, so nothing of someone else's is reused or removed.
    pub(crate) fn create(name: &str) -> Result<Self> {
        if netns_exists(name) {
            bail!("network namespace {name} already exists: remove it with `ip netns del {name}`");
        }
        run_ip(&["netns", "add", name])?;
        let guard = Self {
            name: name.to_owned(),
        };
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        // Devices created in the namespace from now on skip duplicate
        // address detection, so their link-local address is usable at once.
        write_sysctl(Some(name), "net/ipv6/conf/default/accept_dad", "0")?;
        Ok(guard)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        run_ip_cleanup(&["netns", "del", &self.name]);
    }
}

/// A network device, deleted on drop; deleting one end of a veth pair
/// deletes the other end too. `netns` is `None` for the host namespace.
#[derive(Debug)]
pub(crate) struct LinkGuard {
    name: String,
    netns: Option<String>,
}

impl LinkGuard {
    /// Creates a veth pair: `name` in `netns` (the host when `None`), its
    /// peer `peer` moved into `peer_netns`.
    pub(crate) fn create_veth(
        name: &str,
        netns: Option<&str>,
        peer: &str,
        peer_netns: &str,
    ) -> Result<Self> {
        let mut args = Vec::new();
        if let Some(netns) = netns {
            args.extend(["-n", netns]);
        }
        args.extend([
            "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_netns,
        ]);
        run_ip(&args)?;
        Ok(Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        match &self.netns {
            Some(netns) if !netns_exists(netns) => {}
            Some(netns) => run_ip_cleanup(&["-n", netns, "link", "del", &self.name]),
            None => run_ip_cleanup(&["link", "del", &self.name]),
        }
    }
}

/// Runs `ip` in `netns`, or in the host namespace when it is `None`.
pub(crate) fn ip_in(netns: Option<&str>, args: &[&str]) -> Result<String> {
    match netns {
        Some(netns) => {
            let mut full = vec!["-n", netns];
            full.extend_from_slice(args);
            run_ip(&full)
        }
        None => run_ip(args),
    }
}

/// Writes `value` to `/proc/sys/<key>` (slash-separated) as seen from
/// `netns`, or from the host namespace when it is `None`. Callers set only
/// the sysctls of their own namespaces and of devices they created: the
/// kernel drops those with the namespace or device, so nothing needs
/// restoring.
pub(crate) fn write_sysctl(netns: Option<&str>, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let write = || {
        std::fs::write(&path, value)
            .with_context(|| format!("failed to write {value} to {}", path.display()))
    };
    match netns {
        // /proc/sys/net shows the namespace of the thread that opens it.
        Some(netns) => run_in_netns(netns, write)
            .with_context(|| format!("failed to enter {}", netns_path(netns).display()))?,
        None => write(),
    }
}
