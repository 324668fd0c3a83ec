//! The HTTP client that fetches issuer keys, discovery documents and
//! revocation lists.
//!
//! One policy for all of them: a timeout for the whole exchange, a bounded
//! number of redirects, and no redirect from HTTPS back to plain HTTP.

use std::time::Duration;

/// Builds a client that gives up after `timeout` and follows at most
/// `max_redirects` redirects, none of them from HTTPS to HTTP.
pub fn build(timeout: Duration, max_redirects: usize) -> Result<reqwest::Client, reqwest::Error> {
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        let downgrade = attempt.previous().iter().any(|url| url.scheme() == "https")
            && attempt.url().scheme() != "https";
        if attempt.previous().len() > max_redirects {
            attempt.error("too many redirects")
        } else if downgrade {
            attempt.error("redirect from https to http")
        } else {
            attempt.follow()
        }
    });

    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(policy)
        .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
        .build()
}
