//! Messages of the hand-off and their framing on a Unix stream socket.
//!
//! Each message is a 4-byte big-endian length and a JSON object. A message
//! that carries sockets has them attached with `SCM_RIGHTS` to its first
//! byte. The two sides take turns strictly (the new agent requests each message with
//! [`Message::Next`], the old one replies with one message), so a read
//! never spans two messages and their descriptors cannot mix.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use serde::{Deserialize, Serialize};

use super::{fds, HandoffError};

/// Version of this protocol. Both agents must speak the same one; bump it
/// with any change of the messages or of the descriptors they carry.
pub const PROTOCOL_VERSION: u32 = 1;

/// Maximum size of one message's JSON, in bytes. The largest message lists
/// workload names, so 1 MiB leaves room for thousands of pods.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Maximum descriptors in one message: a namespace and two listeners.
pub const MAX_FDS: usize = 3;

/// One message of the hand-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// New agent, first: who it is and which pins it serves.
    Hello {
        protocol: u32,
        agent_version: String,
        pid: u32,
        pin_path: PathBuf,
    },
    /// Old agent: it will hand over `workloads` and, when it has one, the
    /// admin listener.
    Welcome {
        protocol: u32,
        agent_version: String,
        pid: u32,
        workloads: Vec<String>,
        admin: Option<SocketAddr>,
    },
    /// Old agent: no hand-off, for `reason`.
    Refuse { reason: String },
    /// New agent: send the next socket set.
    Next,
    /// Old agent: the admin listener, configured as `configured`. Carries
    /// one descriptor.
    Admin { configured: SocketAddr },
    /// Old agent: one workload's sockets. Carries the namespace, the IPv4
    /// listener and, when `ipv6`, the IPv6 listener, in that order.
    Workload {
        name: String,
        netns: PathBuf,
        ipv6: bool,
    },
    /// Old agent: everything is sent.
    End,
    /// New agent: it accepts on the sockets of `taken` from now on; the old
    /// agent stops accepting and drains.
    Ready { taken: Vec<String> },
    /// Old agent: it has stopped accepting.
    Released,
    /// Any client, first and only: is an agent running here? Used by
    /// `tokengate status` and `tokengate uninstall`.
    Ping,
    /// Old agent: the reply to [`Message::Ping`].
    Pong {
        pid: u32,
        agent_version: String,
        /// Bound address of the admin listener.
        admin: Option<SocketAddr>,
    },
}

impl Message {
    /// Returns the message type as it appears in the JSON, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Welcome { .. } => "welcome",
            Self::Refuse { .. } => "refuse",
            Self::Next => "next",
            Self::Admin { .. } => "admin",
            Self::Workload { .. } => "workload",
            Self::End => "end",
            Self::Ready { .. } => "ready",
            Self::Released => "released",
            Self::Ping => "ping",
            Self::Pong { .. } => "pong",
        }
    }
}

/// Sends `message` with `fds` attached.
pub fn send(stream: &UnixStream, message: &Message, fds: &[RawFd]) -> Result<(), HandoffError> {
    let body = serde_json::to_vec(message).map_err(|source| HandoffError::Encode { source })?;
    let length = u32::try_from(body.len())
        .ok()
        .filter(|length| *length as usize <= MAX_MESSAGE_BYTES)
        .ok_or(HandoffError::TooLarge { bytes: body.len() })?;
    let mut frame = length.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);

    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|source| HandoffError::Io {
        action: "send",
        source: source.into(),
    })?;
    // The descriptors went with the first byte; the rest is plain data.
    let mut writer = stream;
    writer
        .write_all(&frame[sent..])
        .map_err(|source| HandoffError::Io {
            action: "send",
            source,
        })
}

/// Receives one message and the descriptors attached to it.
pub fn receive(stream: &UnixStream) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    let mut head = [0u8; 4];
    let mut received = Vec::new();
    let mut cmsg_buffer = nix::cmsg_space!([RawFd; MAX_FDS]);

    let read = {
        let mut iov = [IoSliceMut::new(&mut head)];
        let message = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buffer),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|source| HandoffError::Io {
            action: "receive",
            source: source.into(),
        })?;
        let truncated = message.flags.contains(MsgFlags::MSG_CTRUNC);
        for control in message.cmsgs().map_err(|source| HandoffError::Io {
            action: "receive",
            source: source.into(),
        })? {
            if let ControlMessageOwned::ScmRights(descriptors) = control {
                received.extend(descriptors);
            }
        }
        if truncated {
            // Close what did arrive before failing.
            drop(fds::adopt(received));
            return Err(HandoffError::TooManyDescriptors { max: MAX_FDS });
        }
        message.bytes
    };
    let received = fds::adopt(received);
    if read == 0 {
        return Err(HandoffError::Closed);
    }

    let mut reader = stream;
    reader
        .read_exact(&mut head[read..])
        .map_err(|source| HandoffError::Io {
            action: "receive",
            source,
        })?;
    let length = u32::from_be_bytes(head) as usize;
    if length > MAX_MESSAGE_BYTES {
        return Err(HandoffError::TooLarge { bytes: length });
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|source| HandoffError::Io {
            action: "receive",
            source,
        })?;
    let message =
        serde_json::from_slice(&body).map_err(|source| HandoffError::Decode { source })?;
    Ok((message, received))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn message_round_trip_without_descriptors() {
        let (left, right) = UnixStream::pair().unwrap();
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".to_owned(),
            pid: 7,
            pin_path: PathBuf::from("/sys/fs/bpf/tokengate"),
        };

        send(&left, &hello, &[]).unwrap();
        let (received, fds) = receive(&right).unwrap();

        assert_eq!(received, hello);
        assert!(fds.is_empty());
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (left, right) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();

        send(
            &left,
            &Message::Admin {
                configured: address,
            },
            &[listener.as_fd().as_raw_fd()],
        )
        .unwrap();
        send(&left, &Message::End, &[]).unwrap();
        let (admin, mut fds) = receive(&right).unwrap();
        let (end, none) = receive(&right).unwrap();

        assert_eq!(
            admin,
            Message::Admin {
                configured: address
            }
        );
        assert_eq!(end, Message::End);
        assert!(none.is_empty());
        let received = std::net::TcpListener::from(fds.remove(0));
        assert_eq!(received.local_addr().unwrap(), address);
    }

    #[test]
    fn closed_peer_is_reported() {
        let (left, right) = UnixStream::pair().unwrap();
        drop(left);

        assert!(matches!(receive(&right), Err(HandoffError::Closed)));
    }

    #[test]
    fn oversized_length_is_rejected() {
        let (mut left, right) = UnixStream::pair().unwrap();
        let length = u32::try_from(MAX_MESSAGE_BYTES + 1).unwrap();
        left.write_all(&length.to_be_bytes()).unwrap();

        assert!(matches!(
            receive(&right),
            Err(HandoffError::TooLarge { .. })
        ));
    }
}
