//! Key sources of an issuer: a JWKS URL, OIDC discovery, a local file or
//! the configuration itself, plus the optional HMAC secret file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::IssuerConfig;

use super::fetch::{self, FetchError, Fetched};
use super::keyset::KeySet;

/// The one key source of an issuer (the configuration validation makes
/// sure there is at most one).
#[derive(Clone, Debug)]
pub(super) enum KeySource {
    Uri(String),
    /// URL of the OIDC discovery document.
    Discovery(String),
    File(PathBuf),
    Inline(serde_json::Value),
    /// Only the HMAC secret, for an issuer that signs with HMAC alone.
    SecretOnly,
}

impl KeySource {
    /// Picks the source configured for `config`, in the order the fields
    /// are documented when an unvalidated configuration sets several.
    pub(super) fn of(config: &IssuerConfig) -> Self {
        if let Some(uri) = &config.jwks_uri {
            Self::Uri(uri.clone())
        } else if let Some(uri) = &config.discovery_uri {
            Self::Discovery(uri.clone())
        } else if config.discovery {
            Self::Discovery(fetch::discovery_uri_of(&config.issuer))
        } else if let Some(path) = &config.jwks_file {
            Self::File(path.clone())
        } else if let Some(document) = &config.jwks {
            Self::Inline(document.clone())
        } else {
            Self::SecretOnly
        }
    }

    /// True when loading needs no network, so it can run synchronously.
    pub(super) fn is_local(&self) -> bool {
        matches!(self, Self::File(_) | Self::Inline(_) | Self::SecretOnly)
    }

    /// Describes the source for logs, with credentials left out of URLs.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Uri(uri) => crate::config::redact_url(uri),
            Self::Discovery(uri) => format!("discovery {}", crate::config::redact_url(uri)),
            Self::File(path) => path.display().to_string(),
            Self::Inline(_) => "inline".to_owned(),
            Self::SecretOnly => "hmac_secret_file".to_owned(),
        }
    }
}

/// Loads the key set from `source`, then adds the secret of
/// `hmac_secret_file` when one is configured.
pub(super) async fn load(
    source: &KeySource,
    client: &reqwest::Client,
    config: &IssuerConfig,
) -> Result<Fetched, FetchError> {
    let fetched = match source {
        KeySource::Uri(uri) => fetch::fetch_jwks(client, uri).await?,
        KeySource::Discovery(uri) => {
            let jwks_uri = fetch::discover_jwks_uri(client, uri, &config.issuer).await?;
            fetch::fetch_jwks(client, &jwks_uri).await?
        }
        KeySource::File(_) | KeySource::Inline(_) | KeySource::SecretOnly => {
            return load_local(source, config)
        }
    };
    with_secret(fetched, config)
}

/// Loads a source that needs no network: a file, inline keys or the
/// secret alone. Fails for the network sources.
pub(super) fn load_local(source: &KeySource, config: &IssuerConfig) -> Result<Fetched, FetchError> {
    let parsed = match source {
        KeySource::File(path) => {
            let document = read_file(path)?;
            Some(KeySet::from_jwks_json(&document))
        }
        KeySource::Inline(document) => Some(KeySet::from_inline(document)),
        KeySource::SecretOnly => None,
        KeySource::Uri(_) | KeySource::Discovery(_) => {
            return Err(FetchError::Client {
                message: "a remote key source cannot be loaded without the network".to_owned(),
            })
        }
    };

    let fetched = match parsed {
        Some(result) => {
            let (keys, skipped) = result.map_err(|source| FetchError::KeySet { source })?;
            Fetched {
                keys,
                skipped,
                max_age: None,
            }
        }
        None => Fetched {
            keys: KeySet::default(),
            skipped: Vec::new(),
            max_age: None,
        },
    };
    with_secret(fetched, config)
}

/// Adds the secret of `config.hmac_secret_file`, read anew, to `fetched`.
fn with_secret(mut fetched: Fetched, config: &IssuerConfig) -> Result<Fetched, FetchError> {
    let Some(path) = &config.hmac_secret_file else {
        return Ok(fetched);
    };

    let secret = read_file(path)?;
    fetched
        .keys
        .add_hmac_secret(&secret)
        .map_err(|source| FetchError::KeySet { source })?;
    Ok(fetched)
}

fn read_file(path: &Path) -> Result<Vec<u8>, FetchError> {
    std::fs::read(path).map_err(|source| FetchError::File {
        path: path.display().to_string(),
        source,
    })
}

/// Returns the lifetime of a freshly loaded set: the response's `max-age`
/// within the configured bounds, or `jwks_refresh_seconds` without one.
pub(super) fn lifetime(config: &IssuerConfig, max_age: Option<Duration>) -> Duration {
    match max_age {
        Some(max_age) => {
            let min = Duration::from_secs(config.jwks_min_refresh_seconds.max(1));
            let max = Duration::from_secs(config.jwks_max_refresh_seconds).max(min);
            max_age.clamp(min, max)
        }
        None => Duration::from_secs(config.jwks_refresh_seconds.max(1)),
    }
}
