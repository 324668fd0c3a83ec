//! Sources of revocation documents: a local file, checked for changes by
//! modification time, size and content, or an HTTP(S) URL, fetched whole.
//! Each source keeps its last good document when a refresh fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::header::{ACCEPT, CONTENT_LENGTH};
use sha2::{Digest as _, Sha256};

use super::document::{DocumentError, RevocationDocument, MAX_DOCUMENT_BYTES};

/// Redirects followed per request; a longer chain is a misconfiguration.
pub const MAX_REDIRECTS: usize = 3;

/// Coarsest modification-time resolution of common file systems (FAT keeps
/// 2 s). A file modified this close to its last read is read again even
/// with an unchanged stamp, because a second write within the same time
/// step leaves the stamp as it was.
const MTIME_RESOLUTION: Duration = Duration::from_secs(2);

/// Error from one refresh of one source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "failed to read the revocation list file {path}; check that it exists and is readable"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up the HTTP client: {message}; check the TLS setup of the host")]
    Client { message: String },
    #[error("request to {url} failed; check that revocation.url is reachable")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}; check revocation.url")]
    Status { url: String, status: u16 },
    #[error("{origin} is larger than {MAX_DOCUMENT_BYTES} bytes; prune the revocation list")]
    TooLarge { origin: String },
    #[error("{origin} is not a usable revocation list")]
    Document {
        origin: String,
        #[source]
        source: DocumentError,
    },
}

/// Outcome of a refresh that succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The document differs from the previous one (or is the first).
    Changed,
    /// The source still contains the same document.
    Unchanged,
}

/// File metadata that shows cheaply whether the file may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Metadata and digest of the file at its last successful read.
#[derive(Clone, Copy, Debug)]
struct FileSeen {
    stamp: FileStamp,
    digest: [u8; 32],
    read_at: SystemTime,
}

impl FileSeen {
    /// True when `stamp` proves the file unchanged: it equals the stamp at
    /// the last read, and that read came well after the modification.
    fn proves_unchanged(&self, stamp: FileStamp) -> bool {
        let settled = stamp.modified.is_some_and(|modified| {
            self.read_at
                .duration_since(modified)
                .is_ok_and(|age| age > MTIME_RESOLUTION)
        });
        self.stamp == stamp && settled
    }
}

/// One configured source and its last good document.
pub struct Source {
    kind: Kind,
}

enum Kind {
    File {
        path: PathBuf,
        seen: Option<FileSeen>,
        document: Option<RevocationDocument>,
    },
    Url {
        url: String,
        client: Result<reqwest::Client, String>,
        digest: Option<[u8; 32]>,
        document: Option<RevocationDocument>,
    },
}

impl Source {
    pub fn file(path: &Path) -> Self {
        let kind = Kind::File {
            path: path.to_owned(),
            seen: None,
            document: None,
        };
        Self { kind }
    }

    /// Creates a URL source whose requests time out after `timeout`. A
    /// client that cannot be built is kept as an error, so every refresh
    /// reports it instead of the agent stopping.
    pub fn url(url: &str, timeout: Duration) -> Self {
        let kind = Kind::Url {
            url: url.to_owned(),
            client: client(timeout).map_err(|error| error.to_string()),
            digest: None,
            document: None,
        };
        Self { kind }
    }

    /// Names the source for logs, with credentials in a URL left out.
    pub fn origin(&self) -> String {
        match &self.kind {
            Kind::File { path, .. } => path.display().to_string(),
            Kind::Url { url, .. } => crate::config::redact_url(url),
        }
    }

    /// Returns the last good document, `None` before the first successful
    /// refresh.
    pub fn document(&self) -> Option<&RevocationDocument> {
        match &self.kind {
            Kind::File { document, .. } | Kind::Url { document, .. } => document.as_ref(),
        }
    }

