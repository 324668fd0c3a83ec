//! Configuration reload: reading and validating the file again, telling
//! what changed against the configuration in force, and the reload metrics.
//!
//! Owns no running part of the agent: `app` applies the changes (issuers,
//! workload proxies, steering) and decides when to reload (file change or
//! SIGHUP).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounterVec, Opts, Registry};
use serde_yaml::Value;
use sha2::{Digest as _, Sha256};

use crate::config::{self, Config, ConfigError};
use crate::metrics::NAMESPACE;

/// Period of the check for a changed configuration file. A Kubernetes
/// `ConfigMap` update replaces the mounted file by swapping the `..data`
/// symlink, which inotify on the file itself does not report. Reading the
/// resolved path's content each second detects every kind of replacement,
/// costs one small read, and applies a change well within the kubelet's own sync
/// delay of up to a minute.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Top-level fields that a reload applies. Every other top-level field (the
/// admin listener, interception, audit output, revocation, cache) is read
/// once at start, and a change to it is logged as needing a restart.
pub const RELOADABLE_FIELDS: [&str; 3] = ["issuers", "workloads", "drain_seconds"];

/// Top-level sections of which only some fields apply on reload, with those
/// fields. A change to any other field of the section needs a restart and
/// is named as `section.field`.
const PARTLY_RELOADABLE: [(&str, &[&str]); 1] = [("enrollment", &["selectors"])];

/// `result` label of a reload that was applied.
pub const RESULT_SUCCESS: &str = "success";

/// `result` label of a reload that was rejected; the previous
/// configuration stays in force.
pub const RESULT_FAILURE: &str = "failure";

/// Error of reading or validating the configuration file on reload.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("failed to read configuration file {path}; check that it exists and is readable, the previous configuration stays in force")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "configuration file {path} is invalid; fix it, the previous configuration stays in force"
    )]
    Invalid {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
}

/// A validated configuration with the YAML document it came from, so that
/// a later reload can compare sections as written.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    /// The same text as a generic YAML value. Comparing these values finds
    /// every change, including fields added to the schema later and secret
    /// values that the schema's `Debug` output hides.
    pub document: Value,
}

impl LoadedConfig {
    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config = config::parse(text, origin)?;
        // `config::parse` accepted the text, so it is valid YAML.
        let document = serde_yaml::from_str(text).unwrap_or(Value::Null);
        Ok(Self { config, document })
    }

    /// Returns the YAML of the issuer named `issuer`, `Null` if absent.
    fn issuer_document(&self, issuer: &str) -> &Value {
        find_entry(&self.document, "issuers", "issuer", issuer)
    }

    /// Returns the YAML of the workload named `workload`, `Null` if absent.
    fn workload_document(&self, workload: &str) -> &Value {
        find_entry(&self.document, "workloads", "name", workload)
    }
}

/// The configuration file on disk and the digest of the content last read.
pub struct ConfigFile {
    path: PathBuf,
    last_digest: Option<[u8; 32]>,
    /// Whether the last read failed, so that a missing file is logged once
    /// and not at every poll.
    last_read_failed: bool,
}

