//! Finding the token in a request (configured headers and cookies) and
//! removing it again before forwarding.
//!
//! Exactly one token may be present; two are rejected rather than guessed
//! between. Pure functions over `http::HeaderMap`.

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::HeaderMap;

use crate::config::WorkloadConfig;
use crate::decision::Reason;

/// Prefix of the default token source, the `Authorization` header with the
/// `Bearer` scheme of RFC 6750 §2.1.
pub const DEFAULT_BEARER_PREFIX: &str = "Bearer ";

/// Token locations of one workload: headers and cookies.
#[derive(Clone, Debug)]
pub struct TokenSources {
    headers: Vec<HeaderRule>,
    cookies: Vec<String>,
}

/// One header that may carry the token, and the text before the token.
#[derive(Clone, Debug)]
struct HeaderRule {
    name: HeaderName,
    /// Text before the token, without trailing spaces.
    prefix: String,
    /// The configured prefix ended with a space: the token then follows
    /// after one or more spaces, as `1*SP` in RFC 9110 §11.4 allows.
    space_separated: bool,
}

/// Location of a found token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenLocation {
    /// A configured header.
    Header(HeaderName),
    /// A configured cookie, by name.
    Cookie(String),
}

/// A token and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundToken<'h> {
    pub token: &'h str,
    pub location: TokenLocation,
}

impl TokenSources {
    /// Builds the sources of `workload`: its `from_headers` and
    /// `from_cookies`, or `Authorization: Bearer` when both are empty.
    ///
    /// A header name that is not valid is skipped; the configuration
    /// validation rejects such names before this runs.
    pub fn new(workload: &WorkloadConfig) -> Self {
        let mut headers: Vec<HeaderRule> = workload
            .from_headers
            .iter()
            .filter_map(|source| {
                let name = HeaderName::from_bytes(source.name.as_bytes()).ok()?;
                Some(HeaderRule::new(name, &source.value_prefix))
            })
            .collect();

        if workload.from_headers.is_empty() && workload.from_cookies.is_empty() {
            headers.push(HeaderRule::new(AUTHORIZATION, DEFAULT_BEARER_PREFIX));
        }
        Self {
            headers,
            cookies: workload.from_cookies.clone(),
        }
    }

