//! Errors from loading the configuration file.

use std::fmt;
use std::path::PathBuf;

/// Error from loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read configuration file {path}; check that it exists and is readable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The text is not YAML, or does not fit the schema: a syntax error, an
    /// unknown or missing field, or a value of the wrong type. `detail` is
    /// `serde_yaml`'s message (with the field path, without the location),
    /// kept as text because its error type repeats the location.
    #[error("{origin}{}: {detail}; fix this field or the YAML syntax at that place", Location(*line, *column))]
    Syntax {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        detail: String,
    },

    /// The file parsed, but values break the rules that the validation pass
    /// checks. Every problem found is listed, not only the first.
    #[error("{origin}: invalid configuration, {} problem(s):{}", problems.len(), ProblemList(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

/// One value that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field, for example `workloads[0].ports[1]`.
    pub field: String,
    /// Line of the field in the file (1-based), or of the nearest enclosing
    /// node when the field was left at its default.
    pub line: Option<usize>,
    /// The offending value as written, or a short description of it.
    pub value: String,
    /// Description of the problem and of the fix.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{} = {}: {}", self.field, self.value, self.message)
    }
}

/// Formats an optional `:line:column` suffix in the style of compilers, so
/// editors and terminals can jump to the place.
struct Location(Option<usize>, Option<usize>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, ":{line}:{column}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

/// Formats problems one per indented line.
struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0 {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}
