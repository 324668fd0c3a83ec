//! Validation of a workload's rules, token forwarding and identity headers.

use std::collections::HashSet;

use http::header::{self, HeaderName};

use super::{is_tchar, is_valid_claim_path, Checker};
use crate::config::path::FieldPath;
use crate::config::{ClaimRequirement, ForwardMode, Requirement, RuleConfig, WorkloadConfig};
use crate::policy::{normalize_path, Template};

/// Headers that `claim_to_headers` may not set: framing and connection
/// fields, whose change would corrupt the forwarded message, and the
/// routing and token fields the agent itself manages.
const RESERVED_IDENTITY_HEADERS: [HeaderName; 10] = [
    header::AUTHORIZATION,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::COOKIE,
    header::HOST,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("x-forwarded-for"),
];

/// Checks `forward` and `claim_to_headers` of one workload.
pub(super) fn check_forwarding(checker: &mut Checker, workload: &WorkloadConfig, path: &FieldPath) {
    if workload.forward == ForwardMode::CookieToAuthorization && workload.from_cookies.is_empty() {
        checker.report(
            path.key("forward"),
            "cookie_to_authorization",
            "moves a cookie token, but from_cookies is empty; list the token cookie under from_cookies",
        );
    }

    let token_headers: Vec<HeaderName> = workload
        .from_headers
        .iter()
        .filter_map(|source| HeaderName::from_bytes(source.name.as_bytes()).ok())
        .collect();
    let mut seen = HashSet::new();
    for (index, entry) in workload.claim_to_headers.iter().enumerate() {
        let item = path.key("claim_to_headers").index(index);
        if !is_valid_claim_path(&entry.claim) {
            checker.report(
                item.key("claim"),
                format_args!("{:?}", entry.claim),
                "must be a claim name, or a dotted path such as realm_access.roles, without empty parts",
            );
        }

        let value = format_args!("{:?}", entry.header).to_string();
        let Ok(name) = HeaderName::from_bytes(entry.header.as_bytes()) else {
            checker.report(
                item.key("header"),
                value,
                "not a valid HTTP header name (RFC 9110 §5.1); use letters, digits and `-`",
            );
            continue;
        };
        if RESERVED_IDENTITY_HEADERS.contains(&name) || token_headers.contains(&name) {
            checker.report(
                item.key("header"),
                value,
                "the agent manages this header (framing, routing or the token); choose another name such as x-user-id",
            );
        } else if !seen.insert(name) {
            checker.report(
                item.key("header"),
                value,
                "duplicate header (names are case-insensitive); map each header from one claim",
            );
        }
    }
}

/// Checks one rule: its path, methods, access flags and requirements.
pub(super) fn check_rule(checker: &mut Checker, rule: &RuleConfig, path: &FieldPath) {
    let segment_names = check_rule_path(checker, rule, path);
    check_methods(checker, &rule.methods, &path.key("methods"));
    check_access(checker, rule, path);

    for (claim, values) in &rule.claims {
        let item = path.key("claims").key(claim);
        if !is_valid_claim_path(claim) {
            checker.report(
                item.clone(),
                format_args!("{claim:?}"),
                "must be a claim name, or a dotted path such as realm_access.roles, without empty parts",
            );
        }
        if values.is_empty() {
            checker.report(
                item,
                "[]",
                "an empty list matches no token; list the accepted values, or remove the claim",
            );
        }
    }
    check_roles(checker, &rule.roles, &path.key("roles"));
    check_scopes(checker, &rule.scopes, &path.key("scopes"));

    if let Some(requires) = &rule.requires {
        check_requirement(
            checker,
            requires,
            segment_names.as_deref(),
            &path.key("requires"),
        );
    }
}

