//! Rewriting an allowed request for the service: the token as `forward`
//! sets, the `claim_to_headers` headers, and the path that the rules matched.

use http::header::{HeaderMap, AUTHORIZATION};
use http::{Request, Uri};

use super::authorize::Authorization;
use super::WorkloadProxy;
use crate::config::ForwardMode;
use crate::decision::Reason;

impl WorkloadProxy {
    /// Rewrites an allowed request for the service.
    ///
    /// 1. Removes every incoming header that `claim_to_headers` sets, on
    ///    every request, so a caller cannot forge an identity header even
    ///    on a public or anonymous route.
    /// 2. For `Allowed`, applies the forward mode and sets the identity
    ///    headers. For `Public` and `Anonymous`, removes every token, so the
    ///    service never receives a token that the agent did not verify.
    /// 3. Replaces the path with the normalised one the rules matched, so
    ///    the service cannot read it differently; the query stays.
    pub(super) fn rewrite_for_service<B>(
        &self,
        request: &mut Request<B>,
        authorization: &Authorization,
    ) {
        let headers = request.headers_mut();
        for (_, name) in &self.claim_headers {
            headers.remove(name);
        }
        if self.strip_unverified_bearer {
            remove_bearer_authorization(headers);
        }

        match authorization.reason {
            Reason::Allowed => {
                self.forward_token(headers, authorization);
                for (name, value) in &authorization.identity_headers {
                    headers.insert(name.clone(), value.clone());
                }
            }
            Reason::Public | Reason::Anonymous => self.sources.strip(headers),
            _ => {}
        }

        if let Some(normalized) = &authorization.normalized_path {
            replace_path(request, normalized);
        }
    }

    fn forward_token(&self, headers: &mut HeaderMap, authorization: &Authorization) {
        match self.forward {
            ForwardMode::Original => {}
            ForwardMode::Strip => self.sources.strip(headers),
            ForwardMode::CookieToAuthorization => {
                if let Some(bearer) = &authorization.moved_bearer {
                    self.sources.strip_cookies(headers);
                    headers.insert(AUTHORIZATION, bearer.clone());
                }
            }
        }
    }
}

/// Removes every `Authorization` field that carries a `Bearer` credential
/// (scheme matched case-insensitively, RFC 9110 §11.1). Other schemes, such
/// as `Basic` for the service's own login, stay.
fn remove_bearer_authorization(headers: &mut HeaderMap) {
    let kept: Vec<_> = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter(|value| !is_bearer(value.as_bytes()))
        .cloned()
        .collect();
    headers.remove(AUTHORIZATION);
    for value in kept {
        headers.append(AUTHORIZATION, value);
    }
}

fn is_bearer(value: &[u8]) -> bool {
    let scheme_end = value
        .iter()
        .position(|byte| *byte == b' ' || *byte == b'\t')
        .unwrap_or(value.len());
    value[..scheme_end].eq_ignore_ascii_case(b"bearer")
}

/// Sets the request's path to `path`, keeping its query, when they differ.
fn replace_path<B>(request: &mut Request<B>, path: &str) {
    if request.uri().path() == path {
        return;
    }
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    match target.parse::<Uri>() {
        Ok(uri) => *request.uri_mut() = uri,
        // A normalised path holds only characters a request target allows,
        // so this is not expected; the raw path is then forwarded.
        Err(error) => {
            tracing::debug!(%error, "normalised path is not a valid target, raw path kept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_authorization_removed_others_kept() {
        let mut headers = HeaderMap::new();
        headers.append(AUTHORIZATION, "Bearer forged.token.value".parse().unwrap());
        headers.append(AUTHORIZATION, "bEaReR\tother".parse().unwrap());
        headers.append(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());

        remove_bearer_authorization(&mut headers);

        let left: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(left, ["Basic dXNlcjpwYXNz"]);
    }

    #[test]
    fn bearer_scheme_detection() {
        assert!(is_bearer(b"Bearer x"));
        assert!(is_bearer(b"bearer"));
        assert!(!is_bearer(b"Bearerx y"));
        assert!(!is_bearer(b"Basic x"));
    }

    #[test]
    fn replace_path_keeps_query() {
        let cases = [
            ("/public/../admin?x=1&y=%2F", "/admin", "/admin?x=1&y=%2F"),
            ("//orders/./7", "/orders/7", "/orders/7"),
            ("/orders/7", "/orders/7", "/orders/7"),
            ("http://host.test//a?q", "/a", "/a?q"),
        ];

        for (raw, normalised, expected) in cases {
            let mut request = Request::get(raw).body(()).expect("request");

            replace_path(&mut request, normalised);

            assert_eq!(request.uri().to_string(), expected, "{raw}");
        }
    }
}