    /// Returns the one token in `headers`, `Ok(None)` when there is none,
    /// `Err(Reason::MultipleTokens)` when there are several, or
    /// `Err(Reason::MalformedToken)` when a source carries a bad token.
    ///
    /// A header whose value does not start with the configured prefix
    /// (`Authorization: Basic ...`) contains no token. Several instances of
    /// one configured header where any carries the prefix count as
    /// several tokens, because the field then has no single meaning.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, Reason> {
        Ok(self.locate(headers)?.map(|found| found.token))
    }

    /// Like [`TokenSources::extract`], and also returns where the token was.
    pub fn locate<'h>(&self, headers: &'h HeaderMap) -> Result<Option<FoundToken<'h>>, Reason> {
        let mut found: Option<FoundToken<'h>> = None;
        let mut record = |token: &'h str, location: TokenLocation| {
            if found.replace(FoundToken { token, location }).is_some() {
                return Err(Reason::MultipleTokens);
            }
            Ok(())
        };

        for rule in &self.headers {
            let values: Vec<_> = headers.get_all(&rule.name).iter().collect();
            let tokens: Vec<Result<&'h str, Reason>> = values
                .iter()
                .filter_map(|value| rule.token_in(value.as_bytes()))
                .collect();
            if tokens.is_empty() {
                continue;
            }
            if values.len() > 1 {
                return Err(Reason::MultipleTokens);
            }
            for token in tokens {
                record(token?, TokenLocation::Header(rule.name.clone()))?;
            }
        }

        for value in headers.get_all(COOKIE) {
            for (name, cookie_value) in cookie_pairs(value.as_bytes()) {
                let Some(wanted) = self.cookies.iter().find(|wanted| wanted.as_bytes() == name)
                else {
                    continue;
                };
                // Other cookies may carry any bytes, but a token is ASCII.
                match std::str::from_utf8(cookie_value) {
                    Ok(token) if !token.is_empty() && token.is_ascii() => {
                        record(token, TokenLocation::Cookie(wanted.clone()))?;
                    }
                    _ => return Err(Reason::MalformedToken),
                }
            }
        }
        Ok(found)
    }

    /// Removes every token from `headers`: each configured header value
    /// that starts with its prefix (well-formed or not) and each configured
    /// cookie. Other values of those headers and other cookies stay.
    pub fn strip(&self, headers: &mut HeaderMap) {
        for rule in &self.headers {
            retain_values(headers, &rule.name, |value| {
                rule.token_in(value.as_bytes()).is_none()
            });
        }
        self.strip_cookies(headers);
    }

    /// Removes the configured token cookies from every `Cookie` header, and
    /// a `Cookie` header that is left empty.
    pub fn strip_cookies(&self, headers: &mut HeaderMap) {
        if self.cookies.is_empty() || !headers.contains_key(COOKIE) {
            return;
        }
        let rewritten: Vec<HeaderValue> = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| self.without_token_cookies(value))
            .collect();
        headers.remove(COOKIE);
        for value in rewritten {
            headers.append(COOKIE, value);
        }
    }

    /// Returns `value` without the configured cookies, `None` when no
    /// cookie is left. Pairs without `=` are kept as they came.
    fn without_token_cookies(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let kept: Vec<&[u8]> = value
            .as_bytes()
            .split(|b| *b == b';')
            .map(trim_blanks)
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let name = pair
                    .iter()
                    .position(|b| *b == b'=')
                    .map_or(&pair[..0], |equals| trim_blanks(&pair[..equals]));
                !self.cookies.iter().any(|wanted| wanted.as_bytes() == name)
            })
            .collect();
        if kept.is_empty() {
            return None;
        }
        // The pieces come from a valid header value and are joined with
        // visible ASCII, so the result is valid too.
        HeaderValue::from_bytes(&kept.join(&b"; "[..])).ok()
    }
}

/// Keeps only the values of header `name` for which `keep` is true.
fn retain_values(headers: &mut HeaderMap, name: &HeaderName, keep: impl Fn(&HeaderValue) -> bool) {
    if !headers.get_all(name).iter().any(|value| !keep(value)) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(name)
        .iter()
        .filter(|value| keep(value))
        .cloned()
        .collect();
    headers.remove(name);
    for value in kept {
        headers.append(name.clone(), value);
    }
}

impl HeaderRule {
    fn new(name: HeaderName, prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches(' ');
        Self {
            name,
            prefix: trimmed.to_owned(),
            space_separated: trimmed.len() != prefix.len(),
        }
    }

    /// Returns the token in one header value, `None` when the value does not
    /// start with the prefix, or `Err(MalformedToken)` when it does but what
    /// follows is not a token.
    fn token_in<'h>(&self, value: &'h [u8]) -> Option<Result<&'h str, Reason>> {
        let prefix = self.prefix.as_bytes();
        // Schemes and other prefixes are case-insensitive (RFC 9110 §11.1).
        if value.len() < prefix.len() || !value[..prefix.len()].eq_ignore_ascii_case(prefix) {
            return None;
        }
        let mut rest = &value[prefix.len()..];

        if self.space_separated {
            let spaces = rest.iter().take_while(|b| **b == b' ').count();
            if spaces == 0 && rest.first().is_some_and(|b| is_tchar(*b)) {
                // `Bearerx`: another scheme that starts with the same letters.
                return None;
            }
            rest = &rest[spaces..];
        }
        // Field values carry no trailing whitespace (RFC 9110 §5.5), but a
        // lenient parser may leave some; it is not part of the token.
        let end = rest
            .iter()
            .rposition(|b| !matches!(b, b' ' | b'\t'))
            .map_or(0, |last| last + 1);
        let token = &rest[..end];

        if token.is_empty() || !is_b64token(token) {
            return Some(Err(Reason::MalformedToken));
        }
        // `is_b64token` admits ASCII only, so this conversion cannot fail.
        Some(std::str::from_utf8(token).map_err(|_| Reason::MalformedToken))
    }
}

