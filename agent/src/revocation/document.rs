//! The revocation list's JSON format, as read from a file or a URL:
//!
//! ```json
//! {
//!   "jtis": [{"jti": "5f2c", "exp": 1700003600}],
//!   "subjects": [{"iss": "https://idp.example", "sub": "alice", "revoked_before": 1700000000}]
//! }
//! ```
//!
//! `jtis` revokes single tokens by their `jti`, whatever their issuer; `exp`
//! is the token's own `exp`, after which the entry is dropped. `subjects`
//! revokes every token of `sub` from `iss` whose `iat` is before
//! `revoked_before` (and every such token without `iat`). Times are integer
//! Unix seconds. Both arrays may be absent. Unknown fields are rejected, so a
//! misspelt field fails the whole document instead of revoking nothing.

use serde::Deserialize;

/// Maximum size of a revocation document, in bytes. An entry takes about
/// 100 bytes, so this fits over 150 000 entries, and a broken or hostile
/// server still cannot fill memory.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// One parsed revocation document.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevocationDocument {
    #[serde(default)]
    pub jtis: Vec<JtiEntry>,
    #[serde(default)]
    pub subjects: Vec<SubjectEntry>,
}

/// A revoked token, named by its `jti`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JtiEntry {
    pub jti: String,
    /// The token's `exp`, in Unix seconds.
    pub exp: u64,
}

/// Every token of one subject issued before a point in time.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectEntry {
    pub iss: String,
    pub sub: String,
    /// Tokens with an `iat` before this, in Unix seconds, are revoked.
    pub revoked_before: u64,
}

/// Error from parsing a revocation document.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error(
        "the revocation list is not a JSON object; write {{\"jtis\": [...], \"subjects\": [...]}}"
    )]
    NotObject,
    #[error(
        "the revocation list is not valid JSON of the documented form; check its fields and types"
    )]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "entry {index} of `{list}` has an empty `{field}`; remove the entry or fill in the value"
    )]
    EmptyValue {
        list: &'static str,
        index: usize,
        field: &'static str,
    },
}

impl RevocationDocument {
    /// Parses `bytes` and rejects entries with an empty `jti`, `iss` or
    /// `sub`, which would match nothing or, worse, a token without the claim.
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        // serde would also read a struct from a JSON array, so `[]` would
        // pass as an empty list.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(DocumentError::NotObject);
        }
        let document: Self =
            serde_json::from_slice(bytes).map_err(|source| DocumentError::Json { source })?;

        for (index, entry) in document.jtis.iter().enumerate() {
            if entry.jti.is_empty() {
                return Err(DocumentError::EmptyValue {
                    list: "jtis",
                    index,
                    field: "jti",
                });
            }
        }
        for (index, entry) in document.subjects.iter().enumerate() {
            let empty_field = if entry.iss.is_empty() {
                Some("iss")
            } else if entry.sub.is_empty() {
                Some("sub")
            } else {
                None
            };
            if let Some(field) = empty_field {
                return Err(DocumentError::EmptyValue {
                    list: "subjects",
                    index,
                    field,
                });
            }
        }
        Ok(document)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_full_document() {
        let text = br#"{
            "jtis": [{"jti": "a1", "exp": 1700003600}],
            "subjects": [{"iss": "https://idp.example", "sub": "alice", "revoked_before": 1700000000}]
        }"#;

        let document = RevocationDocument::parse(text).expect("valid document");

        assert_eq!(
            document.jtis,
            [JtiEntry {
                jti: "a1".to_owned(),
                exp: 1_700_003_600
            }]
        );
        assert_eq!(
            document.subjects,
            [SubjectEntry {
                iss: "https://idp.example".to_owned(),
                sub: "alice".to_owned(),
                revoked_before: 1_700_000_000
            }]
        );
    }

    #[test]
    fn parse_empty_object() {
        let document = RevocationDocument::parse(b"{}").expect("valid document");

        assert_eq!(document, RevocationDocument::default());
    }

    #[test]
    fn parse_rejects_bad_documents() {
        let cases: [(&str, &[u8]); 8] = [
            ("unknown top-level field", br#"{"jti": []}"#),
            (
                "misspelt entry field",
                br#"{"subjects": [{"iss": "i", "sub": "s", "revoked_befor": 1}]}"#,
            ),
            (
                "exp as string",
                br#"{"jtis": [{"jti": "a", "exp": "1700000000"}]}"#,
            ),
            ("negative exp", br#"{"jtis": [{"jti": "a", "exp": -1}]}"#),
            (
                "fractional time",
                br#"{"subjects": [{"iss": "i", "sub": "s", "revoked_before": 1.5}]}"#,
            ),
            ("missing exp", br#"{"jtis": [{"jti": "a"}]}"#),
            ("jti as number", br#"{"jtis": [{"jti": 7, "exp": 1}]}"#),
            ("truncated", br#"{"jtis": [{"jti": "a", "#),
        ];

        for (name, text) in cases {
            let error = RevocationDocument::parse(text).expect_err(name);

            assert!(
                matches!(error, DocumentError::Json { .. }),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn parse_rejects_non_objects() {
        let cases: [&[u8]; 5] = [b"<html>", b"[]", b" [{}]", b"", b"null"];

        for text in cases {
            let error = RevocationDocument::parse(text).expect_err("not an object");

            assert!(
                matches!(error, DocumentError::NotObject),
                "{text:?}: {error}"
            );
        }
    }

    #[test]
    fn parse_rejects_empty_values() {
        let cases: [(&[u8], &str, usize, &str); 3] = [
            (
                br#"{"jtis": [{"jti": "a", "exp": 1}, {"jti": "", "exp": 1}]}"#,
                "jtis",
                1,
                "jti",
            ),
            (
                br#"{"subjects": [{"iss": "", "sub": "s", "revoked_before": 1}]}"#,
                "subjects",
                0,
                "iss",
            ),
            (
                br#"{"subjects": [{"iss": "i", "sub": "", "revoked_before": 1}]}"#,
                "subjects",
                0,
                "sub",
            ),
        ];

        for (text, expected_list, expected_index, expected_field) in cases {
            let error = RevocationDocument::parse(text).expect_err(expected_field);

            let DocumentError::EmptyValue { list, index, field } = error else {
                panic!("{error}");
            };
            assert_eq!(list, expected_list);
            assert_eq!(index, expected_index);
            assert_eq!(field, expected_field);
        }
    }
}
