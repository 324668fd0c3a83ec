//! Schema of egress mode: pods whose outgoing calls to chosen destinations
//! are verified at the source, before they leave the pod.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use super::{ClaimHeader, CorsPreflight, ForwardMode, HeaderSource, RuleConfig, WorkloadConfig};

/// `SO_MARK` of the agent's upstream sockets in egress mode. The egress
/// programs pass a socket with this mark, a second guard besides the
/// agent's cgroup. The sockets live in the pod's namespace, and a veth
/// clears the mark of packets that leave it, so the mark only meets the
/// pod's own rules. The value spells "tg" in its upper bytes; change it if
/// the pod's namespace already uses that mark.
pub const DEFAULT_EGRESS_MARK: u32 = 0x7467_0000;

/// Egress mode: off while `pods` is empty.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Networks whose pods a tokengate agent protects at the destination.
    /// No egress destination may overlap one, so that each request is
    /// verified at exactly one end.
    #[serde(default)]
    pub agent_networks: Vec<Cidr>,
    /// `SO_MARK` on the agent's connections to egress destinations.
    #[serde(default = "default_egress_mark")]
    pub mark: u32,
    /// Pods whose calls are verified before they leave the pod.
    #[serde(default)]
    pub pods: Vec<EgressPodConfig>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            agent_networks: Vec::new(),
            mark: DEFAULT_EGRESS_MARK,
            pods: Vec::new(),
        }
    }
}

impl EgressConfig {
    /// Tells whether any pod has egress steering.
    pub fn is_enabled(&self) -> bool {
        !self.pods.is_empty()
    }
}

/// One pod in egress mode: where it runs, where its calls go, and the token
/// sources and rules its calls must satisfy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPodConfig {
    /// Name used in audit events, metrics, logs and pin names.
    pub name: String,
    /// Network namespace of the pod: `/var/run/netns/NAME` or
    /// `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory, such as
    /// `/sys/fs/cgroup/kubepods.slice/.../cri-containerd-ID.scope` or a
    /// pod-level parent of its containers.
    pub cgroup: PathBuf,
    /// Destinations whose calls are steered into the agent.
    pub destinations: Vec<EgressDestination>,
    /// Headers that carry the token, as for workloads.
    #[serde(default)]
    pub from_headers: Vec<HeaderSource>,
    /// Names of cookies that carry the token.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Forwarding mode of the verified token.
    #[serde(default)]
    pub forward: ForwardMode,
    /// Verified claims copied into request headers for the destination.
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimHeader>,
    /// Whether CORS preflight requests pass without a token.
    #[serde(default)]
    pub cors_preflight: CorsPreflight,
    /// Ordered rules; the first rule whose path and method match decides.
    /// A request that no rule matches is denied.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

impl EgressPodConfig {
    /// Builds the workload view that the request path and the workload
    /// checks use; its ports are the union of the destination ports.
    pub fn workload(&self) -> WorkloadConfig {
        let mut ports: Vec<u16> = self
            .destinations
            .iter()
            .flat_map(|destination| destination.ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        WorkloadConfig {
            name: self.name.clone(),
            netns: self.netns.clone(),
            ports,
            from_headers: self.from_headers.clone(),
            from_cookies: self.from_cookies.clone(),
            forward: self.forward,
            claim_to_headers: self.claim_to_headers.clone(),
            cors_preflight: self.cors_preflight,
            rules: self.rules.clone(),
        }
    }
}

/// Addresses and ports whose calls are steered.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressDestination {
    /// Address range, such as `203.0.113.0/24` or `2001:db8::/32`; a bare
    /// address is one host.
    pub cidr: Cidr,
    /// TCP ports of the range.
    pub ports: Vec<u16>,
}

