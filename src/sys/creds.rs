//! Per-thread filesystem credentials: FUSE requests are carried out as the
//! calling user by switching this thread's fsuid/fsgid (and, where group
//! membership matters, its supplementary groups) for the one operation.
//!
//! The raw syscalls are used on purpose: glibc's `setgroups` changes every
//! thread of the process, the raw syscall only the calling thread.

use std::io;

/// Restores root's filesystem identity when dropped.
#[derive(Debug)]
pub struct CredGuard {
    groups_changed: bool,
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
    // SAFETY: the pointer and length describe a valid slice for the call.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Act as `uid`/`gid` (with supplementary `groups` if given) on this thread
/// until the guard drops. Root (0/0) is a no-op.
pub fn become_user(uid: u32, gid: u32, groups: Option<&[libc::gid_t]>) -> io::Result<CredGuard> {
    let mut g = CredGuard {
        groups_changed: false,
    };
    if let Some(gr) = groups {
        set_groups(gr)?;
        g.groups_changed = true;
    }
    if gid != 0 {
        set_fsgid(gid);
        if set_fsgid(u32::MAX) != gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    if uid != 0 {
        set_fsuid(uid);
        if set_fsuid(u32::MAX) != uid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
    }
    Ok(g)
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        set_fsuid(0);
        set_fsgid(0);
        if self.groups_changed {
            let _ = set_groups(&[]);
        }
    }
}

/// Supplementary groups of process `pid`, from /proc/PID/status.
pub fn groups_of(pid: u32) -> Vec<libc::gid_t> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
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
