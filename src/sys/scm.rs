//! Unix sockets: binding one with its final mode from the moment it
//! appears ([`bind_unix`]), descriptor passing (SCM_RIGHTS) with a bound
//! on what a receive installs, and the small
//! descriptor checks a streaming front end needs: waiting until a peer
//! hangs up or a descriptor is writable, and whether one is a terminal.

use super::cvt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Create the missing directories of `dir`, each with mode 0755 exactly
/// (whatever the umask: with umask 000 `create_dir_all` would make them
/// 0777, and anyone could replace what is bound in them).
pub fn create_dirs_0755(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        create_dirs_0755(p)?;
    }
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create directory `dir` with mode 0700 from the start if it is missing
/// (its missing parents 0755, see [`create_dirs_0755`]).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        create_dirs_0755(p)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// A directory removed (with what is left in it) on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bind a unix socket at `path` that has `mode` from the moment it is
/// there, whatever the process's umask (a umask set around bind(2) would
/// be process-wide, racing every other thread that creates files).
///
/// The socket is bound in a new directory of mode 0700 beside `path` (only
/// root can reach it there), given `mode`, and renamed to `path`, which
/// replaces atomically whatever was there (a stale socket). Missing parent
/// directories are created 0755. The directory's name adds 20-odd bytes
/// to the path, which must still fit a socket address (108 bytes).
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_dirs_0755(dir)?;
    let tmp = TempDir(dir.join(format!(
        ".thinfs-bind-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )));
    std::fs::DirBuilder::new().mode(0o700).create(&tmp.0)?;
    let inner = tmp.0.join("s");
    let l = UnixListener::bind(&inner)?;
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&inner, path)?;
    Ok(l)
}

/// Most descriptors accepted with one message.
pub const MAX_FDS: usize = 4;

/// Room for a control message carrying [`MAX_FDS`] descriptors.
fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Send all of `data` on `sock`, with `fds` attached to its first byte.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // u64 keeps the control buffer aligned for cmsghdr.
        let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
        // SAFETY: a zeroed msghdr is valid; fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            let len = std::mem::size_of_val(fds);
            msg.msg_control = cbuf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as _;
            // SAFETY: msg_control points at a buffer of at least
            // msg_controllen bytes, so the first header and its data fit.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, f) in fds.iter().enumerate() {
                    p.add(i).write_unaligned(f.as_raw_fd());
                }
            }
        }
        // SAFETY: msg points at valid iovec and control buffers.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += r as usize;
    }
    Ok(())
}

/// What one [`recv_with_fds`] brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes read (0: end of stream).
    pub bytes: usize,
    /// Descriptors came that were not taken (more than `max`, or any
    /// with `max` 0): the kernel closed them without installing them.
    pub refused: bool,
}

/// Receive into `buf`, taking at most `max` descriptors that came with the
/// bytes (appended to `fds`, close-on-exec). The control buffer has room
/// for exactly `max` descriptors, so the kernel installs no more than that
/// and closes the rest itself (MSG_CTRUNC); with `max` 0 there is no
/// control buffer and none is installed. A sender can thus never make the
/// receiver hold more than `max` descriptors per call.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max: usize,
) -> io::Result<Received> {
    let max = max.min(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 keeps the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: a zeroed msghdr is valid; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max > 0 {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // CMSG_LEN, not CMSG_SPACE: the kernel fits (len - header) / 4
        // descriptors, and CMSG_SPACE's padding would fit one more.
        // SAFETY: CMSG_LEN only computes a size.
        msg.msg_controllen =
            unsafe { libc::CMSG_LEN((max * std::mem::size_of::<RawFd>()) as u32) } as _;
    }
    // SAFETY: msg points at valid buffers of the sizes given.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut taken = 0;
    let mut refused = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if max > 0 {
        // SAFETY: the kernel filled msg_control up to msg_controllen; the
        // CMSG_* macros walk only within it. Every descriptor it carries
        // is new in this process and owned by nobody else.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                        if taken < max {
                            fds.push(fd);
                            taken += 1;
                        } else {
                            // Cannot happen (the buffer fits `max`); closed.
                            refused = true;
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    Ok(Received {
        bytes: r as usize,
        refused,
    })
}

/// Wait up to `timeout_ms` for `fd` to have input or be hung up. Returns
/// (readable, hung up); an interrupted wait returns (false, false).
pub fn poll_in_or_hup(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    match cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) }) {
        Ok(_) => Ok((
            p.revents & libc::POLLIN != 0,
            p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        )),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok((false, false)),
        Err(e) => Err(e),
    }
}

/// Wait up to `timeout_ms` for `fd` to take output (or fail: the write
/// that follows reports why).
pub fn wait_writable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    match cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) }) {
        Ok(_) => Ok(p.revents != 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Is `fd` a terminal?
pub fn is_tty(fd: impl AsFd) -> bool {
    // SAFETY: isatty only reads the descriptor number.
    unsafe { libc::isatty(fd.as_fd().as_raw_fd()) == 1 }
}

/// Is `fd` open for writing (O_WRONLY or O_RDWR)?
pub fn is_writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(matches!(
        fl & libc::O_ACCMODE,
        libc::O_WRONLY | libc::O_RDWR
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Send one byte carrying `n` copies of stdin's descriptor.
    fn send_n(s: &UnixStream, n: usize) {
        let fd = std::io::stdin();
        let fds: Vec<BorrowedFd<'_>> = (0..n).map(|_| fd.as_fd()).collect();
        send_with_fds(s.as_fd(), b"x", &fds).unwrap();
    }

    #[test]
    fn a_receive_installs_at_most_max_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 16];
        // Within the bound: taken.
        send_n(&a, 1);
        let mut fds = Vec::new();
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds, 1).unwrap();
        assert_eq!((r.bytes, r.refused, fds.len()), (1, false, 1));
        drop(fds);
        // Beyond it: the kernel installs `max` and closes the rest.
        let before = open_fds();
        send_n(&a, 4);
        let mut fds = Vec::new();
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds, 1).unwrap();
        assert_eq!((r.bytes, r.refused, fds.len()), (1, true, 1));
        drop(fds);
        // None wanted: none installed.
        send_n(&a, 3);
        let mut fds = Vec::new();
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds, 0).unwrap();
        assert_eq!((r.bytes, r.refused, fds.len()), (1, true, 0));
        assert_eq!(open_fds(), before, "descriptors left installed");
        // Plain bytes: nothing refused.
        send_n(&a, 0);
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds, 0).unwrap();
        assert_eq!((r.bytes, r.refused), (1, false));
    }

    #[test]
    fn bind_unix_gives_the_mode_and_replaces_a_stale_socket() {
        let d = std::env::temp_dir().join(format!("thinfs-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let p = d.join("a/b/s.sock");
        let l = bind_unix(&p, 0o600).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&d.join("a")), 0o755);
        assert_eq!(mode(&d.join("a/b")), 0o755);
        drop(l);
        // A stale socket is replaced; nothing else is left beside it.
        let l = bind_unix(&p, 0o666).unwrap();
        assert_eq!(mode(&p), 0o666);
        UnixStream::connect(&p).unwrap();
        let names: Vec<_> = std::fs::read_dir(d.join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.sock")]);
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
