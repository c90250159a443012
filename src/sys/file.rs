//! The `*at` file operations that the FUSE passthrough layer performs on
//! inner filesystems, relative to O_PATH file descriptors. None of them
//! follows a symlink inside an inner filesystem: names are single
//! components opened with O_NOFOLLOW (or calls that never follow a final
//! link), and `/proc/self/fd/N` reaches exactly the inode behind a handle.

use super::{cstr, cvt, cvt_l};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

/// The `/proc/self/fd/N` path of a descriptor (to reopen O_PATH fds).
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A formatted number never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `openat(dir, name, flags, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let n = cstr(name)?;
    // SAFETY: n is a valid C string; the returned fd is new and owned.
    let fd =
        cvt(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Create `name` in `dir` with open `flags`, or (without `O_EXCL` in
/// `flags`) open it if it exists; a final symlink is never followed
/// (ELOOP). Returns the file and whether this call made it.
pub fn create_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: i32,
    mode: u32,
) -> io::Result<(File, bool)> {
    let base = (flags | libc::O_NOFOLLOW) & !(libc::O_CREAT | libc::O_EXCL);
    for _ in 0..4 {
        match openat(dir, name, base | libc::O_CREAT | libc::O_EXCL, mode) {
            Ok(fd) => return Ok((File::from(fd), true)),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {}
            Err(e) => return Err(e),
        }
        match openat(dir, name, base, 0) {
            Ok(fd) => return Ok((File::from(fd), false)),
            // Removed in between: try to create it again.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let n = cstr(name)?;
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: n is a valid C string; st is a valid out-parameter.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            n.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// An O_PATH handle on `name` in `dir`, not following a final symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopen an O_PATH handle with real open flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let p = proc_path(fd);
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    // SAFETY: p is a valid C string; the returned fd is new and owned.
    let nfd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: nfd was just returned by open.
    Ok(unsafe { File::from_raw_fd(nfd) })
}

/// `fstatat(fd, "", AT_EMPTY_PATH)`: the stat of the handle itself.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: "" is a valid C string; st is a valid out-parameter.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `mkdirat`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n is a valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) })?;
    Ok(())
}

/// `mknodat`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n is a valid C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), mode, rdev) })?;
    Ok(())
}

/// `symlinkat`.
pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let n = cstr(name)?;
    // SAFETY: both are valid C strings.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) })?;
    Ok(())
}

/// `unlinkat` (with `AT_REMOVEDIR` for directories).
pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let n = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: n is a valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) })?;
    Ok(())
}

/// `renameat2`.
pub fn renameat2(
    od: BorrowedFd<'_>,
    on: &OsStr,
    nd: BorrowedFd<'_>,
    nn: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let a = cstr(on)?;
    let b = cstr(nn)?;
    // SAFETY: both names are valid C strings.
    cvt(unsafe {
        libc::renameat2(
            od.as_raw_fd(),
            a.as_ptr(),
            nd.as_raw_fd(),
            b.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// Hard link the file behind an O_PATH handle as `name` in `dir`.
pub fn linkat(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    // SAFETY: p and n are valid C strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            dir.as_raw_fd(),
            n.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

/// Target of the symlink behind an O_PATH handle.
pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is writable for its length; "" with an O_PATH fd reads the link itself.
    let n = cvt_l(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    } as i64)?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// `chmod` through the handle's proc path.
pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: p is a valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) })?;
    Ok(())
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`; `u32::MAX` leaves a field unchanged.
pub fn chown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: "" is a valid C string.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `truncate` through the handle's proc path.
pub fn truncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: p is a valid C string.
    cvt(unsafe { libc::truncate(p.as_ptr(), size as i64) })?;
    Ok(())
}

/// `ftruncate` on an open file.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) })?;
    Ok(())
}

/// `utimensat` on the handle itself.
pub fn utimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: times points to two timespecs; "" is a valid C string.
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `fallocate` on an open file.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) })?;
    Ok(())
}

