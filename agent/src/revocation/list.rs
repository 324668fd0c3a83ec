//! The revocation list in force: hash lookups by `jti` and by issuer and
//! subject, and the rule that drops entries no valid token can match.

use std::collections::HashMap;

use super::document::RevocationDocument;
use crate::verify::VerifiedToken;

/// Maximum token lifetime assumed for an issuer without
/// `max_lifetime_seconds`, in seconds. A subject entry is kept this long
/// after its `revoked_before`. Access tokens commonly live from minutes to
/// an hour, so a day covers them with a wide margin; this is an estimate,
/// not a limit that the verifier enforces.
///
/// NOTE: a token of such an issuer that lives longer than this becomes valid
/// again once its subject entry is dropped; set `max_lifetime_seconds` on
/// the issuer to make the bound exact.
pub const FALLBACK_MAX_LIFETIME_SECONDS: u64 = 86_400;

/// How long entries must be kept: per issuer, the longest token lifetime
/// and the clock skew its tokens get.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    issuers: HashMap<String, IssuerRetention>,
    /// The largest skew of any issuer: a `jti` entry names no issuer.
    max_skew_seconds: u64,
}

#[derive(Clone, Copy, Debug)]
struct IssuerRetention {
    max_lifetime_seconds: u64,
    skew_seconds: u64,
}

impl Retention {
    /// Builds the rule from `(issuer, max_lifetime_seconds, clock_skew_seconds)`
    /// of each configured issuer.
    pub fn new<'a>(issuers: impl IntoIterator<Item = (&'a str, Option<u64>, u64)>) -> Self {
        let mut retention = Self::default();
        for (issuer, max_lifetime, skew) in issuers {
            retention.max_skew_seconds = retention.max_skew_seconds.max(skew);
            retention.issuers.insert(
                issuer.to_owned(),
                IssuerRetention {
                    max_lifetime_seconds: max_lifetime.unwrap_or(FALLBACK_MAX_LIFETIME_SECONDS),
                    skew_seconds: skew,
                },
            );
        }
        retention
    }

    /// Returns the first Unix second at which no token with this `jti` can
    /// be valid: the verifier rejects a token once `now >= exp + skew`.
    fn jti_end(&self, exp: u64) -> u64 {
        exp.saturating_add(self.max_skew_seconds)
    }

    /// Returns the first Unix second at which no token of the subject with
    /// `iat < revoked_before` can be valid: its `exp` is at most `iat` plus
    /// the issuer's longest lifetime, and it is accepted until `exp + skew`.
    /// An issuer that is not configured gets the fallback lifetime and the
    /// largest skew, because tokens of a later-added issuer may arrive.
    fn subject_end(&self, issuer: &str, revoked_before: u64) -> u64 {
        let (lifetime, skew) = self.issuers.get(issuer).map_or(
            (FALLBACK_MAX_LIFETIME_SECONDS, self.max_skew_seconds),
            |known| (known.max_lifetime_seconds, known.skew_seconds),
        );
        revoked_before.saturating_add(lifetime).saturating_add(skew)
    }
}

/// Entries in force at one point in time. Replaced whole, never edited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// `jti` to the token's `exp`.
    jtis: HashMap<String, u64>,
    /// Issuer to subject to `revoked_before`. Nested maps let a lookup
    /// borrow both strings from the token instead of building a key.
    subjects: HashMap<String, HashMap<String, u64>>,
    subject_count: usize,
}

/// Counts from building a list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildCounts {
    /// Entries past their end, left out.
    pub aged_out: usize,
}

