//! Table-driven conformance suite of the policy layer: token extraction,
//! routing and rule evaluation, each case a request, the verification
//! result of its token, and the expected reason and rule.
//!
//! Token verification itself is covered by the verification suites. Here a
//! case states what verification returned, so that every policy branch is
//! reached with exact claims.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use serde_json::{json, Value};

use tokengate::config::{self, WorkloadConfig};
use tokengate::decision::Reason;
use tokengate::extract::TokenSources;
use tokengate::policy::{Policy, PolicyOutcome, RequestFacts, TokenState};
use tokengate::verify::VerifiedToken;

/// A token the extractor accepts; its claims come from the case.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";

const ISSUER_YAML: &str = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9/jwks
    algorithms: [RS256]
";

/// Rules of the main workload; the comments give each rule's index.
const SHOP_WORKLOAD: &str = r#"
workloads:
  - name: shop
    netns: /var/run/netns/shop
    ports: [8080]
    from_headers:
      - name: Authorization
        value_prefix: "Bearer "
    from_cookies: [session]
    cors_preflight: pass
    rules:
      # 0
      - path: /healthz
        public: true
      # 1
      - path_template: /users/{user}/orders/**
        requires:
          segment_equals_claim: {segment: user, claim: sub}
      # 2
      - path_template: /tenants/{tenant}/*
        methods: [GET]
        requires:
          all:
            - segment_equals_claim: {segment: tenant, claim: org.tenant}
            - any:
                - roles_any: [viewer, admin]
                - scopes_all: [tenant.read]
      # 3
      - path_prefix: /admin
        roles: [admin]
      # 4
      - path: /feed
        allow_missing: true
      # 5
      - path_prefix: /catalog
        allow_missing_or_failed: true
      # 6
      - path_prefix: /flags
        requires:
          any:
            - claim: {path: beta, equals: true}
            - claim: {path: org.tier, one_of: [2, 3]}
            - claim: {path: groups, contains: testers}
      # 7
      - path_template: /reports/*/summary
        methods: [GET, HEAD]
        scopes: [reports.read]
      # 8
      - path: /docs
        methods: [GET]
        requires:
          all:
            - roles_all: [reader, writer]
            - scopes_any: [docs.read, docs.all]
"#;

/// What verification returned for the case's token.
#[derive(Clone)]
enum Verified {
    /// The request carries no token, or verification is not reached.
    NotReached,
    /// Verification passed with these claims.
    Claims(Value),
    /// Verification failed with this reason.
    Failed(Reason),
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    verified: Verified,
    reason: Reason,
    rule: Option<usize>,
}

fn bearer() -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {TOKEN}"))]
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &'static str,
    verified: Verified,
    reason: Reason,
    rule: Option<usize>,
) -> Case {
    let headers = match verified {
        Verified::NotReached => Vec::new(),
        _ => bearer(),
    };
    Case {
        name,
        method,
        path,
        headers,
        verified,
        reason,
        rule,
    }
}

fn claims(value: Value) -> Verified {
    Verified::Claims(value)
}

fn workload(yaml: &str) -> WorkloadConfig {
    let text = format!("{ISSUER_YAML}{yaml}");
    let mut parsed = config::parse(&text, "conformance.yaml")
        .unwrap_or_else(|error| panic!("the case config is invalid: {error}"));
    parsed.workloads.remove(0)
}

