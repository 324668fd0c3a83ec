//! Per-workload authorization rules over a verified token.
//!
//! Rules are ordered; the first whose path and method match decides, and a
//! request no rule matches is denied. A matching rule may be public, may
//! pass anonymous callers on, or may require claims, roles, scopes and path
//! segments bound to claims. Pure functions, no I/O: the proxy and
//! `explain` call the same code.

mod claims;
mod matcher;
mod normalize;
mod requirement;

pub use matcher::{Template, TemplateError};
pub use normalize::normalize_path;

use http::header::{HeaderMap, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
use http::Method;

use crate::config::{CorsPreflight, Requirement, RuleConfig, WorkloadConfig};
use crate::decision::Reason;
use crate::verify::VerifiedToken;

use self::matcher::{Captures, PathMatcher};

pub(crate) use self::claims::{header_text, lookup as lookup_claim};

/// The compiled rules of one workload.
pub struct Policy {
    rules: Vec<CompiledRule>,
    cors_preflight: CorsPreflight,
}

/// One rule, with its path matcher built once at load time.
struct CompiledRule {
    matcher: PathMatcher,
    methods: Vec<String>,
    claims: Vec<(String, Vec<String>)>,
    roles: Vec<String>,
    scopes: Vec<String>,
    requires: Option<Requirement>,
    access: Access,
}

/// Token requirement of a matched rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token needed; none is checked.
    Public,
    /// A token is needed unless `allow_missing`; a token that fails
    /// verification is passed over as anonymous when `allow_failed`.
    Token {
        allow_missing: bool,
        allow_failed: bool,
    },
}

/// The request facts that rules match on.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Raw request path, without or with the query.
    pub path: &'a str,
    /// The request is a CORS preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`.
    pub cors_preflight: bool,
}

impl<'a> RequestFacts<'a> {
    /// Reads the facts of a request with `method`, raw `path` and
    /// `headers`.
    pub fn new(method: &'a str, path: &'a str, headers: &HeaderMap) -> Self {
        let cors_preflight = method == Method::OPTIONS.as_str()
            && headers.contains_key(ORIGIN)
            && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        Self {
            method,
            path,
            cors_preflight,
        }
    }
}

/// The rule a request falls under, if any, found before any token is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the matching rule, `None` when no rule matched or the
    /// request is a passed CORS preflight.
    pub rule: Option<usize>,
    pub route: Route,
    /// The normalised request path, `None` when the path does not normalise
    /// (such a request matches no rule).
    pub normalized_path: Option<String>,
    captures: Captures,
}

/// Routing result: a passed preflight, the matched rule, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A CORS preflight that the workload passes without a token.
    Preflight,
    /// A rule matched, with this access.
    Rule(Access),
    /// No rule matched: denied by default.
    NoRule,
}

impl RouteMatch {
    /// Returns whether the token must be extracted and verified to decide:
    /// false for public rules and passed preflights, whose tokens are
    /// ignored.
    pub fn needs_token(&self) -> bool {
        !matches!(self.route, Route::Preflight | Route::Rule(Access::Public))
    }
}

/// The token, as far as it is known when deciding.
#[derive(Clone, Copy, Debug)]
pub enum TokenState<'a> {
    /// No token in any configured source, or it was not read because the
    /// route does not need one.
    Missing,
    /// Extraction or verification failed with this reason.
    Failed(Reason),
    Valid(&'a VerifiedToken),
}

/// Policy result: the deciding rule and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// Index of the matching rule, `None` when no rule matched.
    pub rule: Option<usize>,
    /// `Reason::Allowed`, `Public` or `Anonymous`, or why the request is
    /// denied: a token failure or the first unmet requirement.
    pub reason: Reason,
}

impl Policy {
    /// Compiles `rules`, with CORS preflights decided by the rules.
    pub fn new(rules: &[RuleConfig]) -> Self {
        let rules = rules
            .iter()
            .map(|rule| CompiledRule {
                matcher: PathMatcher::new(
                    rule.path.as_deref(),
                    rule.path_prefix.as_deref(),
                    rule.path_template.as_deref(),
                ),
                methods: rule.methods.clone(),
                claims: rule
                    .claims
                    .iter()
                    .map(|(path, values)| (path.clone(), values.clone()))
                    .collect(),
                roles: rule.roles.clone(),
                scopes: rule.scopes.clone(),
                requires: rule.requires.clone(),
                access: if rule.public {
                    Access::Public
                } else {
                    Access::Token {
                        allow_missing: rule.allow_missing || rule.allow_missing_or_failed,
                        allow_failed: rule.allow_missing_or_failed,
                    }
                },
            })
            .collect();
        Self {
            rules,
            cors_preflight: CorsPreflight::Rules,
        }
    }

