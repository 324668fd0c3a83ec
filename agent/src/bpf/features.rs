//! Probing the kernel for the eBPF features the agent uses, and saying at
//! start which modes work without the missing ones.
//!
//! Each probe does the smallest real thing: it loads a two-instruction
//! program of the type, creates a one-entry map, or attaches and updates a
//! link in a network namespace made for the probe and dropped after it.
//! Nothing probed stays in the kernel.

use std::fmt;
use std::os::fd::AsFd;
use std::path::Path;

use serde::Serialize;
use tracing::{error, info, warn};

use super::syscall;

/// `BPF_PROG_TYPE_SOCK_OPS`.
const PROG_TYPE_SOCK_OPS: u32 = 13;
/// `BPF_PROG_TYPE_SK_MSG`.
const PROG_TYPE_SK_MSG: u32 = 16;
/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_PROG_TYPE_SK_LOOKUP`.
const PROG_TYPE_SK_LOOKUP: u32 = 30;

/// `BPF_CGROUP_SOCK_OPS`.
const ATTACH_SOCK_OPS: u32 = 3;
/// `BPF_SK_MSG_VERDICT`.
const ATTACH_SK_MSG_VERDICT: u32 = 7;
/// `BPF_CGROUP_INET4_CONNECT`.
const ATTACH_INET4_CONNECT: u32 = 10;
/// `BPF_CGROUP_INET6_CONNECT`.
const ATTACH_INET6_CONNECT: u32 = 11;
/// `BPF_SK_LOOKUP`.
pub(crate) const ATTACH_SK_LOOKUP: u32 = 36;

/// `BPF_MAP_TYPE_SOCKMAP`.
const MAP_TYPE_SOCKMAP: u32 = 15;
/// `BPF_MAP_TYPE_SOCKHASH`.
const MAP_TYPE_SOCKHASH: u32 = 18;

/// `ENOTSUPP`, the kernel-internal "operation not supported" that some
/// bpf(2) paths return to user space; libc does not define it.
const ENOTSUPP: i32 = 524;

/// The kernel's BTF description of itself; CO-RE and BTF-defined maps
/// need it.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Support {
    Available,
    /// The kernel rejected the probe as unsupported; the text is the error.
    Missing(String),
    /// The probe could not tell, for example without `CAP_BPF`; the text is
    /// the error.
    Unknown(String),
}

impl Support {
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }

    /// Maps a probe's result: `EINVAL` and `EOPNOTSUPP` mean the kernel
    /// does not know the type or command, other errors leave it open.
    fn from_result<T>(result: std::io::Result<T>) -> Self {
        match result {
            Ok(_) => Self::Available,
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                ) =>
            {
                Self::Missing(error.to_string())
            }
            Err(error) => Self::Unknown(error.to_string()),
        }
    }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Available => write!(f, "yes"),
            Self::Missing(error) => write!(f, "no ({error})"),
            Self::Unknown(error) => write!(f, "unknown ({error})"),
        }
    }
}

/// Probe outcomes, one field per kernel feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelFeatures {
    /// `BPF_PROG_TYPE_SK_LOOKUP` (Linux 5.9).
    pub sk_lookup: Support,
    /// `BPF_LINK_CREATE` of an `sk_lookup` program on a network namespace
    /// (netns links from Linux 5.8, for `sk_lookup` from 5.9).
    pub netns_link: Support,
    /// `BPF_LINK_UPDATE` on a network namespace link (the command exists
    /// from Linux 5.7, netns links take it from 5.8).
    pub link_update: Support,
    /// `BPF_MAP_TYPE_SOCKMAP` (Linux 4.14).
    pub sockmap: Support,
    /// `BPF_MAP_TYPE_SOCKHASH` (Linux 4.18).
    pub sockhash: Support,
    /// `BPF_PROG_TYPE_SOCK_OPS` (Linux 4.13).
    pub sock_ops: Support,
    /// `BPF_PROG_TYPE_SK_MSG` (Linux 4.17).
    pub sk_msg: Support,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` for `connect4` (Linux 4.17).
    pub cgroup_connect4: Support,
    /// The same for `connect6` (Linux 4.17).
    pub cgroup_connect6: Support,
    /// Kernel BTF at `/sys/kernel/btf/vmlinux` (Linux 5.4 with
    /// `CONFIG_DEBUG_INFO_BTF`).
    pub btf: Support,
    /// A bpf filesystem at the pin path.
    pub bpffs: Support,
}

/// One feature's name and what its absence means for the agent.
struct Consequence {
    name: &'static str,
    missing: &'static str,
    /// True when the agent cannot run without the feature.
    required: bool,
}

