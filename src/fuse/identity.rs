//! Acting as the caller: every operation inside an image runs with the
//! caller's fsuid, fsgid, and, where they can change the outcome, its
//! supplementary groups, so that the inner ext4 decides every permission
//! as it would for a local process.
//!
//! Reading a thread's supplementary groups costs a `/proc` read (about
//! 20 µs, as much as the rest of a CREATE), so it is skipped where the
//! groups cannot matter: see [`groups_moot`]. The read trusts no thread
//! id: it reads only from the thread that still is the request's sender
//! (same fsuid and fsgid, alive, one `/proc` descriptor throughout; see
//! [`creds::groups_of`]); otherwise the caller has no supplementary
//! groups, and no admin rights through them.

use super::Core;
use crate::error::{Error, Result};
use crate::service::Caller;
use crate::sys::{creds, file};
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

/// Permission bits an operation needs on an inode, in the layout of a
/// mode's "other" triplet (4 read, 2 write, 1 search/execute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Need(pub u32);

impl Need {
    /// Nothing is checked on the inode (e.g. registering an open file).
    pub const NONE: Need = Need(0);
    /// Adding or removing a name in a directory: write and search.
    pub const DIR_CHANGE: Need = Need(0o3);

    /// What opening an existing file with `flags` checks.
    pub fn open(flags: i32) -> Need {
        let mut n = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => 0o4,
            libc::O_WRONLY => 0o2,
            _ => 0o6,
        };
        if flags & libc::O_TRUNC != 0 {
            n |= 0o2;
        }
        Need(n)
    }
}

/// Can the supplementary groups of a non-root caller `uid` not change what
/// ext4 decides for an inode with `mode` and owner `owner`, for `need`?
///
/// - The owner: the owner bits alone decide (an ACL's owner entry is the
///   owner bits too).
/// - Anyone else, without an access ACL: a member of the file's group gets
///   the group bits, anybody else the other bits. When the two agree on
///   `need`, membership cannot change the answer (the caller's primary
///   group, the fsgid, is set in any case).
///
/// Otherwise an ACL (named users and groups) needs the groups, and so, in
/// every case, does a setgid bit to be set or kept (`sgid`: ext4 then asks
/// whether the caller is in the file's group). Nothing to check
/// (`Need::NONE`) needs none.
pub(super) fn groups_moot(
    uid: u32,
    mode: u32,
    owner: u32,
    has_acl: bool,
    need: Need,
    sgid: bool,
) -> bool {
    if uid == 0 || sgid {
        return false;
    }
    if need == Need::NONE || owner == uid {
        return true;
    }
    if has_acl {
        return false;
    }
    let group = (mode >> 3) & need.0;
    let other = mode & need.0;
    group == other
}

impl Core {
    /// Run `f` as the calling user: fsuid, fsgid and supplementary groups
    /// (root keeps the daemon's identity, with its fsgid set to the
    /// caller's), mapping an io error to [`Error::Io`] with `what`.
    pub(super) fn as_user<T>(
        &self,
        c: &Caller,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        self.as_user_in(c, None, what, f)
    }

    /// [`Core::as_user`] for operations that create: the caller's `umask`
    /// applies too (the kernel leaves it to us, FUSE_DONT_MASK, so that the
    /// inner ext4 ignores it under a default ACL as it should).
    pub(super) fn as_user_umask<T>(
        &self,
        c: &Caller,
        umask: u32,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        self.as_user_in(c, Some(umask), what, f)
    }

