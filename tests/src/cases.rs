//! Request cases shared by the demo and the e2e tests, and the checks that
//! compare what the caller, the audit log and the service saw.
//!
//! Each attempt uses its own path and request id, so its audit line and its
//! echo log entry (or their absence) can be found again.

mod logs;
mod response;

use std::net::{IpAddr, SocketAddr};

pub use logs::{check_audit, check_echo_log, failure_report, find_token_leaks};
use response::{check_response, describe_service_view};

use crate::echo::REQUEST_ID_HEADER;
use crate::http::{Connection, Request, CONNECT_TIMEOUT};
use crate::ids::unique_id;
use crate::netns::Caller;
use crate::testbed::{AUDIENCE, ORDERS_ROLE, REPORTS_SCOPE, TOKEN_COOKIE};
use crate::tokens::{self, unix_now, Claims, Key};

/// Age of the expired token's `exp`, in seconds: far beyond any clock skew
/// leeway an agent may allow.
const EXPIRED_AGO_SECONDS: u64 = 3600;

/// Age of a token's `exp` that the agent's default 60 s clock skew leeway
/// still accepts.
const EXPIRED_WITHIN_LEEWAY_SECONDS: u64 = 20;

/// Size of the body sent with a request that must be rejected, so the agent
/// has unread bytes to handle.
const REJECTED_BODY_BYTES: usize = 64 * 1024;

/// Subject of every test token.
pub const SUBJECT: &str = "alice@example.test";

/// The token a case sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    None,
    /// Valid, with the `/orders` role, signed by the given key.
    Valid(Key),
    /// Valid and with the role, sent in the cookie instead of the header.
    ValidInCookie,
    /// The same valid token in the header and in the cookie.
    HeaderAndCookie,
    Expired,
    UnknownKey,
    /// Valid, but with `orders.write` in place of the required role.
    LacksRole,
    /// Valid with the required scope for `/reports`.
    WithScope,
    WrongAudience,
    UnknownIssuer,
    NotYetValid,
    AlgNone,
    Hs256WithPublicKey,
    TamperedSignature,
    NotAJwt,
    /// Valid, with the auth scheme written `bearer`: RFC 9110 §11.1 makes
    /// scheme names case-insensitive.
    LowercaseScheme,
    /// Two `Authorization` headers with the same valid token.
    TwoAuthorizationHeaders,
    /// Valid, with `aud` an array that contains the audience among others.
    AudienceList,
    /// Expired by less than the agent's default clock skew leeway.
    ExpiredWithinLeeway,
}

/// One request and its expected outcome.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub method: &'static str,
    /// Path prefix; the attempt appends a unique segment.
    pub path_base: &'static str,
    pub token: TokenKind,
    /// Body size; 0 sends no body.
    pub body_bytes: usize,
    pub expected_status: u16,
    /// Expected `reason` in the audit line.
    pub expected_reason: &'static str,
}

impl Case {
    const fn new(
        name: &'static str,
        method: &'static str,
        path_base: &'static str,
        token: TokenKind,
        expected_status: u16,
        expected_reason: &'static str,
    ) -> Self {
        Self {
            name,
            method,
            path_base,
            token,
            body_bytes: 0,
            expected_status,
            expected_reason,
        }
    }

    const fn with_body(mut self, bytes: usize) -> Self {
        self.body_bytes = bytes;
        self
    }

    pub fn allowed(&self) -> bool {
        self.expected_status == 200
    }
}

/// Returns the cases the demo shows.
pub fn demo_cases() -> Vec<Case> {
    vec![
        Case::new(
            "no token",
            "GET",
            "/orders",
            TokenKind::None,
            401,
            "missing_token",
        ),
        Case::new(
            "expired token",
            "GET",
            "/orders",
            TokenKind::Expired,
            401,
            "expired",
        ),
        Case::new(
            "unknown signing key",
            "GET",
            "/orders",
            TokenKind::UnknownKey,
            401,
            "unknown_key",
        ),
        Case::new(
            "valid token lacking the role",
            "GET",
            "/orders",
            TokenKind::LacksRole,
            403,
            "missing_role",
        ),
        Case::new(
            "valid RS256 token",
            "GET",
            "/orders",
            TokenKind::Valid(Key::Rsa1),
            200,
            "allowed",
        ),
        Case::new(
            "valid ES256 token",
            "GET",
            "/orders",
            TokenKind::Valid(Key::Ec1),
            200,
            "allowed",
        ),
    ]
}

