//! Messages over a `SOCK_SEQPACKET` unix socket: one postcard-encoded [`Envelope`] per packet,
//! file descriptors beside it with `SCM_RIGHTS`. Packet boundaries are kept by the kernel, so
//! there is no framing; a zero-length read means the peer has gone.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::Envelope;

/// Largest message either side sends: room for a call's whole mailbox input (256 KiB), or its
/// output (256 KiB) and log (64 KiB). A spawn answer is ~50 bytes per clone. [`socketpair`]
/// raises the sockets' send buffers to carry it.
pub const MAX_MESSAGE: usize = 400 << 10;

/// The send buffer a socket needs for a [`MAX_MESSAGE`] packet (the kernel refuses a unix
/// datagram longer than the buffer less 32 bytes).
const SEND_BUFFER: usize = MAX_MESSAGE + 64;
/// Most descriptors one message carries (the KVM device, a template's layers, or the stats fds
/// of a VM and each of its vCPUs).
pub const MAX_FDS: usize = 64;

const _: () = assert!(
    cowvm_vmm::layout::MAX_VCPUS < MAX_FDS,
    "a VM's stats fd and one per vCPU fit one message"
);

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed its end (or died).
    #[error("the peer closed the socket")]
    Closed,
    /// A socket call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A message did not decode or encode.
    #[error("malformed message: {0}")]
    Codec(#[from] postcard::Error),
    /// A message or its descriptors were cut short by the kernel.
    #[error("message truncated (larger than {MAX_MESSAGE} bytes or more than {MAX_FDS} fds)")]
    Truncated,
}

impl WireError {
    fn io(op: &'static str) -> WireError {
        let source = io::Error::last_os_error();
        match source.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => WireError::Closed,
            _ => WireError::Io { op, source },
        }
    }
}

/// Sets `option` (`SO_SNDBUF` or `SO_SNDBUFFORCE`) of `socket` to `value`.
fn set_send_buffer(socket: BorrowedFd<'_>, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads one c_int from the pointer, which points at `value`.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// The send buffer of `socket`, in bytes.
fn send_buffer(socket: BorrowedFd<'_>) -> usize {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, and `len` says how many.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        usize::try_from(value).unwrap_or(0)
    } else {
        0
    }
}

/// Raises the send buffer of `socket` to [`SEND_BUFFER`]: the kernel doubles what is asked
/// within `net.core.wmem_max` (208 KiB by default, so 416 KiB); beyond that only root may force
/// it. When neither works, larger messages fail to send with `EMSGSIZE` and smaller ones pass.
fn raise_send_buffer(socket: BorrowedFd<'_>) {
    let half = SEND_BUFFER.div_ceil(2) as libc::c_int;
    if set_send_buffer(socket, libc::SO_SNDBUF, half) && send_buffer(socket) >= SEND_BUFFER {
        return;
    }
    set_send_buffer(socket, libc::SO_SNDBUFFORCE, half);
}

/// A connected pair of `SOCK_SEQPACKET` sockets, both close-on-exec, whose send buffers carry a
/// [`MAX_MESSAGE`] packet.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors the kernel writes on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    raise_send_buffer(pair.0.as_fd());
    raise_send_buffer(pair.1.as_fd());
    Ok(pair)
}

/// Encodes `message` and sends it with `fds` as one packet.
pub fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &Envelope<T>,
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let bytes = postcard::to_allocvec(message)?;
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(WireError::Truncated);
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) } as usize;
    let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
    // SAFETY: an all-zero msghdr is valid; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: the control buffer is CMSG_SPACE(len) bytes, so the first header and its data
        // (`raw.len()` descriptors) fit; the pointers stay inside `control`.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(header).cast::<RawFd>(), raw.len());
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (the encoded bytes) and `control`, all alive for the call.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(WireError::io("sendmsg"));
        }
    }
}

/// Receives one packet: the decoded message and the descriptors that came with it.
pub fn recv<T: DeserializeOwned>(
    socket: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> Result<(Envelope<T>, Vec<OwnedFd>), WireError> {
    buf.resize(MAX_MESSAGE, 0);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    let len = loop {
        // SAFETY: `msg` points at `buf` and `control`, both alive and of the lengths given.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(WireError::io("recvmsg"));
        }
    };
    let fds = take_fds(&msg);
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(WireError::Truncated);
    }
    if len == 0 {
        return Err(WireError::Closed);
    }
    let message = postcard::from_bytes(&buf[..len])?;
    Ok((message, fds))
}

/// Takes ownership of every descriptor in the control messages of `msg`.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer within
    // `msg_controllen`, and each SCM_RIGHTS payload holds whole descriptors that the kernel
    // installed in this process for us (owned by nothing else yet).
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            header = libc::CMSG_NXTHDR(msg, header);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_message_of_max_message_bytes_crosses_a_socketpair_and_one_byte_more_is_refused() {
        let (a, b) = socketpair().expect("socketpair");
        if send_buffer(a.as_fd()) < SEND_BUFFER {
            println!(
                "SKIP: net.core.wmem_max keeps the send buffer at {} bytes and this user may not force it",
                send_buffer(a.as_fd())
            );
            return;
        }
        // postcard: one byte of id, three of length, then the bytes.
        let body = vec![7u8; MAX_MESSAGE - 4];
        let message = Envelope { id: 1u64, body };
        send(a.as_fd(), &message, &[]).expect("a full-size message is sent");
        let mut buf = Vec::new();
        let (back, fds) = recv::<Vec<u8>>(b.as_fd(), &mut buf).expect("and received whole");
        assert_eq!((back.id, back.body.len(), fds.len()), (1, MAX_MESSAGE - 4, 0));
        let larger = Envelope {
            id: 1u64,
            body: vec![7u8; MAX_MESSAGE - 3],
        };
        assert!(matches!(send(a.as_fd(), &larger, &[]), Err(WireError::Truncated)));
    }
}
