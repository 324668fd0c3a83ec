//! Checks of the registered claims `exp`, `nbf`, `iat`, `aud` and `sub`
//! (RFC 7519 §4.1), the header `typ`, and the token's lifetime, against
//! the verifier's clock and the issuer's configuration.

use serde_json::{Map, Value};

use crate::decision::Reason;

/// Latest `NumericDate` accepted, 9999-12-31T23:59:59Z in Unix seconds. No
/// real token lives that long, and larger values (1e300, 2^64) only serve
/// to overflow date arithmetic, so they make the claims invalid.
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

/// Claim requirements of one issuer.
pub(super) struct ClaimRules<'a> {
    pub(super) skew: u64,
    pub(super) require_exp: bool,
    pub(super) audiences: &'a [String],
    pub(super) subject_prefixes: &'a [String],
    pub(super) required_typ: Option<&'a str>,
    pub(super) max_lifetime: Option<u64>,
}

/// Reads the `NumericDate` claim `name` (RFC 7519 §2: a JSON number,
/// integer or fraction) as whole seconds, rounded up so that comparisons
/// with an integer clock stay exact. A value before 1970 counts as 0.
/// Returns `Ok(None)` when absent, and `InvalidClaims` for a string or
/// other non-number, or a date after [`MAX_NUMERIC_DATE`].
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Reason> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(number) = value else {
        return Err(Reason::InvalidClaims);
    };

    let seconds = if let Some(seconds) = number.as_u64() {
        seconds
    } else {
        let seconds = number.as_f64().ok_or(Reason::InvalidClaims)?;
        if seconds <= 0.0 {
            0
        } else if seconds > 1e15 {
            // Beyond any accepted date; checked before the cast.
            return Err(Reason::InvalidClaims);
        } else {
            #[expect(
                clippy::cast_sign_loss,
                clippy::cast_possible_truncation,
                reason = "the value is positive and below 1e15, so it fits u64 exactly"
            )]
            let whole = seconds.ceil() as u64;
            whole
        }
    };
    if seconds > MAX_NUMERIC_DATE {
        return Err(Reason::InvalidClaims);
    }
    Ok(Some(seconds))
}

/// Checks every claim rule at `now` (Unix seconds). The type of each date
/// claim is checked before any time comparison, so a malformed claim is
/// `InvalidClaims` whatever the clock reads.
pub(super) fn check(
    claims: &Map<String, Value>,
    typ: Option<&str>,
    now: u64,
    rules: &ClaimRules<'_>,
) -> Result<(), Reason> {
    let exp = numeric_date(claims, "exp")?;
    let nbf = numeric_date(claims, "nbf")?;
    let iat = numeric_date(claims, "iat")?;

    check_times(exp, nbf, iat, now, rules)?;
    check_lifetime(exp, iat, now, rules.max_lifetime)?;
    check_audience(claims, rules.audiences)?;
    check_subject(claims, rules.subject_prefixes)?;
    check_typ(typ, rules.required_typ)
}

/// Checks the validity period with `skew` seconds of tolerance in each
/// direction.
///
/// - `exp` is required unless the issuer allows tokens without it, and
///   `now` must be before `exp + skew` (§4.1.4). A missing required `exp`
///   is `Expired`, because such a token never ends.
/// - `nbf`, if present, must not be after `now + skew` (§4.1.5).
/// - `iat`, if present, must not be after `now + skew`: a token issued in
///   the future comes from a wrong clock or a forger.
fn check_times(
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    now: u64,
    rules: &ClaimRules<'_>,
) -> Result<(), Reason> {
    let latest_accepted_start = now.saturating_add(rules.skew);

    match exp {
        None if rules.require_exp => return Err(Reason::Expired),
        Some(exp) if now >= exp.saturating_add(rules.skew) => return Err(Reason::Expired),
        _ => {}
    }
    if nbf.is_some_and(|nbf| nbf > latest_accepted_start) {
        return Err(Reason::NotYetValid);
    }
    if iat.is_some_and(|iat| iat > latest_accepted_start) {
        return Err(Reason::NotYetValid);
    }
    Ok(())
}

/// Checks that the token lives at most `max` seconds: `exp - iat`, or
/// `exp - now` without `iat`. Without `exp` the lifetime is unbounded.
fn check_lifetime(
    exp: Option<u64>,
    iat: Option<u64>,
    now: u64,
    max: Option<u64>,
) -> Result<(), Reason> {
    let Some(max) = max else {
        return Ok(());
    };
    let Some(exp) = exp else {
        return Err(Reason::InvalidClaims);
    };

    let start = iat.unwrap_or(now);
    if exp.saturating_sub(start) > max {
        return Err(Reason::InvalidClaims);
    }
    Ok(())
}

