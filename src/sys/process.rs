//! Process helpers for `thinfs mount --daemon`: a pipe whose write end a
//! child inherits (to say "ready"), leaving the controlling terminal, and
//! the open-files limit of the daemon.

use super::cvt;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A pipe: (read end, close-on-exec; write end, inherited by children).
pub fn ready_pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh fds that we now own.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: clearing FD_CLOEXEC on an fd we own.
    cvt(unsafe { libc::fcntl(fds[1], libc::F_SETFD, 0) })?;
    Ok((r, w))
}

/// Take ownership of an inherited fd number (from the environment).
pub fn inherited_fd(n: i32) -> io::Result<File> {
    // SAFETY: fcntl F_GETFD only checks that the fd is open.
    cvt(unsafe { libc::fcntl(n, libc::F_GETFD) })?;
    // SAFETY: the parent passed us this fd for our sole use.
    Ok(unsafe { File::from_raw_fd(n) })
}

/// Start a new session (leave the terminal's process group).
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    cvt(unsafe { libc::setsid() })?;
    Ok(())
}

/// Effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The process (thread group) of thread `tid`, from /proc.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Raise the soft limit of open files (RLIMIT_NOFILE) to the hard limit.
/// Returns (old soft, new soft). A daemon that serves every user of the
/// machine must not live with the 1024 it inherits from a shell or systemd.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: l is a valid out-parameter.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) })?;
    let old = l.rlim_cur;
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: l is a valid rlimit; raising the soft limit up to the hard
        // one needs no privilege.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) })?;
    }
    Ok((old, l.rlim_cur))
}
