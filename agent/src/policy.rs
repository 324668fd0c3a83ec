//! Per-workload authorization rules over a verified token.
//!
//! Rules are ordered; the first whose path prefix and method match decides,
//! and a request no rule matches is denied. Pure functions, no I/O.

mod claims;
mod normalize;

pub use normalize::normalize_path;

use crate::config::RuleConfig;
use crate::decision::Reason;
use crate::verify::VerifiedToken;

/// The compiled rules of one workload.
pub struct Policy {
    rules: Vec<CompiledRule>,
}

/// One rule, with its prefix normalised once at load time.
struct CompiledRule {
    /// `None` when the configured prefix does not normalise; such a rule
    /// never matches. Validated configurations have none.
    prefix: Option<String>,
    methods: Vec<String>,
    claims: Vec<(String, Vec<String>)>,
    roles: Vec<String>,
    scopes: Vec<String>,
}

/// Which rule decided, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// Index of the matching rule, `None` when no rule matched.
    pub rule: Option<usize>,
    /// `Reason::Allowed` or the first unmet requirement.
    pub reason: Reason,
}

impl Policy {
    pub fn new(rules: &[RuleConfig]) -> Self {
        let rules = rules
            .iter()
            .map(|rule| CompiledRule {
                prefix: normalize_path(&rule.path_prefix),
                methods: rule.methods.clone(),
                claims: rule
                    .claims
                    .iter()
                    .map(|(path, values)| (path.clone(), values.clone()))
                    .collect(),
                roles: rule.roles.clone(),
                scopes: rule.scopes.clone(),
            })
            .collect();
        Self { rules }
    }

    /// Evaluates the rules for `method` and the raw request `path` (without
    /// query), which is normalised before matching.
    ///
    /// Methods are compared exactly, because they are case-sensitive (RFC
    /// 9110 §9.1); `HEAD` does not match a rule that lists only `GET`. A
    /// path that does not normalise matches no rule.
    pub fn evaluate(&self, method: &str, path: &str, token: &VerifiedToken) -> PolicyOutcome {
        let Some(path) = normalize_path(path) else {
            return PolicyOutcome {
                rule: None,
                reason: Reason::NoRuleMatched,
            };
        };

        for (index, rule) in self.rules.iter().enumerate() {
            if rule.matches(method, &path) {
                return PolicyOutcome {
                    rule: Some(index),
                    reason: rule.check(token),
                };
            }
        }
        PolicyOutcome {
            rule: None,
            reason: Reason::NoRuleMatched,
        }
    }
}

impl CompiledRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        let Some(prefix) = &self.prefix else {
            return false;
        };
        let method_matches = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        method_matches && prefix_matches(prefix, path)
    }

    /// Returns the first unmet requirement, checked in the order claims,
    /// roles, scopes, or `Reason::Allowed`.
    fn check(&self, token: &VerifiedToken) -> Reason {
        for (path, accepted) in &self.claims {
            let satisfied = claims::lookup(&token.claims, path)
                .is_some_and(|value| claims::claim_matches(value, accepted));
            if !satisfied {
                return Reason::ClaimMismatch;
            }
        }

        if !self.roles.is_empty() {
            let held = claims::roles(&token.claims, &token.roles_claim);
            if !self.roles.iter().any(|role| held.contains(&role.as_str())) {
                return Reason::MissingRole;
            }
        }

        if !self.scopes.is_empty() {
            let held = claims::scopes(&token.claims);
            if !self
                .scopes
                .iter()
                .all(|scope| held.contains(&scope.as_str()))
            {
                return Reason::MissingScope;
            }
        }
        Reason::Allowed
    }
}

