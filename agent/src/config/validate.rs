//! The validation pass: rules that span fields and values that serde
//! accepts but the agent cannot use.
//!
//! Every check runs, so one load lists every problem in the file. Findings
//! carry a field path; `config::parse` turns it into a line number.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::path::Path;

use super::path::FieldPath;
use super::summary::redact_url;
use super::{Config, IssuerConfig, WorkloadConfig, ACCEPTED_ALGORITHMS, HMAC_ALGORITHMS};

mod egress;
mod enrollment;
mod handoff;
mod rules;

/// Maximum length of a workload name. Names appear in metric labels, audit events and
/// bpffs pin names, and 253 is the maximum length of a Kubernetes object name.
const MAX_WORKLOAD_NAME_LEN: usize = 253;

/// One problem before its line is known.
#[derive(Debug)]
pub(super) struct Finding {
    pub(super) field: FieldPath,
    pub(super) value: String,
    pub(super) message: String,
}

#[derive(Default)]
struct Checker {
    findings: Vec<Finding>,
}

impl Checker {
    fn report(&mut self, field: FieldPath, value: impl Display, message: impl Into<String>) {
        self.findings.push(Finding {
            field,
            value: value.to_string(),
            message: message.into(),
        });
    }
}

/// Checks `config` and returns every problem found, in file order.
pub(super) fn validate(config: &Config) -> Vec<Finding> {
    let mut checker = Checker::default();
    let root = FieldPath::root();

    check_audit(&mut checker, config, &root);
    check_interception(&mut checker, config, &root);
    check_issuers(&mut checker, &config.issuers, &root.key("issuers"));
    check_workloads(&mut checker, &config.workloads, &root.key("workloads"));
    enrollment::check_enrollment(
        &mut checker,
        config.enrollment.as_ref(),
        config.workloads.len(),
        &root,
    );
    egress::check_egress(&mut checker, config, &root);
    handoff::check_handoff(&mut checker, config, &root);
    check_revocation_and_cache(&mut checker, config, &root);

    checker.findings
}

fn check_audit(checker: &mut Checker, config: &Config, root: &FieldPath) {
    if let Some(file) = &config.audit.file {
        if file.as_os_str().is_empty() {
            checker.report(
                root.key("audit").key("file"),
                "\"\"",
                "empty path; set a file path, or remove the field to write audit events to standard output",
            );
        }
    }
}

/// Largest `cache.max_entries` accepted. Ten million entries of about 2 KiB
/// each would take 20 GiB, far beyond a node agent's memory, so a larger
/// value is a typo.
const MAX_CACHE_ENTRIES: usize = 10_000_000;

fn check_revocation_and_cache(checker: &mut Checker, config: &Config, root: &FieldPath) {
    let path = root.key("revocation");
    let revocation = &config.revocation;

    if let Some(file) = &revocation.file {
        if file.as_os_str().is_empty() {
            checker.report(
                path.key("file"),
                "\"\"",
                "empty path; set the path of the revocation list file, or remove the field",
            );
        }
    }
    if let Some(url) = &revocation.url {
        check_http_url(checker, url, &path.key("url"));
    }
    if revocation.refresh_seconds == 0 {
        checker.report(
            path.key("refresh_seconds"),
            0,
            "must be at least 1; it is the period of the revocation list refresh",
        );
    }
    if revocation.timeout_seconds == 0 {
        checker.report(
            path.key("timeout_seconds"),
            0,
            "must be at least 1; it bounds one request to the revocation list URL",
        );
    }

    let max_entries = config.cache.max_entries;
    if max_entries == 0 || max_entries > MAX_CACHE_ENTRIES {
        checker.report(
            root.key("cache").key("max_entries"),
            max_entries,
            format!(
                "must be between 1 and {MAX_CACHE_ENTRIES}; set cache.enabled: false to turn the cache off"
            ),
        );
    }
}

fn check_interception(checker: &mut Checker, config: &Config, root: &FieldPath) {
    let path = root.key("interception");
    let interception = &config.interception;

    if !interception.pin_path.is_absolute() {
        checker.report(
            path.key("pin_path"),
            interception.pin_path.display(),
            "must be an absolute path inside a bpffs mount, such as /sys/fs/bpf/tokengate",
        );
    }

    let v4 = interception.reserved_source_v4;
    if !v4.is_loopback() {
        checker.report(
            path.key("reserved_source_v4"),
            v4,
            "must be a loopback address (127.0.0.0/8), because only the pod itself can use one; \
             the default is 127.0.0.6",
        );
    } else if v4 == Ipv4Addr::LOCALHOST && !interception.loopback_exempt {
        checker.report(
            path.key("reserved_source_v4"),
            v4,
            "in-pod clients connect from 127.0.0.1, so with loopback_exempt: false they would \
             pass unchecked as the agent's reserved source; use another loopback address such as 127.0.0.6",
        );
    }

    let v6 = interception.reserved_source_v6;
    if !v6.is_loopback() {
        checker.report(
            path.key("reserved_source_v6"),
            v6,
            "must be the IPv6 loopback address ::1, because only the pod itself can use it",
        );
    }
}

