//! JSON parsing that rejects duplicate member names at any depth.
//!
//! RFC 7515 §5.2 and RFC 7519 §7.2 require a JOSE header or claims set
//! with duplicate names to be rejected (or the last one used). `serde_json`
//! keeps the last value silently, so two parsers could read the same token
//! differently, which an attacker can use to smuggle a claim past one of
//! them. This module builds the same `Value` as `serde_json` but fails on
//! the second occurrence of a name.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `bytes` as a JSON object without duplicate names. Returns `None`
/// for invalid JSON, a value that is not an object, or a duplicate name.
pub(super) fn parse_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    match value {
        Value::Object(object) => Some(object),
        _ => None,
    }
}

/// Seed that deserializes one JSON value strictly.
#[derive(Clone, Copy)]
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value without duplicate object member names")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        StrictValue.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if object.contains_key(&name) {
                return Err(de::Error::custom("duplicate member name"));
            }
            let value = map.next_value_seed(StrictValue)?;
            object.insert(name, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json() {
        let text =
            br#"{"a":1,"b":[true,null,"x",{"c":2.5}],"d":{"e":-3},"f":18446744073709551615}"#;

        let strict = parse_object(text).expect("valid");
        let reference: Value = serde_json::from_slice(text).expect("valid");

        assert_eq!(Value::Object(strict), reference);
    }

    #[test]
    fn rejects_duplicates_at_any_depth() {
        let cases: [&[u8]; 5] = [
            br#"{"alg":"RS256","alg":"none"}"#,
            br#"{"a":{"b":1,"b":2}}"#,
            br#"{"a":[{"b":1,"b":1}]}"#,
            br#"{"sub":"alice","sub":"admin"}"#,
            br#"{"a\u0062":1,"ab":2}"#,
        ];

        for text in cases {
            assert_eq!(
                parse_object(text),
                None,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn rejects_non_objects_and_trailing_data() {
        for text in [&b"[1]"[..], b"\"x\"", b"{} {}", b"{", b"", b"{\"a\":1}x"] {
            assert_eq!(
                parse_object(text),
                None,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