/// Returns further cases the e2e tests run besides [`demo_cases`].
#[expect(clippy::too_many_lines, reason = "a table with one entry per case")]
pub fn extra_cases() -> Vec<Case> {
    vec![
        Case::new(
            "valid EdDSA token",
            "GET",
            "/orders",
            TokenKind::Valid(Key::Ed1),
            200,
            "allowed",
        ),
        Case::new(
            "valid token with a body",
            "POST",
            "/orders",
            TokenKind::Valid(Key::Rsa1),
            200,
            "allowed",
        )
        .with_body(4096),
        Case::new(
            "token in the cookie",
            "GET",
            "/orders",
            TokenKind::ValidInCookie,
            200,
            "allowed",
        ),
        Case::new(
            "token in header and cookie",
            "GET",
            "/orders",
            TokenKind::HeaderAndCookie,
            401,
            "multiple_tokens",
        ),
        Case::new(
            "no token with a body",
            "POST",
            "/orders",
            TokenKind::None,
            401,
            "missing_token",
        )
        .with_body(REJECTED_BODY_BYTES),
        Case::new(
            "wrong audience",
            "GET",
            "/orders",
            TokenKind::WrongAudience,
            401,
            "audience_mismatch",
        ),
        Case::new(
            "unknown issuer",
            "GET",
            "/orders",
            TokenKind::UnknownIssuer,
            401,
            "unknown_issuer",
        ),
        Case::new(
            "not valid yet",
            "GET",
            "/orders",
            TokenKind::NotYetValid,
            401,
            "not_yet_valid",
        ),
        Case::new(
            "alg none",
            "GET",
            "/orders",
            TokenKind::AlgNone,
            401,
            "algorithm_not_allowed",
        ),
        Case::new(
            "HS256 keyed with the JWKS",
            "GET",
            "/orders",
            TokenKind::Hs256WithPublicKey,
            401,
            "algorithm_not_allowed",
        ),
        Case::new(
            "tampered signature",
            "GET",
            "/orders",
            TokenKind::TamperedSignature,
            401,
            "invalid_signature",
        ),
        Case::new(
            "not a JWT",
            "GET",
            "/orders",
            TokenKind::NotAJwt,
            401,
            "malformed_token",
        ),
        Case::new(
            "path without a rule",
            "GET",
            "/admin",
            TokenKind::Valid(Key::Rsa1),
            403,
            "no_rule_matched",
        ),
        Case::new(
            "path prefix without a boundary",
            "GET",
            "/ordersX",
            TokenKind::Valid(Key::Rsa1),
            403,
            "no_rule_matched",
        ),
        Case::new(
            "lower-case bearer scheme",
            "GET",
            "/orders",
            TokenKind::LowercaseScheme,
            200,
            "allowed",
        ),
        Case::new(
            "two Authorization headers",
            "GET",
            "/orders",
            TokenKind::TwoAuthorizationHeaders,
            401,
            "multiple_tokens",
        ),
        Case::new(
            "audience in a list",
            "GET",
            "/orders",
            TokenKind::AudienceList,
            200,
            "allowed",
        ),
        Case::new(
            "expired within the leeway",
            "GET",
            "/orders",
            TokenKind::ExpiredWithinLeeway,
            200,
            "allowed",
        ),
        Case::new(
            "method without a rule",
            "DELETE",
            "/orders",
            TokenKind::Valid(Key::Rsa1),
            403,
            "no_rule_matched",
        ),
        Case::new(
            "missing scope",
            "GET",
            "/reports",
            TokenKind::Valid(Key::Rsa1),
            403,
            "missing_scope",
        ),
        Case::new(
            "required scope",
            "GET",
            "/reports",
            TokenKind::WithScope,
            200,
            "allowed",
        ),
    ]
}

