//! Checks of the `enrollment` section: paths, the API server URL and each
//! selector, whose workload template gets the checks of a static workload.

use std::collections::HashSet;
use std::path::PathBuf;

use super::{check_http_url, check_workload, Checker, FieldPath};
use crate::config::{EnrollmentConfig, SelectorConfig};

/// Network namespace placed in a selector's template while it is checked
/// as a workload; any absolute path passes that check.
const TEMPLATE_NETNS: &str = "/proc/self/ns/net";

/// Maximum length of a Kubernetes label key with its prefix: a DNS
/// subdomain of 253 bytes, `/`, and a name of 63 bytes.
const MAX_LABEL_KEY_LEN: usize = 317;

/// Maximum length of a label value and of a namespace name (RFC 1123
/// label).
const MAX_LABEL_LEN: usize = 63;

/// Checks `enrollment` when present, and whether the file protects anything.
pub(super) fn check_enrollment(
    checker: &mut Checker,
    enrollment: Option<&EnrollmentConfig>,
    static_workloads: usize,
    root: &FieldPath,
) {
    let Some(enrollment) = enrollment else {
        if static_workloads == 0 {
            checker.report(
                root.key("workloads"),
                "[]",
                "add at least one workload, or an enrollment section with selectors; without one nothing is protected",
            );
        }
        return;
    };
    let path = root.key("enrollment");

    for (field, value) in [
        ("socket", &enrollment.socket),
        ("state_dir", &enrollment.state_dir),
    ] {
        if !value.is_absolute() {
            checker.report(
                path.key(field),
                format_args!("{:?}", value.display().to_string()),
                "must be an absolute path",
            );
        }
    }
    if enrollment.sweep_seconds == 0 {
        checker.report(
            path.key("sweep_seconds"),
            0,
            "must be at least 1; it is the period of the check for pods whose network namespace is gone",
        );
    }
    let kubernetes = &enrollment.kubernetes;
    if let Some(url) = &kubernetes.api_server {
        check_http_url(checker, url, &path.key("kubernetes").key("api_server"));
    }
    if kubernetes.timeout_seconds == 0 {
        checker.report(
            path.key("kubernetes").key("timeout_seconds"),
            0,
            "must be at least 1; it bounds one pod lookup in the Kubernetes API",
        );
    }

    let selectors = path.key("selectors");
    if enrollment.selectors.is_empty() && static_workloads == 0 {
        checker.report(
            selectors.clone(),
            "[]",
            "add at least one selector or a static workload; without one nothing is protected",
        );
    }
    let mut names = HashSet::new();
    for (index, selector) in enrollment.selectors.iter().enumerate() {
        let item = selectors.index(index);
        if !names.insert(selector.name.as_str()) {
            checker.report(
                item.key("name"),
                format_args!("{:?}", selector.name),
                "duplicate selector name; give each selector its own name, because pods are tied to it",
            );
        }
        check_selector(checker, selector, &item);
    }
}

fn check_selector(checker: &mut Checker, selector: &SelectorConfig, path: &FieldPath) {
    for (index, namespace) in selector.namespaces.iter().enumerate() {
        if !is_dns_label(namespace) {
            checker.report(
                path.key("namespaces").index(index),
                format_args!("{namespace:?}"),
                "not a Kubernetes namespace name; use 1 to 63 lower-case letters, digits and `-`",
            );
        }
    }
    for (key, value) in &selector.match_labels {
        let item = path.key("match_labels").key(key);
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN || key.contains(char::is_whitespace) {
            checker.report(
                item.clone(),
                format_args!("{key:?}"),
                "not a Kubernetes label key; use an optional DNS prefix, `/` and a name of letters, digits, `-`, `_` and `.`",
            );
        }
        if value.len() > MAX_LABEL_LEN || value.contains(char::is_whitespace) {
            checker.report(
                item,
                format_args!("{value:?}"),
                "not a Kubernetes label value; use at most 63 letters, digits, `-`, `_` and `.`",
            );
        }
    }

    // The template is checked as the workload each pod gets, so the same
    // field paths point at its ports, token sources and rules.
    let template = selector.workload(
        selector.name.clone(),
        PathBuf::from(TEMPLATE_NETNS),
        Vec::new(),
    );
    check_workload(checker, &template, path);
}

/// Returns whether `name` is an RFC 1123 label, the form of a namespace
/// name.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError};

    const BASE: &str = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    algorithms: [RS256]
";

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "enrollment.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|problem| problem.field).collect()
            }
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn selectors_without_static_workloads_are_valid() {
        let text = format!(
            "{BASE}enrollment:\n  selectors:\n    - name: shop\n      namespaces: [shop]\n      match_labels: {{app: orders}}\n      ports: [8080]\n      rules:\n        - path_prefix: /\n          roles: [reader]\n"
        );

        let config = parse(&text, "enrollment.yaml").expect("valid");

        let enrollment = config.enrollment.expect("enrollment");
        assert_eq!(enrollment.selectors[0].match_labels["app"], "orders");
        assert!(enrollment.selectors[0].allow_probes);
        assert!(config.workloads.is_empty());
    }

    #[test]
    fn nothing_protected_is_reported() {
        assert_eq!(problems(BASE), ["workloads"]);
        assert_eq!(
            problems(&format!("{BASE}enrollment:\n  selectors: []\n")),
            ["enrollment.selectors"]
        );
    }

    #[test]
    fn selector_problems_name_their_fields() {
        let text = format!(
            "{BASE}enrollment:\n  socket: run/cni.sock\n  kubernetes:\n    api_server: ftp://api\n  selectors:\n    - name: shop\n      namespaces: [Shop_NS]\n      ports: [0]\n    - name: shop\n      ports: [8080]\n"
        );

        let fields = problems(&text);

        assert_eq!(
            fields,
            [
                "enrollment.socket",
                "enrollment.kubernetes.api_server",
                "enrollment.selectors[0].namespaces[0]",
                "enrollment.selectors[0].ports[0]",
                "enrollment.selectors[1].name",
            ]
        );
    }
}
