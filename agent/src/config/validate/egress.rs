//! Validation of egress mode: pod names and paths, destinations, the
//! verify-once rule against `agent_networks`, and the token sources and
//! rules, which follow the workload checks.

use std::collections::HashMap;
use std::path::Path;

use super::{check_ports, check_token_sources, rules, Checker, MAX_WORKLOAD_NAME_LEN};
use crate::config::path::FieldPath;
use crate::config::{Config, EgressPodConfig};

/// Checks the `egress` section of `config`.
pub(super) fn check_egress(checker: &mut Checker, config: &Config, root: &FieldPath) {
    let egress = &config.egress;
    let path = root.key("egress");
    if !egress.is_enabled() {
        return;
    }

    if egress.mark == 0 {
        checker.report(
            path.key("mark"),
            0,
            "must not be 0, because unmarked sockets carry 0; the default is 0x74670000",
        );
    }
    for (index, network) in egress.agent_networks.iter().enumerate() {
        if network.has_host_bits() {
            checker.report(
                path.key("agent_networks").index(index),
                network,
                format!(
                    "has bits set beyond the prefix length; write the network address {}/{}",
                    network.masked(),
                    network.prefix_len
                ),
            );
        }
    }

    let workload_names: HashMap<&str, usize> = config
        .workloads
        .iter()
        .enumerate()
        .map(|(index, workload)| (workload.name.as_str(), index))
        .collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut netns_paths: HashMap<&Path, usize> = HashMap::new();
    let mut cgroups: HashMap<&Path, usize> = HashMap::new();
    let pods_path = path.key("pods");
    for (index, pod) in egress.pods.iter().enumerate() {
        let item = pods_path.index(index);
        let name = format_args!("{:?}", pod.name);
        if let Some(first) = names.insert(&pod.name, index) {
            checker.report(
                item.key("name"),
                name,
                format!(
                    "duplicate egress pod name, also used at {}; give each pod its own name",
                    pods_path.index(first)
                ),
            );
        } else if let Some(workload) = workload_names.get(pod.name.as_str()) {
            checker.report(
                item.key("name"),
                name,
                format!(
                    "also the name of workloads[{workload}]; audit events and metrics are labelled by name, so use another"
                ),
            );
        }
        if let Some(first) = netns_paths.insert(&pod.netns, index) {
            checker.report(
                item.key("netns"),
                pod.netns.display(),
                format!(
                    "also the namespace of {}; list each pod once with all its destinations",
                    pods_path.index(first)
                ),
            );
        }
        if let Some(first) = cgroups.insert(&pod.cgroup, index) {
            checker.report(
                item.key("cgroup"),
                pod.cgroup.display(),
                format!(
                    "also the cgroup of {}; a cgroup belongs to one pod",
                    pods_path.index(first)
                ),
            );
        }
        check_pod(checker, config, pod, &item);
    }
}

