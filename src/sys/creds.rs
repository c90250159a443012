//! Per-thread filesystem credentials: FUSE requests are carried out as the
//! calling user by switching this thread's fsuid, fsgid, supplementary
//! groups and (for operations that create) umask for the one operation.
//!
//! Everything here acts on the calling thread only: the raw `setgroups`
//! syscall is used on purpose (glibc's wrapper changes every thread of the
//! process), and a thread that sets a umask first unshares its
//! `fs_struct` (CLONE_FS), which threads otherwise share. The guard puts
//! every value back, so nothing of one request survives into the next
//! request served by the same thread.

use std::cell::Cell;
use std::io;

/// Restores the daemon's filesystem identity when dropped.
#[derive(Debug)]
pub struct CredGuard {
    uid_changed: bool,
    gid_changed: bool,
    groups_changed: bool,
    old_umask: Option<libc::mode_t>,
}

fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid has no memory arguments; it returns the previous value.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
}

fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: setfsgid has no memory arguments; it returns the previous value.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a valid slice for the call;
    // the raw syscall changes the calling thread's credentials only.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

thread_local! {
    static OWN_FS: Cell<bool> = const { Cell::new(false) };
}

/// Give this thread its own umask (and cwd/root, which the daemon never
/// uses), once per thread.
fn unshare_fs() -> io::Result<()> {
    if OWN_FS.with(|c| c.get()) {
        return Ok(());
    }
    // SAFETY: no memory arguments; CLONE_FS only copies this thread's
    // fs_struct (cwd, root, umask) so that umask() stops affecting others.
    if unsafe { libc::unshare(libc::CLONE_FS) } == -1 {
        return Err(io::Error::last_os_error());
    }
    OWN_FS.with(|c| c.set(true));
    Ok(())
}

fn set_umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask has no memory arguments and cannot fail.
    unsafe { libc::umask(mask & 0o777) }
}

/// Who an operation runs as.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// fsuid; 0 keeps the daemon's own (root's) identity and capabilities.
    pub uid: u32,
    /// fsgid.
    pub gid: u32,
    /// Supplementary groups (`None`: leave the thread's own, which are none).
    pub groups: Option<&'a [libc::gid_t]>,
    /// umask for operations that create (`None`: leave it).
    pub umask: Option<u32>,
}

/// Act as `id` on this thread until the guard drops.
pub fn become_user(id: Identity<'_>) -> io::Result<CredGuard> {
    let mut g = CredGuard {
        uid_changed: false,
        gid_changed: false,
        groups_changed: false,
        old_umask: None,
    };
    if let Some(mask) = id.umask {
        unshare_fs()?;
        g.old_umask = Some(set_umask(mask));
    }
    if let Some(gr) = id.groups {
        g.groups_changed = true;
        set_groups(gr)?;
    }
    if id.gid != 0 {
        g.gid_changed = true;
        set_fsgid(id.gid);
        if set_fsgid(u32::MAX) != id.gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    if id.uid != 0 {
        g.uid_changed = true;
        set_fsuid(id.uid);
        if set_fsuid(u32::MAX) != id.uid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(g)
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        if self.uid_changed {
            set_fsuid(0);
        }
        if self.gid_changed {
            set_fsgid(0);
        }
        if self.groups_changed && set_groups(&[]).is_err() {
            // Cannot happen while the daemon keeps CAP_SETGID; if it ever
            // did, the thread must not serve another request with them.
            log::error!("cannot drop supplementary groups; aborting");
            std::process::abort();
        }
        if let Some(m) = self.old_umask {
            set_umask(m);
        }
    }
}

/// Supplementary groups of thread `tid` (a FUSE request carries the id of
/// the thread that made the system call; threads may differ in groups, so
/// the thread's own status is read, not its process's), but only from the
/// thread that sent the request of `uid`/`gid` (its fsuid and fsgid).
///
/// A thread id is only a number: once its thread is gone, another process
/// may get it. The sender of a synchronous request cannot exit before the
/// answer (the kernel waits it out once the daemon has read the request),
/// so while the request is served the id names the sender. What is read is
/// checked all the same: `/proc/TID/task/TID` is opened once and `status`
/// read through that descriptor, which stays bound to the one thread it
/// found (a thread that exits makes the read fail; one that reuses the id
/// later is not reached); a thread that is exiting, or whose fsuid and
/// fsgid are not the request's, is refused with ESRCH. Refused or
/// unreadable: no groups, so fewer rights, never more.
pub fn groups_of(tid: u32, uid: u32, gid: u32) -> io::Result<Vec<libc::gid_t>> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let dir = std::fs::File::open(format!("/proc/{tid}/task/{tid}"))?;
    let mut status = String::new();
    std::fs::File::from(super::file::openat(
        dir.as_fd(),
        std::ffi::OsStr::new("status"),
        libc::O_RDONLY | libc::O_CLOEXEC,
        0,
    )?)
    .read_to_string(&mut status)?;
    check_status(&status, uid, gid)
}

/// The groups in a `/proc/TID/status` text, if it is of a live thread
/// whose fsuid and fsgid are `uid` and `gid` (ESRCH otherwise).
pub fn check_status(status: &str, uid: u32, gid: u32) -> io::Result<Vec<libc::gid_t>> {
    let not_it = || io::Error::from_raw_os_error(libc::ESRCH);
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    // Uid:/Gid: are real, effective, saved and filesystem ids.
    let fs_id =
        |name: &str| -> Option<u32> { field(name)?.split_whitespace().nth(3)?.parse().ok() };
    let state = field("State:").map(str::trim).unwrap_or("");
    if state.starts_with('Z') || state.starts_with('X') {
        return Err(not_it());
    }
    if fs_id("Uid:") != Some(uid) || fs_id("Gid:") != Some(gid) {
        return Err(not_it());
    }
    field("Groups:")
        .ok_or_else(not_it)?
        .split_whitespace()
        .map(|x| {
            x.parse()
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
        })
        .collect()
}

/// Drop the daemon's own supplementary groups (process-wide), so that
/// operations done as a user never carry root's groups.
pub fn drop_supplementary_groups() -> io::Result<()> {
    // SAFETY: an empty list; glibc applies it to every thread.
    if unsafe { libc::setgroups(0, std::ptr::null()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