/// Claims of a valid token that passes the `/orders` rule.
pub fn valid_claims() -> Claims {
    Claims::valid(SUBJECT, AUDIENCE).with_roles(&[ORDERS_ROLE])
}

/// What a case sends: `Authorization` header values and the token in the
/// cookie.
struct Credentials {
    authorization: Vec<String>,
    cookie: Option<String>,
}

impl Credentials {
    /// Token texts in the order sent: header tokens, then the cookie token.
    fn tokens(&self) -> Vec<String> {
        let header_tokens = self.authorization.iter().map(|value| {
            value
                .split_once(' ')
                .map_or(value.as_str(), |(_, token)| token)
        });
        header_tokens
            .chain(self.cookie.as_deref())
            .map(str::to_owned)
            .collect()
    }
}

fn credentials(kind: TokenKind) -> Credentials {
    let now = unix_now();
    let header = |token: String| Credentials {
        authorization: vec![format!("Bearer {token}")],
        cookie: None,
    };
    match kind {
        TokenKind::None => Credentials {
            authorization: Vec::new(),
            cookie: None,
        },
        TokenKind::Valid(key) => header(tokens::mint(key, &valid_claims())),
        TokenKind::ValidInCookie => Credentials {
            authorization: Vec::new(),
            cookie: Some(tokens::mint(Key::Rsa1, &valid_claims())),
        },
        TokenKind::HeaderAndCookie => {
            let token = tokens::mint(Key::Rsa1, &valid_claims());
            Credentials {
                authorization: vec![format!("Bearer {token}")],
                cookie: Some(token),
            }
        }
        TokenKind::LowercaseScheme => Credentials {
            authorization: vec![format!(
                "bearer {}",
                tokens::mint(Key::Ec1, &valid_claims())
            )],
            cookie: None,
        },
        TokenKind::TwoAuthorizationHeaders => {
            let value = format!("Bearer {}", tokens::mint(Key::Rsa1, &valid_claims()));
            Credentials {
                authorization: vec![value.clone(), value],
                cookie: None,
            }
        }
        TokenKind::AudienceList => {
            let mut claims = valid_claims();
            claims.aud = Some(serde_json::json!(["billing", AUDIENCE]));
            header(tokens::mint(Key::Ed1, &claims))
        }
        TokenKind::ExpiredWithinLeeway => {
            let mut claims = valid_claims();
            claims.exp = Some(now - EXPIRED_WITHIN_LEEWAY_SECONDS);
            claims.iat = Some(now - EXPIRED_AGO_SECONDS);
            claims.nbf = claims.iat;
            header(tokens::mint(Key::Rsa1, &claims))
        }
        TokenKind::Expired => {
            let mut claims = valid_claims();
            claims.exp = Some(now - EXPIRED_AGO_SECONDS);
            claims.iat = Some(now - 2 * EXPIRED_AGO_SECONDS);
            claims.nbf = claims.iat;
            header(tokens::mint(Key::Rsa1, &claims))
        }
        TokenKind::UnknownKey => header(tokens::mint(Key::RsaUnknown, &valid_claims())),
        TokenKind::LacksRole => header(tokens::mint(
            Key::Rsa1,
            &Claims::valid(SUBJECT, AUDIENCE).with_roles(&["orders.write"]),
        )),
        TokenKind::WithScope => {
            let claims =
                Claims::valid(SUBJECT, AUDIENCE).with_scope(&format!("profile {REPORTS_SCOPE}"));
            header(tokens::mint(Key::Rsa1, &claims))
        }
        TokenKind::WrongAudience => header(tokens::mint(
            Key::Rsa1,
            &Claims::valid(SUBJECT, "billing").with_roles(&[ORDERS_ROLE]),
        )),
        TokenKind::UnknownIssuer => {
            let mut claims = valid_claims();
            claims.iss = Some("https://other-issuer.tokengate.test".to_owned());
            header(tokens::mint(Key::Rsa1, &claims))
        }
        TokenKind::NotYetValid => {
            let mut claims = valid_claims();
            claims.nbf = Some(now + EXPIRED_AGO_SECONDS);
            claims.iat = Some(now + EXPIRED_AGO_SECONDS);
            claims.exp = Some(now + 2 * EXPIRED_AGO_SECONDS);
            header(tokens::mint(Key::Rsa1, &claims))
        }
        TokenKind::AlgNone => header(tokens::mint_alg_none(&valid_claims())),
        TokenKind::Hs256WithPublicKey => {
            header(tokens::mint_hs256_with_public_key(&valid_claims()))
        }
        TokenKind::TamperedSignature => header(tokens::tamper_signature(&tokens::mint(
            Key::Rsa1,
            &valid_claims(),
        ))),
        TokenKind::NotAJwt => header("not-a-jwt".to_owned()),
    }
}