/// True when normalised `path` starts with `prefix` at a segment boundary:
/// `/orders` matches `/orders`, `/orders/7` and `/orders;v=1`, not
/// `/ordersX`. A `;` counts as a boundary because servers that strip path
/// parameters serve `/orders;x` as `/orders`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    if prefix.ends_with('/') {
        return true;
    }
    matches!(path.as_bytes().get(prefix.len()), None | Some(b'/' | b';'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    use super::*;

    fn rule(prefix: &str, methods: &[&str]) -> RuleConfig {
        RuleConfig {
            path_prefix: prefix.to_owned(),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            claims: BTreeMap::new(),
            roles: Vec::new(),
            scopes: Vec::new(),
        }
    }

    fn token(claims: Value) -> VerifiedToken {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object")
        };
        VerifiedToken {
            issuer: "https://idp.example".to_owned(),
            subject: Some("alice".to_owned()),
            kid: Some("rsa-1".to_owned()),
            algorithm: "RS256".to_owned(),
            claims,
            roles_claim: "roles".to_owned(),
        }
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    /// `/admin` needs role admin, `/public` is open to any valid token.
    fn admin_policy() -> Policy {
        let mut admin = rule("/admin", &[]);
        admin.roles = strings(&["admin"]);
        Policy::new(&[admin, rule("/public", &["GET"])])
    }

    #[test]
    fn prefix_matches_segment_boundary() {
        let cases = [
            ("/orders", "/orders", true),
            ("/orders", "/orders/7", true),
            ("/orders", "/orders;v=1", true),
            ("/orders", "/ordersX", false),
            ("/orders", "/order", false),
            ("/orders/", "/orders/7", true),
            ("/orders/", "/orders", false),
            ("/", "/anything", true),
        ];
        for (prefix, path, expected) in cases {
            assert_eq!(prefix_matches(prefix, path), expected, "{prefix} on {path}");
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let mut strict = rule("/orders", &["POST"]);
        strict.roles = strings(&["writer"]);
        let policy = Policy::new(&[strict, rule("/orders", &[]), rule("/", &["GET"])]);
        let reader = token(json!({"roles": ["reader"]}));

        let cases = [
            ("POST", "/orders/1", Some(0), Reason::MissingRole),
            ("GET", "/orders/1", Some(1), Reason::Allowed),
            ("GET", "/other", Some(2), Reason::Allowed),
            ("DELETE", "/other", None, Reason::NoRuleMatched),
            ("get", "/other", None, Reason::NoRuleMatched),
        ];
        for (method, path, rule_index, reason) in cases {
            let outcome = policy.evaluate(method, path, &reader);

            assert_eq!(
                outcome,
                PolicyOutcome {
                    rule: rule_index,
                    reason
                },
                "{method} {path}"
            );
        }
    }

    #[test]
    fn no_rules_denies() {
        let policy = Policy::new(&[]);

        let outcome = policy.evaluate("GET", "/", &token(json!({})));

        assert_eq!(
            outcome,
            PolicyOutcome {
                rule: None,
                reason: Reason::NoRuleMatched
            }
        );
    }

    #[test]
    fn admin_spellings_reach_admin_rule() {
        let policy = admin_policy();
        let reader = token(json!({"roles": ["reader"]}));

        for path in [
            "/admin",
            "/./admin",
            "//admin",
            "/%61dmin",
            "/%2e/admin",
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/admin;jsessionid=1",
            "/admin/",
            "/admin/users",
        ] {
            let outcome = policy.evaluate("GET", path, &reader);

            assert_eq!(
                outcome,
                PolicyOutcome {
                    rule: Some(0),
                    reason: Reason::MissingRole
                },
                "path {path:?}"
            );
        }
    }

    #[test]
    fn ambiguous_paths_match_no_rule() {
        let policy = admin_policy();
        let admin = token(json!({"roles": ["admin"]}));

        for path in [
            "/public/..;/admin",
            "/public%2f..%2fadmin",
            "/public\\..\\admin",
            "/public/%00",
            "public",
        ] {
            let outcome = policy.evaluate("GET", path, &admin);

            assert_eq!(
                outcome,
                PolicyOutcome {
                    rule: None,
                    reason: Reason::NoRuleMatched
                },
                "path {path:?}"
            );
        }
    }

    #[test]
    fn requirements_in_order() {
        let mut full = rule("/", &[]);
        full.claims.insert("tenant".to_owned(), strings(&["acme"]));
        full.roles = strings(&["admin", "ops"]);
        full.scopes = strings(&["read", "write"]);
        let policy = Policy::new(&[full]);

        let cases = [
            (
                json!({"roles": ["ops"], "scope": "read write"}),
                Reason::ClaimMismatch,
            ),
            (
                json!({"tenant": "other", "roles": ["ops"], "scope": "read write"}),
                Reason::ClaimMismatch,
            ),
            (
                json!({"tenant": "acme", "scope": "read write"}),
                Reason::MissingRole,
            ),
            (
                json!({"tenant": "acme", "roles": ["reader"], "scope": "read"}),
                Reason::MissingRole,
            ),
            (
                json!({"tenant": "acme", "roles": "ops"}),
                Reason::MissingScope,
            ),
            (
                json!({"tenant": "acme", "roles": ["ops"], "scope": "read"}),
                Reason::MissingScope,
            ),
            (
                json!({"tenant": "acme", "roles": ["ops"], "scope": "write", "scp": ["read"]}),
                Reason::Allowed,
            ),
            (
                json!({"tenant": ["x", "acme"], "roles": "dev ops", "scope": "write read extra"}),
                Reason::Allowed,
            ),
        ];
        for (claims, reason) in cases {
            let outcome = policy.evaluate("GET", "/", &token(claims.clone()));

            assert_eq!(outcome.reason, reason, "claims {claims}");
        }
    }

    #[test]
    fn roles_claim_from_token() {
        let mut admin = rule("/", &[]);
        admin.roles = strings(&["admin"]);
        let policy = Policy::new(&[admin]);
        let mut keycloak =
            token(json!({"realm_access": {"roles": ["admin"]}, "roles": ["reader"]}));
        keycloak.roles_claim = "realm_access.roles".to_owned();

        let outcome = policy.evaluate("GET", "/", &keycloak);

        assert_eq!(outcome.reason, Reason::Allowed);
    }

    #[test]
    fn numeric_and_nested_claims() {
        let mut versioned = rule("/", &[]);
        versioned
            .claims
            .insert("org.level".to_owned(), strings(&["3"]));
        versioned
            .claims
            .insert("verified".to_owned(), strings(&["true"]));
        let policy = Policy::new(&[versioned]);

        let allowed = policy.evaluate(
            "GET",
            "/",
            &token(json!({"org": {"level": 3}, "verified": true})),
        );
        let denied = policy.evaluate(
            "GET",
            "/",
            &token(json!({"org": {"level": 4}, "verified": true})),
        );
        let wrong_type = policy.evaluate(
            "GET",
            "/",
            &token(json!({"org": {"level": 3}, "verified": "yes"})),
        );

        assert_eq!(allowed.reason, Reason::Allowed);
        assert_eq!(denied.reason, Reason::ClaimMismatch);
        assert_eq!(wrong_type.reason, Reason::ClaimMismatch);
    }

    #[test]
    fn unnormalisable_prefix_never_matches() {
        let policy = Policy::new(&[rule("/a%2fb", &[]), rule("/", &[])]);

        let outcome = policy.evaluate("GET", "/a", &token(json!({})));

        assert_eq!(
            outcome,
            PolicyOutcome {
                rule: Some(1),
                reason: Reason::Allowed
            }
        );
    }
}
