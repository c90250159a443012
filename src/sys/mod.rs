//! Every `unsafe` block and ioctl of thinfs lives under this module.
//!
//! Each libc call goes through [`cvt`] (or a sibling) that turns `-1` into
//! `io::Error::last_os_error()`. Callers above this layer never see a raw
//! pointer. Submodules: loop devices, detached mounts, file-system ioctls
//! (FICLONE, FIFREEZE, FIEMAP, FITRIM), per-thread credentials, and the
//! `*at` file operations the FUSE passthrough uses, and the external
//! programs thinfs runs (`tools`).

pub mod creds;
pub mod file;
pub mod fsio;
pub mod handle;
pub mod loopdev;
pub mod mount;
pub mod process;
pub mod scm;
pub mod signals;
pub mod socket;
pub mod tools;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Turn a `-1` return into the thread's last OS error.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`cvt`] for `long`/`ssize_t` returns.
pub fn cvt_l(ret: i64) -> io::Result<i64> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A path or name as a C string; an embedded NUL is EINVAL.
pub fn cstr(p: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A path as a C string.
pub fn cpath(p: &Path) -> io::Result<CString> {
    cstr(p.as_os_str())
}
