//! Per-workload authorization rules over a verified token.
//!
//! Rules are ordered; the first whose path prefix and method match decides,
//! and a request no rule matches is denied. Pure functions, no I/O.

use crate::config::RuleConfig;
use crate::decision::Reason;
use crate::verify::VerifiedToken;

/// The compiled rules of one workload.
pub struct Policy {
    _rules: Vec<RuleConfig>,
}

/// Which rule decided, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// Index of the matching rule, `None` when no rule matched.
    pub rule: Option<usize>,
    /// `Reason::Allowed` or the first unmet requirement.
    pub reason: Reason,
}

impl Policy {
    pub fn new(_rules: &[RuleConfig]) -> Self {
        todo!()
    }

    /// Evaluates the rules for `method` and the raw request `path` (without
    /// query), which is normalised before matching.
    pub fn evaluate(&self, _method: &str, _path: &str, _token: &VerifiedToken) -> PolicyOutcome {
        todo!()
    }
}