fn check_pod(checker: &mut Checker, config: &Config, pod: &EgressPodConfig, path: &FieldPath) {
    if !is_valid_pin_name(&pod.name) {
        checker.report(
            path.key("name"),
            format_args!("{:?}", pod.name),
            format!(
                "use 1 to {MAX_WORKLOAD_NAME_LEN} characters out of letters, digits, `-` and `_`, \
                 because the name appears in metric labels and bpffs pin names, which reject dots"
            ),
        );
    }
    if !pod.netns.is_absolute() {
        checker.report(
            path.key("netns"),
            format_args!("{:?}", pod.netns.display().to_string()),
            "must be the absolute path of a network namespace, such as /var/run/netns/NAME or /proc/PID/ns/net",
        );
    }
    if !pod.cgroup.is_absolute() {
        checker.report(
            path.key("cgroup"),
            format_args!("{:?}", pod.cgroup.display().to_string()),
            "must be the absolute path of the pod's cgroup v2 directory, such as /sys/fs/cgroup/kubepods.slice/...",
        );
    }

    if pod.destinations.is_empty() {
        checker.report(
            path.key("destinations"),
            "[]",
            "list at least one destination; without one nothing is steered",
        );
    }
    for (index, destination) in pod.destinations.iter().enumerate() {
        let item = path.key("destinations").index(index);
        let cidr = destination.cidr;
        if cidr.has_host_bits() {
            checker.report(
                item.key("cidr"),
                cidr,
                format!(
                    "has bits set beyond the prefix length; write the network address {}/{}",
                    cidr.masked(),
                    cidr.prefix_len
                ),
            );
        }
        if cidr.addr.is_loopback() || cidr.addr.is_unspecified() && cidr.prefix_len > 0 {
            checker.report(
                item.key("cidr"),
                cidr,
                "a loopback or unspecified address stays inside the pod, where the agent's own listener is; list remote destinations only",
            );
        }
        if let Some(network) = config
            .egress
            .agent_networks
            .iter()
            .find(|network| network.overlaps(&cidr))
        {
            checker.report(
                item.key("cidr"),
                cidr,
                format!(
                    "overlaps agent network {network}, whose pods tokengate verifies at the destination; \
                     steering them here would verify each request twice, so narrow the destination"
                ),
            );
        }
        check_ports(checker, &destination.ports, &item.key("ports"));
    }

    let workload = pod.workload();
    check_token_sources(checker, &workload, path);
    rules::check_forwarding(checker, &workload, path);
    for (index, rule) in pod.rules.iter().enumerate() {
        rules::check_rule(checker, rule, &path.key("rules").index(index));
    }
}

fn is_valid_pin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_WORKLOAD_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError};

    const BASE: &str = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/orders
    ports: [8080]
egress:
  agent_networks: [198.18.0.0/16]
  pods:
    - name: client
      netns: /var/run/netns/client
      cgroup: /sys/fs/cgroup/pods/client
      destinations:
        - cidr: 198.19.7.0/24
          ports: [80]
      rules:
        - path_prefix: /
";

    fn problems(text: &str) -> Vec<(String, String)> {
        match parse(text, "egress.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems
                .into_iter()
                .map(|problem| (problem.field, problem.message))
                .collect(),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn valid_egress_parses() {
        let config = parse(BASE, "egress.yaml").expect("valid config");

        assert!(config.egress.is_enabled());
        assert_eq!(config.egress.pods[0].destinations[0].ports, vec![80]);
    }

    #[test]
    fn egress_absent_is_off() {
        let text = BASE.split("egress:").next().expect("base part").to_owned();

        let config = parse(&text, "off.yaml").expect("valid config");

        assert!(!config.egress.is_enabled());
    }

    #[test]
    fn destination_in_agent_network_is_rejected() {
        let text = BASE.replace("198.19.7.0/24", "198.18.4.0/24");

        let found = problems(&text);

        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "egress.pods[0].destinations[0].cidr");
        assert!(found[0].1.contains("twice"), "{found:?}");
    }

    #[test]
    fn destination_checks() {
        let cases = [
            ("198.19.7.0/24", "198.19.7.1/24", "beyond the prefix"),
            ("198.19.7.0/24", "127.0.0.0/8", "loopback"),
            ("ports: [80]", "ports: [0]", "port 0"),
            ("name: client", "name: client.v1", "dots"),
            ("name: client", "name: orders", "workloads[0]"),
            (
                "cgroup: /sys/fs/cgroup/pods/client",
                "cgroup: pods/client",
                "absolute",
            ),
        ];

        for (from, to, expected) in cases {
            let found = problems(&BASE.replace(from, to));

            assert_eq!(found.len(), 1, "{to}: {found:?}");
            assert!(found[0].1.contains(expected), "{to}: {found:?}");
        }
    }

    #[test]
    fn empty_destinations_rejected() {
        let text = BASE.replace(
            "      destinations:\n        - cidr: 198.19.7.0/24\n          ports: [80]\n",
            "      destinations: []\n",
        );

        let found = problems(&text);

        assert_eq!(found[0].0, "egress.pods[0].destinations", "{found:?}");
    }
}