/// `lseek` on an open file.
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    cvt_l(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) })
}

/// `fsync` / `fdatasync` on an open file.
pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    Ok(())
}

/// `copy_file_range` between two open files.
pub fn copy_file_range(
    fin: BorrowedFd<'_>,
    off_in: u64,
    fout: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
) -> io::Result<u64> {
    let mut a = off_in as i64;
    let mut b = off_out as i64;
    // SAFETY: offsets are valid pointers to i64; fds are valid.
    let n = cvt_l(unsafe {
        libc::copy_file_range(
            fin.as_raw_fd(),
            &mut a,
            fout.as_raw_fd(),
            &mut b,
            len as usize,
            0,
        )
    } as i64)?;
    Ok(n as u64)
}

/// `flock` on an open file.
pub fn flock(fd: BorrowedFd<'_>, op: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op) })?;
    Ok(())
}

fn xattr_ret(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `getxattr` through the handle's proc path; size 0 asks for the length.
pub fn getxattr(fd: BorrowedFd<'_>, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    let mut buf = vec![0u8; size];
    // SAFETY: buf is writable for `size` bytes (null when size is 0 is fine).
    let r = xattr_ret(unsafe {
        libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size)
    })?;
    if size == 0 {
        return Ok(vec![0u8; r]);
    }
    buf.truncate(r);
    Ok(buf)
}

/// Does the file behind `fd` carry an access ACL beyond its mode bits? A
/// filesystem without ACL support has none.
pub fn has_access_acl(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match getxattr(fd, OsStr::new("system.posix_acl_access"), 0) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `listxattr`; size 0 asks for the length.
pub fn listxattr(fd: BorrowedFd<'_>, size: usize) -> io::Result<Vec<u8>> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
    // SAFETY: buf is writable for `size` bytes.
    let r = xattr_ret(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    if size == 0 {
        return Ok(vec![0u8; r]);
    }
    buf.truncate(r);
    Ok(buf)
}

/// `setxattr`.
pub fn setxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    // SAFETY: value is readable for its length; strings are valid.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

/// `removexattr`.
pub fn removexattr(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    // SAFETY: strings are valid.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })?;
    Ok(())
}

/// One directory entry from `getdents64`.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Inode number in the inner filesystem.
    pub ino: u64,
    /// Offset cookie of the *next* entry.
    pub off: i64,
    /// `DT_*` type.
    pub kind: u8,
    /// Entry name.
    pub name: OsString,
}

/// Read entries of an open directory starting at cookie `off`.
pub fn read_dir_at(dir: &File, off: i64) -> io::Result<Vec<DirEntry>> {
    let fd = dir.as_fd();
    lseek(fd, off, libc::SEEK_SET)?;
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    // SAFETY: buf is writable for its length.
    let n = cvt_l(unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })? as usize;
    let mut pos = 0;
    while pos + 19 <= n {
        let rd = &buf[pos..];
        let ino = u64::from_ne_bytes(rd[0..8].try_into().unwrap_or([0; 8]));
        let doff = i64::from_ne_bytes(rd[8..16].try_into().unwrap_or([0; 8]));
        let reclen = u16::from_ne_bytes([rd[16], rd[17]]) as usize;
        let kind = rd[18];
        if reclen == 0 || pos + reclen > n {
            break;
        }
        let name_bytes = &rd[19..reclen];
        let end = name_bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(name_bytes.len());
        out.push(DirEntry {
            ino,
            off: doff,
            kind,
            name: OsString::from_vec(name_bytes[..end].to_vec()),
        });
        pos += reclen;
    }
    Ok(out)
}

/// An O_PATH handle on the file behind an open descriptor.
pub fn path_handle(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let p = proc_path(fd);
    // SAFETY: p is a valid C string; the returned fd is new and owned.
    let nfd = cvt(unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    // SAFETY: nfd was just returned by open.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}