    /// [`Core::as_user_in`] for an operation whose only permission check is
    /// `need` on the inode behind `fd` (and, with `sgid`, whether the
    /// caller is in its group): without supplementary groups when
    /// [`groups_moot`] says they cannot change the outcome (the thread has
    /// none of its own). As with any check made before the operation, a
    /// chmod racing it is ordered before or after it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn as_user_on<T>(
        &self,
        c: &Caller,
        on: BorrowedFd<'_>,
        need: Need,
        sgid: bool,
        umask: Option<u32>,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        if self.groups_moot_for(c, on, need, sgid) {
            Self::as_groupless(c, umask, what, f)
        } else {
            self.as_user_in(c, umask, what, f)
        }
    }

    /// [`groups_moot`] for the inode behind `fd`; false when it cannot be
    /// read (the full path is always right).
    pub(super) fn groups_moot_for(
        &self,
        c: &Caller,
        fd: BorrowedFd<'_>,
        need: Need,
        sgid: bool,
    ) -> bool {
        if c.uid == 0 || sgid {
            return false;
        }
        if need == Need::NONE {
            return true;
        }
        let Ok(st) = file::fstat(fd) else {
            return false;
        };
        let mode = st.st_mode & 0o7777;
        if st.st_uid == c.uid {
            return true;
        }
        // The ACL is worth a look only when the bits alone make groups moot.
        if !groups_moot(c.uid, mode, st.st_uid, false, need, sgid) {
            return false;
        }
        match file::has_access_acl(fd) {
            Ok(acl) => groups_moot(c.uid, mode, st.st_uid, acl, need, sgid),
            Err(_) => false,
        }
    }

    /// Run `f` as `c` without supplementary groups, where
    /// [`Core::groups_moot_for`] said they do not matter.
    pub(super) fn as_groupless<T>(
        c: &Caller,
        umask: Option<u32>,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        Self::as_identity(c, None, umask, what, f)
    }

    pub(super) fn as_user_in<T>(
        &self,
        c: &Caller,
        umask: Option<u32>,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        let groups = if c.uid != 0 {
            if c.groups.is_none() {
                self.stats.group_reads.fetch_add(1, Ordering::Relaxed);
            }
            match c.try_groups() {
                Ok(g) => Some(g),
                Err(e) => return Err(Error::io(what(), e)),
            }
        } else {
            None
        };
        Self::as_identity(c, groups.as_deref(), umask, what, f)
    }

    /// Run `f` as `c` with exactly these supplementary `groups` (None:
    /// leave the thread's, which are none) and `umask`.
    fn as_identity<T>(
        c: &Caller,
        groups: Option<&[u32]>,
        umask: Option<u32>,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T> {
        creds::become_user(creds::Identity {
            uid: c.uid,
            gid: c.gid,
            groups,
            umask,
        })
        .and_then(|_g| f())
        .map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 4242;
    const HIM: u32 = 1000;

    #[test]
    fn owner_bits_decide_for_the_owner() {
        assert!(groups_moot(ME, 0o700, ME, false, Need::DIR_CHANGE, false));
        assert!(groups_moot(ME, 0o070, ME, true, Need::DIR_CHANGE, false));
    }

    #[test]
    fn group_and_other_agreeing_make_groups_moot() {
        // The bench's shared directory, /tmp, a directory nobody else may change.
        assert!(groups_moot(ME, 0o777, HIM, false, Need::DIR_CHANGE, false));
        assert!(groups_moot(ME, 0o1777, HIM, false, Need::DIR_CHANGE, false));
        assert!(groups_moot(ME, 0o755, HIM, false, Need::DIR_CHANGE, false));
        assert!(groups_moot(
            ME,
            0o644,
            HIM,
            false,
            Need::open(libc::O_RDONLY),
            false
        ));
        // Write denied to both classes: refused with or without groups.
        assert!(groups_moot(
            ME,
            0o644,
            HIM,
            false,
            Need::open(libc::O_RDWR),
            false
        ));
    }

    #[test]
    fn groups_count_where_classes_differ() {
        // A group directory: members may write, others not.
        assert!(!groups_moot(ME, 0o770, HIM, false, Need::DIR_CHANGE, false));
        assert!(!groups_moot(ME, 0o775, HIM, false, Need::DIR_CHANGE, false));
        // Members denied what others get: without groups the caller would
        // be granted what a member is refused.
        assert!(!groups_moot(ME, 0o707, HIM, false, Need::DIR_CHANGE, false));
        assert!(!groups_moot(
            ME,
            0o604,
            HIM,
            false,
            Need::open(libc::O_RDONLY),
            false
        ));
        assert!(!groups_moot(
            ME,
            0o664,
            HIM,
            false,
            Need::open(libc::O_WRONLY | libc::O_TRUNC),
            false
        ));
    }

    #[test]
    fn acl_setgid_and_root_always_need_the_full_path() {
        assert!(!groups_moot(ME, 0o777, HIM, true, Need::DIR_CHANGE, false));
        assert!(!groups_moot(ME, 0o777, HIM, false, Need::DIR_CHANGE, true));
        assert!(!groups_moot(ME, 0o700, ME, false, Need::DIR_CHANGE, true));
        assert!(!groups_moot(0, 0o777, HIM, false, Need::DIR_CHANGE, false));
    }

    fn my_tid() -> u32 {
        let l = std::fs::read_link("/proc/thread-self").unwrap();
        l.to_string_lossy()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn groups_are_read_from_the_sender_only() {
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let tid = my_tid();
        assert!(creds::groups_of(tid, uid, gid).is_ok());
        // Another identity at that id: not the sender.
        for (u, g) in [(uid + 1, gid), (uid, gid + 1)] {
            let e = creds::groups_of(tid, u, g).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        }
    }

    #[test]
    fn an_exited_thread_or_process_grants_no_groups() {
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let tid = std::thread::spawn(my_tid).join().unwrap();
        assert!(creds::groups_of(tid, uid, gid).is_err());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(creds::groups_of(pid, uid, gid).is_err());
    }

    #[test]
    fn status_of_a_zombie_or_another_user_is_refused() {
        let status = |state: &str, uid: &str| {
            format!(
                "Name:\tx\nState:\t{state}\nUid:\t{uid}\nGid:\t100\t100\t100\t100\nGroups:\t4 27 1001 \n"
            )
        };
        let ok = status("S (sleeping)", "1000\t1000\t1000\t1000");
        assert_eq!(
            creds::check_status(&ok, 1000, 100).unwrap(),
            vec![4, 27, 1001]
        );
        assert!(creds::check_status(&ok, 1001, 100).is_err());
        assert!(creds::check_status(&ok, 1000, 101).is_err());
        // The fsuid (fourth) counts, not the real or effective one.
        let fs = status("S (sleeping)", "0\t0\t0\t1000");
        assert!(creds::check_status(&fs, 1000, 100).is_ok());
        assert!(creds::check_status(&fs, 0, 100).is_err());
        for st in ["Z (zombie)", "X (dead)"] {
            let z = status(st, "1000\t1000\t1000\t1000");
            assert!(creds::check_status(&z, 1000, 100).is_err(), "{st}");
        }
        assert!(creds::check_status("Name:\tx\n", 1000, 100).is_err());
    }

    #[test]
    fn nothing_checked_needs_no_groups() {
        assert!(groups_moot(ME, 0o070, HIM, false, Need::NONE, false));
        assert!(groups_moot(ME, 0o070, HIM, true, Need::NONE, false));
        assert!(!groups_moot(ME, 0o2070, HIM, true, Need::NONE, true));
    }
}
