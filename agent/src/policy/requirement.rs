//! Evaluating a rule's `requires` tree over a verified token.

use serde_json::{Map, Value};

use super::claims;
use super::matcher::Captures;
use crate::config::{ClaimRequirement, Requirement};
use crate::decision::Reason;

/// Inputs of a requirement check.
pub(crate) struct Context<'a> {
    pub claims: &'a Map<String, Value>,
    pub roles_claim: &'a str,
    pub captures: &'a Captures,
}

/// Checks `requirement`; `Err` carries the reason of the first unmet leaf.
///
/// `all` fails with the first failing child's reason. `any` fails with its
/// first child's reason when no child holds, and an empty `any` never
/// holds; validation rejects empty lists.
pub(crate) fn check(requirement: &Requirement, context: &Context<'_>) -> Result<(), Reason> {
    match requirement {
        Requirement::All(children) => children.iter().try_for_each(|child| check(child, context)),
        Requirement::Any(children) => {
            let mut first_failure = None;
            for child in children {
                match check(child, context) {
                    Ok(()) => return Ok(()),
                    Err(reason) => {
                        first_failure.get_or_insert(reason);
                    }
                }
            }
            Err(first_failure.unwrap_or(Reason::ClaimMismatch))
        }
        Requirement::Claim(claim) => {
            holds(check_claim(claim, context.claims), Reason::ClaimMismatch)
        }
        Requirement::RolesAny(wanted) => {
            let held = claims::roles(context.claims, context.roles_claim);
            holds(
                wanted.iter().any(|role| held.contains(&role.as_str())),
                Reason::MissingRole,
            )
        }
        Requirement::RolesAll(wanted) => {
            let held = claims::roles(context.claims, context.roles_claim);
            holds(
                wanted.iter().all(|role| held.contains(&role.as_str())),
                Reason::MissingRole,
            )
        }
        Requirement::ScopesAny(wanted) => {
            let held = claims::scopes(context.claims);
            holds(
                wanted.iter().any(|scope| held.contains(&scope.as_str())),
                Reason::MissingScope,
            )
        }
        Requirement::ScopesAll(wanted) => {
            let held = claims::scopes(context.claims);
            holds(
                wanted.iter().all(|scope| held.contains(&scope.as_str())),
                Reason::MissingScope,
            )
        }
        Requirement::SegmentEqualsClaim(binding) => {
            let segment = context
                .captures
                .iter()
                .find(|(name, _)| *name == binding.segment)
                .and_then(|(_, value)| value.as_deref());
            let claim =
                claims::lookup(context.claims, &binding.claim).and_then(claims::segment_text);
            let bound =
                matches!((segment, claim), (Some(segment), Some(claim)) if segment == claim);
            holds(bound, Reason::ClaimMismatch)
        }
    }
}

fn holds(condition: bool, reason: Reason) -> Result<(), Reason> {
    if condition {
        Ok(())
    } else {
        Err(reason)
    }
}

