//! Checks of the registered claims `exp`, `nbf`, `iat` (RFC 7519 §4.1) and
//! `aud` against the verifier's clock and configuration.

use serde_json::{Map, Value};

use crate::decision::Reason;

/// Reads the `NumericDate` claim `name` (RFC 7519 §2) as whole seconds,
/// rounded up so that comparisons with an integer clock stay exact.
/// Returns `Ok(None)` when absent and `MalformedToken` when not a number.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Reason> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(number) = value else {
        return Err(Reason::MalformedToken);
    };

    if let Some(seconds) = number.as_u64() {
        return Ok(Some(seconds));
    }
    // A negative or fractional value: before 1970 counts as 0.
    let seconds = number.as_f64().ok_or(Reason::MalformedToken)?;
    if seconds <= 0.0 {
        return Ok(Some(0));
    }
    #[expect(
        clippy::cast_sign_loss,
        reason = "the value is positive; `as` saturates above u64::MAX"
    )]
    let whole = seconds.ceil() as u64;
    Ok(Some(whole))
}

/// Checks the token's validity period at `now` (Unix seconds) with `skew`
/// seconds of tolerance in each direction.
///
/// - `exp` is required, and `now` must be before `exp + skew` (§4.1.4);
///   a missing `exp` is `Expired`, because a token without one never ends.
/// - `nbf`, if present, must not be after `now + skew` (§4.1.5).
/// - `iat`, if present, must not be after `now + skew`: a token issued in
///   the future comes from a wrong clock or a forger.
pub(super) fn check_times(claims: &Map<String, Value>, now: u64, skew: u64) -> Result<(), Reason> {
    let latest_accepted_start = now.saturating_add(skew);

    match numeric_date(claims, "exp")? {
        None => return Err(Reason::Expired),
        Some(exp) if now >= exp.saturating_add(skew) => return Err(Reason::Expired),
        Some(_) => {}
    }
    if numeric_date(claims, "nbf")?.is_some_and(|nbf| nbf > latest_accepted_start) {
        return Err(Reason::NotYetValid);
    }
    if numeric_date(claims, "iat")?.is_some_and(|iat| iat > latest_accepted_start) {
        return Err(Reason::NotYetValid);
    }
    Ok(())
}

/// Checks `aud` (RFC 7519 §4.1.3), a string or an array of strings, against
/// `accepted`: one match is enough. An empty `accepted` skips the check.
pub(super) fn check_audience(
    claims: &Map<String, Value>,
    accepted: &[String],
) -> Result<(), Reason> {
    if accepted.is_empty() {
        return Ok(());
    }
    let is_accepted = |value: &Value| {
        value
            .as_str()
            .is_some_and(|aud| accepted.iter().any(|a| a == aud))
    };

    let matched = match claims.get("aud") {
        Some(Value::Array(audiences)) => audiences.iter().any(is_accepted),
        Some(single) => is_accepted(single),
        None => false,
    };
    if matched {
        Ok(())
    } else {
        Err(Reason::AudienceMismatch)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn claims(value: Value) -> Map<String, Value> {
        let Value::Object(map) = value else {
            panic!("not an object")
        };
        map
    }

    #[test]
    fn time_checks() {
        let cases = [
            (json!({"exp": NOW + 10}), Ok(())),
            (json!({"exp": NOW}), Ok(())),
            (json!({"exp": NOW - 59}), Ok(())),
            (json!({"exp": NOW - 60}), Err(Reason::Expired)),
            (json!({"exp": NOW - 3600}), Err(Reason::Expired)),
            (json!({}), Err(Reason::Expired)),
            (json!({"exp": "tomorrow"}), Err(Reason::MalformedToken)),
            (json!({"exp": -5}), Err(Reason::Expired)),
            (json!({"exp": 1.5e300}), Ok(())),
            (json!({"exp": NOW + 10, "nbf": NOW + 60}), Ok(())),
            (
                json!({"exp": NOW + 10, "nbf": NOW + 61}),
                Err(Reason::NotYetValid),
            ),
            (
                json!({"exp": NOW + 10, "nbf": "now"}),
                Err(Reason::MalformedToken),
            ),
            (json!({"exp": NOW + 10, "iat": NOW + 60}), Ok(())),
            (
                json!({"exp": NOW + 10, "iat": NOW + 61}),
                Err(Reason::NotYetValid),
            ),
            (json!({"exp": NOW + 10, "iat": NOW - 86_400}), Ok(())),
            (
                json!({"exp": NOW + 10, "iat": null}),
                Err(Reason::MalformedToken),
            ),
        ];

        for (value, expected) in cases {
            assert_eq!(
                check_times(&claims(value.clone()), NOW, 60),
                expected,
                "claims {value}"
            );
        }
    }

    #[test]
    fn fractional_dates_round_up() {
        // exp 100.5 is valid at 100 and not at 101 with no skew.
        let fractional = claims(json!({"exp": 100.5}));

        assert_eq!(check_times(&fractional, 100, 0), Ok(()));
        assert_eq!(check_times(&fractional, 101, 0), Err(Reason::Expired));
    }

    #[test]
    fn zero_skew_boundaries() {
        assert_eq!(
            check_times(&claims(json!({"exp": NOW})), NOW, 0),
            Err(Reason::Expired)
        );
        assert_eq!(
            check_times(&claims(json!({"exp": NOW + 1})), NOW, 0),
            Ok(())
        );
        assert_eq!(
            check_times(&claims(json!({"exp": NOW + 1, "nbf": NOW})), NOW, 0),
            Ok(())
        );
        assert_eq!(
            check_times(&claims(json!({"exp": NOW + 9, "nbf": NOW + 1})), NOW, 0),
            Err(Reason::NotYetValid)
        );
    }

    #[test]
    fn huge_skew_saturates() {
        assert_eq!(
            check_times(&claims(json!({"exp": u64::MAX})), u64::MAX - 1, u64::MAX),
            Ok(())
        );
    }

    #[test]
    fn audience_checks() {
        let accepted = vec!["orders".to_owned(), "billing".to_owned()];
        let cases = [
            (json!({"aud": "orders"}), Ok(())),
            (json!({"aud": "other"}), Err(Reason::AudienceMismatch)),
            (json!({"aud": ["other", "billing"]}), Ok(())),
            (
                json!({"aud": ["other", "more"]}),
                Err(Reason::AudienceMismatch),
            ),
            (json!({"aud": []}), Err(Reason::AudienceMismatch)),
            (json!({"aud": [7, "orders"]}), Ok(())),
            (json!({"aud": 7}), Err(Reason::AudienceMismatch)),
            (json!({"aud": "Orders"}), Err(Reason::AudienceMismatch)),
            (json!({}), Err(Reason::AudienceMismatch)),
        ];

        for (value, expected) in cases {
            assert_eq!(
                check_audience(&claims(value.clone()), &accepted),
                expected,
                "claims {value}"
            );
        }
    }

    #[test]
    fn no_configured_audience_skips_check() {
        assert_eq!(
            check_audience(&claims(json!({"aud": "anything"})), &[]),
            Ok(())
        );
        assert_eq!(check_audience(&claims(json!({})), &[]), Ok(()));
    }
}
