//! The effective configuration as one log line, without secrets.
//!
//! The file contains no secrets of its own, but a `jwks_uri` may carry
//! credentials in its user-info or query, so URLs are shown without them.

use std::fmt::Write as _;

use super::Config;

impl Config {
    /// Describes the effective configuration for the startup log: every
    /// issuer and workload with the settings that decide traffic, with
    /// credentials left out of URLs.
    pub fn redacted_summary(&self) -> String {
        let mut out = String::new();

        // Writing to a String cannot fail, so the results are ignored.
        let _ = write!(
            out,
            "admin={} audit={} pin_path={} reserved_source={}/{} loopback_exempt={} drain_seconds={}",
            self.admin.listen,
            self.audit.file.as_ref().map_or_else(|| "stdout".to_owned(), |file| file.display().to_string()),
            self.interception.pin_path.display(),
            self.interception.reserved_source_v4,
            self.interception.reserved_source_v6,
            self.interception.loopback_exempt,
            self.drain_seconds,
        );

        for issuer in &self.issuers {
            let _ = write!(
                out,
                "; issuer {:?} keys={} algorithms=[{}] audiences=[{}] clock_skew={}s refresh={}s \
                 unknown_kid_refetch={}s timeout={}s roles_claim={}",
                issuer.issuer,
                issuer.key_source_summary(),
                issuer.algorithms.join(","),
                issuer.audiences.join(","),
                issuer.clock_skew_seconds,
                issuer.jwks_refresh_seconds,
                issuer.unknown_kid_refetch_seconds,
                issuer.jwks_timeout_seconds,
                issuer.roles_claim,
            );
        }

        for workload in &self.workloads {
            let ports: Vec<String> = workload.ports.iter().map(u16::to_string).collect();
            let headers: Vec<&str> = workload
                .from_headers
                .iter()
                .map(|h| h.name.as_str())
                .collect();
            let _ = write!(
                out,
                "; workload {} netns={} ports=[{}] headers=[{}] cookies=[{}] rules={}",
                workload.name,
                workload.netns.display(),
                ports.join(","),
                headers.join(","),
                workload.from_cookies.join(","),
                workload.rules.len(),
            );
        }
        out
    }
}

/// Returns `url` without user-info, query and fragment, where a credential
/// could hide. Text that does not parse as a URL is replaced whole.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "<unparsable URL>".to_owned();
    };

    let had_secret_parts =
        !parsed.username().is_empty() || parsed.password().is_some() || parsed.query().is_some();
    // These setters fail only for URLs that cannot have user-info, which
    // then have none to remove.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    parsed.set_query(None);
    parsed.set_fragment(None);

    if had_secret_parts {
        format!("{parsed} (credentials and query removed)")
    } else {
        parsed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_removes_credentials_and_query() {
        let redacted = redact_url("https://user:pw@idp.example:8443/keys?token=abc#x");

        assert_eq!(
            redacted,
            "https://idp.example:8443/keys (credentials and query removed)"
        );
    }

    #[test]
    fn redact_url_keeps_plain_url() {
        assert_eq!(
            redact_url("http://127.0.0.1:9000/jwks"),
            "http://127.0.0.1:9000/jwks"
        );
        assert_eq!(redact_url("not a url"), "<unparsable URL>");
    }

    #[test]
    fn summary_names_issuers_and_workloads() {
        let text = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: https://u:secret@idp.example/jwks?key=secret
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/orders
    ports: [8080, 8443]
    from_cookies: [session]
";
        let config = crate::config::parse(text, "test.yaml").expect("valid config");

        let summary = config.redacted_summary();

        assert!(
            summary.contains("issuer \"https://idp.example\""),
            "{summary}"
        );
        assert!(
            summary.contains("workload orders netns=/var/run/netns/orders ports=[8080,8443]"),
            "{summary}"
        );
        assert!(summary.contains("cookies=[session]"), "{summary}");
        assert!(!summary.contains("secret"), "{summary}");
    }
}