impl ConfigFile {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last_digest: None,
            last_read_failed: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads, parses and validates the file, and remembers its content as
    /// seen whether or not it is valid.
    pub fn load(&mut self) -> Result<LoadedConfig, ReloadError> {
        let text = self.read()?;
        LoadedConfig::parse(&text, &self.path.display().to_string()).map_err(|source| {
            ReloadError::Invalid {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Reads the file and returns whether its content differs from the last
    /// content read. A failed read is logged (once until the next success)
    /// and counts as unchanged, so a file missing for a moment during a
    /// replacement changes nothing.
    pub fn changed(&mut self) -> bool {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                if self.last_read_failed {
                    tracing::info!(path = %self.path.display(), "configuration file readable again");
                    self.last_read_failed = false;
                }
                self.last_digest != Some(digest(&bytes))
            }
            Err(error) => {
                if !self.last_read_failed {
                    tracing::warn!(path = %self.path.display(), %error, "failed to read configuration file, keeping the configuration in force");
                    self.last_read_failed = true;
                }
                false
            }
        }
    }

    fn read(&mut self) -> Result<String, ReloadError> {
        let bytes = std::fs::read(&self.path).map_err(|source| ReloadError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.last_digest = Some(digest(&bytes));
        String::from_utf8(bytes).map_err(|error| ReloadError::Read {
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, error),
        })
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Differences between a new configuration and the one in force, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigChanges {
    pub issuers_added: Vec<String>,
    pub issuers_removed: Vec<String>,
    /// Issuers whose settings differ; their key stores are replaced.
    pub issuers_changed: Vec<String>,
    pub workloads_added: Vec<String>,
    pub workloads_removed: Vec<String>,
    /// Workloads whose settings differ (rules, ports, token sources, ...).
    pub workloads_changed: Vec<String>,
    /// Top-level fields that changed but apply only at the next start.
    pub restart_required: Vec<String>,
    /// Whether `drain_seconds` changed.
    pub drain_changed: bool,
}

impl ConfigChanges {
    /// Compares `new` with `running`, the configuration in force. Fields
    /// outside [`RELOADABLE_FIELDS`] are compared with `started`, the
    /// document the agent started with, because those are still in force.
    pub fn between(running: &LoadedConfig, started: &Value, new: &LoadedConfig) -> Self {
        let mut changes = Self::default();

        let old_issuers: Vec<&str> = issuer_names(&running.config);
        let new_issuers: Vec<&str> = issuer_names(&new.config);
        for name in &new_issuers {
            if !old_issuers.contains(name) {
                changes.issuers_added.push((*name).to_owned());
            } else if running.issuer_document(name) != new.issuer_document(name) {
                changes.issuers_changed.push((*name).to_owned());
            }
        }
        changes.issuers_removed = missing_from(&old_issuers, &new_issuers);

        let old_workloads = workload_names(&running.config);
        let new_workloads = workload_names(&new.config);
        for name in &new_workloads {
            if !old_workloads.contains(name) {
                changes.workloads_added.push((*name).to_owned());
            } else if running.workload_document(name) != new.workload_document(name) {
                changes.workloads_changed.push((*name).to_owned());
            }
        }
        changes.workloads_removed = missing_from(&old_workloads, &new_workloads);

        changes.restart_required = restart_fields(started, &new.document);
        changes.drain_changed = running.config.drain_seconds != new.config.drain_seconds;
        changes
    }

    /// True when the new configuration changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn issuer_names(config: &Config) -> Vec<&str> {
    config
        .issuers
        .iter()
        .map(|issuer| issuer.issuer.as_str())
        .collect()
}

fn workload_names(config: &Config) -> Vec<&str> {
    config
        .workloads
        .iter()
        .map(|workload| workload.name.as_str())
        .collect()
}

fn missing_from(old: &[&str], new: &[&str]) -> Vec<String> {
    old.iter()
        .filter(|name| !new.contains(name))
        .map(|name| (*name).to_owned())
        .collect()
}

/// Names the top-level fields outside [`RELOADABLE_FIELDS`] whose values
/// differ. A field left out counts as different from one written with its
/// default value, so at worst the log requests a restart that changes nothing.
fn restart_fields(started: &Value, new: &Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for document in [started, new] {
        if let Value::Mapping(mapping) = document {
            for key in mapping.keys().filter_map(Value::as_str) {
                let partly = PARTLY_RELOADABLE.iter().any(|(section, _)| *section == key);
                if !RELOADABLE_FIELDS.contains(&key)
                    && !partly
                    && !names.iter().any(|name| name == key)
                {
                    names.push(key.to_owned());
                }
            }
        }
    }
    names.retain(|name| started.get(name.as_str()) != new.get(name.as_str()));
    for (section, reloadable) in PARTLY_RELOADABLE {
        names.extend(section_restart_fields(
            section,
            reloadable,
            started.get(section),
            new.get(section),
        ));
    }
    names.sort();
    names
}

/// Names, as `section.field`, the fields of one partly reloadable section
/// that differ between the two documents, leaving out `reloadable`.
fn section_restart_fields(
    section: &str,
    reloadable: &[&str],
    started: Option<&Value>,
    new: Option<&Value>,
) -> Vec<String> {
    let mut keys: Vec<&str> = Vec::new();
    for mapping in [started, new]
        .into_iter()
        .flatten()
        .filter_map(Value::as_mapping)
    {
        for key in mapping.keys().filter_map(Value::as_str) {
            if !reloadable.contains(&key) && !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys.into_iter()
        .filter(|key| {
            started.and_then(|value| value.get(*key)) != new.and_then(|value| value.get(*key))
        })
        .map(|key| format!("{section}.{key}"))
        .collect()
}

/// Returns the entry of the sequence `list` whose `key` equals `name`.
fn find_entry<'d>(document: &'d Value, list: &str, key: &str, name: &str) -> &'d Value {
    const ABSENT: &Value = &Value::Null;
    document
        .get(list)
        .and_then(Value::as_sequence)
        .and_then(|entries| {
            entries
                .iter()
                .find(|entry| entry.get(key).and_then(Value::as_str) == Some(name))
        })
        .unwrap_or(ABSENT)
}

/// Series of configuration reloads.
#[derive(Clone)]
pub struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: Gauge,
}

impl ReloadMetrics {
    /// Creates the series in `registry`, both results at zero.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads, by result: success (applied) or failure (rejected, previous configuration kept).",
            )
            .namespace(NAMESPACE),
            &["result"],
        )?;
        let last_success = Gauge::with_opts(
            Opts::new(
                "config_last_reload_success_timestamp_seconds",
                "Unix time of the last configuration load that was applied, the start included.",
            )
            .namespace(NAMESPACE),
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_success.clone()))?;