impl RevocationList {
    /// Merges `documents` at `now` (Unix seconds) and leaves out entries that
    /// no valid token can match any more. A `jti` or subject listed twice
    /// keeps the later `exp` or `revoked_before`, which revokes more.
    pub fn build<'a>(
        documents: impl IntoIterator<Item = &'a RevocationDocument>,
        retention: &Retention,
        now: u64,
    ) -> (Self, BuildCounts) {
        let mut list = Self::default();
        let mut counts = BuildCounts::default();

        for document in documents {
            for entry in &document.jtis {
                if now >= retention.jti_end(entry.exp) {
                    counts.aged_out += 1;
                    continue;
                }
                let exp = list.jtis.entry(entry.jti.clone()).or_insert(entry.exp);
                *exp = (*exp).max(entry.exp);
            }
            for entry in &document.subjects {
                if now >= retention.subject_end(&entry.iss, entry.revoked_before) {
                    counts.aged_out += 1;
                    continue;
                }
                let revoked_before = list
                    .subjects
                    .entry(entry.iss.clone())
                    .or_default()
                    .entry(entry.sub.clone())
                    .or_insert(entry.revoked_before);
                *revoked_before = (*revoked_before).max(entry.revoked_before);
            }
        }

        list.subject_count = list.subjects.values().map(HashMap::len).sum();
        (list, counts)
    }

    /// Number of `jti` entries.
    pub fn jti_count(&self) -> usize {
        self.jtis.len()
    }

    /// Number of subject entries.
    pub fn subject_count(&self) -> usize {
        self.subject_count
    }

    /// True when `token` is revoked: its `jti` (a string) is listed, or its
    /// issuer and subject are listed and its `iat` is before that entry's
    /// `revoked_before` or absent. A non-numeric `iat` counts as absent.
    pub fn is_revoked(&self, token: &VerifiedToken) -> bool {
        let jti = token.claims.get("jti").and_then(serde_json::Value::as_str);
        if jti.is_some_and(|jti| self.jtis.contains_key(jti)) {
            return true;
        }

        let Some(subject) = token.subject.as_deref() else {
            return false;
        };
        let Some(revoked_before) = self
            .subjects
            .get(&token.issuer)
            .and_then(|subjects| subjects.get(subject))
        else {
            return false;
        };
        match token.claims.get("iat").and_then(serde_json::Value::as_f64) {
            #[expect(
                clippy::cast_precision_loss,
                reason = "Unix seconds fit a 53-bit mantissa"
            )]
            Some(iat) => iat < *revoked_before as f64,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::document::{JtiEntry, SubjectEntry};
    use super::*;

    const ISS: &str = "https://idp.example";
    const NOW: u64 = 1_700_000_000;

    fn token(claims: &Value) -> VerifiedToken {
        let claims = claims.as_object().expect("object").clone();
        VerifiedToken {
            issuer: claims["iss"].as_str().expect("iss").to_owned(),
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            kid: None,
            algorithm: "RS256".to_owned(),
            claims,
            roles_claim: "roles".to_owned(),
        }
    }

    fn jti(jti: &str, exp: u64) -> JtiEntry {
        JtiEntry {
            jti: jti.to_owned(),
            exp,
        }
    }

    fn subject(iss: &str, sub: &str, revoked_before: u64) -> SubjectEntry {
        SubjectEntry {
            iss: iss.to_owned(),
            sub: sub.to_owned(),
            revoked_before,
        }
    }

    fn retention() -> Retention {
        Retention::new([(ISS, Some(3600), 60)])
    }

    fn list(document: &RevocationDocument) -> RevocationList {
        RevocationList::build([document], &retention(), NOW).0
    }

    #[test]
    fn jti_entry_revokes_that_token() {
        let document = RevocationDocument {
            jtis: vec![jti("stolen", NOW + 300)],
            subjects: Vec::new(),
        };
        let list = list(&document);

        let stolen = token(&json!({"iss": ISS, "sub": "alice", "jti": "stolen", "iat": NOW}));
        let other = token(&json!({"iss": ISS, "sub": "alice", "jti": "fresh", "iat": NOW}));
        let numeric = token(&json!({"iss": ISS, "sub": "alice", "jti": 7, "iat": NOW}));
        let without = token(&json!({"iss": ISS, "sub": "alice", "iat": NOW}));

        assert!(list.is_revoked(&stolen));
        assert!(!list.is_revoked(&other));
        assert!(!list.is_revoked(&numeric));
        assert!(!list.is_revoked(&without));
    }

    #[test]
    fn subject_entry_revokes_older_tokens() {
        let document = RevocationDocument {
            jtis: Vec::new(),
            subjects: vec![subject(ISS, "alice", NOW)],
        };
        let list = list(&document);
        let cases = [
            (
                "issued a second before",
                json!({"iss": ISS, "sub": "alice", "iat": NOW - 1}),
                true,
            ),
            (
                "issued at the instant",
                json!({"iss": ISS, "sub": "alice", "iat": NOW}),
                false,
            ),
            (
                "issued after",
                json!({"iss": ISS, "sub": "alice", "iat": NOW + 5}),
                false,
            ),
            (
                "fraction before",
                json!({"iss": ISS, "sub": "alice", "iat": 1_699_999_999.5_f64}),
                true,
            ),
            ("without iat", json!({"iss": ISS, "sub": "alice"}), true),
            (
                "iat as string",
                json!({"iss": ISS, "sub": "alice", "iat": "1"}),
                true,
            ),
            (
                "other subject",
                json!({"iss": ISS, "sub": "bob", "iat": NOW - 1}),
                false,
            ),
            (
                "other issuer",
                json!({"iss": "https://other.example", "sub": "alice", "iat": NOW - 1}),
                false,
            ),
            ("no subject", json!({"iss": ISS, "iat": NOW - 1}), false),
        ];

        for (name, claims, revoked) in cases {
            assert_eq!(list.is_revoked(&token(&claims)), revoked, "{name}");
        }
    }

    #[test]
    fn duplicates_keep_the_stricter_entry() {
        let first = RevocationDocument {
            jtis: vec![jti("a", NOW + 10)],
            subjects: vec![subject(ISS, "alice", NOW - 100)],
        };
        let second = RevocationDocument {
            jtis: vec![jti("a", NOW + 20)],
            subjects: vec![subject(ISS, "alice", NOW)],
        };

        let (merged, _) = RevocationList::build([&first, &second], &retention(), NOW);
        let (reversed, _) = RevocationList::build([&second, &first], &retention(), NOW);

        assert_eq!(merged, reversed);
        assert_eq!(merged.jti_count(), 1);
        assert_eq!(merged.subject_count(), 1);
        assert_eq!(merged.jtis["a"], NOW + 20);
        let older = token(&json!({"iss": ISS, "sub": "alice", "iat": NOW - 50}));
        assert!(merged.is_revoked(&older));
    }

    #[test]
    fn jti_entries_age_out_after_exp_and_skew() {
        let document = RevocationDocument {
            jtis: vec![jti("a", NOW)],
            subjects: Vec::new(),
        };
        let retention = retention();

        let (kept, kept_counts) = RevocationList::build([&document], &retention, NOW + 59);
        let (dropped, dropped_counts) = RevocationList::build([&document], &retention, NOW + 60);

        assert_eq!(kept.jti_count(), 1);
        assert_eq!(kept_counts.aged_out, 0);
        assert_eq!(dropped.jti_count(), 0);
        assert_eq!(dropped_counts.aged_out, 1);
    }

    #[test]
    fn subject_entries_age_out_after_lifetime_and_skew() {
        let document = RevocationDocument {
            jtis: Vec::new(),
            subjects: vec![
                subject(ISS, "alice", NOW),
                subject("https://unconfigured.example", "bob", NOW),
            ],
        };
        let retention = retention();
        let configured_end = NOW + 3600 + 60;
        let fallback_end = NOW + FALLBACK_MAX_LIFETIME_SECONDS + 60;

        let (before, _) = RevocationList::build([&document], &retention, configured_end - 1);
        let (after, after_counts) = RevocationList::build([&document], &retention, configured_end);
        let (late, late_counts) = RevocationList::build([&document], &retention, fallback_end);

        assert_eq!(before.subject_count(), 2);
        assert_eq!(
            after.subject_count(),
            1,
            "the configured lifetime has passed"
        );
        assert_eq!(after_counts.aged_out, 1);
        assert_eq!(late.subject_count(), 0, "the fallback lifetime has passed");
        assert_eq!(late_counts.aged_out, 2);
    }

    #[test]
    fn retention_without_max_lifetime_uses_fallback() {
        let retention = Retention::new([(ISS, None, 30)]);

        assert_eq!(
            retention.subject_end(ISS, NOW),
            NOW + FALLBACK_MAX_LIFETIME_SECONDS + 30
        );
        assert_eq!(retention.jti_end(NOW), NOW + 30);
    }
}