fn check_claim(requirement: &ClaimRequirement, claims: &Map<String, Value>) -> bool {
    let Some(value) = claims::lookup(claims, &requirement.path) else {
        return false;
    };
    if let Some(expected) = &requirement.equals {
        return claims::json_equals(value, expected);
    }
    if let Some(accepted) = &requirement.one_of {
        return accepted
            .iter()
            .any(|expected| claims::json_equals(value, expected));
    }
    if let Some(expected) = &requirement.contains {
        return claims::json_contains(value, expected);
    }
    // A comparison without a value holds for no token; validation rejects it.
    false
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn requirement(yaml: &str) -> Requirement {
        serde_yaml::from_str(yaml).expect("valid requirement")
    }

    fn run(yaml: &str, claims: Value, captures: &[(&str, Option<&str>)]) -> Result<(), Reason> {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object")
        };
        let captures: Captures = captures
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.map(str::to_owned)))
            .collect();
        let context = Context {
            claims: &claims,
            roles_claim: "roles",
            captures: &captures,
        };
        check(&requirement(yaml), &context)
    }

    #[test]
    fn yaml_shapes_parse() {
        let parsed = requirement(
            "all:\n  - claim: {path: org.tier, equals: 3}\n  - any:\n    - roles_any: [admin]\n    - scopes_all: [a, b]\n",
        );

        let Requirement::All(children) = parsed else {
            panic!("expected all")
        };
        assert_eq!(children.len(), 2);
        assert!(
            matches!(&children[0], Requirement::Claim(claim) if claim.equals == Some(json!(3)))
        );
        assert!(matches!(&children[1], Requirement::Any(any) if any.len() == 2));
    }

    #[test]
    fn claim_leaf_by_type() {
        let cases: &[(&str, Value, Result<(), Reason>)] = &[
            (
                "claim: {path: verified, equals: true}",
                json!({"verified": true}),
                Ok(()),
            ),
            (
                "claim: {path: verified, equals: true}",
                json!({"verified": "true"}),
                Err(Reason::ClaimMismatch),
            ),
            (
                "claim: {path: verified, equals: 'true'}",
                json!({"verified": true}),
                Err(Reason::ClaimMismatch),
            ),
            (
                "claim: {path: org.tier, equals: 3}",
                json!({"org": {"tier": 3}}),
                Ok(()),
            ),
            (
                "claim: {path: org.tier, equals: 3}",
                json!({"org": {"tier": "3"}}),
                Err(Reason::ClaimMismatch),
            ),
            (
                "claim: {path: region, one_of: [eu, us]}",
                json!({"region": "us"}),
                Ok(()),
            ),
            (
                "claim: {path: region, one_of: [eu, us]}",
                json!({"region": ["us"]}),
                Err(Reason::ClaimMismatch),
            ),
            (
                "claim: {path: groups, contains: ops}",
                json!({"groups": ["dev", "ops"]}),
                Ok(()),
            ),
            (
                "claim: {path: level, one_of: [1, 2]}",
                json!({"level": 2}),
                Ok(()),
            ),
            (
                "claim: {path: missing, equals: x}",
                json!({}),
                Err(Reason::ClaimMismatch),
            ),
        ];
        for (yaml, claims, expected) in cases {
            assert_eq!(
                run(yaml, claims.clone(), &[]),
                *expected,
                "{yaml} on {claims}"
            );
        }
    }

    #[test]
    fn roles_and_scopes_leaves() {
        let claims = json!({"roles": ["reader", "ops"], "scope": "a b"});
        let cases = [
            ("roles_any: [admin, ops]", Ok(())),
            ("roles_any: [admin]", Err(Reason::MissingRole)),
            ("roles_all: [reader, ops]", Ok(())),
            ("roles_all: [reader, admin]", Err(Reason::MissingRole)),
            ("scopes_any: [c, b]", Ok(())),
            ("scopes_any: [c]", Err(Reason::MissingScope)),
            ("scopes_all: [a, b]", Ok(())),
            ("scopes_all: [a, c]", Err(Reason::MissingScope)),
        ];
        for (yaml, expected) in cases {
            assert_eq!(run(yaml, claims.clone(), &[]), expected, "{yaml}");
        }
    }

    #[test]
    fn all_and_any_combine() {
        let yaml = "any:\n  - all:\n    - roles_any: [admin]\n    - scopes_all: [write]\n  - claim: {path: sub, equals: root}\n";
        let cases = [
            (json!({"roles": ["admin"], "scope": "write"}), Ok(())),
            (json!({"sub": "root"}), Ok(())),
            (json!({"roles": ["admin"]}), Err(Reason::MissingScope)),
            (json!({"scope": "write"}), Err(Reason::MissingRole)),
        ];
        for (claims, expected) in cases {
            assert_eq!(run(yaml, claims.clone(), &[]), expected, "{claims}");
        }
    }

    #[test]
    fn segment_binding() {
        let yaml = "segment_equals_claim: {segment: user, claim: sub}";
        let cases = [
            (json!({"sub": "alice"}), Some("alice"), Ok(())),
            (
                json!({"sub": "alice"}),
                Some("bob"),
                Err(Reason::ClaimMismatch),
            ),
            (
                json!({"sub": "alice"}),
                Some("Alice"),
                Err(Reason::ClaimMismatch),
            ),
            (json!({"sub": 42}), Some("42"), Ok(())),
            (
                json!({"sub": ["alice"]}),
                Some("alice"),
                Err(Reason::ClaimMismatch),
            ),
            (json!({}), Some("alice"), Err(Reason::ClaimMismatch)),
            (json!({"sub": "alice"}), None, Err(Reason::ClaimMismatch)),
        ];
        for (claims, segment, expected) in cases {
            let result = run(yaml, claims.clone(), &[("user", segment)]);

            assert_eq!(result, expected, "{claims} on {segment:?}");
        }
        assert_eq!(
            run(yaml, json!({"sub": "alice"}), &[("tenant", Some("alice"))]),
            Err(Reason::ClaimMismatch),
            "a segment the template does not capture binds nothing"
        );
    }
}
