//! Reading the cookie of a socket's network namespace, the value that
//! `bpf_get_netns_cookie` returns inside the kernel for that namespace.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Returns the netns cookie of the namespace that `socket` was created in
/// (`SO_NETNS_COOKIE`, Linux 5.14).
#[expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in libc, nix or socket2"
)]
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a valid open socket borrowed for the whole call, and
    // the option buffer points to a live `u64` whose size is in `length`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    if length as usize != size_of::<u64>() {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE returned {length} bytes instead of 8"
        )));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;

    #[test]
    fn sockets_of_one_namespace_share_cookie() {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let second = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();

        let cookie = netns_cookie(&first).unwrap();

        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie(&second).unwrap(), cookie);
    }
}