/// One case sent by one caller, and everything found out about it.
#[derive(Debug)]
pub struct Attempt {
    pub case: Case,
    pub caller: String,
    pub caller_ip: IpAddr,
    pub request_id: String,
    /// Path without the query; the request target adds a query string.
    pub path: String,
    /// Token texts the request carried.
    pub tokens: Vec<String>,
    pub status: Option<u16>,
    /// `reason` of the matching audit line, once [`check_audit`] ran.
    pub audit_reason: Option<String>,
    /// What the service saw of an allowed request, for output. The token
    /// appears only as its fingerprint.
    pub service_view: Option<String>,
    /// Every mismatch found; empty means the attempt passed.
    pub problems: Vec<String>,
}

impl Attempt {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// Formats one line for output: case, caller, expected and actual.
    pub fn summary(&self) -> String {
        let status = self
            .status
            .map_or_else(|| "none".to_owned(), |status| status.to_string());
        let reason = self.audit_reason.as_deref().unwrap_or("-");
        format!(
            "[{}] {:<10} {:<32} expected {} {:<22} actual {} {}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.caller,
            self.case.name,
            self.case.expected_status,
            self.case.expected_reason,
            status,
            reason
        )
    }
}

/// Builds the request for `case`, sends it from `caller` to `target` on a
/// new connection and checks the response.
pub fn send_case(case: &Case, caller: &Caller, target: SocketAddr) -> Attempt {
    let id = unique_id();
    let slug: String = case
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let caller_slug = caller.label().replace(' ', "-");
    let path = format!("{}/{slug}-{caller_slug}-{id}", case.path_base);
    let request_id = format!("{slug}-{caller_slug}-{id}");
    let credentials = credentials(case.token);

    let mut request = Request::new(case.method, &format!("{path}?attempt={id}"))
        .header(REQUEST_ID_HEADER, &request_id);
    for value in &credentials.authorization {
        request = request.header("Authorization", value);
    }
    if let Some(token) = &credentials.cookie {
        request = request.header("Cookie", &format!("theme=dark; {TOKEN_COOKIE}={token}"));
    }
    let body = crate::pattern_bytes(case.body_bytes);
    if case.body_bytes > 0 {
        request = request.body(body.clone());
    }

    let mut attempt = Attempt {
        case: case.clone(),
        caller: caller.label(),
        caller_ip: IpAddr::V4(caller.source_ip()),
        request_id,
        path,
        tokens: credentials.tokens(),
        status: None,
        audit_reason: None,
        service_view: None,
        problems: Vec::new(),
    };

    let response = caller
        .connect(target, CONNECT_TIMEOUT)
        .map_err(anyhow::Error::from)
        .and_then(|stream| Connection::new(stream).map_err(anyhow::Error::from))
        .and_then(|mut connection| connection.send(&request));
    match response {
        Ok(response) => {
            attempt.status = Some(response.status);
            attempt.problems =
                check_response(case, &response, &credentials, &attempt.request_id, &body);
            attempt.service_view = describe_service_view(&response);
        }
        Err(error) => attempt.problems.push(format!("no response: {error:#}")),
    }
    attempt
}
