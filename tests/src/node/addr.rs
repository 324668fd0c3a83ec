//! Address blocks of a test node: one IPv4 /24 of 198.18.0.0/15 and the
//! IPv6 /64 of the tokengate test prefix with the same index.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};

use crate::netns::{run_ip, Subnet};

/// The unique local IPv6 /48 (RFC 4193) that tokengate tests carve their
/// /64s from. Its global ID spells "Token" in hex, so a leftover address is
/// easy to attribute. A ULA prefix is routed only inside the network that
/// chose it.
pub const TEST_PREFIX_V6: Ipv6Addr = Ipv6Addr::new(0xfd54, 0x6f6b, 0x656e, 0, 0, 0, 0, 0);

/// Length of [`TEST_PREFIX_V6`].
pub const TEST_PREFIX_V6_LEN: u8 = 48;

/// Number of attempts to find a /24 whose matching /64 the host does not
/// use. Each failed attempt keeps its reservation until the search ends.
const MAX_ALLOCATION_ATTEMPTS: usize = 16;

/// One IPv4 /24 and one IPv6 /64, reserved together for the lifetime of this
/// value. The /64 is the subnet's index placed in the fourth group of
/// [`TEST_PREFIX_V6`], so the flock(2) that reserves the /24 (see
/// [`Subnet`]) reserves the /64 too.
#[derive(Debug)]
pub struct AddressBlock {
    subnet: Subnet,
    index: u16,
}

impl AddressBlock {
    /// Reserves a block whose /24 and /64 overlap nothing on the host.
    pub fn allocate() -> Result<Self> {
        let host_networks = host_ipv6_networks()?;
        let mut rejected = Vec::new();
        for _ in 0..MAX_ALLOCATION_ATTEMPTS {
            let subnet = Subnet::allocate()?;
            let index = subnet_index(subnet.network());
            let prefix = prefix_v6(index);
            if host_networks
                .iter()
                .any(|&(address, len)| overlaps_v6(prefix, 64, address, len))
            {
                rejected.push(subnet);
                continue;
            }
            return Ok(Self { subnet, index });
        }
        bail!(
            "every tried /64 of {TEST_PREFIX_V6}/{TEST_PREFIX_V6_LEN} is in use on the host: \
             remove leftover test routes (`ip -6 route`)"
        )
    }

    /// IPv4 address with host part `host` in the /24.
    pub fn v4(&self, host: u8) -> Ipv4Addr {
        self.subnet.address(host)
    }

    /// IPv6 address with interface identifier `host` in the /64.
    pub fn v6(&self, host: u16) -> Ipv6Addr {
        let [a, b, c, d, ..] = prefix_v6(self.index).segments();
        Ipv6Addr::new(a, b, c, d, 0, 0, 0, host)
    }

    /// Formats the /24 as `ADDRESS/24`.
    pub fn cidr_v4(&self) -> String {
        format!("{}/24", self.subnet.network())
    }

    /// Formats the /64 as `ADDRESS/64`.
    pub fn cidr_v6(&self) -> String {
        format!("{}/64", prefix_v6(self.index))
    }
}

/// Index of a /24 inside 198.18.0.0/15, 0 to 511.
fn subnet_index(network: Ipv4Addr) -> u16 {
    let offset = u32::from(network) - u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (offset >> 8) as u16
}

/// Returns the /64 of [`TEST_PREFIX_V6`] with `index` in its fourth group.
fn prefix_v6(index: u16) -> Ipv6Addr {
    let [a, b, c, ..] = TEST_PREFIX_V6.segments();
    Ipv6Addr::new(a, b, c, index, 0, 0, 0, 0)
}

/// Returns whether two IPv6 prefixes share at least one address.
fn overlaps_v6(a: Ipv6Addr, a_len: u8, b: Ipv6Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len).min(128);
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(len));
    u128::from(a) & mask == u128::from(b) & mask
}

/// IPv6 addresses and route prefixes of the host namespace, as (address,
/// prefix length) pairs; a bare address counts as a /128.
fn host_ipv6_networks() -> Result<Vec<(Ipv6Addr, u8)>> {
    let mut networks = Vec::new();
    for args in [
        &["-6", "-o", "addr", "show"][..],
        &["-6", "route", "show", "table", "all"][..],
    ] {
        let output = run_ip(args)?;
        for token in output.split_whitespace() {
            let (address, len) = match token.split_once('/') {
                Some((address, len)) => (address, len.parse::<u8>().ok()),
                None => (token, Some(128)),
            };
            if let (Ok(address), Some(len)) = (address.parse::<Ipv6Addr>(), len) {
                networks.push((address, len));
            }
        }
    }
    Ok(networks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_carries_subnet_index() {
        assert_eq!(subnet_index(Ipv4Addr::new(198, 18, 0, 0)), 0);
        assert_eq!(subnet_index(Ipv4Addr::new(198, 19, 255, 0)), 511);
        assert_eq!(
            prefix_v6(511),
            "fd54:6f6b:656e:1ff::".parse::<Ipv6Addr>().expect("addr")
        );
    }

    #[test]
    fn v6_overlap_checks_shorter_prefix() {
        let ours = prefix_v6(3);

        assert!(overlaps_v6(ours, 64, TEST_PREFIX_V6, 48));
        assert!(overlaps_v6(ours, 64, Ipv6Addr::UNSPECIFIED, 0));
        assert!(!overlaps_v6(ours, 64, "fd00::2".parse().expect("addr"), 64));
        assert!(!overlaps_v6(ours, 64, prefix_v6(4), 64));
    }
}
