//! Reading a JWS compact serialization (RFC 7515 §7.1) without verifying
//! it, to choose the issuer, algorithm and key before any crypto runs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::decision::Reason;

/// Header and claims of a token, not yet verified.
#[derive(Debug)]
pub(super) struct Unverified {
    pub(super) alg: String,
    pub(super) kid: Option<String>,
    /// `iss` when it is a string; `None` when absent.
    pub(super) issuer: Option<String>,
}

/// Splits and decodes `token`. Returns `MalformedToken` unless it has three
/// base64url parts (unpadded, RFC 7515 §2), a JSON object header with a
/// string `alg` and, if present, a string `kid`, and a JSON object payload
/// whose `iss`, if present, is a string.
pub(super) fn read(token: &str) -> Result<Unverified, Reason> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::MalformedToken);
    };

    let header = decode_object(header)?;
    let payload = decode_object(payload)?;
    URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| Reason::MalformedToken)?;

    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(Reason::MalformedToken),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(Reason::MalformedToken),
    };
    let issuer = match payload.get("iss") {
        None => None,
        Some(Value::String(issuer)) => Some(issuer.clone()),
        Some(_) => return Err(Reason::MalformedToken),
    };

    Ok(Unverified { alg, kid, issuer })
}

fn decode_object(part: &str) -> Result<Map<String, Value>, Reason> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reason::MalformedToken)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(Reason::MalformedToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn read_valid_parts() {
        let token = format!(
            "{}.{}.{}",
            encode(r#"{"alg":"RS256","kid":"k1"}"#),
            encode(r#"{"iss":"i"}"#),
            encode("sig")
        );

        let unverified = read(&token).expect("well-formed");

        assert_eq!(unverified.alg, "RS256");
        assert_eq!(unverified.kid.as_deref(), Some("k1"));
        assert_eq!(unverified.issuer.as_deref(), Some("i"));
    }

    #[test]
    fn read_rejects_malformed() {
        let header = encode(r#"{"alg":"RS256"}"#);
        let payload = encode(r#"{"iss":"i"}"#);
        let cases = [
            String::new(),
            "garbage".to_owned(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.c2ln.extra"),
            format!("{header}=.{payload}.c2ln"),
            format!("{header}.{payload}.c2ln*"),
            format!("{}.{payload}.c2ln", encode("not json")),
            format!("{}.{payload}.c2ln", encode("[1]")),
            format!("{header}.{}.c2ln", encode("\"string\"")),
            format!("{}.{payload}.c2ln", encode(r#"{"typ":"JWT"}"#)),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":256}"#)),
            format!("{}.{payload}.c2ln", encode(r#"{"alg":"RS256","kid":7}"#)),
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
}