impl KernelFeatures {
    /// Runs every probe. `pin_path` is where the bpf filesystem should be.
    pub fn probe(pin_path: &Path) -> Self {
        let sk_lookup = syscall::load_pass_program(PROG_TYPE_SK_LOOKUP, ATTACH_SK_LOOKUP);
        let (netns_link, link_update) = if let Ok(program) = &sk_lookup {
            probe_netns_link(program.as_fd())
        } else {
            let skipped = Support::Missing("needs sk_lookup".to_owned());
            (skipped.clone(), skipped)
        };

        Self {
            sk_lookup: Support::from_result(sk_lookup),
            netns_link,
            link_update,
            sockmap: Support::from_result(syscall::create_probe_map(MAP_TYPE_SOCKMAP)),
            sockhash: Support::from_result(syscall::create_probe_map(MAP_TYPE_SOCKHASH)),
            sock_ops: Support::from_result(syscall::load_pass_program(
                PROG_TYPE_SOCK_OPS,
                ATTACH_SOCK_OPS,
            )),
            sk_msg: Support::from_result(syscall::load_pass_program(
                PROG_TYPE_SK_MSG,
                ATTACH_SK_MSG_VERDICT,
            )),
            cgroup_connect4: Support::from_result(syscall::load_pass_program(
                PROG_TYPE_CGROUP_SOCK_ADDR,
                ATTACH_INET4_CONNECT,
            )),
            cgroup_connect6: Support::from_result(syscall::load_pass_program(
                PROG_TYPE_CGROUP_SOCK_ADDR,
                ATTACH_INET6_CONNECT,
            )),
            btf: probe_btf(),
            bpffs: probe_bpffs(pin_path),
        }
    }

    /// Returns each feature with its probe outcome and what its absence
    /// means, in a fixed order.
    fn consequences(&self) -> [(&Support, Consequence); 11] {
        [
            (&self.sk_lookup, Consequence { name: "sk_lookup", missing: "ingress steering impossible, agent refuses to start", required: true }),
            (&self.netns_link, Consequence { name: "netns_link", missing: "sk_lookup programs cannot be attached, agent refuses to start", required: true }),
            (&self.link_update, Consequence { name: "link_update", missing: "programs are replaced by a second link and a pin rename, with two programs attached for a moment", required: false }),
            (&self.sockmap, Consequence { name: "sockmap", missing: "no listener map for sk_lookup, agent refuses to start", required: true }),
            (&self.sockhash, Consequence { name: "sockhash", missing: "sockmap fast path off", required: false }),
            (&self.sock_ops, Consequence { name: "sock_ops", missing: "sockmap fast path and egress original-destination records off", required: false }),
            (&self.sk_msg, Consequence { name: "sk_msg", missing: "sockmap fast path off", required: false }),
            (&self.cgroup_connect4, Consequence { name: "cgroup_connect4", missing: "egress mode off for IPv4", required: false }),
            (&self.cgroup_connect6, Consequence { name: "cgroup_connect6", missing: "egress mode off for IPv6", required: false }),
            (&self.btf, Consequence { name: "btf", missing: "programs that need kernel BTF cannot load; the sk_lookup program does not need it", required: false }),
            (&self.bpffs, Consequence { name: "bpffs", missing: "pins impossible until bpffs is mounted; the agent mounts it when it may", required: false }),
        ]
    }

    /// Returns the names of missing features without which the agent
    /// cannot steer. Features whose probe was inconclusive are not listed.
    pub fn missing_required(&self) -> Vec<&'static str> {
        self.consequences()
            .into_iter()
            .filter(|(support, consequence)| {
                consequence.required && matches!(support, Support::Missing(_))
            })
            .map(|(_, consequence)| consequence.name)
            .collect()
    }

    /// Logs one line per feature that is not available, saying what is
    /// lost, and one summary line.
    pub fn log(&self) {
        for (support, consequence) in self.consequences() {
            match support {
                Support::Available => {}
                Support::Missing(detail) if consequence.required => error!(
                    feature = consequence.name,
                    error = %detail,
                    effect = consequence.missing,
                    "kernel feature missing"
                ),
                Support::Missing(detail) => warn!(
                    feature = consequence.name,
                    error = %detail,
                    effect = consequence.missing,
                    "kernel feature missing"
                ),
                Support::Unknown(detail) => warn!(
                    feature = consequence.name,
                    error = %detail,
                    effect = consequence.missing,
                    "kernel feature could not be probed, assuming it works"
                ),
            }
        }
        let available: Vec<&str> = self
            .consequences()
            .into_iter()
            .filter(|(support, _)| support.is_available())
            .map(|(_, consequence)| consequence.name)
            .collect();
        info!(available = ?available, "kernel features probed");
    }

    /// Returns `(name, outcome)` pairs in a fixed order, for `status`.
    pub fn entries(&self) -> Vec<(&'static str, &Support)> {
        self.consequences()
            .into_iter()
            .map(|(support, consequence)| (consequence.name, support))
            .collect()
    }
}

