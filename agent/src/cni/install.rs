//! `tokengate-cni install` and `uninstall`: copy the plugin binary into the
//! node's CNI binary directory and chain it at the end of the node's
//! primary conflist, as the last plugin, so it runs after the network is
//! set up.
//!
//! The runtime uses the configuration file that sorts first by name in the
//! CNI configuration directory, so that is the one changed. Writes go to a
//! temporary file that is renamed into place, so the runtime never reads a
//! half-written file.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// `type` of the plugin's entry in a conflist, and its binary's file name.
pub const PLUGIN_TYPE: &str = "tokengate-cni";

/// Mode of the installed binary: the runtime runs it as root.
const BINARY_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("failed to read the CNI configuration directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no .conflist file in {path}; install the cluster's network plugin first, tokengate-cni chains after it")]
    NoConflist { path: PathBuf },
    #[error("{path} is a single-plugin .conf file, which cannot chain; convert it to a .conflist with a plugins list")]
    SinglePluginConf { path: PathBuf },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a conflist: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Settings of `install`.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The plugin binary to copy, normally the running executable.
    pub source_binary: PathBuf,
    /// CNI binary directory of the node, such as `/opt/cni/bin`.
    pub bin_dir: PathBuf,
    /// CNI configuration directory of the node, such as `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// Agent socket written into the entry.
    pub agent_socket: PathBuf,
    /// Namespaces written into the entry's `excludeNamespaces`.
    pub exclude_namespaces: Vec<String>,
    /// Seconds written into the entry's `timeoutSeconds`.
    pub timeout_seconds: u64,
}

/// Copies the binary and chains the entry. Returns the conflist changed,
/// and whether its content changed (false when it was already chained).
pub fn install(options: &InstallOptions) -> Result<(PathBuf, bool), InstallError> {
    let target = options.bin_dir.join(PLUGIN_TYPE);
    let binary = std::fs::read(&options.source_binary).map_err(|source| InstallError::Read {
        path: options.source_binary.clone(),
        source,
    })?;
    let current = std::fs::read(&target).ok();
    if current.as_deref() != Some(binary.as_slice()) {
        write_atomically(&target, &binary, BINARY_MODE)?;
    }

    let path = primary_conflist(&options.conf_dir)?;
    let conflist = read_conflist(&path)?;
    let entry = json!({
        "type": PLUGIN_TYPE,
        "agentSocket": options.agent_socket,
        "excludeNamespaces": options.exclude_namespaces,
        "timeoutSeconds": options.timeout_seconds,
    });
    let chained = chain(&conflist, entry).map_err(|detail| InstallError::Invalid {
        path: path.clone(),
        detail,
    })?;
    if chained == conflist {
        return Ok((path, false));
    }
    write_conflist(&path, &chained)?;
    Ok((path, true))
}

/// Removes the entry from the primary conflist and the binary from
/// `bin_dir`. Returns the conflist it changed, if any.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut changed = None;
    if let Ok(path) = primary_conflist(conf_dir) {
        let conflist = read_conflist(&path)?;
        let unchained = unchain(&conflist);
        if unchained != conflist {
            write_conflist(&path, &unchained)?;
            changed = Some(path);
        }
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Write {
                path: target,
                source,
            })
        }
    }
    Ok(changed)
}

/// Returns `conflist` with `entry` as its last plugin, replacing an entry
/// of the same type wherever it was.
pub fn chain(conflist: &Value, entry: Value) -> Result<Value, String> {
    let mut chained = conflist.clone();
    let plugins = chained
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("no plugins list")?;
    plugins.retain(|plugin| plugin.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.is_empty() {
        return Err("the plugins list has no network plugin to chain after".to_owned());
    }
    plugins.push(entry);
    Ok(chained)
}

/// Returns `conflist` without entries of this plugin's type.
pub fn unchain(conflist: &Value) -> Value {
    let mut unchained = conflist.clone();
    if let Some(plugins) = unchained.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|plugin| plugin.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    unchained
}

/// Returns the configuration file the runtime uses: the first `.conflist`,
/// `.conf` or `.json` file by name. A `.conf` first is an error, because a
/// single-plugin configuration has nothing to chain to.
fn primary_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let entries = std::fs::read_dir(conf_dir).map_err(|source| InstallError::ReadDir {
        path: conf_dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension().is_some_and(|extension| {
                extension == "conflist" || extension == "conf" || extension == "json"
            })
        })
        .collect();
    files.sort();
    match files.into_iter().next() {
        Some(path)
            if path
                .extension()
                .is_some_and(|extension| extension == "conflist") =>
        {
            Ok(path)
        }
        Some(path) => {
            let is_list = std::fs::read(&path)
                .ok()
                .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
                .is_some_and(|value| value.get("plugins").is_some());
            if is_list {
                Ok(path)
            } else {
                Err(InstallError::SinglePluginConf { path })
            }
        }
        None => Err(InstallError::NoConflist {
            path: conf_dir.to_owned(),
        }),
    }
}