    /// Reads the source again. On error the last good document stays.
    pub async fn refresh(&mut self) -> Result<Refreshed, SourceError> {
        match &mut self.kind {
            Kind::File {
                path,
                seen,
                document,
            } => refresh_file(path, seen, document).await,
            Kind::Url {
                url,
                client,
                digest,
                document,
            } => {
                let client = client.as_ref().map_err(|message| SourceError::Client {
                    message: message.clone(),
                })?;
                let origin = crate::config::redact_url(url);
                let body = fetch(client, url, &origin).await?;
                install(&body, &origin, digest, document)
            }
        }
    }
}

async fn refresh_file(
    path: &Path,
    seen: &mut Option<FileSeen>,
    document: &mut Option<RevocationDocument>,
) -> Result<Refreshed, SourceError> {
    let read_error = |source| SourceError::Read {
        path: path.to_owned(),
        source,
    };
    // `metadata` follows symbolic links, so the stamp changes when a
    // Kubernetes ConfigMap update swaps the `..data` link.
    let metadata = tokio::fs::metadata(path).await.map_err(read_error)?;
    let stamp = FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    };
    if document.is_some() && seen.is_some_and(|last| last.proves_unchanged(stamp)) {
        return Ok(Refreshed::Unchanged);
    }
    let origin = path.display().to_string();
    if usize::try_from(stamp.len).map_or(true, |len| len > MAX_DOCUMENT_BYTES) {
        return Err(SourceError::TooLarge { origin });
    }

    let read_at = SystemTime::now();
    let body = tokio::fs::read(path).await.map_err(read_error)?;
    if body.len() > MAX_DOCUMENT_BYTES {
        return Err(SourceError::TooLarge { origin });
    }
    let mut digest = seen.map(|last| last.digest);
    let refreshed = install(&body, &origin, &mut digest, document)?;
    if let Some(digest) = digest {
        *seen = Some(FileSeen {
            stamp,
            digest,
            read_at,
        });
    }
    Ok(refreshed)
}

/// Parses `body` unless its digest equals the last one, and stores the
/// document and digest on success.
fn install(
    body: &[u8],
    origin: &str,
    digest: &mut Option<[u8; 32]>,
    document: &mut Option<RevocationDocument>,
) -> Result<Refreshed, SourceError> {
    let new_digest: [u8; 32] = Sha256::digest(body).into();
    if document.is_some() && *digest == Some(new_digest) {
        return Ok(Refreshed::Unchanged);
    }

    let parsed = RevocationDocument::parse(body).map_err(|source| SourceError::Document {
        origin: origin.to_owned(),
        source,
    })?;
    *digest = Some(new_digest);
    *document = Some(parsed);
    Ok(Refreshed::Changed)
}

/// Builds the HTTP client: the configured timeout for the whole exchange,
/// and redirects that stay on HTTPS once HTTPS was used.
fn client(timeout: Duration) -> Result<reqwest::Client, SourceError> {
    crate::http_client::build(timeout, MAX_REDIRECTS).map_err(|error| SourceError::Client {
        message: error.to_string(),
    })
}

