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

/// True when `claim` equals `expected` by JSON type: a number equals a
/// number of the same value (`3` and `3.0`), a string only a string, a
/// boolean only a boolean; arrays and objects compare element by element.
pub(crate) fn json_equals(claim: &Value, expected: &Value) -> bool {
    match (claim, expected) {
        (Value::Number(left), Value::Number(right)) => numbers_equal(left, right),
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .zip(right)
                    .all(|(left, right)| json_equals(left, right))
        }
        (Value::Object(left), Value::Object(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .all(|(key, left)| right.get(key).is_some_and(|right| json_equals(left, right)))
        }
        (left, right) => left == right,
    }
}

fn numbers_equal(left: &serde_json::Number, right: &serde_json::Number) -> bool {
    if let (Some(left), Some(right)) = (as_integer(left), as_integer(right)) {
        return left == right;
    }
    // Exact comparison on purpose: JSON numbers that print the same parse
    // to the same `f64`, and a tolerance would accept values not written.
    match (left.as_f64(), right.as_f64()) {
        #[expect(clippy::float_cmp, reason = "claim values are compared exactly")]
        (Some(left), Some(right)) => left == right,
        _ => false,
    }
}

fn as_integer(number: &serde_json::Number) -> Option<i128> {
    number
        .as_i64()
        .map(i128::from)
        .or_else(|| number.as_u64().map(i128::from))
}

/// True when `claim` is an array with an element equal to `expected`, or a
/// string whose space-separated words include the string `expected` (the
/// OAuth `scope` form).
pub(crate) fn json_contains(claim: &Value, expected: &Value) -> bool {
    match (claim, expected) {
        (Value::Array(items), _) => items.iter().any(|item| json_equals(item, expected)),
        (Value::String(text), Value::String(word)) => {
            text.split_whitespace().any(|candidate| candidate == word)
        }
        _ => false,
    }
}

/// Returns the text a path segment is compared with: a string claim as it
/// is, an integer claim in decimal. Other types bind no segment, because
/// their text form is ambiguous.
pub(crate) fn segment_text(claim: &Value) -> Option<String> {
    match claim {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => as_integer(number).map(|integer| integer.to_string()),
        _ => None,
    }
}

/// Returns the value of an identity header for `claim`: a string as it is,
/// numbers and booleans as JSON text, an array's elements joined with `,`
/// (strings as they are, others as JSON text), an object as JSON. Null is
/// no value.
pub(crate) fn header_text(claim: &Value) -> Option<String> {
    match claim {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
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

    #[test]
    fn json_equals_by_type() {
        let cases: &[(Value, Value, bool)] = &[
            (json!("true"), json!(true), false),
            (json!(true), json!(true), true),
            (json!(3), json!(3.0), true),
            (json!(3), json!("3"), false),
            (json!(u64::MAX), json!(u64::MAX), true),
            (json!(-1), json!(u64::MAX), false),
            (json!(["a", 1]), json!(["a", 1.0]), true),
            (json!(["a"]), json!("a"), false),
            (json!({"a": [1]}), json!({"a": [1]}), true),
            (json!({"a": 1}), json!({"a": 1, "b": 2}), false),
            (json!(null), json!(null), true),
        ];
        for (claim, expected, equal) in cases {
            assert_eq!(json_equals(claim, expected), *equal, "{claim} = {expected}");
        }
    }

    #[test]
    fn json_contains_cases() {
        let cases: &[(Value, Value, bool)] = &[
            (json!(["a", "b"]), json!("b"), true),
            (json!([1, 2]), json!(2.0), true),
            (json!([1, 2]), json!("2"), false),
            (json!([true]), json!(true), true),
            (json!("read write"), json!("write"), true),
            (json!("read write"), json!("wri"), false),
            (json!("b"), json!("b"), true),
            (json!(2), json!(2), false),
        ];
        for (claim, expected, contained) in cases {
            assert_eq!(
                json_contains(claim, expected),
                *contained,
                "{claim} has {expected}"
            );
        }
    }

    #[test]
    fn segment_and_header_text() {
        assert_eq!(segment_text(&json!("alice")).as_deref(), Some("alice"));
        assert_eq!(segment_text(&json!(42)).as_deref(), Some("42"));
        assert_eq!(segment_text(&json!(4.5)), None);
        assert_eq!(segment_text(&json!(true)), None);
        assert_eq!(segment_text(&json!(["alice"])), None);

        assert_eq!(header_text(&json!("alice")).as_deref(), Some("alice"));
        assert_eq!(header_text(&json!(7)).as_deref(), Some("7"));
        assert_eq!(header_text(&json!(false)).as_deref(), Some("false"));
        assert_eq!(
            header_text(&json!(["a", 2, true])).as_deref(),
            Some("a,2,true")
        );
        assert_eq!(
            header_text(&json!({"k": "v"})).as_deref(),
            Some(r#"{"k":"v"}"#)
        );
        assert_eq!(header_text(&json!(null)), None);
    }
}