fn read_conflist(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|error| InstallError::Invalid {
        path: path.to_owned(),
        detail: error.to_string(),
    })
}

fn write_conflist(path: &Path, conflist: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(conflist).map_err(|error| InstallError::Invalid {
        path: path.to_owned(),
        detail: error.to_string(),
    })?;
    text.push(b'\n');
    let mode =
        std::fs::metadata(path).map_or(0o644, |metadata| metadata.permissions().mode() & 0o777);
    write_atomically(path, &text, mode)
}

/// Writes `data` to a temporary file beside `path` and renames it into
/// place.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let write_error = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let mut staging = path.as_os_str().to_owned();
    staging.push(".tokengate-tmp");
    let staging = PathBuf::from(staging);
    std::fs::write(&staging, data).map_err(write_error)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    std::fs::rename(&staging, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> InstallOptions {
        let source = dir.join("source-binary");
        std::fs::write(&source, b"\x7fELF plugin").unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        InstallOptions {
            source_binary: source,
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            agent_socket: PathBuf::from("/run/tokengate/cni.sock"),
            exclude_namespaces: vec!["kube-system".to_owned()],
            timeout_seconds: 30,
        }
    }

    fn write_json(path: &Path, value: &Value) {
        std::fs::write(path, serde_json::to_vec(value).unwrap()).unwrap();
    }

    #[test]
    fn install_chains_into_first_conflist_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = options(dir.path());
        let first = options.conf_dir.join("10-calico.conflist");
        let second = options.conf_dir.join("99-other.conflist");
        write_json(
            &first,
            &json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}, {"type": "portmap"}]}),
        );
        write_json(
            &second,
            &json!({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}),
        );

        let (path, changed) = install(&options).unwrap();
        let (_, changed_again) = install(&options).unwrap();

        assert_eq!(path, first);
        assert!(changed);
        assert!(!changed_again);
        let conflist: Value = serde_json::from_slice(&std::fs::read(&first).unwrap()).unwrap();
        let types: Vec<&str> = conflist["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|plugin| plugin["type"].as_str())
            .collect();
        assert_eq!(types, ["calico", "portmap", PLUGIN_TYPE]);
        assert_eq!(
            conflist["plugins"][2]["excludeNamespaces"][0],
            "kube-system"
        );
        assert_eq!(
            std::fs::read(options.bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"\x7fELF plugin"
        );
        let untouched: Value = serde_json::from_slice(&std::fs::read(&second).unwrap()).unwrap();
        assert_eq!(untouched["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn chain_moves_an_old_entry_to_the_end() {
        let conflist =
            json!({"plugins": [{"type": PLUGIN_TYPE, "agentSocket": "/old"}, {"type": "calico"}]});

        let chained = chain(
            &conflist,
            json!({"type": PLUGIN_TYPE, "agentSocket": "/new"}),
        )
        .unwrap();

        assert_eq!(chained["plugins"].as_array().unwrap().len(), 2);
        assert_eq!(chained["plugins"][1]["agentSocket"], "/new");
    }

    #[test]
    fn single_plugin_conf_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let options = options(dir.path());
        write_json(
            &options.conf_dir.join("10-bridge.conf"),
            &json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge"}),
        );

        let error = install(&options).unwrap_err();

        assert!(
            matches!(error, InstallError::SinglePluginConf { .. }),
            "{error}"
        );
    }

    #[test]
    fn uninstall_removes_entry_and_binary() {
        let dir = tempfile::tempdir().unwrap();
        let options = options(dir.path());
        let path = options.conf_dir.join("10-calico.conflist");
        let original =
            json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}]});
        write_json(&path, &original);
        install(&options).unwrap();

        let changed = uninstall(&options.bin_dir, &options.conf_dir).unwrap();

        assert_eq!(changed, Some(path.clone()));
        let conflist: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(conflist, original);
        assert!(!options.bin_dir.join(PLUGIN_TYPE).exists());
    }
}