fn check_issuers(checker: &mut Checker, issuers: &[IssuerConfig], path: &FieldPath) {
    if issuers.is_empty() {
        checker.report(
            path.clone(),
            "[]",
            "add at least one issuer; without one no token can be verified",
        );
    }

    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (index, issuer) in issuers.iter().enumerate() {
        let item = path.index(index);
        if let Some(first) = first_seen.get(issuer.issuer.as_str()) {
            checker.report(
                item.key("issuer"),
                format_args!("{:?}", issuer.issuer),
                format!(
                    "duplicate issuer, also configured at {}; merge the two entries",
                    path.index(*first)
                ),
            );
        } else {
            first_seen.insert(&issuer.issuer, index);
        }
        check_issuer(checker, issuer, &item);
    }
}

fn check_issuer(checker: &mut Checker, issuer: &IssuerConfig, path: &FieldPath) {
    if issuer.issuer.is_empty() {
        checker.report(
            path.key("issuer"),
            "\"\"",
            "set the exact `iss` value of this issuer's tokens",
        );
    } else if issuer.issuer.trim() != issuer.issuer {
        checker.report(
            path.key("issuer"),
            format_args!("{:?}", issuer.issuer),
            "`iss` is compared exactly, so leading or trailing whitespace never matches; remove it",
        );
    }

    check_key_source(checker, issuer, path);
    check_algorithms(checker, issuer, &path.key("algorithms"));

    for (index, audience) in issuer.audiences.iter().enumerate() {
        if audience.is_empty() {
            checker.report(
                path.key("audiences").index(index),
                "\"\"",
                "an empty audience matches no token; remove it, or leave the list empty to skip the audience check",
            );
        }
    }

    check_durations(checker, issuer, path);
    check_claim_requirements(checker, issuer, path);

    if !is_valid_claim_path(&issuer.roles_claim) {
        checker.report(
            path.key("roles_claim"),
            format_args!("{:?}", issuer.roles_claim),
            "must be a claim name, or a dotted path such as realm_access.roles, without empty parts",
        );
    }
}

