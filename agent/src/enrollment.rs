//! The agent's side of pod enrolment: the Unix socket the CNI plugin
//! calls, the pod lookup in the Kubernetes API, selector matching, probe
//! routes and the per-pod state files.
//!
//! This module decides and stores; `app` enrols the pods it selects through
//! the same path as static workloads.

pub mod kube;
pub mod pod;
pub mod server;
pub mod state;

use tokio::sync::oneshot;

use crate::cni::protocol::{AgentRequest, AgentResponse};
use crate::config::{SelectorConfig, PROTECT_ANNOTATION};

pub use self::kube::{KubeClient, KubeError};
pub use self::pod::{probe_rules, workload_name, Pod, ProbeRoute};
pub use self::state::{PodRecord, StateDir, StateError, STATE_VERSION};

/// Value of [`PROTECT_ANNOTATION`] that opts a pod in.
pub const PROTECT_ANNOTATION_VALUE: &str = "true";

/// A request from the plugin on its way to the agent's main task, with
/// the pod as the API returned it (ADD and CHECK).
#[derive(Debug)]
pub struct PodRequest {
    pub request: AgentRequest,
    pub pod: Option<Pod>,
    pub reply: oneshot::Sender<AgentResponse>,
}

/// Namespaces that some selector may match: `None` when a selector lists
/// no namespaces and so matches in any. The socket server responds to ADD
/// for a pod in another namespace without a lookup in the Kubernetes API, so
/// such pods start even while the API server is unreachable.
pub type NamespaceFilter = Option<std::collections::BTreeSet<String>>;

/// Builds the [`NamespaceFilter`] of `selectors`.
pub fn namespace_filter(selectors: &[SelectorConfig]) -> NamespaceFilter {
    let mut namespaces = std::collections::BTreeSet::new();
    for selector in selectors {
        if selector.namespaces.is_empty() {
            return None;
        }
        namespaces.extend(selector.namespaces.iter().cloned());
    }
    Some(namespaces)
}

/// Returns the first selector that matches `pod`.
pub fn select<'a>(selectors: &'a [SelectorConfig], pod: &Pod) -> Option<&'a SelectorConfig> {
    selectors.iter().find(|selector| matches(selector, pod))
}

fn matches(selector: &SelectorConfig, pod: &Pod) -> bool {
    let metadata = &pod.metadata;
    let namespace_matches =
        selector.namespaces.is_empty() || selector.namespaces.contains(&metadata.namespace);
    let labels_match = selector
        .match_labels
        .iter()
        .all(|(key, value)| metadata.labels.get(key) == Some(value));
    let annotation_matches = !selector.require_annotation
        || metadata
            .annotations
            .get(PROTECT_ANNOTATION)
            .map(String::as_str)
            == Some(PROTECT_ANNOTATION_VALUE);
    namespace_matches && labels_match && annotation_matches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selectors() -> Vec<SelectorConfig> {
        serde_yaml::from_str(
            "
- name: annotated
  require_annotation: true
  ports: [9000]
- name: shop
  namespaces: [shop]
  match_labels: {app: orders, tier: api}
  ports: [8080]
",
        )
        .unwrap()
    }

    fn pod(namespace: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = namespace.to_owned();
        for (key, value) in labels {
            pod.metadata
                .labels
                .insert((*key).to_owned(), (*value).to_owned());
        }
        for (key, value) in annotations {
            pod.metadata
                .annotations
                .insert((*key).to_owned(), (*value).to_owned());
        }
        pod
    }

    #[test]
    fn namespace_filter_lists_selector_namespaces() {
        let selectors = selectors();

        assert_eq!(namespace_filter(&selectors), None);
        let filter = namespace_filter(&selectors[1..]).unwrap();
        assert_eq!(filter.into_iter().collect::<Vec<_>>(), ["shop"]);
        assert_eq!(
            namespace_filter(&[]),
            Some(std::collections::BTreeSet::new())
        );
    }

    #[test]
    fn labels_and_namespace_select() {
        let selectors = selectors();
        let matching = pod(
            "shop",
            &[("app", "orders"), ("tier", "api"), ("x", "y")],
            &[],
        );

        assert_eq!(select(&selectors, &matching).unwrap().name, "shop");
    }

    #[test]
    fn missing_label_or_other_namespace_does_not_select() {
        let selectors = selectors();

        for pod in [
            pod("shop", &[("app", "orders")], &[]),
            pod("shop", &[("app", "orders"), ("tier", "web")], &[]),
            pod("other", &[("app", "orders"), ("tier", "api")], &[]),
        ] {
            assert!(select(&selectors, &pod).is_none(), "{pod:?}");
        }
    }

    #[test]
    fn annotation_opts_in_and_first_selector_wins() {
        let selectors = selectors();
        let annotated = pod(
            "shop",
            &[("app", "orders"), ("tier", "api")],
            &[(PROTECT_ANNOTATION, "true")],
        );
        let false_value = pod("dev", &[], &[(PROTECT_ANNOTATION, "yes")]);

        assert_eq!(select(&selectors, &annotated).unwrap().name, "annotated");
        assert!(select(&selectors, &false_value).is_none());
    }
}
