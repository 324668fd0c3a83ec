//! The verify-once check on this node: an egress destination must not
//! cover a port that this agent protects in one of its own pods, because
//! such a call would be verified at the source and again at the pod.
//!
//! `agent_networks` in the configuration covers the other nodes. This check
//! covers the statically configured workloads of this node, whose
//! addresses the agent reads from their network namespaces.

use std::net::IpAddr;

use crate::config::{EgressConfig, WorkloadConfig};
use crate::netns::PodNetns;

/// A destination that reaches a protected port of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub pod: String,
    pub destination: String,
    pub workload: String,
    pub address: IpAddr,
    pub port: u16,
}

/// Returns every egress destination that covers a protected port at one
/// of `addresses`, the addresses of `workload`'s pod.
pub fn find_overlaps(
    egress: &EgressConfig,
    workload: &WorkloadConfig,
    addresses: &[IpAddr],
) -> Vec<Overlap> {
    let mut found = Vec::new();
    for pod in &egress.pods {
        for destination in &pod.destinations {
            let ports = destination
                .ports
                .iter()
                .filter(|port| workload.ports.contains(port));
            for port in ports {
                let covered = addresses
                    .iter()
                    .filter(|address| destination.cidr.contains(address.to_canonical()));
                for address in covered {
                    found.push(Overlap {
                        pod: pod.name.clone(),
                        destination: destination.cidr.to_string(),
                        workload: workload.name.clone(),
                        address: *address,
                        port: *port,
                    });
                }
            }
        }
    }
    found
}

/// Reads the interface addresses of the namespace that `netns` entered,
/// loopback excluded.
pub async fn pod_addresses(netns: &PodNetns) -> std::io::Result<Vec<IpAddr>> {
    netns
        .run(|| {
            let interfaces = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
            let addresses = interfaces
                .filter_map(|interface| {
                    let address = interface.address?;
                    if let Some(v4) = address.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .filter(|address| !address.is_loopback())
                .collect();
            Ok(addresses)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const CONFIG: &str = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/orders
    ports: [8080]
egress:
  pods:
    - name: client
      netns: /var/run/netns/client
      cgroup: /sys/fs/cgroup/pods/client
      destinations:
        - cidr: 198.18.4.0/24
          ports: [8080, 9090]
";

    #[test]
    fn overlap_needs_address_and_port() {
        let config = parse(CONFIG, "overlap.yaml").expect("valid config");
        let workload = &config.workloads[0];
        let inside: IpAddr = "198.18.4.10".parse().unwrap();
        let outside: IpAddr = "198.18.5.10".parse().unwrap();

        let found = find_overlaps(&config.egress, workload, &[outside, inside]);

        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].address, inside);
        assert_eq!(found[0].port, 8080);
        assert_eq!(found[0].workload, "orders");
        assert!(find_overlaps(&config.egress, workload, &[outside]).is_empty());
    }

    #[tokio::test]
    async fn own_namespace_addresses_exclude_loopback() {
        let netns = match PodNetns::open(std::path::Path::new("/proc/self/ns/net")) {
            Ok(netns) => netns,
            Err(error) => {
                println!("SKIP: {error}");
                return;
            }
        };

        let addresses = pod_addresses(&netns).await.expect("getifaddrs");

        assert!(addresses.iter().all(|address| !address.is_loopback()));
    }
}
