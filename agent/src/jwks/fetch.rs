//! One HTTP(S) fetch of a JWKS document.

use std::time::Duration;

use http::header::{ACCEPT, CONTENT_LENGTH};

use super::keyset::{KeySet, KeySetError, SkippedKey};

/// Largest JWKS body read, in bytes. A set of dozens of RSA-4096 keys is
/// well under 100 KiB; the cap keeps a broken or hostile endpoint from
/// filling memory.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Redirects followed per fetch. Issuers sometimes move their JWKS behind
/// one redirect; a chain longer than this is a misconfiguration.
pub const MAX_JWKS_REDIRECTS: usize = 3;

/// Error from one fetch that produced no key set.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("failed to set up the HTTP client: {message}; check the TLS setup of the host")]
    Client { message: String },
    #[error("request failed; check that jwks_uri is reachable")]
    Request {
        #[source]
        source: reqwest::Error,
    },
    #[error("the server answered HTTP {status}; check jwks_uri")]
    Status { status: u16 },
    #[error("the response is larger than {MAX_JWKS_BYTES} bytes; check that jwks_uri points at the JWKS")]
    TooLarge,
    #[error("the response is not a usable JWKS")]
    KeySet {
        #[source]
        source: KeySetError,
    },
}

/// Builds the HTTP client of one issuer: the configured timeout for the
/// whole exchange, and redirects that stay on HTTPS once HTTPS was used.
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, FetchError> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.previous().iter().any(|url| url.scheme() == "https")
            && attempt.url().scheme() != "https";
        if attempt.previous().len() > MAX_JWKS_REDIRECTS {
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
        .map_err(|error| FetchError::Client {
            message: error.to_string(),
        })
}

/// Fetches and parses the JWKS at `uri`.
pub(super) async fn fetch(
    client: &reqwest::Client,
    uri: &str,
) -> Result<(KeySet, Vec<SkippedKey>), FetchError> {
    let mut response = client
        .get(uri)
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(|source| FetchError::Request { source })?;

    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            status: status.as_u16(),
        });
    }
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared_len.is_some_and(|len| len > MAX_JWKS_BYTES) {
        return Err(FetchError::TooLarge);
    }

    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| FetchError::Request { source })?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }

    KeySet::from_jwks_json(&body).map_err(|source| FetchError::KeySet { source })
}
