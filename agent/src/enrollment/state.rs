//! The state directory: one JSON file per enrolled pod, named after the
//! pod sandbox's container id, so that a restarted agent adopts the pods it
//! protected and releases those whose network namespace is gone.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pod::ProbeRoute;

/// Layout version of a state file. A file of another version is not
/// adopted; its pod is released like one whose namespace is gone.
pub const STATE_VERSION: u32 = 1;

/// Mode of the state directory: the files name pods and namespaces, which
/// only the agent needs to read.
const STATE_DIR_MODE: u32 = 0o700;

/// Mode of each state file.
const STATE_FILE_MODE: u32 = 0o600;

/// Maximum length of a container id in a file name: `NAME_MAX` (255) less
/// the `.json` suffix and the `.tmp` suffix of a file being written.
const MAX_CONTAINER_ID_LEN: usize = 255 - 9;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "invalid container id {container_id:?}; a runtime sends letters, digits, `-`, `_` and `.`"
    )]
    InvalidContainerId { container_id: String },
    #[error(
        "failed to create the state directory {path}; check that its parent exists and is writable"
    )]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write pod state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to remove pod state file {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the state directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pod state file {path} is unreadable or not valid JSON; remove it once its pod is gone"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// State of one enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub version: u32,
    /// Id of the pod sandbox (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Network namespace path from the runtime (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Interface name from the runtime (`CNI_IFNAME`).
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Name of the selector that matched.
    pub selector: String,
    /// Name of the workload in metrics, audit events and pins.
    pub workload: String,
    /// Probe routes that are public, as read from the pod spec at ADD.
    pub probes: Vec<ProbeRoute>,
}

/// The directory of pod state files.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens `path`, creating it (mode 0700) when missing.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(path)
            .map_err(|source| StateError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the path of the state file of `container_id`.
    pub fn file(&self, container_id: &str) -> Result<PathBuf, StateError> {
        let valid = !container_id.is_empty()
            && container_id.len() <= MAX_CONTAINER_ID_LEN
            && !container_id.starts_with('.')
            && container_id
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
        if !valid {
            return Err(StateError::InvalidContainerId {
                container_id: container_id.to_owned(),
            });
        }
        Ok(self.path.join(format!("{container_id}.json")))
    }

    /// Writes `record` to a temporary file and renames it into place, so a
    /// crash leaves the old file or the new one, never half of one.
    pub fn write(&self, record: &PodRecord) -> Result<(), StateError> {
        let target = self.file(&record.container_id)?;
        let staging = target.with_extension("json.tmp");
        let write_error = |source| StateError::Write {
            path: target.clone(),
            source,
        };

        let text = serde_json::to_vec_pretty(record)
            .map_err(io::Error::from)
            .map_err(write_error)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(STATE_FILE_MODE)
            .open(&staging)
            .map_err(write_error)?;
        io::Write::write_all(&mut file, &text).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&staging, &target).map_err(write_error)
    }

    /// Removes the state file of `container_id`. Returns whether it existed.
    pub fn remove(&self, container_id: &str) -> Result<bool, StateError> {
        let path = self.file(container_id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Remove { path, source }),
        }
    }

    /// Reads every state file. A file that cannot be read or parsed is
    /// returned as its error, so the caller logs it and goes on.
    pub fn list(&self) -> Result<Vec<Result<PodRecord, StateError>>, StateError> {
        let read_dir_error = |source| StateError::ReadDir {
            path: self.path.clone(),
            source,
        };
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_dir_error)? {
            let path = entry.map_err(read_dir_error)?.path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            records.push(read_record(&path));
        }
        Ok(records)
    }
}

fn read_record(path: &Path) -> Result<PodRecord, StateError> {
    let parse_error = |source| StateError::Parse {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read(path).map_err(parse_error)?;
    serde_json::from_slice(&text)
        .map_err(io::Error::from)
        .map_err(parse_error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn record(container_id: &str) -> PodRecord {
        PodRecord {
            version: STATE_VERSION,
            container_id: container_id.to_owned(),
            netns: PathBuf::from("/var/run/netns/cni-1234"),
            ifname: "eth0".to_owned(),
            namespace: "shop".to_owned(),
            name: "orders-1".to_owned(),
            uid: "6f1c".to_owned(),
            selector: "shop".to_owned(),
            workload: "shop_orders-1".to_owned(),
            probes: vec![ProbeRoute {
                port: 8080,
                path: "/healthz".to_owned(),
            }],
        }
    }

    #[test]
    fn write_list_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("pods")).unwrap();

        state.write(&record("abc123")).unwrap();
        let listed: Vec<PodRecord> = state
            .list()
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();

        assert_eq!(listed, [record("abc123")]);
        assert!(state.remove("abc123").unwrap());
        assert!(!state.remove("abc123").unwrap());
        assert!(state.list().unwrap().is_empty());
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("pods")).unwrap();

        state.write(&record("abc123")).unwrap();

        let dir_mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        let file_mode = std::fs::metadata(state.file("abc123").unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, STATE_DIR_MODE);
        assert_eq!(file_mode & 0o777, STATE_FILE_MODE);
    }

    #[test]
    fn container_ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();

        for id in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(
                matches!(state.file(id), Err(StateError::InvalidContainerId { .. })),
                "accepted {id:?}"
            );
        }
    }

    #[test]
    fn unparsable_file_is_listed_as_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("broken.json"), b"{").unwrap();

        let listed = state.list().unwrap();

        assert_eq!(listed.len(), 1);
        assert!(matches!(listed[0], Err(StateError::Parse { .. })));
    }
}
