//! Paths to configuration fields, such as `workloads[0].ports[1]`, shared by
//! the validation pass and the line locator so that both name a field the
//! same way.

use std::fmt;

/// One step from a YAML node to a child: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// Path from the document root to one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct FieldPath(Vec<Segment>);

impl FieldPath {
    pub(crate) fn root() -> Self {
        Self(Vec::new())
    }

    /// Returns the path of the mapping entry `name` under this node.
    pub(crate) fn key(&self, name: &str) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(name.to_owned()));
        Self(segments)
    }

    /// Returns the path of the sequence item `index` under this node.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Self(segments)
    }

    /// Returns the path of the enclosing node, `None` at the root.
    pub(crate) fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }
}

/// True for keys that read unambiguously after a `.`: field names, and
/// claim names without dots or brackets.
fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document root)");
        }

        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                // A claim name such as `realm_access.roles` is one key, so it
                // is quoted to keep it apart from the path separator.
                Segment::Key(key) if !is_plain_key(key) => write!(f, "[{key:?}]")?,
                Segment::Key(key) if position == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_joins_keys_and_indexes() {
        let path = FieldPath::root()
            .key("workloads")
            .index(0)
            .key("ports")
            .index(1);

        assert_eq!(path.to_string(), "workloads[0].ports[1]");
    }

    #[test]
    fn display_quotes_dotted_keys() {
        let path = FieldPath::root()
            .key("rules")
            .index(2)
            .key("claims")
            .key("realm_access.roles");

        assert_eq!(path.to_string(), r#"rules[2].claims["realm_access.roles"]"#);
    }

    #[test]
    fn parent_walks_up_to_root() {
        let path = FieldPath::root().key("issuers").index(3);

        assert_eq!(path.parent(), Some(FieldPath::root().key("issuers")));
        assert_eq!(FieldPath::root().parent(), None);
        assert_eq!(FieldPath::root().to_string(), "(document root)");
    }
}
