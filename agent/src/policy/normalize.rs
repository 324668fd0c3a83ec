//! Request path normalisation before rule matching.
//!
//! A rule on `/admin` must also cover every other spelling of that path that
//! the service would serve as `/admin`: `/./admin`, `//admin`, `/%61dmin`,
//! `/x/../admin`. Paths whose meaning differs between servers (an encoded
//! `/` or `\`, a NUL) are rejected instead of guessed at.

/// Normalises an origin-form request path (RFC 9112 §3.2.1) for matching.
///
/// Steps, in order:
/// 1. Drops a query, if the caller left one on.
/// 2. Decodes percent-encoded unreserved characters (RFC 3986 §2.3,
///    §6.2.2.2) and upper-cases the hex digits of the escapes it keeps.
/// 3. Removes empty segments, so `//a` is `/a`.
/// 4. Resolves `.` and `..` segments (RFC 3986 §5.2.4); `..` at the root
///    stays at the root.
///
/// A trailing `/` is kept, because `/a/` and `/a` may be different
/// resources. Returns `None` for a path that:
/// - does not start with `/`;
/// - contains `%2F`, `%5C` or `%00`, because servers disagree on whether
///   they split segments or end the string;
/// - contains a raw `\`, `#`, space, control or non-ASCII byte, or a
///   malformed escape;
/// - has a dot segment with parameters (`..;x`), which servers that strip
///   `;` parameters, such as Tomcat, resolve as `..`.
///
/// NOTE: letter case is kept, so a service that serves `/ADMIN` as `/admin`
/// needs its rules written for every spelling, or one rule on `/`.
pub fn normalize_path(raw: &str) -> Option<String> {
    let path = raw.split_once('?').map_or(raw, |(path, _query)| path);
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path)?;

    // RFC 3986 §5.2.4 keeps empty segments while it removes dot segments,
    // but servers that merge slashes first (nginx, this function) drop them:
    // `/admin//../public` is `/admin/public` to one and `/public` to the
    // other. A path mixing the two has no single meaning, so it is rejected.
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let has_empty = segments[..last].iter().any(|segment| segment.is_empty());
    if has_empty && segments.contains(&"..") {
        return None;
    }

    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in segments {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            _ => {
                let name = segment
                    .split_once(';')
                    .map_or(segment, |(name, _params)| name);
                if name == "." || name == ".." {
                    return None;
                }
                kept.push(segment);
            }
        }
    }

    let mut normalised = String::with_capacity(decoded.len());
    for segment in &kept {
        normalised.push('/');
        normalised.push_str(segment);
    }
    if kept.is_empty() || trailing_slash {
        normalised.push('/');
    }
    Some(normalised)
}

/// RFC 3986 §2.3 unreserved characters.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut position = 0;

    while position < bytes.len() {
        let byte = bytes[position];
        if byte == b'%' {
            let high = hex_value(*bytes.get(position + 1)?)?;
            let low = hex_value(*bytes.get(position + 2)?)?;
            let value = high * 16 + low;
            if is_unreserved(value) {
                out.push(char::from(value));
            } else if matches!(value, b'/' | b'\\' | 0) {
                return None;
            } else {
                out.push('%');
                out.push(char::from(bytes[position + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[position + 2].to_ascii_uppercase()));
            }
            position += 3;
            continue;
        }

        if byte <= b' ' || byte >= 0x7f || matches!(byte, b'\\' | b'#') {
            return None;
        }
        out.push(char::from(byte));
        position += 1;
    }
    Some(out)
}

/// Decodes every percent escape of a normalised path segment, for
/// comparing it with a claim. Returns `None` when the bytes are not UTF-8.
pub(crate) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut position = 0;

    while position < bytes.len() {
        let escape = (bytes[position] == b'%')
            .then(|| {
                let high = hex_value(*bytes.get(position + 1)?)?;
                let low = hex_value(*bytes.get(position + 2)?)?;
                Some(high * 16 + low)
            })
            .flatten();
        if let Some(value) = escape {
            out.push(value);
            position += 3;
        } else {
            out.push(bytes[position]);
            position += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_path_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/", Some("/")),
            ("/admin", Some("/admin")),
            ("/admin/", Some("/admin/")),
            ("/./admin", Some("/admin")),
            ("//admin", Some("/admin")),
            ("///admin//users", Some("/admin/users")),
            ("/%61dmin", Some("/admin")),
            ("/%2e/admin", Some("/admin")),
            ("/%2E%2E/admin", Some("/admin")),
            ("/x/../admin", Some("/admin")),
            ("/x/%2e%2e/admin", Some("/admin")),
            ("/../../admin", Some("/admin")),
            ("/admin/.", Some("/admin/")),
            ("/admin/x/..", Some("/admin/")),
            ("/..", Some("/")),
            ("/admin//../public", None),
            ("/admin/users//../../public/x", None),
            ("//x/%2e%2e/y", None),
            ("/x/../y/", Some("/y/")),
            ("/admin?x=1", Some("/admin")),
            ("/a%20b", Some("/a%20b")),
            ("/a%3fb", Some("/a%3Fb")),
            ("/a%252e", Some("/a%252e")),
            ("/a%7e", Some("/a~")),
            ("/a;v=1/b", Some("/a;v=1/b")),
            ("/..;/admin", None),
            ("/public/..;x/admin", None),
            ("/admin%2fusers", None),
            ("/admin%2Fusers", None),
            ("/admin%5cusers", None),
            ("/admin%00", None),
            ("/admin\\users", None),
            ("/admin#frag", None),
            ("/ad min", None),
            ("/admin\t", None),
            ("/ädmin", None),
            ("/admin%", None),
            ("/admin%4", None),
            ("/admin%zz", None),
            ("admin", None),
            ("", None),
            ("*", None),
            ("http://host/admin", None),
        ];

        for (raw, expected) in cases {
            assert_eq!(
                normalize_path(raw).as_deref(),
                *expected,
                "raw path {raw:?}"
            );
        }
    }

    #[test]
    fn normalize_path_is_idempotent() {
        for raw in [
            "/a/./b/../c/d/",
            "/a/./c//d/",
            "/%61/%2e%2e/b",
            "/x%3a",
            "/",
        ] {
            let once = normalize_path(raw).expect("valid path");

            assert_eq!(
                normalize_path(&once).as_deref(),
                Some(once.as_str()),
                "raw path {raw:?}"
            );
        }
    }

    #[test]
    fn percent_decode_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("alice", Some("alice")),
            ("al%40ice", Some("al@ice")),
            ("%C3%A4", Some("\u{e4}")),
            ("a%20b", Some("a b")),
            ("%FF", None),
            ("100%", Some("100%")),
        ];

        for (segment, expected) in cases {
            assert_eq!(percent_decode(segment).as_deref(), *expected, "{segment:?}");
        }
    }
}
