//! Header rewriting between the caller's connection and the service's.
//!
//! Hop-by-hop fields describe one connection, so a proxy drops them instead
//! of forwarding them (RFC 9110 §7.6.1); hyper frames each side's body
//! itself. The proxy adds `X-Forwarded-For` with the caller's address.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

/// Fields that RFC 9110 §7.6.1 names as connection-specific, besides the
/// ones a `Connection` field lists. `Proxy-Connection` is a non-standard
/// field that old clients still send.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// De-facto standard field for the caller's address, read by most web
/// frameworks. `Forwarded` (RFC 7239) is rarer in services.
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Prepares a caller's request for the service: drops hop-by-hop fields,
/// keeping the token headers in `keep`, sends the origin form of the target
/// over HTTP/1.1 and appends the caller to `X-Forwarded-For`.
pub(super) fn prepare_request<B>(request: &mut Request<B>, client: IpAddr, keep: &[String]) {
    remove_hop_by_hop(request.headers_mut(), keep);
    append_forwarded_for(request.headers_mut(), client);

    // An absolute-form target (a request addressed to a proxy) becomes the
    // origin form a server expects; `Host` already names the authority.
    if request.uri().scheme().is_some() || request.uri().authority().is_some() {
        if let Some(path_and_query) = request.uri().path_and_query().cloned() {
            *request.uri_mut() = Uri::from(path_and_query);
        }
    }
    *request.version_mut() = Version::HTTP_11;
}

/// Drops hop-by-hop fields from the service's response.
pub(super) fn prepare_response(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers, &[]);
}

/// Removes the fixed hop-by-hop fields and those that `Connection` lists,
/// except the names in `keep`.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep: &[String]) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| !keep.iter().any(|kept| kept == name.as_str()))
        .collect();

    // RFC 9112 §6.3: a chunked message's `Content-Length` is not its
    // length, so it goes with `Transfer-Encoding` and hyper frames the body
    // from what it actually carries.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }

    for name in HOP_BY_HOP.iter().chain(&listed) {
        headers.remove(name);
    }
}

/// Appends `client` to the last `X-Forwarded-For` value, so the field stays
/// one comma-separated list however many hops set it.
fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let mut list = earlier.join(", ");
    if !list.is_empty() {
        list.push_str(", ");
    }
    list.push_str(&client.to_string());

    let value = HeaderValue::from_str(&list)
        .expect("addresses and visible ASCII form a valid header value");
    headers.insert(X_FORWARDED_FOR, value);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get("/orders?id=7");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn removes_fixed_hop_by_hop_fields() {
        let mut request = request(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("accept", "application/json"),
        ]);

        prepare_request(&mut request, IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);

        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ] {
            assert!(!request.headers().contains_key(name), "{name} kept");
        }
        assert_eq!(request.headers()["accept"], "application/json");
    }

    #[test]
    fn removes_fields_listed_in_connection() {
        let mut request = request(&[
            ("connection", "close, x-trace"),
            ("x-trace", "1"),
            ("x-other", "2"),
        ]);

        prepare_request(&mut request, IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);

        assert!(!request.headers().contains_key("x-trace"));
        assert_eq!(request.headers()["x-other"], "2");
    }

    #[test]
    fn keeps_token_header_listed_in_connection() {
        let mut request = request(&[
            ("connection", "Authorization"),
            ("authorization", "Bearer abc"),
        ]);

        prepare_request(
            &mut request,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &["authorization".to_owned()],
        );

        assert_eq!(request.headers()["authorization"], "Bearer abc");
    }

    #[test]
    fn chunked_request_loses_content_length() {
        let mut request = request(&[("transfer-encoding", "chunked"), ("content-length", "10")]);

        prepare_request(&mut request, IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);

        assert!(!request.headers().contains_key("transfer-encoding"));
        assert!(!request.headers().contains_key("content-length"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut first = request(&[]);
        let mut second = request(&[
            ("x-forwarded-for", "198.18.0.9"),
            ("x-forwarded-for", "198.18.0.10"),
        ]);

        prepare_request(&mut first, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), &[]);
        prepare_request(&mut second, IpAddr::V6(Ipv6Addr::LOCALHOST), &[]);

        assert_eq!(first.headers()["x-forwarded-for"], "198.18.0.1");
        assert_eq!(
            second.headers().get_all("x-forwarded-for").iter().count(),
            1
        );
        assert_eq!(
            second.headers()["x-forwarded-for"],
            "198.18.0.9, 198.18.0.10, ::1"
        );
    }

    #[test]
    fn absolute_target_becomes_origin_form() {
        let mut request = Request::get("http://orders.test:8080/orders?id=7")
            .body(())
            .unwrap();

        prepare_request(&mut request, IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);

        assert_eq!(request.uri().to_string(), "/orders?id=7");
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn response_loses_hop_by_hop_fields() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));

        prepare_response(&mut headers);

        assert_eq!(headers.len(), 1);
        assert_eq!(headers["content-type"], "text/plain");
    }
}
