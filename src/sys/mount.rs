//! Detached mounts (`fsopen`/`fsconfig`/`fsmount`) and unmounting.
//!
//! Every mount made here is `nosuid,nodev` (nothing is ever executed or
//! opened as a device through the daemon's own view of a filesystem), and
//! every ext4 gets the daemon's own [`EXT4_ERRORS`], never what the
//! superblock asks for: an image may come from a stream or a backup made
//! by someone else, whose superblock may say `errors=panic`.
//!
//! Inner filesystems are mounted *detached*: the mount exists only as a file
//! descriptor held by the daemon and is reachable nowhere in any mount table.
//! When the daemon exits or is killed, the kernel drops the mount, then the
//! autoclear loop device under it. Nothing leaks, nothing needs cleaning.

use super::{cpath, cstr, cvt};
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;

/// The `errors=` behaviour of every ext4 thinfs mounts: on an error the
/// filesystem turns read-only (its writers get EROFS, the space guard logs
/// it and repairs it with `e2fsck -fy` once it is unmounted); the host never
/// panics and a damaged filesystem is not written further. containerd's
/// mounts of thinfs devices carry it too.
pub const EXT4_ERRORS: &str = "remount-ro";

/// Mount `source` (a block device) with filesystem `fstype` as a detached
/// mount; `flags` are fsconfig flags (`ro`, `norecovery`, ...), `opts` are
/// key=value options. An ext4 gets `errors=`[`EXT4_ERRORS`] unless `opts`
/// name another `errors`. Returns an fd of the mount's root directory,
/// opened O_RDONLY (not O_PATH); the mount is `nosuid,nodev`.
pub fn fsmount_detached(
    fstype: &str,
    source: &Path,
    read_only: bool,
    flags: &[&str],
    opts: &[(&str, &str)],
) -> io::Result<OwnedFd> {
    let ft = cstr(fstype)?;
    // SAFETY: ft is a valid NUL-terminated string for the call's duration.
    let fsfd = cvt(unsafe { libc::syscall(libc::SYS_fsopen, ft.as_ptr(), FSOPEN_CLOEXEC) } as i32)?;
    // SAFETY: fsopen returned a fresh fd that we now own.
    let fsfd = unsafe { OwnedFd::from_raw_fd(fsfd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fsfd);
    let set_string = |k: &str, v: &std::ffi::CStr| -> io::Result<()> {
        let k = cstr(k)?;
        // SAFETY: key and value are valid C strings; fsfd is an fs context.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                raw,
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        } as i32)?;
        Ok(())
    };
    set_string("source", &cpath(source)?)?;
    let mut all_flags: Vec<&str> = flags.to_vec();
    if read_only {
        all_flags.push("ro");
    }
    for f in all_flags {
        let k = cstr(f)?;
        // SAFETY: key is a valid C string; value must be NULL for SET_FLAG.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                raw,
                FSCONFIG_SET_FLAG,
                k.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            )
        } as i32)?;
    }
    for (k, v) in opts {
        set_string(k, &cstr(v)?)?;
    }
    if fstype == "ext4" && !opts.iter().any(|(k, _)| *k == "errors") {
        set_string("errors", &cstr(EXT4_ERRORS)?)?;
    }
    // SAFETY: no pointers; creates the superblock from the configured context.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            raw,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    } as i32)?;
    let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if read_only {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    // SAFETY: no pointers; returns a new fd for the detached mount.
    let mfd = cvt(unsafe { libc::syscall(libc::SYS_fsmount, raw, FSMOUNT_CLOEXEC, attrs) } as i32)?;
    // SAFETY: fsmount returned a fresh fd that we now own.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
    // The fsmount fd is O_PATH: reopen its root as a real directory so that
    // syncfs and ioctls (FIFREEZE, FITRIM) work on it. It keeps the mount alive.
    super::file::openat(
        mfd.as_fd(),
        std::ffi::OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
}

/// Detach the mount at `path` lazily (MNT_DETACH).
pub fn umount_lazy(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid C string.
    cvt(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// Mount point.
    pub point: String,
    /// Filesystem type (`fuse`, `fuse.thinfs`, `ext4`...).
    pub fstype: String,
    /// Source (`thinfs` for ours).
    pub source: String,
    /// `major:minor` of the mounted filesystem's device.
    pub dev: String,
}

impl MountEntry {
    /// Is this a thinfs FUSE mount?
    pub fn is_thinfs(&self) -> bool {
        self.fstype.starts_with("fuse") && (self.source == "thinfs" || self.fstype == "fuse.thinfs")
    }
}

/// The mount table of this process.
pub fn mount_table() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() > dash + 2 && fields.len() > 4 {
            out.push(MountEntry {
                point: unescape(fields[4]),
                fstype: fields[dash + 1].to_string(),
                source: unescape(fields[dash + 2]),
                dev: fields[2].to_string(),
            });
        }
    }
    Ok(out)
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount `path` (fails with EBUSY while in use).
pub fn umount(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid C string.
    cvt(unsafe { libc::umount2(p.as_ptr(), 0) })?;
    Ok(())
}

/// Ask the filesystem at `path` for its statistics: unlike `stat`, which
/// the kernel may answer from cache, this reaches a FUSE daemon, so a dead
/// one shows up as ENOTCONN.
pub fn probe(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: zeroed statvfs is a valid out-parameter; p is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::statvfs(p.as_ptr(), &mut s) })?;
    Ok(())
}