/// Fetches the body at `url`, at most [`MAX_DOCUMENT_BYTES`] of it.
async fn fetch(client: &reqwest::Client, url: &str, origin: &str) -> Result<Vec<u8>, SourceError> {
    let request_error = |source| SourceError::Request {
        url: origin.to_owned(),
        source,
    };
    let mut response = client
        .get(url)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(request_error)?;

    let status = response.status();
    if !status.is_success() {
        return Err(SourceError::Status {
            url: origin.to_owned(),
            status: status.as_u16(),
        });
    }
    let too_large = || SourceError::TooLarge {
        origin: origin.to_owned(),
    };
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared_len.is_some_and(|len| len > MAX_DOCUMENT_BYTES) {
        return Err(too_large());
    }

    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(request_error)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::test_server::JwksServer;

    const DOCUMENT: &[u8] = br#"{"jtis": [{"jti": "a", "exp": 4000000000}]}"#;
    const OTHER: &[u8] = br#"{"jtis": [{"jti": "b", "exp": 4000000000}]}"#;

    fn jtis(source: &Source) -> Vec<String> {
        source
            .document()
            .expect("a document")
            .jtis
            .iter()
            .map(|entry| entry.jti.clone())
            .collect()
    }

    #[tokio::test]
    async fn file_read_and_change_detected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.json");
        std::fs::write(&path, DOCUMENT).expect("write");
        let mut source = Source::file(&path);

        let first = source.refresh().await.expect("first read");
        let again = source.refresh().await.expect("second read");
        std::fs::write(&path, OTHER).expect("rewrite");
        let changed = source.refresh().await.expect("read after change");

        assert_eq!(first, Refreshed::Changed);
        assert_eq!(again, Refreshed::Unchanged);
        assert_eq!(changed, Refreshed::Changed);
        assert_eq!(jtis(&source), ["b"]);
    }

    #[tokio::test]
    async fn file_rewritten_with_same_content_is_unchanged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.json");
        std::fs::write(&path, DOCUMENT).expect("write");
        let mut source = Source::file(&path);
        source.refresh().await.expect("first read");

        std::fs::write(&path, b"").expect("truncate");
        std::fs::write(&path, DOCUMENT).expect("rewrite");
        let refreshed = source.refresh().await.expect("read");

        assert_eq!(refreshed, Refreshed::Unchanged);
    }

    #[tokio::test]
    async fn bad_file_keeps_last_good_document() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.json");
        std::fs::write(&path, DOCUMENT).expect("write");
        let mut source = Source::file(&path);
        source.refresh().await.expect("first read");

        std::fs::write(&path, b"{\"jtis\": [").expect("write garbage");
        let garbage = source.refresh().await;
        std::fs::remove_file(&path).expect("remove");
        let missing = source.refresh().await;

        assert!(
            matches!(garbage, Err(SourceError::Document { .. })),
            "{garbage:?}"
        );
        assert!(
            matches!(missing, Err(SourceError::Read { .. })),
            "{missing:?}"
        );
        assert_eq!(jtis(&source), ["a"]);
    }

    #[tokio::test]
    async fn missing_file_at_start_is_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut source = Source::file(&dir.path().join("absent.json"));

        let outcome = source.refresh().await;

        assert!(
            matches!(outcome, Err(SourceError::Read { .. })),
            "{outcome:?}"
        );
        assert!(source.document().is_none());
    }

    #[tokio::test]
    async fn url_fetched_and_failures_keep_last_good() {
        let server = JwksServer::start(200, DOCUMENT).await;
        let mut source = Source::url(&server.uri(), Duration::from_secs(5));

        let first = source.refresh().await.expect("first fetch");
        let again = source.refresh().await.expect("second fetch");
        server.set_reply(503, b"unavailable");
        let unavailable = source.refresh().await;
        server.set_reply(200, b"<html>");
        let garbage = source.refresh().await;
        server.set_reply(200, &vec![b' '; MAX_DOCUMENT_BYTES + 1]);
        let oversized = source.refresh().await;

        assert_eq!(first, Refreshed::Changed);
        assert_eq!(again, Refreshed::Unchanged);
        assert!(
            matches!(unavailable, Err(SourceError::Status { status: 503, .. })),
            "{unavailable:?}"
        );
        assert!(
            matches!(garbage, Err(SourceError::Document { .. })),
            "{garbage:?}"
        );
        assert!(
            matches!(oversized, Err(SourceError::TooLarge { .. })),
            "{oversized:?}"
        );
        assert_eq!(jtis(&source), ["a"]);
        assert_eq!(server.hits(), 5);
    }

    #[tokio::test]
    async fn unreachable_url_is_request_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/revoked.json",
            listener.local_addr().expect("address")
        );
        drop(listener);
        let mut source = Source::url(&url, Duration::from_secs(5));

        let outcome = source.refresh().await;

        assert!(
            matches!(outcome, Err(SourceError::Request { .. })),
            "{outcome:?}"
        );
        assert!(source.document().is_none());
    }
}
