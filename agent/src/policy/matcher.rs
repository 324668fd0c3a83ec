//! Matching a normalised request path against a rule's `path`,
//! `path_prefix` or `path_template`.
//!
//! Literal text is compared with each segment's `;` parameters removed,
//! because servers such as Tomcat serve `/admin;x` as `/admin`; a rule on
//! `/admin` must therefore cover it. A captured `{name}` segment keeps its
//! parameters, so an ownership check compares what the caller sent.

use super::normalize::{normalize_path, percent_decode};

/// Error in a `path_template`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must start with `/`, such as /users/{{user}}")]
    NoLeadingSlash,
    #[error("`**` may only be the last segment, because it takes every remaining segment")]
    DoubleStarNotLast,
    #[error("segment {segment:?} mixes a placeholder with text; a segment is a literal, `{{name}}`, `*` or `**`")]
    MixedSegment { segment: String },
    #[error("placeholder {name:?} must be a name of letters, digits and `_`")]
    InvalidName { name: String },
    #[error("placeholder {name:?} is used twice; give each segment its own name")]
    DuplicateName { name: String },
    #[error("segment {segment:?} is empty or a dot segment, which normalised request paths never contain")]
    EmptyOrDotSegment { segment: String },
    #[error("literal segment {segment:?} is not in normalised form; write {normalised:?}")]
    NotNormalised { segment: String, normalised: String },
    #[error("literal segment {segment:?} contains characters that no accepted request path has")]
    InvalidLiteral { segment: String },
}

/// Path matcher of a rule: exact, prefix or template.
#[derive(Clone, Debug)]
pub(crate) enum PathMatcher {
    /// The whole path, a trailing `/` aside.
    Exact(String),
    /// The path starts with this prefix at a segment boundary.
    Prefix(String),
    Template(Template),
    /// The configured path does not normalise, so the rule never matches.
    /// Validated configurations have none.
    Never,
}

/// A parsed `path_template`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Named(String),
    AnySegment,
    AnyRemaining,
}

/// Named segments captured by a template match: the name, and the
/// percent-decoded segment, `None` when it does not decode to UTF-8.
pub(crate) type Captures = Vec<(String, Option<String>)>;

impl PathMatcher {
    /// Builds the matcher for a rule's exact path, prefix or template.
    /// Whichever is set first wins; validation ensures exactly one is.
    pub(crate) fn new(path: Option<&str>, prefix: Option<&str>, template: Option<&str>) -> Self {
        if let Some(path) = path {
            return normalize_path(path).map_or(Self::Never, |normal| {
                Self::Exact(strip_trailing_slash(&normal).to_owned())
            });
        }
        if let Some(prefix) = prefix {
            return normalize_path(prefix).map_or(Self::Never, Self::Prefix);
        }
        if let Some(template) = template {
            return Template::parse(template).map_or(Self::Never, Self::Template);
        }
        Self::Never
    }

    /// Matches the normalised `path`; returns the captured segments on a
    /// match.
    pub(crate) fn matches(&self, path: &str) -> Option<Captures> {
        match self {
            Self::Exact(expected) => {
                let actual = segments(path);
                let wanted = segments(expected);
                let equal = actual.len() == wanted.len()
                    && actual
                        .iter()
                        .zip(&wanted)
                        .all(|(segment, literal)| segment_name(segment) == *literal);
                equal.then(Vec::new)
            }
            Self::Prefix(prefix) => prefix_matches(prefix, path).then(Vec::new),
            Self::Template(template) => template.matches(path),
            Self::Never => None,
        }
    }
}

