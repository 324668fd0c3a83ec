//! Reading a JWS compact serialization (RFC 7515 §7.1) without verifying
//! it, to choose the issuer, algorithm and key before any crypto runs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::json;
use crate::decision::Reason;

/// Longest `kid` accepted, in bytes. Published `kid`s are thumbprints or
/// short names well under 100 bytes; a longer one only serves to fill
/// logs and audit lines.
pub const MAX_KID_BYTES: usize = 256;

/// Header members that carry or point at a key (RFC 7515 §4.1.2 to
/// §4.1.6). The agent only trusts keys from the issuer's configured
/// source, so a token naming its own key is rejected as malformed.
const KEY_CARRYING_MEMBERS: [&str; 4] = ["jku", "jwk", "x5u", "x5c"];

/// Header and claims of a token, not yet verified.
#[derive(Debug)]
pub(super) struct Unverified<'t> {
    pub(super) alg: String,
    pub(super) kid: Option<String>,
    pub(super) typ: Option<String>,
    /// `iss` when it is a string; `None` when absent.
    pub(super) issuer: Option<String>,
    pub(super) claims: Map<String, Value>,
    /// `BASE64URL(header) . BASE64URL(payload)`, the JWS signing input.
    pub(super) signing_input: &'t str,
    /// The third part, still base64url-encoded.
    pub(super) signature: &'t str,
}

/// Splits and decodes `token`. Returns `MalformedToken` unless:
/// - it has three parts in canonical base64url: no padding, no `+` or `/`,
///   no non-zero trailing bits (RFC 7515 §2), so one token has one spelling;
/// - header and payload are JSON objects without duplicate member names
///   (RFC 7515 §5.2);
/// - the header has a string `alg`, a string `kid` (if any) of at most
///   [`MAX_KID_BYTES`] without control characters, a string `typ` (if
///   any), no `crit` (RFC 7515 §4.1.11: no extension is understood here)
///   and none of the key-carrying members `jku`, `jwk`, `x5u`, `x5c`;
/// - the payload's `iss`, if present, is a string.
pub(super) fn read(token: &str) -> Result<Unverified<'_>, Reason> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::MalformedToken);
    };
    let signing_input = &token[..header.len() + 1 + payload.len()];

    let header = decode_object(header)?;
    let claims = decode_object(payload)?;
    URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| Reason::MalformedToken)?;

    if header.contains_key("crit")
        || KEY_CARRYING_MEMBERS
            .iter()
            .any(|member| header.contains_key(*member))
    {
        return Err(Reason::MalformedToken);
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(Reason::MalformedToken),
    };
    let kid = optional_string(&header, "kid")?;
    if kid
        .as_deref()
        .is_some_and(|kid| kid.len() > MAX_KID_BYTES || kid.chars().any(char::is_control))
    {
        return Err(Reason::MalformedToken);
    }
    let typ = optional_string(&header, "typ")?;
    let issuer = optional_string(&claims, "iss")?;

    Ok(Unverified {
        alg,
        kid,
        typ,
        issuer,
        claims,
        signing_input,
        signature,
    })
}

fn optional_string(object: &Map<String, Value>, name: &str) -> Result<Option<String>, Reason> {
    match object.get(name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(Reason::MalformedToken),
    }
}

fn decode_object(part: &str) -> Result<Map<String, Value>, Reason> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reason::MalformedToken)?;
    json::parse_object(&bytes).ok_or(Reason::MalformedToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn read_valid_parts() {
        let header = encode(r#"{"alg":"RS256","kid":"k1","typ":"at+jwt"}"#);
        let payload = encode(r#"{"iss":"i","sub":"s"}"#);
        let token = format!("{header}.{payload}.{}", encode("sig"));

        let unverified = read(&token).expect("well-formed");

        assert_eq!(unverified.alg, "RS256");
        assert_eq!(unverified.kid.as_deref(), Some("k1"));
        assert_eq!(unverified.typ.as_deref(), Some("at+jwt"));
        assert_eq!(unverified.issuer.as_deref(), Some("i"));
        assert_eq!(unverified.claims["sub"], "s");
        assert_eq!(unverified.signing_input, format!("{header}.{payload}"));
        assert_eq!(unverified.signature, encode("sig"));
    }

    #[test]
    fn read_rejects_malformed() {
        let header = encode(r#"{"alg":"RS256"}"#);
        let payload = encode(r#"{"iss":"i"}"#);
        let long_kid = format!(
            r#"{{"alg":"RS256","kid":"{}"}}"#,
            "k".repeat(MAX_KID_BYTES + 1)
        );
        let cases = [
            String::new(),
            "garbage".to_owned(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.c2ln.extra"),
            format!("{header}=.{payload}.c2ln"),
            format!("{header}.{payload}.c2ln*"),
            format!("{header}.{payload}.c2l"),
            format!("{header}.{payload}.c2ln+"),
            format!("{}.{payload}.c2ln", encode("not json")),
            format!("{}.{payload}.c2ln", encode("[1]")),
            format!("{header}.{}.c2ln", encode("\"string\"")),
            format!("{}.{payload}.c2ln", encode(r#"{"typ":"JWT"}"#)),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":256}"#)),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":"RS256","kid":7}"#)),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":"RS256","typ":1}"#)),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","kid":"a\u0000b"}"#)
            ),
            format!("{}.{payload}.c2ln", encode(&long_kid)),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","crit":["exp"]}"#)
            ),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":"RS256","crit":[]}"#)),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","jku":"http://x"}"#)
            ),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":"RS256","jwk":{}}"#)),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","x5u":"http://x"}"#)
            ),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","x5c":["AA"]}"#)
            ),
            format!(
                "{}.{payload}.c2ln",
                encode(r#"{"alg":"RS256","alg":"none"}"#)
            ),
            format!("{header}.{}.c2ln", encode(r#"{"iss":"i","iss":"j"}"#)),
            format!("{header}.{}.c2ln", encode(r#"{"iss":["a","b"]}"#)),
        ];

        for token in cases {
            assert_eq!(
                read(&token).map(|_| ()),
                Err(Reason::MalformedToken),
                "token {token:?}"
            );
        }
    }

    #[test]
    fn read_without_iss_or_kid() {
        let token = format!(
            "{}.{}.",
            encode(r#"{"alg":"none"}"#),
            encode(r#"{"sub":"x"}"#)
        );

        let unverified = read(&token).expect("well-formed");

        assert_eq!(unverified.alg, "none");
        assert_eq!(unverified.kid, None);
        assert_eq!(unverified.issuer, None);
    }

    #[test]
    fn kid_with_path_characters_is_read() {
        let token = format!(
            "{}.{}.c2ln",
            encode(r#"{"alg":"RS256","kid":"../../etc/passwd"}"#),
            encode("{}")
        );

        let unverified = read(&token).expect("a kid is only a name");

        assert_eq!(unverified.kid.as_deref(), Some("../../etc/passwd"));
    }
}