/// Checks that exactly one of `path`, `path_prefix` and `path_template`
/// is set and usable. Returns the template's segment names, `None` when
/// the template is invalid, so that its names are unknown.
fn check_rule_path(
    checker: &mut Checker,
    rule: &RuleConfig,
    path: &FieldPath,
) -> Option<Vec<String>> {
    let set: Vec<&str> = [
        ("path", rule.path.is_some()),
        ("path_prefix", rule.path_prefix.is_some()),
        ("path_template", rule.path_template.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if set.is_empty() {
        checker.report(
            path.clone(),
            "(no path)",
            "set one of path, path_prefix or path_template, such as path_prefix: /",
        );
    } else if set.len() > 1 {
        checker.report(
            path.key(set[1]),
            set.join(" + "),
            "set only one of path, path_prefix and path_template, because each chooses how the path matches",
        );
    }

    if let Some(exact) = &rule.path {
        check_normalised(checker, exact, &path.key("path"));
    }
    if let Some(prefix) = &rule.path_prefix {
        check_normalised(checker, prefix, &path.key("path_prefix"));
    }
    let Some(template) = &rule.path_template else {
        return Some(Vec::new());
    };
    match Template::parse(template) {
        Ok(parsed) => Some(parsed.names().into_iter().map(str::to_owned).collect()),
        Err(error) => {
            checker.report(
                path.key("path_template"),
                format_args!("{template:?}"),
                error.to_string(),
            );
            None
        }
    }
}

fn check_normalised(checker: &mut Checker, value: &str, path: &FieldPath) {
    let shown = format_args!("{value:?}").to_string();
    if !value.starts_with('/') {
        checker.report(path.clone(), shown, "must start with `/`, such as /orders");
        return;
    }

    match normalize_path(value) {
        // Requests are matched after normalisation, so a path that is not
        // itself normalised could never match.
        Some(normalised) if normalised == value => {}
        Some(normalised) => checker.report(
            path.clone(),
            shown,
            format!("request paths are normalised before matching, so this never matches; write {normalised}"),
        ),
        None => checker.report(
            path.clone(),
            shown,
            "contains characters that no accepted request path has (an encoded `/`, `\\` or NUL, \
             a `\\`, `#`, a space, a control character or a bad `%` escape); remove them",
        ),
    }
}

fn check_methods(checker: &mut Checker, methods: &[String], path: &FieldPath) {
    for (index, method) in methods.iter().enumerate() {
        let valid_token = !method.is_empty() && method.bytes().all(is_tchar);
        if !valid_token || method.bytes().any(|b| b.is_ascii_lowercase()) {
            let hint = if valid_token {
                format!("; write {}", method.to_ascii_uppercase())
            } else {
                String::new()
            };
            checker.report(
                path.index(index),
                format_args!("{method:?}"),
                format!(
                    "methods are case-sensitive tokens (RFC 9110 §9.1) and are matched as written, \
                     so use the uppercase name such as GET or POST{hint}"
                ),
            );
        }
    }
}

/// Checks that `public`, `allow_missing` and `allow_missing_or_failed`
/// do not contradict each other or the requirements.
fn check_access(checker: &mut Checker, rule: &RuleConfig, path: &FieldPath) {
    if rule.public {
        let has_requirements = !rule.claims.is_empty()
            || !rule.roles.is_empty()
            || !rule.scopes.is_empty()
            || rule.requires.is_some();
        if has_requirements {
            checker.report(
                path.key("public"),
                true,
                "a public rule checks no token, so its claims, roles, scopes and requires would be ignored; \
                 remove them or remove public",
            );
        }
        if rule.allow_missing || rule.allow_missing_or_failed {
            checker.report(
                path.key("public"),
                true,
                "a public rule needs no token; remove allow_missing and allow_missing_or_failed",
            );
        }
    }
    if rule.allow_missing && rule.allow_missing_or_failed {
        checker.report(
            path.key("allow_missing"),
            true,
            "allow_missing_or_failed already passes requests without a token; keep only one of the two",
        );
    }
}

fn check_roles(checker: &mut Checker, roles: &[String], path: &FieldPath) {
    for (index, role) in roles.iter().enumerate() {
        if role.is_empty() {
            checker.report(
                path.index(index),
                "\"\"",
                "an empty role matches nothing; remove it",
            );
        }
    }
}

fn check_scopes(checker: &mut Checker, scopes: &[String], path: &FieldPath) {
    for (index, scope) in scopes.iter().enumerate() {
        if scope.is_empty() || scope.chars().any(char::is_whitespace) {
            checker.report(
                path.index(index),
                format_args!("{scope:?}"),
                "a scope is one non-empty word, because `scope` holds space-separated scopes (RFC 8693 §4.2); \
                 list each scope separately",
            );
        }
    }
}

fn check_requirement(
    checker: &mut Checker,
    requirement: &Requirement,
    segment_names: Option<&[String]>,
    path: &FieldPath,
) {
    match requirement {
        Requirement::All(children) | Requirement::Any(children) => {
            let key = if matches!(requirement, Requirement::All(_)) {
                "all"
            } else {
                "any"
            };
            let item = path.key(key);
            if children.is_empty() {
                checker.report(
                    item.clone(),
                    "[]",
                    "an empty list is ambiguous (all holds for every token, any for none); list requirements or remove it",
                );
            }
            for (index, child) in children.iter().enumerate() {
                check_requirement(checker, child, segment_names, &item.index(index));
            }
        }
        Requirement::Claim(claim) => check_claim(checker, claim, &path.key("claim")),
        Requirement::RolesAny(roles) | Requirement::RolesAll(roles) => {
            let key = if matches!(requirement, Requirement::RolesAny(_)) {
                "roles_any"
            } else {
                "roles_all"
            };
            check_non_empty(checker, roles.is_empty(), &path.key(key));
            check_roles(checker, roles, &path.key(key));
        }
        Requirement::ScopesAny(scopes) | Requirement::ScopesAll(scopes) => {
            let key = if matches!(requirement, Requirement::ScopesAny(_)) {
                "scopes_any"
            } else {
                "scopes_all"
            };
            check_non_empty(checker, scopes.is_empty(), &path.key(key));
            check_scopes(checker, scopes, &path.key(key));
        }
        Requirement::SegmentEqualsClaim(binding) => {
            let item = path.key("segment_equals_claim");
            // An invalid template is reported already, and its names are
            // unknown.
            let names = segment_names.unwrap_or_default();
            if segment_names.is_some() && !names.contains(&binding.segment) {
                let known = if names.is_empty() {
                    "the rule has no path_template with `{name}` segments".to_owned()
                } else {
                    format!("the template names {}", names.join(", "))
                };
                checker.report(
                    item.key("segment"),
                    format_args!("{:?}", binding.segment),
                    format!("names no segment of the rule's path_template ({known}); use one of its `{{name}}` segments"),
                );
            }
            if !is_valid_claim_path(&binding.claim) {
                checker.report(
                    item.key("claim"),
                    format_args!("{:?}", binding.claim),
                    "must be a claim name, or a dotted path such as org.tenant, without empty parts",
                );
            }
        }
    }
}

fn check_non_empty(checker: &mut Checker, empty: bool, path: &FieldPath) {
    if empty {
        checker.report(
            path.clone(),
            "[]",
            "an empty list holds for no token (any) or every token (all); list values or remove it",
        );
    }
}

fn check_claim(checker: &mut Checker, claim: &ClaimRequirement, path: &FieldPath) {
    if !is_valid_claim_path(&claim.path) {
        checker.report(
            path.key("path"),
            format_args!("{:?}", claim.path),
            "must be a claim name, or a dotted path such as realm_access.roles, without empty parts",
        );
    }

    let set = [
        claim.equals.is_some(),
        claim.one_of.is_some(),
        claim.contains.is_some(),
    ]
    .into_iter()
    .filter(|present| *present)
    .count();
    if set != 1 {
        checker.report(
            path.clone(),
            format_args!("{set} comparisons"),
            "set exactly one of equals, one_of and contains",
        );
    }
    if claim.one_of.as_ref().is_some_and(Vec::is_empty) {
        checker.report(
            path.key("one_of"),
            "[]",
            "an empty list matches no token; list the accepted values",
        );
    }
    let mut values = claim
        .equals
        .iter()
        .chain(claim.contains.iter())
        .chain(claim.one_of.iter().flatten());
    if values.any(serde_json::Value::is_null) {
        checker.report(
            path.clone(),
            "null",
            "a null value is what an absent YAML value reads as; write the value, quoted if it is text",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError, Problem};

    const BASE: &str = r"issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    algorithms: [RS256]
workloads:
  - name: shop
    netns: /var/run/netns/shop
    ports: [8080]
    from_cookies: [session]
    forward: cookie_to_authorization
    claim_to_headers:
      - {claim: sub, header: x-user-id}
    rules:
      - path_template: /users/{user}/orders/**
        requires:
          all:
            - segment_equals_claim: {segment: user, claim: sub}
            - claim: {path: tier, one_of: [1, 2]}
      - path: /healthz
        public: true
";

    fn edited(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from:?} not in the base document");
        BASE.replacen(from, to, 1)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, "rules.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("expected validation problems, got: {other}"),
        }
    }

    #[test]
    fn base_is_valid() {
        assert_eq!(problems(BASE), []);
    }

    #[test]
    fn each_problem_names_field() {
        let cases = [
            (
                edited("      - path: /healthz\n", "      - methods: [GET]\n"),
                "workloads[0].rules[1]",
                "set one of path",
            ),
            (
                edited("      - path: /healthz\n", "      - path: /healthz\n        path_prefix: /h\n"),
                "workloads[0].rules[1].path_prefix",
                "only one of",
            ),
            (
                edited("path: /healthz", "path: /./healthz"),
                "workloads[0].rules[1].path",
                "write /healthz",
            ),
            (
                edited("/users/{user}/orders/**", "/users/{user}/**/x"),
                "workloads[0].rules[0].path_template",
                "last segment",
            ),
            (
                edited("{segment: user, claim: sub}", "{segment: owner, claim: sub}"),
                "workloads[0].rules[0].requires.all[0].segment_equals_claim.segment",
                "names user",
            ),
            (
                edited("one_of: [1, 2]", "one_of: []"),
                "workloads[0].rules[0].requires.all[1].claim.one_of",
                "empty list",
            ),
            (
                edited("{path: tier, one_of: [1, 2]}", "{path: tier, equals: 1, contains: 1}"),
                "workloads[0].rules[0].requires.all[1].claim",
                "exactly one of equals",
            ),
            (
                edited("one_of: [1, 2]", "one_of: [1, ~]"),
                "workloads[0].rules[0].requires.all[1].claim",
                "null",
            ),
            (
                edited("        public: true\n", "        public: true\n        roles: [admin]\n"),
                "workloads[0].rules[1].public",
                "ignored",
            ),
            (
                edited("        public: true\n", "        allow_missing: true\n        allow_missing_or_failed: true\n"),
                "workloads[0].rules[1].allow_missing",
                "keep only one",
            ),
            (
                edited("header: x-user-id", "header: Authorization"),
                "workloads[0].claim_to_headers[0].header",
                "manages this header",
            ),
            (
                edited("header: x-user-id", "header: 'x user'"),
                "workloads[0].claim_to_headers[0].header",
                "header name",
            ),
            (
                edited("claim: sub, header", "claim: a..b, header"),
                "workloads[0].claim_to_headers[0].claim",
                "dotted path",
            ),
            (
                edited("from_cookies: [session]", "from_cookies: []"),
                "workloads[0].forward",
                "from_cookies is empty",
            ),
            (
                edited(
                    "      - {claim: sub, header: x-user-id}\n",
                    "      - {claim: sub, header: x-user-id}\n      - {claim: name, header: X-User-Id}\n",
                ),
                "workloads[0].claim_to_headers[1].header",
                "duplicate header",
            ),
        ];

        for (text, field, fragment) in cases {
            let found = problems(&text);

            assert_eq!(found.len(), 1, "{field}: {found:#?}");
            assert_eq!(found[0].field, field);
            assert!(
                found[0].message.contains(fragment),
                "{field}: {}",
                found[0].message
            );
        }
    }

    #[test]
    fn requirement_with_two_keys_is_syntax_error() {
        let text = edited(
            "            - claim: {path: tier, one_of: [1, 2]}\n",
            "            - {roles_any: [a], scopes_any: [b]}\n",
        );

        let error = parse(&text, "rules.yaml").expect_err("two keys");

        let ConfigError::Syntax { line, detail, .. } = &error else {
            panic!("{error}")
        };
        assert!(line.is_some(), "{error}");
        assert!(detail.contains("exactly one key"), "{detail}");
    }

    #[test]
    fn yaml_values_keep_their_type() {
        let text = edited("one_of: [1, 2]", "equals: true");

        let config = parse(&text, "rules.yaml").expect("valid");

        let Some(crate::config::Requirement::All(children)) =
            &config.workloads[0].rules[0].requires
        else {
            panic!("expected all")
        };
        let crate::config::Requirement::Claim(claim) = &children[1] else {
            panic!("expected claim")
        };
        assert_eq!(claim.equals, Some(serde_json::Value::Bool(true)));
    }
}