/// Attaches the probe program to a network namespace created for the probe,
/// then updates the link with the same program. The namespace goes away with
/// the last fd, taking the link with it.
fn probe_netns_link(program: std::os::fd::BorrowedFd<'_>) -> (Support, Support) {
    let netns = match new_netns() {
        Ok(netns) => netns,
        Err(error) => {
            let unknown = Support::Unknown(format!("no namespace to probe in: {error}"));
            return (unknown.clone(), unknown);
        }
    };
    let link = match syscall::link_create(program, netns.as_fd(), ATTACH_SK_LOOKUP) {
        Ok(link) => link,
        Err(error) => {
            let link = Support::from_result::<()>(Err(error));
            return (link, Support::Missing("needs a netns link".to_owned()));
        }
    };
    let update = syscall::link_update(link.as_fd(), program, Some(program));
    (Support::Available, Support::from_result(update))
}

/// Creates a network namespace on a short-lived thread and returns its fd.
/// The calling thread's namespace is left alone.
fn new_netns() -> std::io::Result<std::fs::File> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::fs::File::open("/proc/thread-self/ns/net")
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace probe thread panicked"))?
}

fn probe_btf() -> Support {
    match std::fs::metadata(VMLINUX_BTF) {
        Ok(_) => Support::Available,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Support::Missing(format!("{VMLINUX_BTF} not found"))
        }
        Err(error) => Support::Unknown(error.to_string()),
    }
}

fn probe_bpffs(pin_path: &Path) -> Support {
    let existing = pin_path
        .ancestors()
        .find(|ancestor| !ancestor.as_os_str().is_empty() && ancestor.exists())
        .unwrap_or(Path::new("/"));
    match super::bpffs::is_bpffs(existing) {
        Ok(true) => Support::Available,
        Ok(false) => Support::Missing(format!("{} is not on bpffs", existing.display())),
        Err(error) => Support::Unknown(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_available() -> KernelFeatures {
        KernelFeatures {
            sk_lookup: Support::Available,
            netns_link: Support::Available,
            link_update: Support::Available,
            sockmap: Support::Available,
            sockhash: Support::Available,
            sock_ops: Support::Available,
            sk_msg: Support::Available,
            cgroup_connect4: Support::Available,
            cgroup_connect6: Support::Available,
            btf: Support::Available,
            bpffs: Support::Available,
        }
    }

    #[test]
    fn missing_sk_lookup_is_required() {
        let features = KernelFeatures {
            sk_lookup: Support::Missing("EINVAL".to_owned()),
            sk_msg: Support::Missing("EINVAL".to_owned()),
            ..all_available()
        };

        assert_eq!(features.missing_required(), vec!["sk_lookup"]);
    }

    #[test]
    fn unknown_outcome_is_not_counted_missing() {
        let features = KernelFeatures {
            sk_lookup: Support::Unknown("EPERM".to_owned()),
            ..all_available()
        };

        assert!(features.missing_required().is_empty());
    }

    #[test]
    fn einval_means_missing_eperm_means_unknown() {
        let einval =
            Support::from_result::<()>(Err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        let eperm = Support::from_result::<()>(Err(std::io::Error::from_raw_os_error(libc::EPERM)));

        assert!(matches!(einval, Support::Missing(_)));
        assert!(matches!(eperm, Support::Unknown(_)));
    }

    /// Runs the real probes. With `CAP_BPF` on a kernel of 5.9 or later every
    /// feature is found; without it the probes return `Unknown`, never
    /// `Missing`.
    #[test]
    fn probe_on_this_kernel() {
        let features = KernelFeatures::probe(Path::new("/sys/fs/bpf/tokengate"));

        assert!(features.missing_required().is_empty(), "{features:?}");
        if let Support::Unknown(error) = &features.sk_lookup {
            println!("SKIP: probes inconclusive without CAP_BPF: {error}");
            return;
        }
        assert_eq!(features.sk_lookup, Support::Available);
        assert_eq!(features.netns_link, Support::Available);
        assert_eq!(features.link_update, Support::Available);
        assert_eq!(features.sockmap, Support::Available);
        assert_eq!(features.sockhash, Support::Available);
        assert_eq!(features.sk_msg, Support::Available);
        assert_eq!(features.cgroup_connect6, Support::Available);
    }
}