impl Template {
    /// Parses a `path_template` such as `/users/{user}/orders/**`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(TemplateError::NoLeadingSlash);
        };
        let raw: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            strip_trailing_slash(rest).split('/').collect()
        };

        let mut parts = Vec::with_capacity(raw.len());
        for (index, segment) in raw.iter().enumerate() {
            let part = parse_part(segment)?;
            if part == Part::AnyRemaining && index + 1 != raw.len() {
                return Err(TemplateError::DoubleStarNotLast);
            }
            if let Part::Named(name) = &part {
                if parts.contains(&part) {
                    return Err(TemplateError::DuplicateName { name: name.clone() });
                }
            }
            parts.push(part);
        }
        Ok(Self { parts })
    }

    /// Returns the names of the `{name}` segments, in order.
    pub fn names(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Named(name) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    fn matches(&self, path: &str) -> Option<Captures> {
        let segments = segments(path);
        let mut captures = Vec::new();

        for (index, part) in self.parts.iter().enumerate() {
            if *part == Part::AnyRemaining {
                return Some(captures);
            }
            let segment = segments.get(index)?;
            match part {
                Part::Literal(literal) => {
                    if segment_name(segment) != literal {
                        return None;
                    }
                }
                Part::Named(name) => captures.push((name.clone(), percent_decode(segment))),
                Part::AnySegment | Part::AnyRemaining => {}
            }
        }
        (segments.len() == self.parts.len()).then_some(captures)
    }
}

fn parse_part(segment: &str) -> Result<Part, TemplateError> {
    match segment {
        "*" => return Ok(Part::AnySegment),
        "**" => return Ok(Part::AnyRemaining),
        _ => {}
    }
    if let Some(name) = segment
        .strip_prefix('{')
        .and_then(|inner| inner.strip_suffix('}'))
    {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !valid {
            return Err(TemplateError::InvalidName {
                name: name.to_owned(),
            });
        }
        return Ok(Part::Named(name.to_owned()));
    }
    if matches!(segment, "" | "." | "..") {
        return Err(TemplateError::EmptyOrDotSegment {
            segment: segment.to_owned(),
        });
    }
    if segment.contains(['{', '}', '*']) {
        return Err(TemplateError::MixedSegment {
            segment: segment.to_owned(),
        });
    }

    // A literal must read the same after normalisation, or no request
    // path could ever match it.
    match normalize_path(&format!("/{segment}")) {
        Some(normal) if normal[1..] == *segment => Ok(Part::Literal(segment.to_owned())),
        Some(normal) => Err(TemplateError::NotNormalised {
            segment: segment.to_owned(),
            normalised: normal[1..].to_owned(),
        }),
        None => Err(TemplateError::InvalidLiteral {
            segment: segment.to_owned(),
        }),
    }
}

/// Splits a normalised path into segments; a trailing `/` adds none.
fn segments(path: &str) -> Vec<&str> {
    let inner = strip_trailing_slash(path.strip_prefix('/').unwrap_or(path));
    if inner.is_empty() {
        Vec::new()
    } else {
        inner.split('/').collect()
    }
}

fn strip_trailing_slash(path: &str) -> &str {
    if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    }
}

/// Returns a segment without its `;` parameters.
fn segment_name(segment: &str) -> &str {
    segment.split_once(';').map_or(segment, |(name, _)| name)
}

