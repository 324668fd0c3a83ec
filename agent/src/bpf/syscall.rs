//! The few `bpf(2)` commands that aya 0.13 does not offer for our objects.
//! They open a pinned link, read a link's info, replace a link's program
//! (`BPF_LINK_UPDATE`, public in aya only for XDP and TC links), count map
//! keys, and make the minimal loads and maps of feature probing.
//!
//! Each attribute struct is the prefix of the kernel's `union bpf_attr`
//! (include/uapi/linux/bpf.h) that its command reads. The kernel accepts a
//! shorter attribute and treats the missing tail as zero.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BPF_MAP_CREATE`.
const CMD_MAP_CREATE: libc::c_int = 0;
/// `BPF_MAP_GET_NEXT_KEY`.
const CMD_MAP_GET_NEXT_KEY: libc::c_int = 4;
/// `BPF_PROG_LOAD`.
const CMD_PROG_LOAD: libc::c_int = 5;
/// `BPF_OBJ_GET`.
const CMD_OBJ_GET: libc::c_int = 7;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const CMD_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
/// `BPF_LINK_CREATE`.
const CMD_LINK_CREATE: libc::c_int = 28;
/// `BPF_LINK_UPDATE`.
const CMD_LINK_UPDATE: libc::c_int = 29;

/// `BPF_F_REPLACE`: replace only if the link still runs `old_prog_fd`.
const F_REPLACE: u32 = 4;

/// A program of two instructions, `r0 = 1; exit`. The value 1 is the
/// "pass" or "allow" verdict of every program type probed here. The bytes
/// are `struct bpf_insn` in little-endian order, where the destination
/// register is the low nibble of the second byte.
///
/// NOTE: a big-endian host needs the register nibbles swapped; the agent
/// is built for `x86_64` and `aarch64` only.
const PASS_PROGRAM: [[u8; 8]; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
    [0xb7, 0x00, 0, 0, 1, 0, 0, 0],
    // BPF_JMP | BPF_EXIT
    [0x95, 0x00, 0, 0, 0, 0, 0, 0],
];

/// License of the probe programs. No helper is called, so any string
/// works; GPL keeps the probe valid should that change.
const PROBE_LICENSE: &[u8] = b"GPL\0";

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapKeyAttr {
    map_fd: u32,
    padding: u32,
    key: u64,
    next_key: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The head of `struct bpf_link_info` with the `netns` member of its union,
/// the part a netns link fills.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// Explicit padding: the union that follows is 8-byte aligned.
    padding: u32,
    pub netns_ino: u32,
    pub attach_type: u32,
}

/// Calls `bpf(cmd, attr, size_of::<T>())`.
#[expect(
    unsafe_code,
    reason = "bpf(2) has no safe wrapper for these commands in aya 0.13"
)]
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `repr(C)` struct that is the
    // prefix of `union bpf_attr` for `cmd`, and its exact size is passed, so
    // the kernel reads and writes only within it. Pointers stored inside it
    // point to data that outlives this call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Wraps a file descriptor returned by the kernel.
#[expect(
    unsafe_code,
    reason = "taking ownership of a new fd from a raw syscall needs from_raw_fd"
)]
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel has just returned `fd` as a new descriptor that
    // nothing else in this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A valid fd is never negative.
    fd.as_raw_fd().cast_unsigned()
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    owned(bpf(CMD_OBJ_GET, &mut attr)?)
}

/// Reads the info of the link `link` (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(link),
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(CMD_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Makes the link `link` run `new_program` in place of its current program
/// (`BPF_LINK_UPDATE`). The switch is atomic: every lookup runs either the
/// old or the new program. With `old_program`, the update fails with
/// `EPERM` unless the link still runs that program.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_program: BorrowedFd<'_>,
    old_program: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_u32(link),
        new_prog_fd: fd_u32(new_program),
        ..LinkUpdateAttr::default()
    };
    if let Some(old) = old_program {
        attr.flags = F_REPLACE;
        attr.old_prog_fd = fd_u32(old);
    }
    bpf(CMD_LINK_UPDATE, &mut attr).map(drop)
}

/// Counts the keys of the map `map`, whose keys are `key_size` bytes, by
/// walking them with `BPF_MAP_GET_NEXT_KEY`; stops at `limit`. Entries
/// added or removed during the walk may or may not be counted.
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32, limit: u64) -> io::Result<u64> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0;
    let mut first = true;
    while count < limit {
        let mut attr = MapKeyAttr {
            map_fd: fd_u32(map),
            // A null key requests the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..MapKeyAttr::default()
        };
        match bpf(CMD_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => break,
            Err(error) => return Err(error),
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        count += 1;
    }
    Ok(count)
}

/// Creates a link of `program` to `target` (`BPF_LINK_CREATE`).
pub fn link_create(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: fd_u32(program),
        target_fd: fd_u32(target),
        attach_type,
        flags: 0,
    };
    owned(bpf(CMD_LINK_CREATE, &mut attr)?)
}

/// Loads [`PASS_PROGRAM`] as a program of `prog_type` for
/// `expected_attach_type`, to learn whether the kernel has that type.
pub fn load_pass_program(prog_type: u32, expected_attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: PASS_PROGRAM.len() as u32,
        insns: PASS_PROGRAM.as_ptr() as u64,
        license: PROBE_LICENSE.as_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    owned(bpf(CMD_PROG_LOAD, &mut attr)?)
}

/// Creates a map of `map_type` with 4-byte keys and values and one entry,
/// to learn whether the kernel has that type.
pub fn create_probe_map(map_type: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    owned(bpf(CMD_MAP_CREATE, &mut attr)?)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn attribute_sizes_match_the_kernel_prefixes() {
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(size_of::<LinkUpdateAttr>(), 16);
        assert_eq!(size_of::<ObjGetAttr>(), 16);
        assert_eq!(size_of::<LinkInfo>(), 24);
    }

    #[test]
    fn obj_get_of_missing_pin_fails() {
        let dir = tempfile::tempdir().unwrap();

        let error = obj_get(&dir.path().join("absent")).unwrap_err();

        // ENOENT with CAP_BPF, EPERM without it.
        assert!(
            matches!(error.raw_os_error(), Some(libc::ENOENT | libc::EPERM)),
            "{error}"
        );
    }

    #[test]
    fn link_update_of_non_link_fails() {
        let file = tempfile::tempfile().unwrap();

        let error = link_update(file.as_fd(), file.as_fd(), None).unwrap_err();

        assert!(
            matches!(
                error.raw_os_error(),
                Some(libc::EINVAL | libc::EPERM | libc::EBADF)
            ),
            "{error}"
        );
    }
}
