//! File handles (`name_to_handle_at` / `open_by_handle_at`): how the FUSE
//! layer keeps an inode it cannot afford a descriptor for, and reopens it
//! when the kernel asks for it again. ext4 supports them.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Largest handle accepted (MAX_HANDLE_SZ in the kernel).
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A file's handle: names it within its filesystem without a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandle {
    kind: i32,
    bytes: Vec<u8>,
}

impl FileHandle {
    /// The handle of the file `fd` refers to (an O_PATH fd is fine).
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
        let mut raw = RawHandle {
            handle_bytes: MAX_HANDLE_SZ as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: raw is a file_handle with handle_bytes of room after its
        // header; the empty path with AT_EMPTY_PATH names `fd` itself; the
        // kernel writes only within those bounds and to mount_id.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                fd.as_raw_fd(),
                c"".as_ptr(),
                &mut raw as *mut RawHandle,
                &mut mount_id as *mut libc::c_int,
                libc::AT_EMPTY_PATH,
            ) as libc::c_int
        })?;
        let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
        Ok(FileHandle {
            kind: raw.handle_type,
            bytes: raw.f_handle[..n].to_vec(),
        })
    }

    /// Open the file again as O_PATH, within the filesystem that `root`
    /// (any fd on it) is on. Needs CAP_DAC_READ_SEARCH: call it with the
    /// daemon's own credentials. ESTALE if the file is gone.
    pub fn open_path(&self, root: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        let mut raw = RawHandle {
            handle_bytes: self.bytes.len() as u32,
            handle_type: self.kind,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        // SAFETY: raw is a valid file_handle whose handle_bytes matches the
        // bytes copied in; the kernel only reads it.
        let fd = cvt(unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                root.as_raw_fd(),
                &mut raw as *mut RawHandle,
                libc::O_PATH | libc::O_CLOEXEC,
            ) as libc::c_int
        })?;
        // SAFETY: fd was just returned by the kernel and is owned here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// The soft limit on open descriptors of this process.
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit the kernel fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == -1 {
        return 1024;
    }
    r.rlim_cur
}
