//! Responses the proxy sends itself, without contacting the service.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::decision::Reason;

/// Body of a response to the caller: the service's streamed body, or a short
/// body the proxy wrote.
pub(super) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Realm of every challenge. RFC 6750 §3 lets the server choose it, and one
/// name for the whole agent shows callers which layer rejected them.
pub const REALM: &str = "tokengate";

/// Builds the response for a request denied for `reason`: its status, the
/// RFC 6750 challenge on 401 and 403, and a JSON body naming the reason.
/// It reveals nothing about keys, claims or rules beyond the reason.
pub(super) fn deny(reason: Reason) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::FORBIDDEN);
    let error = error_code(reason, status);
    let body = serde_json::json!({ "error": error, "reason": reason.as_str() }).to_string();

    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(challenge) = challenge(reason, status) {
        let value =
            HeaderValue::from_str(&challenge).expect("reason descriptions are visible ASCII");
        headers.insert(header::WWW_AUTHENTICATE, value);
    }

    response
}

/// Builds the `WWW-Authenticate` value for a 401 or 403.
fn challenge(reason: Reason, status: StatusCode) -> Option<String> {
    // RFC 6750 §3.1: a request without any token gets a challenge with no
    // error code.
    if reason == Reason::MissingToken {
        return Some(format!(r#"Bearer realm="{REALM}""#));
    }

    let code = match status {
        StatusCode::UNAUTHORIZED => "invalid_token",
        StatusCode::FORBIDDEN => "insufficient_scope",
        _ => return None,
    };
    Some(format!(
        r#"Bearer realm="{REALM}", error="{code}", error_description="{}""#,
        reason.description()
    ))
}

/// Returns the body's `error`: the RFC 6750 error code where one applies,
/// else a name for the status.
fn error_code(reason: Reason, status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED if reason == Reason::MissingToken => "unauthorized",
        StatusCode::UNAUTHORIZED => "invalid_token",
        StatusCode::FORBIDDEN => "insufficient_scope",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::BAD_GATEWAY => "bad_gateway",
        _ => "denied",
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_json(response: Response<ProxyBody>) -> serde_json::Value {
        let Either::Right(body) = response.into_body() else {
            panic!("expected the proxy's own body")
        };
        let bytes = body.collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn missing_token_challenge_has_no_error() {
        let response = deny(Reason::MissingToken);

        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer realm="tokengate""#
        );
        let json = body_json(response).await;
        assert_eq!(json["reason"], "missing_token");
    }

    #[tokio::test]
    async fn invalid_token_challenge_names_reason() {
        let response = deny(Reason::Expired);

        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer realm="tokengate", error="invalid_token", error_description="the token has expired""#
        );
        let json = body_json(response).await;
        assert_eq!(json["error"], "invalid_token");
        assert_eq!(json["reason"], "expired");
    }

    #[tokio::test]
    async fn forbidden_is_insufficient_scope() {
        let response = deny(Reason::MissingRole);

        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let challenge = response.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            challenge.starts_with(r#"Bearer realm="tokengate", error="insufficient_scope""#),
            "{challenge}"
        );
        let json = body_json(response).await;
        assert_eq!(json["error"], "insufficient_scope");
    }

    #[tokio::test]
    async fn bad_gateway_has_no_challenge() {
        let response = deny(Reason::UpstreamUnavailable);

        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(!response.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn every_description_fits_a_header() {
        for reason in Reason::ALL {
            assert!(
                HeaderValue::from_str(reason.description()).is_ok(),
                "{reason:?}"
            );
            assert!(!reason.description().contains('"'), "{reason:?}");
        }
    }
}
