//! Finding the token in a request: configured headers and cookies.
//!
//! Exactly one token may be present; two are rejected rather than guessed
//! between. Pure functions over `http::HeaderMap`.

use http::HeaderMap;

use crate::config::WorkloadConfig;
use crate::decision::Reason;

/// Where a workload's token may be found.
#[derive(Clone, Debug)]
pub struct TokenSources {
    _private: (),
}

impl TokenSources {
    pub fn new(_workload: &WorkloadConfig) -> Self {
        todo!()
    }

    /// Returns the one token in `headers`, `Ok(None)` when there is none, or
    /// `Err(Reason::MultipleTokens)`.
    pub fn extract<'h>(&self, _headers: &'h HeaderMap) -> Result<Option<&'h str>, Reason> {
        todo!()
    }
}
