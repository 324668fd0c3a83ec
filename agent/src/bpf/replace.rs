//! Putting a newly loaded program in place of the one a pod runs.
//!
//! The preferred way is `BPF_LINK_UPDATE` on the pinned link: the kernel
//! swaps the program of the existing link in one step, so every lookup runs
//! either the old or the new program, never both and never none. Where the
//! kernel refuses the update, or the pinned link belongs to another network
//! namespace, the program gets a new link that is pinned over the old one by
//! `rename`; the old link then runs until the kernel releases it.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::programs::links::FdLink;
use aya::programs::SkLookup;
use serde::Serialize;
use tracing::{info, warn};

use super::features::ATTACH_SK_LOOKUP;
use super::pins::{self, LINK_PIN};
use super::{links, program_error, syscall, BpfError};

/// Method by which the program was put in place in the pod's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Installed {
    /// No link was pinned: a new link was attached and pinned.
    NewLink,
    /// The pinned link now runs the new program (`BPF_LINK_UPDATE`).
    Updated,
    /// A new link replaced the pinned one by `rename`, and the old link
    /// was waited for until the kernel released it.
    Replaced,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::NewLink => "new link",
            Self::Updated => "link updated",
            Self::Replaced => "link replaced",
        };
        f.write_str(text)
    }
}

/// Makes `program`, loaded and with its maps filled, the one that runs in
/// `netns` for `workload`, whose pins are in `pod_dir`. `previous_links`
/// are the pod's links found before any map was replaced.
pub fn install(
    program: &mut SkLookup,
    netns: &File,
    pod_dir: &Path,
    workload: &str,
    previous_links: &BTreeSet<u32>,
) -> Result<Installed, BpfError> {
    let link_path = pod_dir.join(LINK_PIN);
    if link_path.exists() && try_update(program, netns, &link_path, workload)? {
        return Ok(Installed::Updated);
    }

    let link_id = program
        .attach(netns)
        .map_err(|source| program_error(workload, source))?;
    let link: FdLink = program
        .take_link(link_id)
        .map_err(|source| program_error(workload, source))?
        .into();
    let replaced = pins::pin_link(link, pod_dir)?;
    links::wait_released(workload, previous_links)?;
    Ok(if replaced {
        Installed::Replaced
    } else {
        Installed::NewLink
    })
}

/// Updates the link pinned at `link_path` to run `program`. Returns false,
/// after logging why, when the link cannot take it and a new link is
/// needed.
fn try_update(
    program: &SkLookup,
    netns: &File,
    link_path: &Path,
    workload: &str,
) -> Result<bool, BpfError> {
    let link = match syscall::obj_get(link_path) {
        Ok(link) => link,
        Err(error) => {
            warn!(workload, path = %link_path.display(), %error, "pinned link unreadable, attaching a new link");
            return Ok(false);
        }
    };
    let expected_netns = netns.metadata().map(|metadata| metadata.ino()).ok();
    match syscall::link_info(link.as_fd()) {
        Ok(info)
            if info.attach_type == ATTACH_SK_LOOKUP
                && expected_netns == Some(u64::from(info.netns_ino)) => {}
        Ok(info) => {
            info!(
                workload,
                link.id = info.id,
                link.netns = info.netns_ino,
                netns = ?expected_netns,
                "pinned link is attached to another network namespace, attaching a new link"
            );
            return Ok(false);
        }
        Err(error) => {
            warn!(workload, %error, "failed to read the pinned link's info, attaching a new link");
            return Ok(false);
        }
    }

    let program_fd = program
        .fd()
        .map_err(|source| program_error(workload, source))?;
    match syscall::link_update(link.as_fd(), program_fd.as_fd(), None) {
        Ok(()) => Ok(true),
        Err(error) => {
            warn!(
                workload,
                %error,
                "kernel refused to update the pinned link, replacing it by a new link; both programs run until the old link is released"
            );
            Ok(false)
        }
    }
}
