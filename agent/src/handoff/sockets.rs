//! The sockets that move between agents: what the running agent offers
//! ([`Offered`]) and what a new agent has received ([`Inherited`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// One workload's sockets.
pub struct WorkloadSockets {
    /// Path the namespace was opened from, for messages.
    pub netns_path: PathBuf,
    pub netns: File,
    pub listener_v4: TcpListener,
    pub listener_v6: Option<TcpListener>,
}

impl WorkloadSockets {
    /// Duplicates every descriptor, so the copy can be sent or kept while
    /// the original serves.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            netns_path: self.netns_path.clone(),
            netns: self.netns.try_clone()?,
            listener_v4: self.listener_v4.try_clone()?,
            listener_v6: self
                .listener_v6
                .as_ref()
                .map(TcpListener::try_clone)
                .transpose()?,
        })
    }

    /// Tells whether the namespace is the one at `path` now. A pod that was
    /// restarted has a new namespace under the same path.
    pub fn is_netns_at(&self, path: &Path) -> bool {
        let inherited = self
            .netns
            .metadata()
            .map(|metadata| (metadata.dev(), metadata.ino()));
        let current = std::fs::metadata(path).map(|metadata| (metadata.dev(), metadata.ino()));
        matches!((inherited, current), (Ok(a), Ok(b)) if a == b)
    }
}

/// The admin listener and the address it was configured with.
pub struct AdminSocket {
    pub configured: SocketAddr,
    pub listener: TcpListener,
}

/// Sockets the running agent serves, as duplicates that a hand-off sends.
#[derive(Default)]
pub struct Offered {
    workloads: Mutex<BTreeMap<String, WorkloadSockets>>,
    admin: Mutex<Option<AdminSocket>>,
}

impl Offered {
    /// Records the sockets of `workload`, replacing earlier ones.
    pub fn add_workload(&self, workload: &str, sockets: WorkloadSockets) {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(workload.to_owned(), sockets);
    }

    /// Forgets `workload`, which is no longer served.
    pub fn remove_workload(&self, workload: &str) {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(workload);
    }

    pub fn set_admin(&self, admin: AdminSocket) {
        *self.admin.lock().unwrap_or_else(PoisonError::into_inner) = Some(admin);
    }

    /// Returns the names of the offered workloads.
    pub fn workload_names(&self) -> Vec<String> {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Duplicates the sockets of `workload`, if it is still served.
    pub fn clone_workload(&self, workload: &str) -> Option<std::io::Result<WorkloadSockets>> {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(workload)
            .map(WorkloadSockets::try_clone)
    }

    /// Duplicates the admin listener, if there is one.
    pub fn clone_admin(&self) -> Option<std::io::Result<AdminSocket>> {
        self.admin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|admin| {
                Ok(AdminSocket {
                    configured: admin.configured,
                    listener: admin.listener.try_clone()?,
                })
            })
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|admin| admin.configured)
    }
}

/// Sockets received from the previous agent, waiting for their workload to
/// be enrolled.
#[derive(Default)]
pub struct Inherited {
    workloads: Mutex<BTreeMap<String, WorkloadSockets>>,
    admin: Mutex<Option<AdminSocket>>,
    taken: Mutex<Vec<String>>,
}

impl Inherited {
    pub fn add_workload(&self, workload: String, sockets: WorkloadSockets) {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(workload, sockets);
    }

    pub fn set_admin(&self, admin: AdminSocket) {
        *self.admin.lock().unwrap_or_else(PoisonError::into_inner) = Some(admin);
    }

    /// Removes and returns the sockets of `workload` when they were made in
    /// the namespace now at `netns`. Sockets of a namespace that has since
    /// been replaced are dropped, and `None` is returned.
    pub fn take_workload(&self, workload: &str, netns: &Path) -> Option<WorkloadSockets> {
        let sockets = self
            .workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(workload)?;
        if !sockets.is_netns_at(netns) {
            tracing::warn!(
                workload,
                netns = %netns.display(),
                inherited.netns = %sockets.netns_path.display(),
                "inherited sockets belong to another network namespace, creating new ones"
            );
            return None;
        }
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(workload.to_owned());
        Some(sockets)
    }

    /// Removes and returns the admin listener when it was configured as
    /// `configured`.
    pub fn take_admin(&self, configured: SocketAddr) -> Option<TcpListener> {
        let mut admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        if admin.as_ref()?.configured != configured {
            return None;
        }
        admin.take().map(|admin| admin.listener)
    }

    /// Returns the names of the workloads whose sockets were taken.
    pub fn taken(&self) -> Vec<String> {
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns the names of the workloads whose sockets wait for them.
    pub fn waiting(&self) -> Vec<String> {
        self.workloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets(netns: &Path) -> WorkloadSockets {
        WorkloadSockets {
            netns_path: netns.to_owned(),
            netns: File::open(netns).unwrap(),
            listener_v4: TcpListener::bind("127.0.0.1:0").unwrap(),
            listener_v6: None,
        }
    }

    #[test]
    fn take_workload_once() {
        let inherited = Inherited::default();
        let netns = Path::new("/proc/self/ns/net");
        inherited.add_workload("orders".to_owned(), sockets(netns));

        assert!(inherited.take_workload("orders", netns).is_some());
        assert!(inherited.take_workload("orders", netns).is_none());
        assert_eq!(inherited.taken(), vec!["orders".to_owned()]);
    }

    #[test]
    fn take_workload_of_other_namespace_is_rejected() {
        let inherited = Inherited::default();
        let file = tempfile::NamedTempFile::new().unwrap();
        inherited.add_workload("orders".to_owned(), sockets(file.path()));

        assert!(inherited
            .take_workload("orders", Path::new("/proc/self/ns/net"))
            .is_none());
        assert!(inherited.waiting().is_empty());
        assert!(inherited.taken().is_empty());
    }

    #[test]
    fn admin_taken_only_for_same_configuration() {
        let inherited = Inherited::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
        inherited.set_admin(AdminSocket {
            configured,
            listener,
        });

        assert!(inherited
            .take_admin("127.0.0.1:15021".parse().unwrap())
            .is_none());
        assert!(inherited.take_admin(configured).is_some());
    }

    #[test]
    fn offered_clone_is_independent() {
        let offered = Offered::default();
        let netns = Path::new("/proc/self/ns/net");
        offered.add_workload("orders", sockets(netns));

        let copy = offered.clone_workload("orders").unwrap().unwrap();
        offered.remove_workload("orders");

        assert!(copy.listener_v4.local_addr().is_ok());
        assert!(offered.clone_workload("orders").is_none());
    }
}