/// An IP prefix: an address and the number of leading bits that count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Returns the number of bits of the address family.
    pub fn max_len(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// Tells whether bits beyond the prefix are set, as in `10.0.0.1/8`.
    pub fn has_host_bits(&self) -> bool {
        self.masked() != self.addr
    }

    /// Returns the address with the bits beyond the prefix cleared.
    pub fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(addr) => {
                let mask = prefix_mask_u32(self.prefix_len);
                IpAddr::V4((u32::from(addr) & mask).into())
            }
            IpAddr::V6(addr) => {
                let mask = prefix_mask_u128(self.prefix_len);
                IpAddr::V6((u128::from(addr) & mask).into())
            }
        }
    }

    /// Tells whether `addr` lies in the prefix; addresses of the other
    /// family never do.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(own), IpAddr::V4(other)) => {
                let mask = prefix_mask_u32(self.prefix_len);
                u32::from(own) & mask == u32::from(other) & mask
            }
            (IpAddr::V6(own), IpAddr::V6(other)) => {
                let mask = prefix_mask_u128(self.prefix_len);
                u128::from(own) & mask == u128::from(other) & mask
            }
            _ => false,
        }
    }

    /// Tells whether the two prefixes share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let shorter = if self.prefix_len <= other.prefix_len {
            self
        } else {
            other
        };
        let longer = if std::ptr::eq(shorter, self) {
            other
        } else {
            self
        };
        shorter.contains(longer.addr)
    }
}

fn prefix_mask_u32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn prefix_mask_u128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            format!("invalid IP prefix {text:?}: {addr_text:?} is not an IP address")
        })?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix_len = match len_text {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| {
                    format!(
                        "invalid IP prefix {text:?}: the length must be a number from 0 to {max}"
                    )
                })?,
        };
        Ok(Self { addr, prefix_len })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

fn default_egress_mark() -> u32 {
    DEFAULT_EGRESS_MARK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("valid prefix")
    }

    #[test]
    fn cidr_parses_prefix_and_host() {
        assert_eq!(cidr("198.18.0.0/15").prefix_len, 15);
        assert_eq!(cidr("198.18.0.7").prefix_len, 32);
        assert_eq!(cidr("fd00::/8").prefix_len, 8);
        assert_eq!(cidr("fd00::1").prefix_len, 128);
    }

    #[test]
    fn cidr_rejects_invalid_text() {
        for text in [
            "198.18.0.0/33",
            "fd00::/129",
            "example/8",
            "198.18.0.0/x",
            "",
        ] {
            assert!(text.parse::<Cidr>().is_err(), "{text}");
        }
    }

    #[test]
    fn cidr_host_bits() {
        assert!(cidr("198.18.0.1/24").has_host_bits());
        assert!(!cidr("198.18.0.0/24").has_host_bits());
        assert!(!cidr("0.0.0.0/0").has_host_bits());
        assert!(cidr("fd00::1/64").has_host_bits());
    }

    #[test]
    fn cidr_overlap_table() {
        let cases = [
            ("198.18.0.0/15", "198.19.4.0/24", true),
            ("198.19.4.0/24", "198.18.0.0/15", true),
            ("198.18.0.0/24", "198.18.1.0/24", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("fd00::/8", "fd12::/16", true),
            ("fd00::/8", "198.18.0.0/15", false),
        ];

        for (left, right, expected) in cases {
            assert_eq!(
                cidr(left).overlaps(&cidr(right)),
                expected,
                "{left} {right}"
            );
        }
    }

    #[test]
    fn workload_view_merges_ports() {
        let pod: EgressPodConfig = serde_yaml::from_str(
            "name: client\nnetns: /var/run/netns/client\ncgroup: /sys/fs/cgroup/client\n\
             destinations:\n  - cidr: 198.18.0.0/24\n    ports: [443, 80]\n  - cidr: fd00::/8\n    ports: [80]\n",
        )
        .expect("valid pod");

        let workload = pod.workload();

        assert_eq!(workload.ports, vec![80, 443]);
        assert_eq!(workload.name, "client");
    }
}