    /// Compiles a workload's rules and its CORS preflight setting.
    pub fn for_workload(workload: &WorkloadConfig) -> Self {
        let mut policy = Self::new(&workload.rules);
        policy.cors_preflight = workload.cors_preflight;
        policy
    }

    /// Finds the rule for a request. Methods are compared exactly, because
    /// they are case-sensitive (RFC 9110 §9.1); `HEAD` does not match a rule
    /// that lists only `GET`. A path that does not normalise matches no
    /// rule.
    pub fn route(&self, request: &RequestFacts<'_>) -> RouteMatch {
        let normalized_path = normalize_path(request.path);
        let no_rule = |normalized_path| RouteMatch {
            rule: None,
            route: Route::NoRule,
            normalized_path,
            captures: Vec::new(),
        };
        let Some(path) = normalized_path else {
            return no_rule(None);
        };

        if request.cors_preflight && self.cors_preflight == CorsPreflight::Pass {
            return RouteMatch {
                rule: None,
                route: Route::Preflight,
                normalized_path: Some(path),
                captures: Vec::new(),
            };
        }

        for (index, rule) in self.rules.iter().enumerate() {
            let method_matches =
                rule.methods.is_empty() || rule.methods.iter().any(|m| m == request.method);
            if !method_matches {
                continue;
            }
            if let Some(captures) = rule.matcher.matches(&path) {
                return RouteMatch {
                    rule: Some(index),
                    route: Route::Rule(rule.access),
                    normalized_path: Some(path),
                    captures,
                };
            }
        }
        no_rule(Some(path))
    }

    /// Decides a routed request given what is known of its token.
    ///
    /// Without a matching rule the token still decides first, so a caller
    /// without a valid token learns nothing about which paths exist: 401
    /// for a missing or bad token, then 403 `NoRuleMatched`.
    pub fn decide(&self, routed: &RouteMatch, token: TokenState<'_>) -> PolicyOutcome {
        let outcome = |reason| PolicyOutcome {
            rule: routed.rule,
            reason,
        };
        let (allow_missing, allow_failed) = match routed.route {
            Route::Preflight | Route::Rule(Access::Public) => return outcome(Reason::Public),
            Route::NoRule => {
                return outcome(match token {
                    TokenState::Missing => Reason::MissingToken,
                    TokenState::Failed(reason) => reason,
                    TokenState::Valid(_) => Reason::NoRuleMatched,
                })
            }
            Route::Rule(Access::Token {
                allow_missing,
                allow_failed,
            }) => (allow_missing, allow_failed),
        };

        match token {
            TokenState::Missing if allow_missing => outcome(Reason::Anonymous),
            TokenState::Missing => outcome(Reason::MissingToken),
            TokenState::Failed(_) if allow_failed => outcome(Reason::Anonymous),
            TokenState::Failed(reason) => outcome(reason),
            TokenState::Valid(verified) => {
                // A route from another policy could carry an index this one
                // does not have; deny rather than guess.
                let Some(rule) = routed.rule.and_then(|index| self.rules.get(index)) else {
                    return outcome(Reason::NoRuleMatched);
                };
                outcome(rule.check(verified, &routed.captures))
            }
        }
    }

    /// Routes and decides a request in one step.
    pub fn evaluate_request(
        &self,
        request: &RequestFacts<'_>,
        token: TokenState<'_>,
    ) -> PolicyOutcome {
        self.decide(&self.route(request), token)
    }

    /// Evaluates the rules for `method` and the raw request `path` (without
    /// query) with a verified token; not a CORS preflight.
    pub fn evaluate(&self, method: &str, path: &str, token: &VerifiedToken) -> PolicyOutcome {
        let request = RequestFacts {
            method,
            path,
            cors_preflight: false,
        };
        self.evaluate_request(&request, TokenState::Valid(token))
    }
}

impl CompiledRule {
    /// Returns the first unmet requirement, checked in the order claims,
    /// roles, scopes, `requires`, or `Reason::Allowed`.
    fn check(&self, token: &VerifiedToken, captures: &Captures) -> Reason {
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

        if let Some(requires) = &self.requires {
            let context = requirement::Context {
                claims: &token.claims,
                roles_claim: &token.roles_claim,
                captures,
            };
            if let Err(reason) = requirement::check(requires, &context) {
                return reason;
            }
        }
        Reason::Allowed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn rule(prefix: &str, methods: &[&str]) -> RuleConfig {
        RuleConfig {
            path_prefix: Some(prefix.to_owned()),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            ..RuleConfig::default()
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