/// RFC 9110 §5.6.2 `tchar`, the characters of an authentication scheme.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// RFC 6750 §2.1 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" /
/// "+" / "/" ) *"="`. A JWS compact serialization is a subset.
fn is_b64token(token: &[u8]) -> bool {
    let body_len = token
        .iter()
        .rposition(|b| *b != b'=')
        .map_or(0, |last| last + 1);
    body_len > 0
        && token[..body_len]
            .iter()
            .all(|b| B64TOKEN_BYTES[usize::from(*b)])
}

/// The bytes allowed before the `=` padding of a `b64token`, as a table
/// indexed by byte: every request checks every byte of its token, and one
/// load per byte is cheaper than the comparisons.
const B64TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "byte is below 256")]
        let value = byte as u8;
        table[byte] = value.is_ascii_alphanumeric()
            || matches!(value, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        byte += 1;
    }
    table
};

/// Removes spaces and tabs around `bytes`.
fn trim_blanks(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |last| last + 1);
    &bytes[start..end]
}

/// Splits a Cookie header (RFC 6265 §4.2.1, `name=value; name=value`) into
/// pairs of bytes, because other cookies may hold bytes that are not text.
/// A value in double quotes is returned without them. Pieces without `=`
/// are skipped.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|b| *b == b';').filter_map(|pair| {
        let equals = pair.iter().position(|b| *b == b'=')?;
        let name = trim_blanks(&pair[..equals]);
        let value = trim_blanks(&pair[equals + 1..]);
        let unquoted = value
            .strip_prefix(b"\"")
            .and_then(|inner| inner.strip_suffix(b"\""))
            .unwrap_or(value);
        Some((name, unquoted))
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use http::HeaderValue;

    use super::*;
    use crate::config::{CorsPreflight, ForwardMode, HeaderSource};

    /// Request headers, and the expected result of `extract`.
    type Case = (
        Vec<(&'static str, String)>,
        Result<Option<&'static str>, Reason>,
    );

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";
    const OTHER: &str = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln";

    fn workload(headers: &[(&str, &str)], cookies: &[&str]) -> WorkloadConfig {
        WorkloadConfig {
            name: "orders".to_owned(),
            netns: PathBuf::from("/var/run/netns/orders"),
            ports: vec![8080],
            from_headers: headers
                .iter()
                .map(|(name, prefix)| HeaderSource {
                    name: (*name).to_owned(),
                    value_prefix: (*prefix).to_owned(),
                })
                .collect(),
            from_cookies: cookies.iter().map(|c| (*c).to_owned()).collect(),
            forward: ForwardMode::default(),
            claim_to_headers: Vec::new(),
            cors_preflight: CorsPreflight::default(),
            rules: Vec::new(),
        }
    }

    fn header_map(pairs: &[(&str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
            map.append(
                name,
                HeaderValue::from_bytes(value.as_bytes()).expect("header value"),
            );
        }
        map
    }

    #[test]
    fn default_bearer_cases() {
        let sources = TokenSources::new(&workload(&[], &[]));
        let cases: Vec<Case> = vec![
            (vec![], Ok(None)),
            (
                vec![("authorization", format!("Bearer {TOKEN}"))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![("Authorization", format!("bearer {TOKEN}"))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![("authorization", format!("BEARER   {TOKEN}"))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![("authorization", format!("Bearer {TOKEN} "))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![("authorization", "Basic dXNlcjpwdw==".to_owned())],
                Ok(None),
            ),
            (vec![("authorization", format!("Bearerx{TOKEN}"))], Ok(None)),
            (vec![("authorization", format!("Bear {TOKEN}"))], Ok(None)),
            (
                vec![("authorization", "Bearer".to_owned())],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", "Bearer ".to_owned())],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", "Bearer    ".to_owned())],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", format!("Bearer {TOKEN} extra"))],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", format!("Bearer {TOKEN},{OTHER}"))],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", format!("Bearer\t{TOKEN}"))],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("authorization", "Bearer ===".to_owned())],
                Err(Reason::MalformedToken),
            ),
            (
                vec![
                    ("authorization", format!("Bearer {TOKEN}")),
                    ("authorization", format!("Bearer {OTHER}")),
                ],
                Err(Reason::MultipleTokens),
            ),
            (
                vec![
                    ("authorization", format!("Bearer {TOKEN}")),
                    ("authorization", "Basic dXNlcjpwdw==".to_owned()),
                ],
                Err(Reason::MultipleTokens),
            ),
            (
                vec![
                    ("authorization", "Basic a".to_owned()),
                    ("authorization", "Basic b".to_owned()),
                ],
                Ok(None),
            ),
            (vec![("cookie", format!("token={TOKEN}"))], Ok(None)),
            (vec![("x-token", TOKEN.to_owned())], Ok(None)),
        ];

        for (pairs, expected) in cases {
            let headers = header_map(&pairs);

            assert_eq!(sources.extract(&headers), expected, "headers {pairs:?}");
        }
    }

    #[test]
    fn bearer_with_padding_is_token() {
        let sources = TokenSources::new(&workload(&[], &[]));
        let headers = header_map(&[("authorization", "Bearer abc+/=".to_owned())]);

        assert_eq!(sources.extract(&headers), Ok(Some("abc+/=")));
    }

    #[test]
    fn non_ascii_header_value() {
        let sources = TokenSources::new(&workload(&[], &[]));
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xc3\xa4bc").expect("obs-text value"),
        );

        assert_eq!(sources.extract(&headers), Err(Reason::MalformedToken));
    }

    #[test]
    fn cookie_sources() {
        let sources = TokenSources::new(&workload(&[], &["session", "alt"]));
        let cases: Vec<Case> = vec![
            (vec![], Ok(None)),
            (
                vec![("cookie", format!("theme=dark; session={TOKEN}"))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![("cookie", format!("session=\"{TOKEN}\""))],
                Ok(Some(TOKEN)),
            ),
            (
                vec![
                    ("cookie", "theme=dark".to_owned()),
                    ("cookie", format!("session={TOKEN}")),
                ],
                Ok(Some(TOKEN)),
            ),
            (vec![("cookie", format!("Session={TOKEN}"))], Ok(None)),
            (
                vec![("cookie", "session=".to_owned())],
                Err(Reason::MalformedToken),
            ),
            (
                vec![("cookie", format!("session={TOKEN}; session={OTHER}"))],
                Err(Reason::MultipleTokens),
            ),
            (
                vec![
                    ("cookie", format!("session={TOKEN}")),
                    ("cookie", format!("alt={OTHER}")),
                ],
                Err(Reason::MultipleTokens),
            ),
            (vec![("authorization", format!("Bearer {TOKEN}"))], Ok(None)),
        ];

        for (pairs, expected) in cases {
            let headers = header_map(&pairs);

            assert_eq!(sources.extract(&headers), expected, "headers {pairs:?}");
        }
    }

    #[test]
    fn cookie_header_with_binary_neighbour() {
        let sources = TokenSources::new(&workload(&[], &["session"]));
        let mut headers = HeaderMap::new();
        let value = format!("pref=caf\u{e9}; session={TOKEN}");
        headers.insert(
            COOKIE,
            HeaderValue::from_bytes(value.as_bytes()).expect("obs-text value"),
        );
        let mut binary_token = HeaderMap::new();
        binary_token.insert(
            COOKIE,
            HeaderValue::from_bytes(b"session=\xc3\xa4bc").expect("obs-text value"),
        );

        assert_eq!(sources.extract(&headers), Ok(Some(TOKEN)));
        assert_eq!(sources.extract(&binary_token), Err(Reason::MalformedToken));
    }

    #[test]
    fn header_and_cookie_together() {
        let sources = TokenSources::new(&workload(&[("Authorization", "Bearer ")], &["session"]));
        let one = header_map(&[("authorization", format!("Bearer {TOKEN}"))]);
        let both = header_map(&[
            ("authorization", format!("Bearer {TOKEN}")),
            ("cookie", format!("session={TOKEN}")),
        ]);

        assert_eq!(sources.extract(&one), Ok(Some(TOKEN)));
        assert_eq!(sources.extract(&both), Err(Reason::MultipleTokens));
    }

    #[test]
    fn custom_header_without_prefix() {
        let sources = TokenSources::new(&workload(&[("X-Jwt-Assertion", "")], &[]));
        let custom = header_map(&[("x-jwt-assertion", TOKEN.to_owned())]);
        let empty = header_map(&[("x-jwt-assertion", String::new())]);
        let bearer_only = header_map(&[("authorization", format!("Bearer {TOKEN}"))]);

        assert_eq!(sources.extract(&custom), Ok(Some(TOKEN)));
        assert_eq!(sources.extract(&empty), Err(Reason::MalformedToken));
        assert_eq!(
            sources.extract(&bearer_only),
            Ok(None),
            "configured sources replace the default"
        );
    }

    #[test]
    fn two_configured_headers() {
        let sources = TokenSources::new(&workload(
            &[("Authorization", "Bearer "), ("X-Token", "")],
            &[],
        ));
        let both = header_map(&[
            ("authorization", format!("Bearer {TOKEN}")),
            ("x-token", OTHER.to_owned()),
        ]);

        assert_eq!(sources.extract(&both), Err(Reason::MultipleTokens));
    }

    #[test]
    fn locate_names_source() {
        let sources = TokenSources::new(&workload(
            &[("Authorization", "Bearer "), ("X-Token", "")],
            &["session"],
        ));
        let cases = [
            (
                ("authorization", format!("bearer {TOKEN}")),
                TokenLocation::Header(AUTHORIZATION),
            ),
            (
                ("x-token", TOKEN.to_owned()),
                TokenLocation::Header(HeaderName::from_static("x-token")),
            ),
            (
                ("cookie", format!("a=1; session={TOKEN}")),
                TokenLocation::Cookie("session".to_owned()),
            ),
        ];

        for (pair, location) in cases {
            let headers = header_map(std::slice::from_ref(&pair));

            let found = sources.locate(&headers);

            assert_eq!(
                found,
                Ok(Some(FoundToken {
                    token: TOKEN,
                    location
                })),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn strip_removes_tokens_only() {
        let sources = TokenSources::new(&workload(
            &[("Authorization", "Bearer "), ("X-Token", "")],
            &["session", "alt"],
        ));
        let mut headers = header_map(&[
            ("authorization", format!("Bearer {TOKEN}")),
            ("authorization", "Basic dXNlcjpwdw==".to_owned()),
            ("x-token", OTHER.to_owned()),
            ("cookie", format!("theme=dark; session={TOKEN}; lang=en")),
            ("cookie", format!("alt={OTHER}")),
            ("accept", "text/plain".to_owned()),
        ]);

        sources.strip(&mut headers);

        let authorization: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(authorization, ["Basic dXNlcjpwdw=="]);
        assert!(!headers.contains_key("x-token"));
        let cookies: Vec<_> = headers.get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["theme=dark; lang=en"]);
        assert_eq!(headers["accept"], "text/plain");
        assert_eq!(sources.extract(&headers), Ok(None));
    }

    #[test]
    fn strip_cookies_keeps_neighbours() {
        let sources = TokenSources::new(&workload(&[], &["session"]));
        let cases = [
            (format!("session={TOKEN}"), None),
            (format!("a=1;session={TOKEN}"), Some("a=1")),
            (format!(" session={TOKEN} ; b=2 ;flag"), Some("b=2; flag")),
            ("Session=x; b=2".to_owned(), Some("Session=x; b=2")),
            ("sessionx=1".to_owned(), Some("sessionx=1")),
        ];

        for (value, expected) in cases {
            let mut headers = header_map(&[("cookie", value.clone())]);

            sources.strip_cookies(&mut headers);

            assert_eq!(
                headers.get(COOKIE).map(|v| v.to_str().expect("ASCII")),
                expected,
                "{value:?}"
            );
        }
    }

    #[test]
    fn strip_keeps_binary_cookie_bytes() {
        let sources = TokenSources::new(&workload(&[], &["session"]));
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_bytes(b"pref=caf\xe9; session=abc").expect("obs-text value"),
        );

        sources.strip(&mut headers);

        assert_eq!(headers[COOKIE].as_bytes(), b"pref=caf\xe9");
    }
}
