//! Unix socket credentials (SO_PEERCRED).

use super::cvt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// (pid, uid, gid) of the process at the other end of a unix socket.
pub fn peer_cred(sock: impl AsFd) -> io::Result<(u32, u32, u32)> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: c and len are valid out-parameters of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((c.pid as u32, c.uid, c.gid))
}
