//! Finding the links that attach a pod's program, and waiting until the
//! kernel has released them.
//!
//! Removing the last pin of a link does not detach it at once. bpffs drops
//! its reference when it frees the inode, after an RCU grace period
//! (`bpf_free_inode`), and `bpf_link_put` then releases the link from a
//! workqueue (kernel/bpf/syscall.c). Until that work runs, the program stays
//! in the namespace's `sk_lookup` list and keeps steering connections. On a
//! 2-core VM (kernel 6.18) busy with other jobs and 4 busy-looping shells,
//! it stayed attached for up to 2.6 s after its pin was removed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::MapInfo;
use aya::programs::{loaded_links, loaded_programs, ProgramError, ProgramType};
use tokengate_common::{MAP_CONFIG, MAP_COUNTERS, MAP_LISTENERS, MAP_PORTS};
use tracing::debug;

use super::BpfError;

/// Maximum wait for the kernel to release an unpinned link. The measured
/// worst case (see the module documentation) was 2.6 s, so this leaves room
/// for heavier load and still bounds a reload or a detach.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval between two scans of the kernel's link list. A scan costs three
/// syscalls per link on the host.
const RELEASE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Returns the ids of the `sk_lookup` links whose program uses one of the
/// maps pinned in the pod directory `dir` (of any layout version), that is
/// the links of this pod's programs.
///
/// Call it while the link pin still exists: a link whose last reference is
/// already gone cannot be opened by id and is not listed.
pub fn pod_links(dir: &Path) -> Result<BTreeSet<u32>, BpfError> {
    let map_ids: BTreeSet<u32> = super::layout::all_map_dirs(dir)
        .iter()
        .flat_map(|maps| {
            [MAP_LISTENERS, MAP_PORTS, MAP_CONFIG, MAP_COUNTERS]
                .iter()
                .filter_map(|name| MapInfo::from_pin(maps.join(name)).ok())
        })
        .map(|info| info.id())
        .collect();
    if map_ids.is_empty() {
        return Ok(BTreeSet::new());
    }

    let mut programs = BTreeSet::new();
    for program in loaded_programs() {
        let program = match program {
            Ok(program) => program,
            Err(error) if is_gone(&error) => continue,
            Err(source) => return Err(list_error("programs", source)),
        };
        if !program
            .program_type()
            .is_ok_and(|program_type| program_type == ProgramType::SkLookup)
        {
            continue;
        }
        let uses_pod_maps = match program.map_ids() {
            Ok(Some(ids)) => ids.iter().any(|id| map_ids.contains(id)),
            Ok(None) => false,
            Err(error) if is_gone(&error) => false,
            Err(source) => return Err(list_error("programs", source)),
        };
        if uses_pod_maps {
            programs.insert(program.id());
        }
    }

    let mut links = BTreeSet::new();
    for link in loaded_links() {
        match link {
            Ok(link) if programs.contains(&link.prog_id) => {
                links.insert(link.id);
            }
            Ok(_) => {}
            Err(error) if is_gone(&error) => {}
            Err(source) => return Err(list_error("links", source)),
        }
    }
    Ok(links)
}

/// Waits until the kernel has released every link in `links`, whose pins
/// the caller has removed, so that their programs no longer run.
///
/// NOTE: the kernel frees a link's id just before it takes the program out
/// of the namespace's list, so the last check can pass a few microseconds
/// early. A lookup that already started may also still run the old program.
pub fn wait_released(workload: &str, links: &BTreeSet<u32>) -> Result<(), BpfError> {
    if links.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    loop {
        let attached = attached_among(links)?;
        if attached.is_empty() {
            debug!(workload, links = ?links, waited = ?start.elapsed(), "old links released");
            return Ok(());
        }
        if start.elapsed() >= RELEASE_TIMEOUT {
            return Err(BpfError::LinkNotReleased {
                workload: workload.to_owned(),
                links: attached.into_iter().collect(),
                timeout: RELEASE_TIMEOUT,
            });
        }
        std::thread::sleep(RELEASE_POLL_INTERVAL);
    }
}

