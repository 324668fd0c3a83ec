//! Checks of `interception.handoff`.

use super::{Checker, FieldPath};
use crate::config::Config;

/// Maximum length of a Unix socket path: `sun_path` has room for 108
/// bytes including the terminating NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

pub(super) fn check_handoff(checker: &mut Checker, config: &Config, root: &FieldPath) {
    let path = root.key("interception").key("handoff");
    let handoff = &config.interception.handoff;

    let socket = handoff.socket_path(&config.interception.pin_path);
    if !socket.is_absolute() {
        checker.report(
            path.key("socket"),
            socket.display(),
            "must be an absolute path, such as /run/tokengate/handoff.sock",
        );
    }
    if socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        checker.report(
            path.key("socket"),
            socket.display(),
            format!("is longer than the {MAX_SOCKET_PATH_BYTES} bytes a Unix socket path may have; choose a shorter path"),
        );
    }
    if handoff.timeout_seconds == 0 {
        checker.report(
            path.key("timeout_seconds"),
            handoff.timeout_seconds,
            "must be at least 1; the default is 30",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError};

    const BASE: &str = "\
issuers:
  - issuer: https://idp.example
    jwks_uri: http://127.0.0.1:9000/jwks
    algorithms: [RS256]
workloads:
  - name: orders
    netns: /var/run/netns/orders
    ports: [8080]
";

    fn problems(interception: &str) -> Vec<String> {
        let text = format!("{BASE}interception:\n{interception}");
        match parse(&text, "handoff.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|problem| problem.field).collect()
            }
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn default_handoff_is_valid() {
        assert!(problems("  loopback_exempt: true\n").is_empty());
    }

    #[test]
    fn relative_socket_is_rejected() {
        let fields = problems("  handoff:\n    socket: run/handoff.sock\n");

        assert_eq!(fields, vec!["interception.handoff.socket".to_owned()]);
    }

    #[test]
    fn overlong_socket_is_rejected() {
        let long = format!("  handoff:\n    socket: /run/{}.sock\n", "a".repeat(120));

        assert_eq!(
            problems(&long),
            vec!["interception.handoff.socket".to_owned()]
        );
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let fields = problems("  handoff:\n    timeout_seconds: 0\n");

        assert_eq!(
            fields,
            vec!["interception.handoff.timeout_seconds".to_owned()]
        );
    }
}