/// Checks `aud` (RFC 7519 §4.1.3), a string or an array of strings, against
/// `accepted`: one match is enough. An empty `accepted` skips the check.
fn check_audience(claims: &Map<String, Value>, accepted: &[String]) -> Result<(), Reason> {
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

/// Checks that `sub` is a string starting with one of `prefixes`, such as
/// a SPIFFE ID under `spiffe://cluster.local/ns/`. No prefixes skip it.
fn check_subject(claims: &Map<String, Value>, prefixes: &[String]) -> Result<(), Reason> {
    if prefixes.is_empty() {
        return Ok(());
    }

    let subject = claims.get("sub").and_then(Value::as_str);
    if subject.is_some_and(|sub| {
        prefixes
            .iter()
            .any(|prefix| sub.starts_with(prefix.as_str()))
    }) {
        Ok(())
    } else {
        Err(Reason::InvalidClaims)
    }
}

/// Checks the header `typ` against `required`. Media types compare
/// case-insensitively, and `application/` may be left out (RFC 7515
/// §4.1.9), so `at+jwt` equals `application/AT+JWT` (RFC 9068 §2.1).
fn check_typ(typ: Option<&str>, required: Option<&str>) -> Result<(), Reason> {
    let Some(required) = required else {
        return Ok(());
    };

    let matches = typ.is_some_and(|typ| {
        strip_application(typ).eq_ignore_ascii_case(strip_application(required))
    });
    if matches {
        Ok(())
    } else {
        Err(Reason::InvalidClaims)
    }
}

fn strip_application(media_type: &str) -> &str {
    const PREFIX: &str = "application/";
    match media_type.get(..PREFIX.len()) {
        Some(head) if head.eq_ignore_ascii_case(PREFIX) => &media_type[PREFIX.len()..],
        _ => media_type,
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

    fn rules(skew: u64) -> ClaimRules<'static> {
        ClaimRules {
            skew,
            require_exp: true,
            audiences: &[],
            subject_prefixes: &[],
            required_typ: None,
            max_lifetime: None,
        }
    }

    fn check_at(value: &Value, now: u64, rules: &ClaimRules<'_>) -> Result<(), Reason> {
        check(&claims(value.clone()), None, now, rules)
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
            (json!({"exp": "tomorrow"}), Err(Reason::InvalidClaims)),
            (json!({"exp": "1800000000"}), Err(Reason::InvalidClaims)),
            (json!({"exp": -5}), Err(Reason::Expired)),
            (json!({"exp": 1.5e300}), Err(Reason::InvalidClaims)),
            (json!({"exp": 1e300}), Err(Reason::InvalidClaims)),
            (json!({"exp": u64::MAX}), Err(Reason::InvalidClaims)),
            (json!({"exp": MAX_NUMERIC_DATE}), Ok(())),
            (
                json!({"exp": MAX_NUMERIC_DATE + 1}),
                Err(Reason::InvalidClaims),
            ),
            (json!({"exp": true}), Err(Reason::InvalidClaims)),
            (json!({"exp": NOW + 10, "nbf": NOW + 60}), Ok(())),
            (
                json!({"exp": NOW + 10, "nbf": NOW + 61}),
                Err(Reason::NotYetValid),
            ),
            (
                json!({"exp": NOW + 10, "nbf": "now"}),
                Err(Reason::InvalidClaims),
            ),
            (
                json!({"exp": NOW + 10, "nbf": 1e300}),
                Err(Reason::InvalidClaims),
            ),
            (json!({"exp": NOW + 10, "iat": NOW + 60}), Ok(())),
            (
                json!({"exp": NOW + 10, "iat": NOW + 61}),
                Err(Reason::NotYetValid),
            ),
            (json!({"exp": NOW + 10, "iat": NOW - 86_400}), Ok(())),
            (
                json!({"exp": NOW + 10, "iat": null}),
                Err(Reason::InvalidClaims),
            ),
            (
                json!({"exp": NOW - 3600, "nbf": "now"}),
                Err(Reason::InvalidClaims),
            ),
        ];

        for (value, expected) in cases {
            assert_eq!(
                check_at(&value, NOW, &rules(60)),
                expected,
                "claims {value}"
            );
        }
    }

    #[test]
    fn huge_number_beyond_u64() {
        // 2^64 is u64::MAX + 1; serde_json reads it as a float.
        let value: Value = serde_json::from_str(r#"{"exp": 18446744073709551616}"#).expect("JSON");

        assert_eq!(
            check_at(&value, NOW, &rules(60)),
            Err(Reason::InvalidClaims)
        );
    }

    #[test]
    fn exp_optional_when_configured() {
        let optional = ClaimRules {
            require_exp: false,
            ..rules(60)
        };

        assert_eq!(check_at(&json!({}), NOW, &optional), Ok(()));
        assert_eq!(
            check_at(&json!({"exp": NOW - 3600}), NOW, &optional),
            Err(Reason::Expired)
        );
        assert_eq!(
            check_at(&json!({"exp": "x"}), NOW, &optional),
            Err(Reason::InvalidClaims)
        );
    }

    #[test]
    fn fractional_dates_round_up() {
        // exp 100.5 is valid at 100 and not at 101 with no skew.
        let fractional = json!({"exp": 100.5});

        assert_eq!(check_at(&fractional, 100, &rules(0)), Ok(()));
        assert_eq!(check_at(&fractional, 101, &rules(0)), Err(Reason::Expired));
    }

    #[test]
    fn zero_skew_boundaries() {
        assert_eq!(
            check_at(&json!({"exp": NOW}), NOW, &rules(0)),
            Err(Reason::Expired)
        );
        assert_eq!(check_at(&json!({"exp": NOW + 1}), NOW, &rules(0)), Ok(()));
        assert_eq!(
            check_at(&json!({"exp": NOW + 1, "nbf": NOW}), NOW, &rules(0)),
            Ok(())
        );
        assert_eq!(
            check_at(&json!({"exp": NOW + 9, "nbf": NOW + 1}), NOW, &rules(0)),
            Err(Reason::NotYetValid)
        );
    }

    #[test]
    fn huge_skew_saturates() {
        assert_eq!(
            check_at(
                &json!({"exp": MAX_NUMERIC_DATE}),
                u64::MAX - 1,
                &rules(u64::MAX)
            ),
            Ok(())
        );
    }

    #[test]
    fn lifetime_limit() {
        let limited = ClaimRules {
            max_lifetime: Some(3600),
            ..rules(60)
        };
        let cases = [
            (json!({"iat": NOW, "exp": NOW + 3600}), Ok(())),
            (
                json!({"iat": NOW, "exp": NOW + 3601}),
                Err(Reason::InvalidClaims),
            ),
            (
                json!({"iat": NOW - 7200, "exp": NOW + 60}),
                Err(Reason::InvalidClaims),
            ),
            (json!({"exp": NOW + 3600}), Ok(())),
            (json!({"exp": NOW + 3601}), Err(Reason::InvalidClaims)),
        ];

        for (value, expected) in cases {
            assert_eq!(check_at(&value, NOW, &limited), expected, "claims {value}");
        }
        let unbounded = ClaimRules {
            require_exp: false,
            ..limited
        };
        assert_eq!(
            check_at(&json!({}), NOW, &unbounded),
            Err(Reason::InvalidClaims)
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

    #[test]
    fn subject_prefix_checks() {
        let prefixes = vec!["spiffe://cluster.local/ns/".to_owned()];
        let cases = [
            (
                json!({"sub": "spiffe://cluster.local/ns/shop/sa/web"}),
                Ok(()),
            ),
            (
                json!({"sub": "spiffe://cluster.local/nsx"}),
                Err(Reason::InvalidClaims),
            ),
            (
                json!({"sub": "spiffe://evil.local/ns/shop"}),
                Err(Reason::InvalidClaims),
            ),
            (
                json!({"sub": ["spiffe://cluster.local/ns/a"]}),
                Err(Reason::InvalidClaims),
            ),
            (json!({}), Err(Reason::InvalidClaims)),
        ];

        for (value, expected) in cases {
            assert_eq!(
                check_subject(&claims(value.clone()), &prefixes),
                expected,
                "claims {value}"
            );
        }
        assert_eq!(check_subject(&claims(json!({})), &[]), Ok(()));
    }

    #[test]
    fn typ_checks() {
        let cases = [
            (Some("at+jwt"), Ok(())),
            (Some("AT+JWT"), Ok(())),
            (Some("application/at+jwt"), Ok(())),
            (Some("Application/At+Jwt"), Ok(())),
            (Some("JWT"), Err(Reason::InvalidClaims)),
            (Some("at+jwt; charset=utf-8"), Err(Reason::InvalidClaims)),
            (Some("application/"), Err(Reason::InvalidClaims)),
            (None, Err(Reason::InvalidClaims)),
        ];

        for (typ, expected) in cases {
            assert_eq!(check_typ(typ, Some("at+jwt")), expected, "{typ:?}");
            assert_eq!(
                check_typ(typ, Some("application/at+jwt")),
                expected,
                "{typ:?} against the long form"
            );
        }
        assert_eq!(check_typ(None, None), Ok(()));
    }
}