/// True when normalised `path` starts with `prefix` at a segment boundary:
/// `/orders` matches `/orders`, `/orders/7` and `/orders;v=1`, not
/// `/ordersX`. A `;` counts as a boundary because servers that strip path
/// parameters serve `/orders;x` as `/orders`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    if prefix.ends_with('/') {
        return true;
    }
    matches!(path.as_bytes().get(prefix.len()), None | Some(b'/' | b';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> PathMatcher {
        PathMatcher::Template(Template::parse(text).expect("valid template"))
    }

    fn captured(pairs: &[(&str, &str)]) -> Captures {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Some((*value).to_owned())))
            .collect()
    }

    #[test]
    fn prefix_matches_segment_boundary() {
        let cases = [
            ("/orders", "/orders", true),
            ("/orders", "/orders/7", true),
            ("/orders", "/orders;v=1", true),
            ("/orders", "/ordersX", false),
            ("/orders", "/order", false),
            ("/orders/", "/orders/7", true),
            ("/orders/", "/orders", false),
            ("/", "/anything", true),
        ];
        for (prefix, path, expected) in cases {
            assert_eq!(prefix_matches(prefix, path), expected, "{prefix} on {path}");
        }
    }

    #[test]
    fn exact_path_cases() {
        let matcher = PathMatcher::new(Some("/healthz"), None, None);
        let root = PathMatcher::new(Some("/"), None, None);

        for (path, expected) in [
            ("/healthz", true),
            ("/healthz/", true),
            ("/healthz;v=1", true),
            ("/healthz/x", false),
            ("/healthzx", false),
            ("/", false),
        ] {
            assert_eq!(matcher.matches(path).is_some(), expected, "{path}");
        }
        assert!(root.matches("/").is_some());
        assert!(root.matches("/a").is_none());
    }

    #[test]
    fn template_matches_and_captures() {
        let orders = template("/users/{user}/orders/**");
        let one = template("/tenants/{tenant}/items/*");

        assert_eq!(
            orders.matches("/users/alice/orders"),
            Some(captured(&[("user", "alice")]))
        );
        assert_eq!(
            orders.matches("/users/alice/orders/7/lines"),
            Some(captured(&[("user", "alice")]))
        );
        assert_eq!(
            orders.matches("/users/al%40ice/orders/"),
            Some(captured(&[("user", "al@ice")]))
        );
        assert_eq!(
            orders.matches("/users/alice;x/orders;y/1"),
            Some(captured(&[("user", "alice;x")]))
        );
        assert_eq!(orders.matches("/users/alice"), None);
        assert_eq!(orders.matches("/users/alice/invoices"), None);
        assert_eq!(orders.matches("/users"), None);
        assert_eq!(
            one.matches("/tenants/acme/items/9"),
            Some(captured(&[("tenant", "acme")]))
        );
        assert_eq!(one.matches("/tenants/acme/items"), None);
        assert_eq!(one.matches("/tenants/acme/items/9/x"), None);
    }

    #[test]
    fn undecodable_capture_is_none() {
        let matcher = template("/users/{user}");

        assert_eq!(
            matcher.matches("/users/%FF"),
            Some(vec![("user".to_owned(), None)])
        );
    }

    #[test]
    fn template_parse_errors() {
        let cases = [
            ("users/{u}", TemplateError::NoLeadingSlash),
            ("/a/**/b", TemplateError::DoubleStarNotLast),
            (
                "/a{u}",
                TemplateError::MixedSegment {
                    segment: "a{u}".to_owned(),
                },
            ),
            (
                "/{u-1}",
                TemplateError::InvalidName {
                    name: "u-1".to_owned(),
                },
            ),
            (
                "/{}",
                TemplateError::InvalidName {
                    name: String::new(),
                },
            ),
            (
                "/{u}/{u}",
                TemplateError::DuplicateName {
                    name: "u".to_owned(),
                },
            ),
            (
                "/%61dmin",
                TemplateError::NotNormalised {
                    segment: "%61dmin".to_owned(),
                    normalised: "admin".to_owned(),
                },
            ),
            (
                "/a//b",
                TemplateError::EmptyOrDotSegment {
                    segment: String::new(),
                },
            ),
            (
                "/a/../b",
                TemplateError::EmptyOrDotSegment {
                    segment: "..".to_owned(),
                },
            ),
            (
                "/a%2fb",
                TemplateError::InvalidLiteral {
                    segment: "a%2fb".to_owned(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Template::parse(text), Err(expected), "{text}");
        }
    }

    #[test]
    fn template_names_in_order() {
        let parsed = Template::parse("/t/{tenant}/u/{user}/**").expect("valid");

        assert_eq!(parsed.names(), ["tenant", "user"]);
    }

    #[test]
    fn root_and_double_star_templates() {
        let root = template("/");
        let everything = template("/**");

        assert!(root.matches("/").is_some());
        assert!(root.matches("/a").is_none());
        assert!(everything.matches("/").is_some());
        assert!(everything.matches("/a/b/c").is_some());
    }
}
