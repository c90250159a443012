//! Unix sockets: the peer's credentials (SO_PEERCRED, SO_PEERGROUPS) and
//! waiting for readable sockets (poll).

use super::cvt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

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

/// Supplementary groups of the process at the other end of a unix socket,
/// as they were when it connected (SO_PEERGROUPS).
pub fn peer_groups(sock: impl AsFd) -> io::Result<Vec<u32>> {
    let mut v: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (v.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: v has room for `len` bytes; len is a valid in/out parameter.
        let r = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                v.as_mut_ptr().cast(),
                &mut len,
            )
        };
        match cvt(r) {
            Ok(_) => {
                v.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
                return Ok(v);
            }
            // The kernel says how much room it needs.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && v.len() < 1 << 16 => {
                let need = (len as usize).div_ceil(std::mem::size_of::<libc::gid_t>());
                v.resize(need.max(v.len() * 2), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Wait up to `timeout_ms` (-1: forever) until one of `fds` is readable
/// (or hung up, or in error). Returns one flag per fd; an interrupted wait
/// returns all false.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfd structures.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    match cvt(r) {
        Ok(_) => Ok(p.iter().map(|x| x.revents != 0).collect()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; p.len()]),
        Err(e) => Err(e),
    }
}