        for result in [RESULT_SUCCESS, RESULT_FAILURE] {
            reloads.with_label_values(&[result]);
        }
        Ok(Self {
            reloads,
            last_success,
        })
    }

    /// Records the configuration loaded at start.
    pub fn record_initial_load(&self) {
        self.last_success.set(unix_now_seconds());
    }

    /// Counts a reload that was applied.
    pub fn record_success(&self) {
        self.reloads.with_label_values(&[RESULT_SUCCESS]).inc();
        self.last_success.set(unix_now_seconds());
    }

    /// Counts a reload that was rejected.
    pub fn record_failure(&self) {
        self.reloads.with_label_values(&[RESULT_FAILURE]).inc();
    }

    /// Returns the count of reloads with `result`.
    pub fn count(&self, result: &str) -> u64 {
        self.reloads.with_label_values(&[result]).get()
    }
}

fn unix_now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(issuers: &str, workloads: &str, extra: &str) -> LoadedConfig {
        let text = format!("{extra}issuers:\n{issuers}workloads:\n{workloads}");
        LoadedConfig::parse(&text, "test.yaml").expect("valid test configuration")
    }

    const ISSUER_A: &str =
        "  - issuer: https://a.test\n    jwks_uri: http://127.0.0.1:1/a\n    algorithms: [RS256]\n";
    const ISSUER_A_ES: &str =
        "  - issuer: https://a.test\n    jwks_uri: http://127.0.0.1:1/a\n    algorithms: [ES256]\n";
    const ISSUER_B: &str =
        "  - issuer: https://b.test\n    jwks_uri: http://127.0.0.1:1/b\n    algorithms: [RS256]\n";
    const ORDERS: &str = "  - name: orders\n    netns: /var/run/netns/orders\n    ports: [8080]\n    rules:\n      - path_prefix: /\n";
    const ORDERS_9090: &str = "  - name: orders\n    netns: /var/run/netns/orders\n    ports: [8080, 9090]\n    rules:\n      - path_prefix: /\n";
    const BILLING: &str = "  - name: billing\n    netns: /var/run/netns/billing\n    ports: [8081]\n    rules:\n      - path_prefix: /\n";

    #[test]
    fn same_text_changes_nothing() {
        let running = config(ISSUER_A, ORDERS, "");
        let new = config(ISSUER_A, ORDERS, "");

        let changes = ConfigChanges::between(&running, &running.document, &new);

        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn issuers_added_removed_changed() {
        let running = config(&format!("{ISSUER_A}{ISSUER_B}"), ORDERS, "");
        let new = config(ISSUER_A_ES, ORDERS, "");

        let changes = ConfigChanges::between(&running, &running.document, &new);

        assert_eq!(changes.issuers_changed, ["https://a.test"]);
        assert_eq!(changes.issuers_removed, ["https://b.test"]);
        assert!(changes.issuers_added.is_empty());
        assert!(changes.workloads_changed.is_empty());
    }

    #[test]
    fn workloads_added_removed_changed() {
        let running = config(ISSUER_A, ORDERS, "");
        let new = config(ISSUER_A, &format!("{ORDERS_9090}{BILLING}"), "");

        let changes = ConfigChanges::between(&running, &running.document, &new);

        assert_eq!(changes.workloads_added, ["billing"]);
        assert_eq!(changes.workloads_changed, ["orders"]);
        assert!(changes.workloads_removed.is_empty());

        let back = ConfigChanges::between(&new, &running.document, &running);
        assert_eq!(back.workloads_removed, ["billing"]);
    }

    #[test]
    fn admin_change_needs_restart() {
        let running = config(ISSUER_A, ORDERS, "");
        let new = config(ISSUER_A, ORDERS, "admin:\n  listen: 127.0.0.1:9901\n");

        let changes = ConfigChanges::between(&running, &running.document, &new);

        assert_eq!(changes.restart_required, ["admin"]);
        assert!(changes.workloads_changed.is_empty());
    }

    #[test]
    fn enrollment_selectors_reload_but_socket_needs_restart() {
        let running = config(
            ISSUER_A,
            ORDERS,
            "enrollment:\n  socket: /run/a.sock\n  selectors: []\n",
        );
        let selectors = config(
            ISSUER_A,
            ORDERS,
            "enrollment:\n  socket: /run/a.sock\n  selectors:\n    - name: shop\n      ports: [8080]\n",
        );
        let socket = config(
            ISSUER_A,
            ORDERS,
            "enrollment:\n  socket: /run/b.sock\n  selectors: []\n",
        );

        let changes = ConfigChanges::between(&running, &running.document, &selectors);
        assert!(
            changes.restart_required.is_empty(),
            "{:?}",
            changes.restart_required
        );

        let changes = ConfigChanges::between(&running, &running.document, &socket);
        assert_eq!(changes.restart_required, ["enrollment.socket"]);
    }

    #[test]
    fn restart_compared_with_start() {
        let started = config(ISSUER_A, ORDERS, "drain_seconds: 5\n");
        let running = config(ISSUER_A, ORDERS, "drain_seconds: 5\n");
        let new = config(ISSUER_A, ORDERS, "drain_seconds: 7\n");

        let changes = ConfigChanges::between(&running, &started.document, &new);

        assert!(changes.drain_changed);
        assert!(changes.restart_required.is_empty());
    }

    #[test]
    fn file_change_detected_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, format!("issuers:\n{ISSUER_A}workloads:\n{ORDERS}")).unwrap();
        let mut file = ConfigFile::new(&path);

        assert!(file.changed(), "never read yet");
        file.load().expect("valid file");
        assert!(!file.changed());
        std::fs::write(&path, "issuers: [").unwrap();
        assert!(file.changed());
        assert!(matches!(file.load(), Err(ReloadError::Invalid { .. })));
        assert!(!file.changed(), "an invalid file is seen once");
    }

    #[test]
    fn missing_file_is_unchanged() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut file = ConfigFile::new(&dir.path().join("absent.yaml"));

        assert!(!file.changed());
        assert!(matches!(file.load(), Err(ReloadError::Read { .. })));
    }

    #[test]
    fn metrics_count_results() {
        let registry = Registry::new();
        let metrics = ReloadMetrics::register(&registry).expect("register");

        metrics.record_success();
        metrics.record_failure();
        metrics.record_failure();

        assert_eq!(metrics.count(RESULT_SUCCESS), 1);
        assert_eq!(metrics.count(RESULT_FAILURE), 2);
        assert!(metrics.last_success.get() > 0.0);
    }
}