/// Checks that exactly one key source is set (none is allowed for an
/// HMAC-only issuer) and that the chosen one is usable.
fn check_key_source(checker: &mut Checker, issuer: &IssuerConfig, path: &FieldPath) {
    let discovery = issuer.discovery || issuer.discovery_uri.is_some();
    let sources: Vec<&str> = [
        (issuer.jwks_uri.is_some(), "jwks_uri"),
        (discovery, "discovery"),
        (issuer.jwks_file.is_some(), "jwks_file"),
        (issuer.jwks.is_some(), "jwks"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();

    if sources.len() > 1 {
        checker.report(
            path.key(sources[1]),
            sources.join(" + "),
            "set exactly one key source out of jwks_uri, discovery (or discovery_uri), jwks_file and jwks",
        );
    } else if sources.is_empty() && issuer.hmac_secret_file.is_none() {
        checker.report(
            path.key("jwks_uri"),
            "(missing)",
            "set one key source: jwks_uri, discovery: true, discovery_uri, jwks_file or jwks \
             (or hmac_secret_file for an issuer that signs only with HMAC)",
        );
    }

    if let Some(uri) = &issuer.jwks_uri {
        check_http_url(checker, uri, &path.key("jwks_uri"));
    }
    if let Some(uri) = &issuer.discovery_uri {
        check_http_url(checker, uri, &path.key("discovery_uri"));
    } else if issuer.discovery {
        // OpenID Connect Discovery 1.0 §4: the document is found by
        // appending the well-known path to the issuer URL.
        check_http_url(checker, &issuer.issuer, &path.key("issuer"));
    }
    for (field, file) in [
        ("jwks_file", &issuer.jwks_file),
        ("hmac_secret_file", &issuer.hmac_secret_file),
    ] {
        if file.as_ref().is_some_and(|file| !file.is_absolute()) {
            checker.report(
                path.key(field),
                format_args!("{:?}", file.as_ref().map(|file| file.display().to_string()).unwrap_or_default()),
                "must be an absolute path, because the agent's working directory is not part of its configuration",
            );
        }
    }
    if let Some(jwks) = &issuer.jwks {
        if let Err(error) = crate::jwks::KeySet::from_inline(jwks) {
            checker.report(
                path.key("jwks"),
                "(inline JWKS)",
                format!("not a usable JWKS: {}; write a mapping with a `keys` list, or that JSON as a string", ErrorText(&error)),
            );
        }
    }
}

/// Formats an error with its sources for a finding's message.
struct ErrorText<'a>(&'a (dyn std::error::Error + 'static));

impl Display for ErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

fn check_durations(checker: &mut Checker, issuer: &IssuerConfig, path: &FieldPath) {
    let durations = [
        (
            "jwks_refresh_seconds",
            issuer.jwks_refresh_seconds,
            "keys would be fetched in a busy loop",
        ),
        (
            "jwks_min_refresh_seconds",
            issuer.jwks_min_refresh_seconds,
            "an issuer sending max-age=0 would be fetched in a busy loop",
        ),
        (
            "unknown_kid_refetch_seconds",
            issuer.unknown_kid_refetch_seconds,
            "every token with a random `kid` would cause a fetch from the issuer",
        ),
        (
            "jwks_timeout_seconds",
            issuer.jwks_timeout_seconds,
            "every fetch would time out at once",
        ),
    ];
    for (field, seconds, consequence) in durations {
        if seconds == 0 {
            checker.report(
                path.key(field),
                0,
                format!("must be at least 1, because with 0 {consequence}"),
            );
        }
    }

    if issuer.jwks_max_refresh_seconds < issuer.jwks_min_refresh_seconds {
        checker.report(
            path.key("jwks_max_refresh_seconds"),
            issuer.jwks_max_refresh_seconds,
            format!(
                "is below jwks_min_refresh_seconds ({}); raise it or lower the minimum",
                issuer.jwks_min_refresh_seconds
            ),
        );
    }
}

fn check_claim_requirements(checker: &mut Checker, issuer: &IssuerConfig, path: &FieldPath) {
    for (index, prefix) in issuer.subject_prefixes.iter().enumerate() {
        if prefix.is_empty() {
            checker.report(
                path.key("subject_prefixes").index(index),
                "\"\"",
                "an empty prefix matches every subject; remove it, or leave the list empty to skip the check",
            );
        }
    }

    if let Some(typ) = &issuer.required_typ {
        let bare = typ
            .get(..12)
            .filter(|head| head.eq_ignore_ascii_case("application/"))
            .map_or(typ.as_str(), |_| &typ[12..]);
        if bare.is_empty() || !bare.bytes().all(|b| is_tchar(b) || b == b'/') {
            checker.report(
                path.key("required_typ"),
                format_args!("{typ:?}"),
                "must be a media type such as at+jwt (RFC 9068 §2.1), without parameters or spaces",
            );
        }
    }

    if issuer.max_token_bytes == 0 {
        checker.report(
            path.key("max_token_bytes"),
            0,
            format!(
                "must be at least 1, because with 0 every token is rejected; the default is {}",
                super::DEFAULT_MAX_TOKEN_BYTES
            ),
        );
    }
    if issuer.max_lifetime_seconds == Some(0) {
        checker.report(
            path.key("max_lifetime_seconds"),
            0,
            "must be at least 1, because with 0 every token is rejected; remove the field for no limit",
        );
    }
    if !issuer.require_exp && issuer.max_lifetime_seconds.is_some() {
        checker.report(
            path.key("require_exp"),
            false,
            "max_lifetime_seconds needs `exp` to measure a lifetime, so tokens without one would all be \
             rejected; set require_exp: true or remove max_lifetime_seconds",
        );
    }
}

fn check_http_url(checker: &mut Checker, uri: &str, path: &FieldPath) {
    let problem = match reqwest::Url::parse(uri) {
        Err(error) => Some(format!(
            "not a valid URL ({error}); write an absolute http:// or https:// URL"
        )),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => Some(format!(
            "scheme `{}` is not supported; use http:// or https://",
            url.scheme()
        )),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => {
            Some("the URL has no host; write an absolute http:// or https:// URL".to_owned())
        }
        Ok(_) => None,
    };
    if let Some(message) = problem {
        checker.report(path.clone(), format_args!("{:?}", redact_url(uri)), message);
    }
}

fn check_algorithms(checker: &mut Checker, issuer: &IssuerConfig, path: &FieldPath) {
    let algorithms = &issuer.algorithms;
    let accepted = ACCEPTED_ALGORITHMS.join(", ");
    if algorithms.is_empty() {
        checker.report(
            path.clone(),
            "[]",
            format!("list at least one algorithm out of {accepted}"),
        );
    }

    let has_secret = issuer.hmac_secret_file.is_some();
    for (index, name) in algorithms.iter().enumerate() {
        if ACCEPTED_ALGORITHMS.contains(&name.as_str())
            || (has_secret && HMAC_ALGORITHMS.contains(&name.as_str()))
        {
            continue;
        }
        let message = if name.trim().eq_ignore_ascii_case("none") {
            // RFC 8725 §3.2: `none` must be rejected unless the token is
            // protected by other means, which it is not here.
            "`none` marks an unsigned token that anyone can forge; remove it".to_owned()
        } else if !has_secret
            && HMAC_ALGORITHMS
                .iter()
                .any(|hs| name.eq_ignore_ascii_case(hs))
        {
            // RFC 8725 §3.1: HMAC verification uses a shared secret, and a
            // verifier that treats a public JWKS key as that secret accepts
            // tokens signed by anyone who has the public key.
            "HMAC algorithms need the secret shared with the issuer; set hmac_secret_file to a file \
             holding it, because public JWKS keys are never used as HMAC secrets (key confusion)"
                .to_owned()
        } else if let Some(known) = ACCEPTED_ALGORITHMS
            .iter()
            .chain(HMAC_ALGORITHMS.iter())
            .find(|known| known.eq_ignore_ascii_case(name))
        {
            format!("algorithm names are case-sensitive (RFC 7515 §4.1.1); write {known}")
        } else {
            format!("unknown algorithm; use one of {accepted}, or HS256/HS384/HS512 with hmac_secret_file")
        };
        checker.report(path.index(index), format_args!("{name:?}"), message);
    }

    let lists_hmac = algorithms
        .iter()
        .any(|name| HMAC_ALGORITHMS.contains(&name.as_str()));
    if has_secret && !lists_hmac {
        checker.report(
            path.clone(),
            format_args!("[{}]", algorithms.join(", ")),
            "hmac_secret_file is set but no HMAC algorithm is listed, so the secret is never used; \
             add HS256, HS384 or HS512, or remove hmac_secret_file",
        );
    }
}

fn check_workloads(checker: &mut Checker, workloads: &[WorkloadConfig], path: &FieldPath) {
    // An empty list is reported by `enrollment::check_enrollment`, because
    // selected pods may be all that a node protects.
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut ports_in_netns: HashMap<(&Path, u16), usize> = HashMap::new();
    for (index, workload) in workloads.iter().enumerate() {
        let item = path.index(index);
        if let Some(first) = names.get(workload.name.as_str()) {
            checker.report(
                item.key("name"),
                format_args!("{:?}", workload.name),
                format!(
                    "duplicate workload name, also used at {}; give each workload its own name",
                    path.index(*first)
                ),
            );
        } else {
            names.insert(&workload.name, index);
        }

        // Two workloads cannot both take one port of one namespace, because
        // a connection is steered into exactly one listener.
        for (port_index, port) in workload.ports.iter().enumerate() {
            let key = (workload.netns.as_path(), *port);
            match ports_in_netns.get(&key) {
                Some(other) if *other != index => checker.report(
                    item.key("ports").index(port_index),
                    port,
                    format!(
                        "port {port} of {} is already protected by {}; each port of a namespace belongs to one workload",
                        workload.netns.display(),
                        path.index(*other),
                    ),
                ),
                _ => {
                    ports_in_netns.entry(key).or_insert(index);
                }
            }
        }
        check_workload(checker, workload, &item);
    }
}

fn check_workload(checker: &mut Checker, workload: &WorkloadConfig, path: &FieldPath) {
    if !is_valid_workload_name(&workload.name) {
        checker.report(
            path.key("name"),
            format_args!("{:?}", workload.name),
            format!(
                "use 1 to {MAX_WORKLOAD_NAME_LEN} characters out of letters, digits, `-`, `_` and `.`, \
                 because the name appears in metric labels and file names"
            ),
        );
    }

    if workload.netns.as_os_str().is_empty() || !workload.netns.is_absolute() {
        checker.report(
            path.key("netns"),
            format_args!("{:?}", workload.netns.display().to_string()),
            "must be the absolute path of a network namespace, such as /var/run/netns/NAME or /proc/PID/ns/net",
        );
    }

    check_ports(checker, &workload.ports, &path.key("ports"));
    check_token_sources(checker, workload, path);
    rules::check_forwarding(checker, workload, path);
    for (index, rule) in workload.rules.iter().enumerate() {
        rules::check_rule(checker, rule, &path.key("rules").index(index));
    }
}

fn check_ports(checker: &mut Checker, ports: &[u16], path: &FieldPath) {
    if ports.is_empty() {
        checker.report(path.clone(), "[]", "list at least one TCP port to protect");
    }

    let mut seen = HashSet::new();
    for (index, port) in ports.iter().enumerate() {
        if *port == 0 {
            checker.report(
                path.index(index),
                0,
                "port 0 is not a real port; use a port from 1 to 65535",
            );
        } else if !seen.insert(*port) {
            checker.report(
                path.index(index),
                port,
                "duplicate port; list each port once",
            );
        }
    }
}

fn check_token_sources(checker: &mut Checker, workload: &WorkloadConfig, path: &FieldPath) {
    let mut header_names = HashSet::new();
    for (index, source) in workload.from_headers.iter().enumerate() {
        let item = path.key("from_headers").index(index);
        match http::HeaderName::from_bytes(source.name.as_bytes()) {
            Err(_) => checker.report(
                item.key("name"),
                format_args!("{:?}", source.name),
                "not a valid HTTP header name (RFC 9110 §5.1); use letters, digits and `-`",
            ),
            Ok(name) if name == http::header::COOKIE => checker.report(
                item.key("name"),
                format_args!("{:?}", source.name),
                "the Cookie header holds many cookies; list the cookie's name under from_cookies instead",
            ),
            Ok(name) => {
                if !header_names.insert(name) {
                    checker.report(
                        item.key("name"),
                        format_args!("{:?}", source.name),
                        "duplicate header (names are case-insensitive); list each header once",
                    );
                }
            }
        }

        let prefix_ok = source
            .value_prefix
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b))
            && !source.value_prefix.starts_with(' ');
        if !prefix_ok {
            checker.report(
                item.key("value_prefix"),
                format_args!("{:?}", source.value_prefix),
                "use printable ASCII without leading spaces, such as \"Bearer \"",
            );
        }
    }

    let mut cookie_names = HashSet::new();
    for (index, name) in workload.from_cookies.iter().enumerate() {
        let item = path.key("from_cookies").index(index);
        if name.is_empty() || !name.bytes().all(is_tchar) {
            checker.report(
                item,
                format_args!("{name:?}"),
                "not a valid cookie name (RFC 6265 §4.1.1); use letters, digits and `-`, `_`, `.`",
            );
        } else if !cookie_names.insert(name.as_str()) {
            checker.report(
                item,
                format_args!("{name:?}"),
                "duplicate cookie name; list each cookie once",
            );
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`, the characters of a token such as a method or
/// cookie name.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_valid_claim_path(path: &str) -> bool {
    !path.is_empty() && path.split('.').all(|part| !part.is_empty())
}

fn is_valid_workload_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_WORKLOAD_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError, Problem};

    const ISSUER: &str = r"  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    audiences: [orders]
    algorithms: [RS256]
";

    const WORKLOAD: &str = r#"  - name: orders
    netns: /var/run/netns/orders
    ports: [8080]
    from_headers:
      - name: Authorization
        value_prefix: "Bearer "
    from_cookies: [session]
    rules:
      - path_prefix: /orders
        methods: [GET]
        claims:
          tenant: [acme]
        roles: [reader]
        scopes: [orders.read]
"#;

    fn document(issuers: &str, workloads: &str) -> String {
        format!("issuers:\n{issuers}workloads:\n{workloads}")
    }

    /// The valid document with `from` replaced by `to` (which must occur).
    fn edited(from: &str, to: &str) -> String {
        let text = document(ISSUER, WORKLOAD);
        assert!(text.contains(from), "{from:?} not in the base document");
        text.replacen(from, to, 1)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, "test.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("expected validation problems, got: {other}"),
        }
    }

    #[test]
    fn base_document_is_valid() {
        assert_eq!(problems(&document(ISSUER, WORKLOAD)), []);
    }

    #[test]
    fn revocation_and_cache_fields() {
        let base = document(ISSUER, WORKLOAD);
        let valid = format!(
            "{base}revocation:\n  file: /etc/tokengate/revoked.json\n  url: https://idp.example/revoked.json\n  \
             refresh_seconds: 5\n  timeout_seconds: 2\ncache:\n  enabled: false\n  max_entries: 50\n"
        );
        assert_eq!(problems(&valid), []);
        let cases = [
            (
                "revocation:\n  url: ftp://idp.example/revoked\n",
                "revocation.url",
                "scheme",
            ),
            (
                "revocation:\n  url: not a url\n",
                "revocation.url",
                "not a valid URL",
            ),
            ("revocation:\n  file: ''\n", "revocation.file", "empty path"),
            (
                "revocation:\n  refresh_seconds: 0\n",
                "revocation.refresh_seconds",
                "at least 1",
            ),
            (
                "revocation:\n  timeout_seconds: 0\n",
                "revocation.timeout_seconds",
                "at least 1",
            ),
            (
                "cache:\n  max_entries: 0\n",
                "cache.max_entries",
                "cache.enabled: false",
            ),
            (
                "cache:\n  max_entries: 10000001\n",
                "cache.max_entries",
                "between 1 and",
            ),
        ];

        for (section, field, message) in cases {
            let found = problems(&format!("{base}{section}"));

            assert_eq!(found.len(), 1, "{section}: {found:?}");
            assert_eq!(found[0].field, field, "{section}");
            assert!(
                found[0].message.contains(message),
                "{section}: {}",
                found[0].message
            );
            assert!(found[0].line.is_some(), "{section}: no line");
        }
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one table with a case per validation rule"
    )]
    fn each_rule_reports_its_field() {
        let second_workload = WORKLOAD.replace("/var/run/netns/orders", "/var/run/netns/other");
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "no issuers",
                format!("issuers: []\nworkloads:\n{WORKLOAD}"),
                "issuers",
                "at least one issuer",
            ),
            (
                "no workloads",
                format!("issuers:\n{ISSUER}workloads: []\n"),
                "workloads",
                "at least one workload",
            ),
            (
                "duplicate issuer",
                document(&format!("{ISSUER}{ISSUER}"), WORKLOAD),
                "issuers[1].issuer",
                "duplicate issuer, also configured at issuers[0]",
            ),
            (
                "empty issuer",
                edited("issuer: https://idp.example", "issuer: ''"),
                "issuers[0].issuer",
                "exact `iss`",
            ),
            (
                "issuer with space",
                edited(
                    "issuer: https://idp.example",
                    "issuer: 'https://idp.example '",
                ),
                "issuers[0].issuer",
                "whitespace",
            ),
            (
                "jwks_uri scheme",
                edited("http://127.0.0.1:9000/jwks", "ftp://127.0.0.1/jwks"),
                "issuers[0].jwks_uri",
                "scheme `ftp`",
            ),
            (
                "jwks_uri not a URL",
                edited("http://127.0.0.1:9000/jwks", "127.0.0.1/jwks"),
                "issuers[0].jwks_uri",
                "not a valid URL",
            ),
            (
                "no algorithms",
                edited("algorithms: [RS256]", "algorithms: []"),
                "issuers[0].algorithms",
                "at least one",
            ),
            (
                "alg none",
                edited("[RS256]", "[None]"),
                "issuers[0].algorithms[0]",
                "unsigned token",
            ),
            (
                "alg HS256",
                edited("[RS256]", "[HS256]"),
                "issuers[0].algorithms[0]",
                "key confusion",
            ),
            (
                "alg hs512",
                edited("[RS256]", "[RS256, hs512]"),
                "issuers[0].algorithms[1]",
                "key confusion",
            ),
            (
                "alg case",
                edited("[RS256]", "[rs256]"),
                "issuers[0].algorithms[0]",
                "write RS256",
            ),
            (
                "alg unknown",
                edited("[RS256]", "[ES512]"),
                "issuers[0].algorithms[0]",
                "unknown algorithm",
            ),
            (
                "empty audience",
                edited("audiences: [orders]", "audiences: ['']"),
                "issuers[0].audiences[0]",
                "empty",
            ),
            (
                "zero refresh",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    jwks_refresh_seconds: 0\n",
                ),
                "issuers[0].jwks_refresh_seconds",
                "at least 1",
            ),
            (
                "two key sources",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    jwks_file: /etc/tokengate/jwks.json\n",
                ),
                "issuers[0].jwks_file",
                "exactly one key source",
            ),
            (
                "no key source",
                edited("    jwks_uri: http://127.0.0.1:9000/jwks\n", ""),
                "issuers[0].jwks_uri",
                "set one key source",
            ),
            (
                "relative jwks file",
                edited(
                    "    jwks_uri: http://127.0.0.1:9000/jwks\n",
                    "    jwks_file: keys/jwks.json\n",
                ),
                "issuers[0].jwks_file",
                "absolute path",
            ),
            (
                "inline jwks without keys",
                edited(
                    "    jwks_uri: http://127.0.0.1:9000/jwks\n",
                    "    jwks: '{\"keys\": []}'\n",
                ),
                "issuers[0].jwks",
                "not a usable JWKS",
            ),
            (
                "discovery uri not http",
                edited(
                    "    jwks_uri: http://127.0.0.1:9000/jwks\n",
                    "    discovery_uri: ftp://idp.example/.well-known/openid-configuration\n",
                ),
                "issuers[0].discovery_uri",
                "not supported",
            ),
            (
                "secret without hmac algorithm",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    hmac_secret_file: /etc/tokengate/secret\n",
                ),
                "issuers[0].algorithms",
                "never used",
            ),
            (
                "max refresh below min",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    jwks_min_refresh_seconds: 600\n    jwks_max_refresh_seconds: 60\n",
                ),
                "issuers[0].jwks_max_refresh_seconds",
                "below jwks_min_refresh_seconds",
            ),
            (
                "typ with parameters",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    required_typ: 'at+jwt; charset=utf-8'\n",
                ),
                "issuers[0].required_typ",
                "media type",
            ),
            (
                "lifetime without exp",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    require_exp: false\n    max_lifetime_seconds: 600\n",
                ),
                "issuers[0].require_exp",
                "needs `exp`",
            ),
            (
                "zero token size",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    max_token_bytes: 0\n",
                ),
                "issuers[0].max_token_bytes",
                "at least 1",
            ),
            (
                "empty subject prefix",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    subject_prefixes: ['']\n",
                ),
                "issuers[0].subject_prefixes[0]",
                "matches every subject",
            ),
            (
                "zero refetch interval",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    unknown_kid_refetch_seconds: 0\n",
                ),
                "issuers[0].unknown_kid_refetch_seconds",
                "random `kid`",
            ),
            (
                "zero timeout",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    jwks_timeout_seconds: 0\n",
                ),
                "issuers[0].jwks_timeout_seconds",
                "at least 1",
            ),
            (
                "roles_claim empty part",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    roles_claim: realm_access..roles\n",
                ),
                "issuers[0].roles_claim",
                "dotted path",
            ),
            (
                "duplicate workload",
                document(ISSUER, &format!("{WORKLOAD}{second_workload}")),
                "workloads[1].name",
                "duplicate workload name, also used at workloads[0]",
            ),
            (
                "workload name",
                edited("name: orders", "name: orders/eu"),
                "workloads[0].name",
                "metric labels",
            ),
            (
                "netns empty",
                edited("netns: /var/run/netns/orders", "netns: ''"),
                "workloads[0].netns",
                "absolute",
            ),
            (
                "netns relative",
                edited("netns: /var/run/netns/orders", "netns: netns/orders"),
                "workloads[0].netns",
                "absolute",
            ),
            (
                "no ports",
                edited("ports: [8080]", "ports: []"),
                "workloads[0].ports",
                "at least one",
            ),
            (
                "port zero",
                edited("ports: [8080]", "ports: [0]"),
                "workloads[0].ports[0]",
                "port 0",
            ),
            (
                "duplicate port",
                edited("ports: [8080]", "ports: [8080, 8080]"),
                "workloads[0].ports[1]",
                "duplicate port",
            ),
            (
                "port of another workload",
                document(
                    ISSUER,
                    &format!(
                        "{WORKLOAD}{}",
                        WORKLOAD.replace("name: orders", "name: billing")
                    ),
                ),
                "workloads[1].ports[0]",
                "already protected by workloads[0]",
            ),
            (
                "bad header name",
                edited("name: Authorization", "name: 'X Token'"),
                "workloads[0].from_headers[0].name",
                "header name",
            ),
            (
                "cookie header",
                edited("name: Authorization", "name: Cookie"),
                "workloads[0].from_headers[0].name",
                "from_cookies",
            ),
            (
                "duplicate header",
                edited(
                    "        value_prefix: \"Bearer \"\n",
                    "        value_prefix: \"Bearer \"\n      - name: authorization\n",
                ),
                "workloads[0].from_headers[1].name",
                "duplicate header",
            ),
            (
                "prefix leading space",
                edited("value_prefix: \"Bearer \"", "value_prefix: \" Bearer \""),
                "workloads[0].from_headers[0].value_prefix",
                "printable ASCII",
            ),
            (
                "prefix not ASCII",
                edited("value_prefix: \"Bearer \"", "value_prefix: \"Bärer \""),
                "workloads[0].from_headers[0].value_prefix",
                "printable ASCII",
            ),
            (
                "bad cookie name",
                edited("from_cookies: [session]", "from_cookies: ['se;ssion']"),
                "workloads[0].from_cookies[0]",
                "cookie name",
            ),
            (
                "duplicate cookie",
                edited(
                    "from_cookies: [session]",
                    "from_cookies: [session, session]",
                ),
                "workloads[0].from_cookies[1]",
                "duplicate cookie",
            ),
            (
                "prefix without slash",
                edited("path_prefix: /orders", "path_prefix: orders"),
                "workloads[0].rules[0].path_prefix",
                "start with `/`",
            ),
            (
                "prefix not normalised",
                edited("path_prefix: /orders", "path_prefix: /orders/./items"),
                "workloads[0].rules[0].path_prefix",
                "write /orders/items",
            ),
            (
                "prefix double slash",
                edited("path_prefix: /orders", "path_prefix: //orders"),
                "workloads[0].rules[0].path_prefix",
                "write /orders",
            ),
            (
                "prefix encoded slash",
                edited("path_prefix: /orders", "path_prefix: /orders%2Fitems"),
                "workloads[0].rules[0].path_prefix",
                "encoded `/`",
            ),
            (
                "lower-case method",
                edited("methods: [GET]", "methods: [GET, post]"),
                "workloads[0].rules[0].methods[1]",
                "write POST",
            ),
            (
                "method not a token",
                edited("methods: [GET]", "methods: ['GE T']"),
                "workloads[0].rules[0].methods[0]",
                "case-sensitive tokens",
            ),
            (
                "claim without values",
                edited("tenant: [acme]", "tenant: []"),
                "workloads[0].rules[0].claims.tenant",
                "empty list",
            ),
            (
                "claim path empty part",
                edited("tenant: [acme]", "org..tenant: [acme]"),
                "workloads[0].rules[0].claims[\"org..tenant\"]",
                "dotted path",
            ),
            (
                "empty role",
                edited("roles: [reader]", "roles: ['']"),
                "workloads[0].rules[0].roles[0]",
                "empty role",
            ),
            (
                "scope with space",
                edited(
                    "scopes: [orders.read]",
                    "scopes: ['orders.read orders.write']",
                ),
                "workloads[0].rules[0].scopes[0]",
                "space-separated",
            ),
            (
                "reserved source not loopback",
                format!(
                    "interception:\n  reserved_source_v4: 10.0.0.6\n{}",
                    document(ISSUER, WORKLOAD)
                ),
                "interception.reserved_source_v4",
                "loopback address",
            ),
            (
                "reserved source v6 not loopback",
                format!(
                    "interception:\n  reserved_source_v6: 'fe80::6'\n{}",
                    document(ISSUER, WORKLOAD)
                ),
                "interception.reserved_source_v6",
                "::1",
            ),
            (
                "reserved source is in-pod loopback",
                format!(
                    "interception:\n  reserved_source_v4: 127.0.0.1\n  loopback_exempt: false\n{}",
                    document(ISSUER, WORKLOAD)
                ),
                "interception.reserved_source_v4",
                "in-pod clients",
            ),
            (
                "pin path relative",
                format!(
                    "interception:\n  pin_path: bpf/tokengate\n{}",
                    document(ISSUER, WORKLOAD)
                ),
                "interception.pin_path",
                "absolute",
            ),
            (
                "audit file empty",
                format!("audit:\n  file: ''\n{}", document(ISSUER, WORKLOAD)),
                "audit.file",
                "empty path",
            ),
        ];

        for (name, text, field, fragment) in cases {
            let found = problems(&text);

            assert_eq!(found.len(), 1, "{name}: {found:#?}");
            assert_eq!(found[0].field, field, "{name}");
            assert!(
                found[0].message.contains(fragment),
                "{name}: {}",
                found[0].message
            );
            assert!(found[0].line.is_some(), "{name}: no line");
        }
    }

    #[test]
    fn problem_lines_point_at_field() {
        let text = edited("ports: [8080]", "ports:\n      - 8080\n      - 8080");

        let found = problems(&text);

        assert_eq!(found.len(), 1, "{found:#?}");
        let line = found[0].line.expect("line");
        assert_eq!(text.lines().nth(line - 1), Some("      - 8080"));
        assert_eq!(
            line,
            text.lines()
                .position(|l| l == "    ports:")
                .expect("ports line")
                + 3
        );
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one table of cases")]
    fn accepted_variants() {
        let cases = [
            (
                "zero clock skew",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    clock_skew_seconds: 0\n",
                ),
            ),
            (
                "every algorithm",
                edited(
                    "[RS256]",
                    "[RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA]",
                ),
            ),
            (
                "https jwks",
                edited(
                    "http://127.0.0.1:9000/jwks",
                    "https://idp.example/.well-known/jwks.json",
                ),
            ),
            (
                "hmac with secret",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256, HS256]\n    hmac_secret_file: /etc/tokengate/secret\n",
                ),
            ),
            (
                "hmac only",
                edited(
                    "    jwks_uri: http://127.0.0.1:9000/jwks\n    audiences: [orders]\n    algorithms: [RS256]\n",
                    "    hmac_secret_file: /etc/tokengate/secret\n    audiences: [orders]\n    algorithms: [HS512]\n",
                ),
            ),
            (
                "discovery",
                edited("    jwks_uri: http://127.0.0.1:9000/jwks\n", "    discovery: true\n"),
            ),
            (
                "inline mapping",
                edited(
                    "    jwks_uri: http://127.0.0.1:9000/jwks\n",
                    "    jwks:\n      keys:\n        - {kty: OKP, crv: Ed25519, kid: k, x: 11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo}\n",
                ),
            ),
            (
                "claim requirements",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    subject_prefixes: ['spiffe://cluster.local/ns/']\n    required_typ: application/at+jwt\n    max_lifetime_seconds: 3600\n    max_token_bytes: 16384\n",
                ),
            ),
            (
                "no audiences",
                edited("audiences: [orders]", "audiences: []"),
            ),
            ("any method", edited("methods: [GET]", "methods: []")),
            (
                "extension method",
                edited("methods: [GET]", "methods: [PROPFIND, M-SEARCH]"),
            ),
            (
                "root prefix",
                edited("path_prefix: /orders", "path_prefix: /"),
            ),
            (
                "prefix with slash",
                edited("path_prefix: /orders", "path_prefix: /orders/"),
            ),
            (
                "raw token header",
                edited("value_prefix: \"Bearer \"", "value_prefix: \"\""),
            ),
            (
                "keycloak roles",
                edited(
                    "algorithms: [RS256]\n",
                    "algorithms: [RS256]\n    roles_claim: realm_access.roles\n",
                ),
            ),
            (
                "namespaced claim",
                edited("tenant: [acme]", "https://example.com/tenant: [acme]"),
            ),
            (
                "same port, other namespace",
                document(
                    ISSUER,
                    &format!(
                        "{WORKLOAD}{}",
                        WORKLOAD
                            .replace("name: orders", "name: billing")
                            .replace("netns/orders", "netns/billing")
                    ),
                ),
            ),
            (
                "no rules",
                document(
                    ISSUER,
                    &WORKLOAD[..WORKLOAD.find("    rules:").expect("rules")],
                ),
            ),
            (
                "loopback reserved source when exempt",
                format!(
                    "interception:\n  reserved_source_v4: 127.0.0.1\n{}",
                    document(ISSUER, WORKLOAD)
                ),
            ),
        ];

        for (name, text) in cases {
            assert_eq!(problems(&text), [], "{name}");
        }
    }
}
