//! HTTP(S) fetches: a JWKS document with its `Cache-Control` lifetime, and
//! an OIDC discovery document that names the JWKS.

use std::time::Duration;

use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH};
use serde::Deserialize;

use super::keyset::{KeySet, KeySetError, SkippedKey};

/// Largest JWKS or discovery body read, in bytes. A set of dozens of
/// RSA-4096 keys is well under 100 KiB; the cap keeps a broken or hostile
/// endpoint from filling memory.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Redirects followed per fetch. Issuers sometimes move their JWKS behind
/// one redirect; a chain longer than this is a misconfiguration.
pub const MAX_JWKS_REDIRECTS: usize = 3;

/// Path of the discovery document below the issuer URL (OIDC Discovery
/// 1.0 §4).
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Error from one fetch that produced no key set.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("failed to set up the HTTP client: {message}; check the TLS setup of the host")]
    Client { message: String },
    #[error("request to {uri} failed; check that it is reachable")]
    Request {
        uri: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{uri} answered HTTP {status}; check the URL")]
    Status { uri: String, status: u16 },
    #[error("the response of {uri} is larger than {MAX_JWKS_BYTES} bytes; check that the URL points at the document")]
    TooLarge { uri: String },
    #[error("the response is not a usable JWKS")]
    KeySet {
        #[source]
        source: KeySetError,
    },
    #[error("the discovery document at {uri} is not a JSON object with `issuer` and `jwks_uri`; check discovery_uri")]
    DiscoveryDocument {
        uri: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the discovery document names issuer {found:?}, not {expected:?}; OpenID Connect Discovery 1.0 §4.3 requires them to be equal, so fix `issuer` or discovery_uri")]
    DiscoveryIssuer { expected: String, found: String },
    #[error("the discovery document names jwks_uri {uri:?}, which is not an https:// URL (or http:// when discovery itself used http://)")]
    DiscoveryJwksUri { uri: String },
    #[error("failed to read {path}; check that the file exists and is readable by the agent")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A JWKS as fetched, with the lifetime its response declared.
pub(super) struct Fetched {
    pub(super) keys: KeySet,
    pub(super) skipped: Vec<SkippedKey>,
    /// `max-age` of the response (0 for `no-cache` or `no-store`), before
    /// the configured bounds apply; `None` without such a directive.
    pub(super) max_age: Option<Duration>,
}

/// Builds the HTTP client of one issuer: the configured timeout for the
/// whole exchange, and redirects that stay on HTTPS once HTTPS was used.
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, FetchError> {
    crate::http_client::build(timeout, MAX_JWKS_REDIRECTS).map_err(|error| FetchError::Client {
        message: error.to_string(),
    })
}

/// Fetches and parses the JWKS at `uri`.
pub(super) async fn fetch_jwks(client: &reqwest::Client, uri: &str) -> Result<Fetched, FetchError> {
    let (body, max_age) = get(client, uri, "application/jwk-set+json, application/json").await?;
    let (keys, skipped) =
        KeySet::from_jwks_json(&body).map_err(|source| FetchError::KeySet { source })?;
    Ok(Fetched {
        keys,
        skipped,
        max_age,
    })
}

/// Fetches the discovery document at `uri` and returns its `jwks_uri`,
/// after checking that its `issuer` is exactly `expected_issuer`
/// (OIDC Discovery 1.0 §4.3, which stops a document from one
/// issuer from lending keys to another).
pub(super) async fn discover_jwks_uri(
    client: &reqwest::Client,
    uri: &str,
    expected_issuer: &str,
) -> Result<String, FetchError> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }

    let (body, _) = get(client, uri, "application/json").await?;
    let document: Discovery =
        serde_json::from_slice(&body).map_err(|source| FetchError::DiscoveryDocument {
            uri: crate::config::redact_url(uri),
            source,
        })?;

    if document.issuer != expected_issuer {
        return Err(FetchError::DiscoveryIssuer {
            expected: expected_issuer.to_owned(),
            found: document.issuer,
        });
    }
    let discovered_over_https = uri.starts_with("https://");
    let jwks_ok = match reqwest::Url::parse(&document.jwks_uri) {
        Ok(url) => url.scheme() == "https" || (url.scheme() == "http" && !discovered_over_https),
        Err(_) => false,
    };
    if !jwks_ok {
        return Err(FetchError::DiscoveryJwksUri {
            uri: crate::config::redact_url(&document.jwks_uri),
        });
    }
    Ok(document.jwks_uri)
}

/// Returns the discovery URL of `issuer`: the issuer without a trailing
/// `/`, then [`DISCOVERY_PATH`].
pub(super) fn discovery_uri_of(issuer: &str) -> String {
    format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/'))
}

/// GETs `uri` and returns the body, capped at [`MAX_JWKS_BYTES`], with the
/// response's `max-age`.
async fn get(
    client: &reqwest::Client,
    uri: &str,
    accept: &str,
) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
    let redacted = || crate::config::redact_url(uri);
    let mut response = client
        .get(uri)
        .header(ACCEPT, accept)
        .send()
        .await
        .map_err(|source| FetchError::Request {
            uri: redacted(),
            source,
        })?;

    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            uri: redacted(),
            status: status.as_u16(),
        });
    }
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared_len.is_some_and(|len| len > MAX_JWKS_BYTES) {
        return Err(FetchError::TooLarge { uri: redacted() });
    }
    let max_age = response
        .headers()
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(max_age_of)
        .min();

    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| FetchError::Request {
            uri: redacted(),
            source,
        })?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge { uri: redacted() });
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// Reads the freshness lifetime from one `Cache-Control` header value
/// (RFC 9111 §5.2.2): `max-age=N`, or 0 for `no-cache` and `no-store`.
/// Unknown directives and malformed values are ignored.
fn max_age_of(value: &str) -> Option<Duration> {
    let mut lifetime = None;
    for directive in value.split(',') {
        let directive = directive.trim();
        let (name, argument) = directive
            .split_once('=')
            .map_or((directive, None), |(name, argument)| {
                (name.trim(), Some(argument.trim().trim_matches('"')))
            });

        let seconds =
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                Some(0)
            } else if name.eq_ignore_ascii_case("max-age") {
                argument.and_then(|text| text.parse::<u64>().ok())
            } else {
                None
            };
        if let Some(seconds) = seconds {
            let candidate = Duration::from_secs(seconds);
            lifetime = Some(lifetime.map_or(candidate, |current: Duration| current.min(candidate)));
        }
    }
    lifetime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        let cases = [
            ("max-age=300", Some(300)),
            ("public, max-age=3600, must-revalidate", Some(3600)),
            ("Max-Age = 60", Some(60)),
            ("max-age=\"120\"", Some(120)),
            ("no-store", Some(0)),
            ("max-age=600, no-cache", Some(0)),
            ("public", None),
            ("max-age=soon", None),
            ("max-age=-1", None),
            ("", None),
        ];

        for (header, expected) in cases {
            assert_eq!(
                max_age_of(header),
                expected.map(Duration::from_secs),
                "{header:?}"
            );
        }
    }

    #[test]
    fn discovery_uri_from_issuer() {
        assert_eq!(
            discovery_uri_of("https://idp.example/realms/shop"),
            "https://idp.example/realms/shop/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_uri_of("https://idp.example/"),
            "https://idp.example/.well-known/openid-configuration"
        );
    }
}
