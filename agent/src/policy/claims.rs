//! Reading claims for rule requirements: dotted paths, value comparison,
//! roles and scopes.

use serde_json::{Map, Value};

/// Finds the claim at `path` in `claims`.
///
/// A dot descends into a nested object (`realm_access.roles`), but a claim
/// whose own name contains dots, such as `https://example.com/roles`, is
/// found too: at each level the longest key that matches the remaining
/// path wins.
pub(crate) fn lookup<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }

    let mut dots: Vec<usize> = path.match_indices('.').map(|(index, _)| index).collect();
    dots.reverse();
    for dot in dots {
        if let Some(Value::Object(nested)) = claims.get(&path[..dot]) {
            if let Some(value) = lookup(nested, &path[dot + 1..]) {
                return Some(value);
            }
        }
    }
    None
}

/// True when the scalar `value` equals `accepted`: strings as they are,
/// numbers and booleans by their JSON text (`42`, `true`). Null, arrays and
/// objects equal nothing.
fn scalar_equals(value: &Value, accepted: &str) -> bool {
    match value {
        Value::String(text) => text == accepted,
        Value::Number(number) => number.to_string() == accepted,
        Value::Bool(flag) => accepted == if *flag { "true" } else { "false" },
        Value::Null | Value::Array(_) | Value::Object(_) => false,
    }
}

/// True when the claim equals one of `accepted`, or, for an array claim,
/// contains an element that does.
pub(crate) fn claim_matches(value: &Value, accepted: &[String]) -> bool {
    let matches_any = |item: &Value| {
        accepted
            .iter()
            .any(|candidate| scalar_equals(item, candidate))
    };
    match value {
        Value::Array(items) => items.iter().any(matches_any),
        scalar => matches_any(scalar),
    }
}

/// Adds the words of a list claim: an array of strings, or one string of
/// space-separated words (the OAuth `scope` form). Other elements are
/// ignored, because a role or scope is a string.
fn push_words<'a>(value: Option<&'a Value>, words: &mut Vec<&'a str>) {
    match value {
        Some(Value::String(text)) => words.extend(text.split_whitespace()),
        Some(Value::Array(items)) => words.extend(items.iter().filter_map(Value::as_str)),
        _ => {}
    }
}

/// Roles held according to the claim at `roles_claim`.
pub(crate) fn roles<'a>(claims: &'a Map<String, Value>, roles_claim: &str) -> Vec<&'a str> {
    let mut words = Vec::new();
    push_words(lookup(claims, roles_claim), &mut words);
    words
}

/// Scopes held: the union of `scope` (RFC 8693 §4.2, space-separated) and
/// `scp` (an array or a string, as Okta and Microsoft Entra issue it).
pub(crate) fn scopes(claims: &Map<String, Value>) -> Vec<&str> {
    let mut words = Vec::new();
    push_words(claims.get("scope"), &mut words);
    push_words(claims.get("scp"), &mut words);
    words
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn lookup_paths() {
        let claims = object(json!({
            "sub": "alice",
            "realm_access": {"roles": ["admin"], "deep": {"x": 1}},
            "https://example.com/roles": ["ns"],
            "a.b": {"c": "literal-then-nested"},
            "a": {"b": {"c": "nested"}},
        }));

        let cases: &[(&str, Option<Value>)] = &[
            ("sub", Some(json!("alice"))),
            ("realm_access.roles", Some(json!(["admin"]))),
            ("realm_access.deep.x", Some(json!(1))),
            ("https://example.com/roles", Some(json!(["ns"]))),
            ("a.b.c", Some(json!("literal-then-nested"))),
            ("realm_access.missing", None),
            ("sub.x", None),
            ("missing", None),
        ];
        for (path, expected) in cases {
            assert_eq!(lookup(&claims, path), expected.as_ref(), "path {path:?}");
        }
    }

    #[test]
    fn claim_matches_by_json_text() {
        let accepted = |values: &[&str]| values.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>();
        let cases: &[(Value, &[&str], bool)] = &[
            (json!("eu"), &["eu", "us"], true),
            (json!("asia"), &["eu", "us"], false),
            (json!(["x", "us"]), &["eu", "us"], true),
            (json!(["x", "y"]), &["eu", "us"], false),
            (json!(42), &["42"], true),
            (json!(42), &["42.0"], false),
            (json!(true), &["true"], true),
            (json!(false), &["true"], false),
            (json!([1, 2]), &["2"], true),
            (json!(null), &["null"], false),
            (json!({"a": 1}), &["{\"a\":1}"], false),
            (json!([["eu"]]), &["eu"], false),
        ];
        for (value, values, expected) in cases {
            assert_eq!(
                claim_matches(value, &accepted(values)),
                *expected,
                "{value} against {values:?}"
            );
        }
    }

    #[test]
    fn roles_from_array_or_string() {
        let claims = object(json!({
            "roles": ["reader", 7, "writer"],
            "groups": "ops  dev",
            "realm_access": {"roles": ["admin"]},
            "flag": true,
        }));

        assert_eq!(roles(&claims, "roles"), ["reader", "writer"]);
        assert_eq!(roles(&claims, "groups"), ["ops", "dev"]);
        assert_eq!(roles(&claims, "realm_access.roles"), ["admin"]);
        assert!(roles(&claims, "flag").is_empty());
        assert!(roles(&claims, "absent").is_empty());
    }

    #[test]
    fn scopes_from_scope_and_scp() {
        let both = object(json!({"scope": "read write", "scp": ["admin"]}));
        let scp_string = object(json!({"scp": "read"}));
        let neither = object(json!({"sub": "x"}));

        assert_eq!(scopes(&both), ["read", "write", "admin"]);
        assert_eq!(scopes(&scp_string), ["read"]);
        assert!(scopes(&neither).is_empty());
    }
}