/// One entry of the kernel's link list, in ascending id order.
#[derive(Clone, Copy, Debug)]
enum Listed {
    /// A link that could be opened by its id.
    Link(u32),
    /// A link whose id is listed but that could not be opened (ENOENT or
    /// EAGAIN): its last reference is gone and the kernel has not released
    /// it yet, or it is still being created.
    Unreadable,
}

/// Returns the ids in `links` that the kernel may still have attached.
fn attached_among(links: &BTreeSet<u32>) -> Result<BTreeSet<u32>, BpfError> {
    let mut listing = Vec::new();
    for link in loaded_links() {
        match link {
            Ok(link) => listing.push(Listed::Link(link.id)),
            Err(error) if is_gone(&error) => listing.push(Listed::Unreadable),
            Err(source) => return Err(list_error("links", source)),
        }
    }
    Ok(attached_in_listing(&listing, links))
}

/// Returns the ids in `links` that `listing` shows or may hide.
///
/// An unreadable entry has no id, but the listing runs in ascending id
/// order, so it hides only ids between the readable entries around it. A
/// wanted id in that range counts as attached.
fn attached_in_listing(listing: &[Listed], links: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut attached = BTreeSet::new();
    let mut previous_id = 0u32;
    let mut unreadable_after: Option<u32> = None;
    for entry in listing {
        match *entry {
            Listed::Link(id) => {
                if let Some(after) = unreadable_after.take() {
                    attached.extend(links.range(after.saturating_add(1)..id));
                }
                if links.contains(&id) {
                    attached.insert(id);
                }
                previous_id = id;
            }
            Listed::Unreadable => {
                unreadable_after.get_or_insert(previous_id);
            }
        }
    }
    if let Some(after) = unreadable_after {
        attached.extend(links.range(after.saturating_add(1)..));
    }
    attached
}

/// Tells whether an object listing failed only because the object went
/// away between finding its id and opening it.
fn is_gone(error: &ProgramError) -> bool {
    match error {
        ProgramError::SyscallError(error) => matches!(
            error.io_error.raw_os_error(),
            Some(libc::ENOENT | libc::EAGAIN)
        ),
        _ => false,
    }
}

fn list_error(kind: &'static str, source: ProgramError) -> BpfError {
    BpfError::ListObjects { kind, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(values: &[u32]) -> BTreeSet<u32> {
        values.iter().copied().collect()
    }

    #[test]
    fn listed_link_is_attached() {
        let listing = [Listed::Link(3), Listed::Link(7), Listed::Link(9)];

        assert_eq!(attached_in_listing(&listing, &ids(&[7, 8])), ids(&[7]));
    }

    #[test]
    fn released_link_is_not_attached() {
        let listing = [Listed::Link(3), Listed::Link(9)];

        assert!(attached_in_listing(&listing, &ids(&[7])).is_empty());
    }

    #[test]
    fn unreadable_entry_hides_ids_between_neighbours() {
        let listing = [
            Listed::Link(3),
            Listed::Unreadable,
            Listed::Link(9),
            Listed::Link(12),
        ];

        assert_eq!(attached_in_listing(&listing, &ids(&[2, 5, 10])), ids(&[5]));
    }

    #[test]
    fn unreadable_entry_at_ends_hides_open_ranges() {
        let listing = [
            Listed::Unreadable,
            Listed::Link(4),
            Listed::Unreadable,
            Listed::Unreadable,
        ];

        assert_eq!(
            attached_in_listing(&listing, &ids(&[1, 4, 6, 100])),
            ids(&[1, 4, 6, 100])
        );
    }

    #[test]
    fn empty_listing_has_nothing_attached() {
        assert!(attached_in_listing(&[], &ids(&[1])).is_empty());
    }
}
