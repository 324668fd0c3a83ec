//! System calls that aya 0.13 and socket2 do not wrap: creating and pinning
//! a cgroup `bpf_link`, and reading a socket's network namespace cookie.
//!
//! aya 0.13 attaches cgroup programs through links but keeps them private
//! (there is no conversion to `FdLink`), so it cannot pin them. A pinned
//! link is what keeps egress steering in place, and the destinations
//! closed, while no agent runs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BPF_LINK_CREATE` from the Linux UAPI (`enum bpf_cmd`).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_OBJ_PIN` from the Linux UAPI (`enum bpf_cmd`).
const BPF_OBJ_PIN: libc::c_long = 6;

/// `BPF_CGROUP_SOCK_OPS` from the Linux UAPI (`enum bpf_attach_type`).
pub const ATTACH_SOCK_OPS: u32 = 3;
/// `BPF_CGROUP_INET4_CONNECT` from the Linux UAPI.
pub const ATTACH_CONNECT4: u32 = 10;
/// `BPF_CGROUP_INET6_CONNECT` from the Linux UAPI.
pub const ATTACH_CONNECT6: u32 = 11;

/// Size of the `bpf_attr` buffer passed to the kernel. The kernel reads the
/// fields of the command and requires every byte past them to be zero, so
/// a zeroed buffer larger than the fields used works on every version.
const ATTR_BYTES: usize = 128;

/// Creates a link that attaches `program` to the cgroup `cgroup` for
/// `attach_type`. Cgroup links always allow other programs on the same
/// hook, so a replacement can be attached before the old link goes.
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_BYTES];
    // `link_create`: prog_fd, target_fd, attach_type, flags (0), all u32.
    write_u32(&mut attr, 0, fd_as_u32(program.as_raw_fd())?);
    write_u32(&mut attr, 4, fd_as_u32(cgroup.as_raw_fd())?);
    write_u32(&mut attr, 8, attach_type);

    // On success BPF_LINK_CREATE returns a new descriptor that nothing else
    // owns, as `owned_fd` requires.
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    Ok(owned_fd(fd))
}

/// Pins the bpf object behind `fd` (here: a link) at `path` in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path_text = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains a NUL byte"))?;
    let mut attr = [0u8; ATTR_BYTES];
    // `obj_pin`: pathname (u64 pointer), bpf_fd (u32), file_flags (0).
    let pointer = path_text.as_ptr() as u64;
    attr[0..8].copy_from_slice(&pointer.to_ne_bytes());
    write_u32(&mut attr, 8, fd_as_u32(fd.as_raw_fd())?);

    bpf(BPF_OBJ_PIN, &attr).map(|_| ())
}

/// Returns the cookie of the network namespace that `socket` belongs to
/// (`SO_NETNS_COOKIE`, Linux 5.14), the value `bpf_get_netns_cookie`
/// returns in programs that run for sockets of that namespace.
#[expect(
    unsafe_code,
    reason = "getsockopt has no safe wrapper for SO_NETNS_COOKIE in socket2 0.5 or nix 0.29"
)]
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the whole call, `cookie` is a
    // live u64 and `length` contains its size, as getsockopt requires.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut length,
        )
    };
    if result == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[expect(
    unsafe_code,
    reason = "the bpf(2) system call has no safe wrapper for these commands in aya 0.13"
)]
fn bpf(command: libc::c_long, attr: &[u8; ATTR_BYTES]) -> io::Result<libc::c_int> {
    // SAFETY: `attr` is a live, initialised buffer of `ATTR_BYTES` bytes for
    // the whole call, and the kernel only reads it for these commands. The
    // one pointer inside it (the pin path) outlives the call in the caller.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_ptr(),
            ATTR_BYTES as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        libc::c_int::try_from(result).map_err(|_| io::Error::other("bpf(2) returned an invalid fd"))
    }
}

#[expect(
    unsafe_code,
    reason = "turning a descriptor returned by a raw system call into an OwnedFd"
)]
fn owned_fd(fd: libc::c_int) -> OwnedFd {
    // SAFETY: the caller passes a descriptor that the kernel just returned
    // and that nothing else owns or closes.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn fd_as_u32(fd: libc::c_int) -> io::Result<u32> {
    u32::try_from(fd).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative fd"))
}

fn write_u32(attr: &mut [u8; ATTR_BYTES], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}