fn header_map(pairs: &[(&str, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

fn verified_token(claims: &Value) -> VerifiedToken {
    let Value::Object(map) = claims.clone() else {
        panic!("claims must be an object")
    };
    VerifiedToken {
        issuer: "https://idp.example".to_owned(),
        subject: map.get("sub").and_then(Value::as_str).map(str::to_owned),
        kid: Some("rsa-1".to_owned()),
        algorithm: "RS256".to_owned(),
        claims: map,
        roles_claim: "roles".to_owned(),
    }
}

/// Decides `case` the way the proxy does: route, then extract and verify
/// only when the route needs a token, then decide.
fn decide(sources: &TokenSources, policy: &Policy, case: &Case) -> PolicyOutcome {
    let headers = header_map(&case.headers);
    let facts = RequestFacts::new(case.method, case.path, &headers);
    let routed = policy.route(&facts);
    if !routed.needs_token() {
        return policy.decide(&routed, TokenState::Missing);
    }

    let token;
    let state = match (sources.locate(&headers), &case.verified) {
        (Ok(None), _) => TokenState::Missing,
        (Err(reason), _) => TokenState::Failed(reason),
        (Ok(Some(_)), Verified::Claims(claims)) => {
            token = verified_token(claims);
            TokenState::Valid(&token)
        }
        (Ok(Some(_)), Verified::Failed(reason)) => TokenState::Failed(*reason),
        (Ok(Some(_)), Verified::NotReached) => {
            panic!(
                "{}: the request carries a token but the case gives no verification result",
                case.name
            )
        }
    };
    policy.decide(&routed, state)
}

fn run(workload_yaml: &str, cases: &[Case]) {
    let workload = workload(workload_yaml);
    let sources = TokenSources::new(&workload);
    let policy = Policy::for_workload(&workload);

    let mut failures = Vec::new();
    for case in cases {
        let outcome = decide(&sources, &policy, case);
        let expected = PolicyOutcome {
            rule: case.rule,
            reason: case.reason,
        };
        if outcome != expected {
            failures.push(format!(
                "{}: {} {} -> {outcome:?}, expected {expected:?}",
                case.name, case.method, case.path
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table with a case per behaviour")]
fn shop_rules() {
    use Reason::{
        Allowed, Anonymous, ClaimMismatch, Expired, InvalidSignature, MalformedToken, MissingRole,
        MissingScope, MissingToken, MultipleTokens, NoRuleMatched, Public,
    };
    use Verified::{Failed, NotReached};

    let alice = || claims(json!({"sub": "alice"}));
    let mut cases = vec![
        // Public rule: no token needed, a bad token is ignored.
        case(
            "public without token",
            "GET",
            "/healthz",
            NotReached,
            Public,
            Some(0),
        ),
        case(
            "public trailing slash",
            "GET",
            "/healthz/",
            NotReached,
            Public,
            Some(0),
        ),
        case(
            "public with bad token",
            "GET",
            "/healthz",
            Failed(Expired),
            Public,
            Some(0),
        ),
        case(
            "public is exact",
            "GET",
            "/healthz/deep",
            NotReached,
            MissingToken,
            None,
        ),
        // Ownership binding.
        case(
            "owner reads own orders",
            "GET",
            "/users/alice/orders",
            alice(),
            Allowed,
            Some(1),
        ),
        case(
            "owner deep path",
            "DELETE",
            "/users/alice/orders/7/lines/2",
            alice(),
            Allowed,
            Some(1),
        ),
        case(
            "other user's orders",
            "GET",
            "/users/bob/orders/7",
            alice(),
            ClaimMismatch,
            Some(1),
        ),
        case(
            "encoded owner segment",
            "GET",
            "/users/%61lice/orders",
            alice(),
            Allowed,
            Some(1),
        ),
        case(
            "percent-decoded segment",
            "GET",
            "/users/al%40ice/orders",
            claims(json!({"sub": "al@ice"})),
            Allowed,
            Some(1),
        ),
        case(
            "case differs",
            "GET",
            "/users/Alice/orders",
            alice(),
            ClaimMismatch,
            Some(1),
        ),
        case(
            "dot segments climb to other user",
            "GET",
            "/users/alice/../bob/orders",
            alice(),
            ClaimMismatch,
            Some(1),
        ),
        case(
            "segment with parameters",
            "GET",
            "/users/alice;x/orders",
            alice(),
            ClaimMismatch,
            Some(1),
        ),
        case(
            "no sub claim",
            "GET",
            "/users/alice/orders",
            claims(json!({})),
            ClaimMismatch,
            Some(1),
        ),
        case(
            "numeric sub",
            "GET",
            "/users/42/orders",
            claims(json!({"sub": 42})),
            Allowed,
            Some(1),
        ),
        case(
            "missing token on bound route",
            "GET",
            "/users/alice/orders",
            NotReached,
            MissingToken,
            Some(1),
        ),
        // Tenant binding combined with any-of.
        case(
            "tenant viewer",
            "GET",
            "/tenants/acme/invoices",
            claims(json!({"org": {"tenant": "acme"}, "roles": ["viewer"]})),
            Allowed,
            Some(2),
        ),
        case(
            "tenant by scope",
            "GET",
            "/tenants/acme/invoices",
            claims(json!({"org": {"tenant": "acme"}, "scope": "tenant.read other"})),
            Allowed,
            Some(2),
        ),
        case(
            "other tenant",
            "GET",
            "/tenants/globex/invoices",
            claims(json!({"org": {"tenant": "acme"}, "roles": ["admin"]})),
            ClaimMismatch,
            Some(2),
        ),
        case(
            "tenant without role or scope",
            "GET",
            "/tenants/acme/invoices",
            claims(json!({"org": {"tenant": "acme"}})),
            MissingRole,
            Some(2),
        ),
        case(
            "tenant template one segment only",
            "GET",
            "/tenants/acme/invoices/7",
            claims(json!({"org": {"tenant": "acme"}, "roles": ["admin"]})),
            NoRuleMatched,
            None,
        ),
        case(
            "tenant rule method",
            "POST",
            "/tenants/acme/invoices",
            claims(json!({"org": {"tenant": "acme"}, "roles": ["admin"]})),
            NoRuleMatched,
            None,
        ),
        // Default deny and token failures without a rule.
        case(
            "no rule, no token",
            "GET",
            "/unknown",
            NotReached,
            MissingToken,
            None,
        ),
        case(
            "no rule, bad token",
            "GET",
            "/unknown",
            Failed(InvalidSignature),
            InvalidSignature,
            None,
        ),
        case(
            "no rule, valid token",
            "GET",
            "/unknown",
            alice(),
            NoRuleMatched,
            None,
        ),
        case(
            "unnormalisable path",
            "GET",
            "/admin%2fx",
            alice(),
            NoRuleMatched,
            None,
        ),
        // allow_missing.
        case(
            "feed anonymous",
            "GET",
            "/feed",
            NotReached,
            Anonymous,
            Some(4),
        ),
        case(
            "feed with valid token",
            "GET",
            "/feed",
            alice(),
            Allowed,
            Some(4),
        ),
        case(
            "feed with bad token",
            "GET",
            "/feed",
            Failed(Expired),
            Expired,
            Some(4),
        ),
        // allow_missing_or_failed.
        case(
            "catalog anonymous",
            "GET",
            "/catalog/1",
            NotReached,
            Anonymous,
            Some(5),
        ),
        case(
            "catalog bad token",
            "GET",
            "/catalog/1",
            Failed(Expired),
            Anonymous,
            Some(5),
        ),
        case(
            "catalog valid token",
            "GET",
            "/catalog/1",
            alice(),
            Allowed,
            Some(5),
        ),
        // Typed claim comparisons.
        case(
            "flag boolean",
            "GET",
            "/flags",
            claims(json!({"beta": true})),
            Allowed,
            Some(6),
        ),
        case(
            "flag string true",
            "GET",
            "/flags",
            claims(json!({"beta": "true"})),
            ClaimMismatch,
            Some(6),
        ),
        case(
            "tier number",
            "GET",
            "/flags",
            claims(json!({"org": {"tier": 3}})),
            Allowed,
            Some(6),
        ),
        case(
            "tier float",
            "GET",
            "/flags",
            claims(json!({"org": {"tier": 2.0}})),
            Allowed,
            Some(6),
        ),
        case(
            "tier string",
            "GET",
            "/flags",
            claims(json!({"org": {"tier": "3"}})),
            ClaimMismatch,
            Some(6),
        ),
        case(
            "group array",
            "GET",
            "/flags",
            claims(json!({"groups": ["dev", "testers"]})),
            Allowed,
            Some(6),
        ),
        case(
            "group absent",
            "GET",
            "/flags",
            claims(json!({"groups": ["dev"]})),
            ClaimMismatch,
            Some(6),
        ),
        // Wildcard template with a simple scope requirement.
        case(
            "report summary",
            "HEAD",
            "/reports/2024/summary",
            claims(json!({"scope": "reports.read"})),
            Allowed,
            Some(7),
        ),
        case(
            "report without scope",
            "GET",
            "/reports/2024/summary",
            alice(),
            MissingScope,
            Some(7),
        ),
        case(
            "report star is one segment",
            "GET",
            "/reports/a/b/summary",
            alice(),
            NoRuleMatched,
            None,
        ),
        // all-of roles, any-of scopes.
        case(
            "docs both roles",
            "GET",
            "/docs",
            claims(json!({"roles": ["reader", "writer"], "scp": ["docs.all"]})),
            Allowed,
            Some(8),
        ),
        case(
            "docs one role",
            "GET",
            "/docs",
            claims(json!({"roles": ["reader"], "scope": "docs.read"})),
            MissingRole,
            Some(8),
        ),
        case(
            "docs no scope",
            "GET",
            "/docs",
            claims(json!({"roles": ["reader", "writer"]})),
            MissingScope,
            Some(8),
        ),
    ];

    // Path normalisation: every spelling of /admin reaches the admin rule,
    // including ones that look like the public exact path or a template.
    for path in [
        "/admin",
        "/./admin",
        "/%61dmin",
        "//admin",
        "/public/../admin",
        "/healthz/../admin",
        "/users/alice/orders/../../../admin",
        "/admin;jsessionid=1",
        "/ADMIN/../admin/",
    ] {
        cases.push(case(
            "admin spelling",
            "GET",
            path,
            alice(),
            MissingRole,
            Some(3),
        ));
    }
    for path in ["/./healthz", "/%68ealthz", "//healthz", "/admin/../healthz"] {
        cases.push(case(
            "healthz spelling",
            "GET",
            path,
            NotReached,
            Public,
            Some(0),
        ));
    }
    for path in [
        "/users/alice/./orders",
        "//users/alice//orders/",
        "/users/alice/%6frders/1",
    ] {
        cases.push(case(
            "template spelling",
            "GET",
            path,
            alice(),
            Allowed,
            Some(1),
        ));
    }

    // CORS preflight passes without a token on any path that normalises.
    let preflight = |path: &'static str, headers: Vec<(&'static str, String)>, reason, rule| Case {
        name: "preflight",
        method: "OPTIONS",
        path,
        headers,
        verified: NotReached,
        reason,
        rule,
    };
    let origin = ("origin", "https://app.example".to_owned());
    let request_method = ("access-control-request-method", "POST".to_owned());
    cases.push(preflight(
        "/admin",
        vec![origin.clone(), request_method.clone()],
        Public,
        None,
    ));
    cases.push(preflight(
        "/admin",
        vec![origin.clone()],
        MissingToken,
        Some(3),
    ));
    cases.push(preflight(
        "/admin",
        vec![request_method.clone()],
        MissingToken,
        Some(3),
    ));
    cases.push(preflight(
        "/admin%2f",
        vec![origin, request_method],
        MissingToken,
        None,
    ));

    // Token sources: a cookie works, two tokens and bad tokens are 401.
    let with_headers = |name, headers: Vec<(&'static str, String)>, verified, reason, rule| Case {
        name,
        method: "GET",
        path: "/feed",
        headers,
        verified,
        reason,
        rule,
    };
    cases.push(with_headers(
        "cookie token",
        vec![("cookie", format!("theme=dark; session={TOKEN}"))],
        alice(),
        Allowed,
        Some(4),
    ));
    cases.push(with_headers(
        "header and cookie",
        vec![
            ("authorization", format!("Bearer {TOKEN}")),
            ("cookie", format!("session={TOKEN}")),
        ],
        alice(),
        MultipleTokens,
        Some(4),
    ));
    cases.push(with_headers(
        "two authorization headers",
        vec![
            ("authorization", format!("Bearer {TOKEN}")),
            ("authorization", format!("bearer {TOKEN}")),
        ],
        alice(),
        MultipleTokens,
        Some(4),
    ));
    cases.push(with_headers(
        "lower-case scheme",
        vec![("authorization", format!("bEaReR {TOKEN}"))],
        alice(),
        Allowed,
        Some(4),
    ));
    cases.push(with_headers(
        "basic is no token",
        vec![("authorization", "Basic dXNlcjpwdw==".to_owned())],
        NotReached,
        Anonymous,
        Some(4),
    ));
    cases.push(with_headers(
        "malformed bearer",
        vec![("authorization", "Bearer a b".to_owned())],
        NotReached,
        MalformedToken,
        Some(4),
    ));
    cases.push(Case {
        name: "two tokens on failed-ok route",
        method: "GET",
        path: "/catalog",
        headers: vec![
            ("authorization", format!("Bearer {TOKEN}")),
            ("cookie", format!("session={TOKEN}")),
        ],
        verified: NotReached,
        reason: Anonymous,
        rule: Some(5),
    });

    run(SHOP_WORKLOAD, &cases);
}

#[test]
fn custom_header_and_rules_preflight() {
    let yaml = r#"
workloads:
  - name: api
    netns: /var/run/netns/api
    ports: [8080]
    from_headers:
      - name: X-Jwt-Assertion
        value_prefix: ""
    rules:
      - path_prefix: /
        methods: [GET, OPTIONS]
        claims:
          team: [core, "7"]
"#;
    let header = |value: &str| vec![("x-jwt-assertion", value.to_owned())];
    let cases = vec![
        Case {
            name: "custom header",
            method: "GET",
            path: "/a",
            headers: header(TOKEN),
            verified: claims(json!({"team": "core"})),
            reason: Reason::Allowed,
            rule: Some(0),
        },
        Case {
            name: "simple claims compare as text",
            method: "GET",
            path: "/a",
            headers: header(TOKEN),
            verified: claims(json!({"team": 7})),
            reason: Reason::Allowed,
            rule: Some(0),
        },
        Case {
            name: "bearer ignored when not configured",
            method: "GET",
            path: "/a",
            headers: bearer(),
            verified: Verified::NotReached,
            reason: Reason::MissingToken,
            rule: Some(0),
        },
        Case {
            name: "preflight decided by rules by default",
            method: "OPTIONS",
            path: "/a",
            headers: vec![
                ("origin", "https://app.example".to_owned()),
                ("access-control-request-method", "GET".to_owned()),
            ],
            verified: Verified::NotReached,
            reason: Reason::MissingToken,
            rule: Some(0),
        },
        Case {
            name: "claim mismatch",
            method: "GET",
            path: "/a",
            headers: header(TOKEN),
            verified: claims(json!({"team": "ops"})),
            reason: Reason::ClaimMismatch,
            rule: Some(0),
        },
    ];

    run(yaml, &cases);
}

#[test]
fn first_matching_rule_decides() {
    let yaml = r"
workloads:
  - name: api
    netns: /var/run/netns/api
    ports: [8080]
    rules:
      - path_prefix: /orders
        methods: [POST]
        roles: [writer]
      - path_template: /orders/**
      - path: /
        public: true
";
    let writer = || claims(json!({"roles": ["writer"]}));
    let reader = || claims(json!({"roles": ["reader"]}));
    let cases = vec![
        case(
            "post needs writer",
            "POST",
            "/orders/1",
            reader(),
            Reason::MissingRole,
            Some(0),
        ),
        case(
            "post as writer",
            "POST",
            "/orders/1",
            writer(),
            Reason::Allowed,
            Some(0),
        ),
        case(
            "get falls through",
            "GET",
            "/orders/1",
            reader(),
            Reason::Allowed,
            Some(1),
        ),
        case(
            "root is public",
            "GET",
            "/",
            Verified::NotReached,
            Reason::Public,
            Some(2),
        ),
        case(
            "other path denied",
            "GET",
            "/x",
            reader(),
            Reason::NoRuleMatched,
            None,
        ),
        case(
            "method case matters",
            "post",
            "/orders/1",
            reader(),
            Reason::Allowed,
            Some(1),
        ),
    ];

    run(yaml, &cases);
}
