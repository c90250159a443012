//! File operations inside images and snapshots: attributes, open, read,
//! write, sync, space, seek, copy and extended attributes. Everything that
//! checks permissions or changes a file runs with the caller's full
//! credentials, passthrough backing files included.

use super::budget::{Held, Kind};
use super::identity::Need;
use super::inode::{Inode, Real};
use super::{Caller, Core, Handle, attr};
use crate::error::{Error, IoContext, Result};
use crate::sys::{file, fsio};
use fuser::{BackingId, FileAttr, TimeOrNow};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

/// The file a request on a handle works on: the handle's own, or one
/// reopened for this request (closed after it).
enum FileRef<'a> {
    Held(&'a File),
    Reopened(File),
}

impl std::ops::Deref for FileRef<'_> {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            FileRef::Held(f) => f,
            FileRef::Reopened(f) => f,
        }
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            // Before 1970. fuser 0.18 decodes the kernel's (sec < 0, nsec)
            // as epoch - (|sec| + nsec), so that is what is undone here.
            Err(e) => libc::timespec {
                tv_sec: -(e.duration().as_secs() as i64) as libc::time_t,
                tv_nsec: e.duration().subsec_nanos() as libc::c_long,
            },
        },
    }
}

/// What a setattr request asks for.
#[derive(Debug, Default)]
pub(super) struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub fh: Option<u64>,
}

impl Core {
    pub(super) fn getattr_real(&self, i: &Inode, r: &Real) -> Result<FileAttr> {
        let st = file::fstat(r.fd()).ctx(|| format!("stat inode {:#x}", i.ino))?;
        Ok(attr::from_stat(i.ino, &st))
    }

    pub(super) fn setattr_real(
        &self,
        c: &Caller,
        i: &Inode,
        r: &Real,
        s: SetAttr,
    ) -> Result<FileAttr> {
        if let Some(mode) = s.mode
            && r.fmt != libc::S_IFLNK
        {
            self.as_user(c, || "chmod".into(), || file::chmod(r.fd(), mode & 0o7777))?;
        }
        if s.uid.is_some() || s.gid.is_some() {
            let (u, g) = (s.uid.unwrap_or(u32::MAX), s.gid.unwrap_or(u32::MAX));
            self.as_user(c, || "chown".into(), || file::chown(r.fd(), u, g))?;
        }
        if let Some(size) = s.size {
            let h = match s.fh {
                Some(fh) => Some(self.handle(fh)?),
                None => None,
            };
            match h.as_deref() {
                Some(h @ Handle::File { .. }) => {
                    let f = self.file_of(h)?;
                    self.as_user(
                        c,
                        || "ftruncate".into(),
                        || file::ftruncate(f.as_fd(), size),
                    )?
                }
                _ => self.as_user(c, || "truncate".into(), || file::truncate(r.fd(), size))?,
            }
        }
        if s.atime.is_some() || s.mtime.is_some() {
            let ts = [timespec(s.atime), timespec(s.mtime)];
            self.as_user(c, || "utimens".into(), || file::utimens(r.fd(), &ts))?;
        }
        self.getattr_real(i, r)
    }

    /// Open a real file as the caller.
    pub(super) fn open_real(&self, c: &Caller, r: &Real, flags: i32) -> Result<File> {
        r.mount.touch();
        // The caller's own file without setgid bit: no groups needed.
        let sgid = file::fstat(r.fd())
            .map(|st| st.st_mode & libc::S_ISGID != 0)
            .unwrap_or(true);
        let what = || "open".to_string();
        let open = || file::reopen(r.fd(), flags);
        self.as_user_on(c, r.fd(), Need::open(flags), sgid, None, what, open)
    }

    /// The passthrough backing id of inode `i`, shared by all its open
    /// handles (the kernel allows one per inode); made from the first
    /// opener's `file`, registered with that caller's credentials: the
    /// kernel does passthrough I/O with them, so that a write by a user
    /// clears setuid/setgid as it would on ext4.
    fn backing_for(
        &self,
        c: &Caller,
        i: &Inode,
        file: &File,
        writable: bool,
        make: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let mut b = i.backing.lock();
        if let Some(id) = b.upgrade() {
            // Writes through this handle will run with the first opener's
            // credentials: if they might be root's, drop what a write by
            // this caller would drop, now.
            if writable && c.uid != 0 {
                self.kill_privs_for(c, file);
            }
            return Some(id);
        }
        // Writes will run with these credentials: groups matter to them
        // only for a setgid file (ext4 keeps S_ISGID for a group member).
        let sgid = file::fstat(file.as_fd())
            .map(|st| st.st_mode & libc::S_ISGID != 0)
            .unwrap_or(true);
        let what = || "register passthrough file".to_string();
        let registered =
            self.as_user_on(c, file.as_fd(), Need::NONE, sgid, None, what, || make(file));
        match registered {
            Ok(id) => {
                let id = Arc::new(id);
                *b = Arc::downgrade(&id);
                Some(id)
            }
            Err(e) => {
                log::warn!("passthrough unavailable for inode {:#x}: {e}", i.ino);
                None
            }
        }
    }

    /// Clear setuid, and setgid where ext4 would, as a write by `c` does.
    fn kill_privs_for(&self, c: &Caller, file: &File) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(st) = file::fstat(file.as_fd()) else {
            return;
        };
        let mode = st.st_mode & 0o7777;
        let mut kill = mode & libc::S_ISUID;
        if mode & libc::S_ISGID != 0 {
            let member = || {
                c.gid == st.st_gid
                    || c.try_groups()
                        .map(|g| g.contains(&st.st_gid))
                        .unwrap_or(false)
            };
            if mode & libc::S_IXGRP != 0 || !member() {
                kill |= libc::S_ISGID;
            }
        }
        if kill != 0
            && let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode & !kill))
        {
            log::warn!("cannot clear setuid/setgid before a shared write: {e}");
        }
    }

    /// What a file open of `c` will hold, taken before the open (so that a
    /// refused open truncates or creates nothing): a passthrough handle
    /// when the kernel supports it, else a descriptor.
    pub(super) fn take_for_open(&self, c: &Caller) -> Result<Held> {
        let kind = if self.passthrough.load(Ordering::Relaxed) {
            Kind::Light
        } else {
            Kind::Fd
        };
        self.budget.take(c.uid, kind, None)
    }

    /// Register an opened file of inode `i` as a handle; regular files get
    /// the inode's passthrough backing id (made from the first opener with
    /// `open_backing`) when the kernel supports passthrough. A passthrough
    /// handle keeps no descriptor: `file` is closed once registered (the
    /// kernel holds its own reference to the backing file, and fuser's
    /// `BackingId` is only the number). Otherwise the handle keeps `file`,
    /// which counts against the caller's share.
    ///
    /// `held` is what [`Core::take_for_open`] took; if the file gets no
    /// passthrough after all, it keeps a descriptor, taken from the share.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn file_handle(
        &self,
        c: &Caller,
        i: &Inode,
        file: File,
        flags: i32,
        held: Held,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<(u64, Option<Arc<BackingId>>)> {
        let r = self.real(i)?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let backing = if r.fmt == libc::S_IFREG {
            self.backing_for(c, i, &file, writable, open_backing)
        } else {
            None
        };
        let (held, file) = match backing {
            Some(_) => (held, None),
            None if held.kind() == Kind::Fd => (held, Some(file)),
            None => (self.budget.take(c.uid, Kind::Fd, None)?, Some(file)),
        };
        let open = r.mount.open_token(c.pid)?;
        if backing.is_some() {
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        }
        let fh = self.add_handle(Handle::File {
            ino: i.ino,
            flags,
            file,
            _backing: backing.clone(),
            _open: open,
            _held: held,
        });
        Ok((fh, backing))
    }

    /// Close a handle; the last handle of an inode drops its backing id.
    pub(super) fn release_handle(&self, fh: u64) {
        drop(self.drop_handle(fh));
    }

    /// The file of a handle: its own descriptor, or (passthrough) the
    /// inode reopened with the open's flags. Reopened as the daemon: the
    /// caller's right to the file was checked when it opened it, and an
    /// open file keeps its rights on ext4 whatever chmod does later; the
    /// operation itself runs as the caller where it matters.
    fn file_of<'a>(&self, h: &'a Handle) -> Result<FileRef<'a>> {
        self.file_of_as(h, None)
    }

    /// [`Core::file_of`], reopened read-only when `read_only` (fsync and
    /// lseek need no more; a writable descriptor closed after the request
    /// would make ext4 flush delayed allocations early, and could not be
    /// reopened on a file made immutable since).
    fn file_of_read_only<'a>(&self, h: &'a Handle) -> Result<FileRef<'a>> {
        self.file_of_as(h, Some(libc::O_RDONLY))
    }

    fn file_of_as<'a>(&self, h: &'a Handle, mode: Option<i32>) -> Result<FileRef<'a>> {
        let Handle::File {
            ino, flags, file, ..
        } = h
        else {
            return Err(Error::io(
                "not a file in an image",
                std::io::Error::from_raw_os_error(libc::EBADF),
            ));
        };
        if let Some(f) = file {
            return Ok(FileRef::Held(f));
        }
        let i = self.inodes.get(*ino)?;
        let r = self.real(&i)?;
        let mut flags = flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
        if let Some(m) = mode {
            flags = (flags & !libc::O_ACCMODE) | m;
        }
        let f = file::reopen(r.fd(), flags).ctx(|| format!("reopen inode {ino:#x}"))?;
        Ok(FileRef::Reopened(f))
    }

    pub(super) fn read_fh(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let h = self.handle(fh)?;
        match h.as_ref() {
            Handle::Content { data, .. } => {
                let start = (off as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Handle::File { .. } => {
                let f = self.file_of(&h)?;
                let mut buf = vec![0u8; size as usize];
                let mut done = 0;
                while done < buf.len() {
                    let n = f
                        .read_at(&mut buf[done..], off + done as u64)
                        .ctx(|| "read".into())?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(buf)
            }
            _ => Err(Error::io(
                "read of a directory",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            )),
        }
    }

    /// Write as the caller (so that ext4 clears setuid/setgid as for them).
    pub(super) fn write_fh(&self, c: &Caller, fh: u64, off: u64, data: &[u8]) -> Result<u32> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let h = self.handle(fh)?;
        match h.as_ref() {
            Handle::File { .. } => {
                let f = self.file_of(&h)?;
                self.as_user(c, || "write".into(), || f.write_all_at(data, off))?;
                Ok(data.len() as u32)
            }
            Handle::Content { .. } => Err(Error::ReadOnly(".thinfs files are read-only".into())),
            _ => Err(Error::io(
                "write to a directory",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            )),
        }
    }

    pub(super) fn fsync_fh(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        match h.as_ref() {
            Handle::File { .. } => {
                let f = self.file_of_read_only(&h)?;
                file::fsync(f.as_fd(), datasync).ctx(|| "fsync".into())
            }
            Handle::Dir { dir, .. } => {
                file::fsync(dir.lock().as_fd(), datasync).ctx(|| "fsyncdir".into())
            }
            _ => Ok(()),
        }
    }

    pub(super) fn fallocate_fh(
        &self,
        c: &Caller,
        fh: u64,
        off: u64,
        len: u64,
        mode: i32,
    ) -> Result<()> {
        let h = self.handle(fh)?;
        let f = self.file_of(&h)?;
        self.as_user(
            c,
            || "fallocate".into(),
            || file::fallocate(f.as_fd(), mode, off, len),
        )
    }

    pub(super) fn lseek_fh(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        let f = self.file_of_read_only(&h)?;
        file::lseek(f.as_fd(), off, whence).ctx(|| "lseek".into())
    }

    /// copy_file_range as the caller.
    pub(super) fn copy_range_fh(
        &self,
        c: &Caller,
        fin: u64,
        off_in: u64,
        fout: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let a = self.handle(fin)?;
        let b = self.handle(fout)?;
        let (fa, fb) = (self.file_of(&a)?, self.file_of(&b)?);
        self.as_user(
            c,
            || "copy_file_range".into(),
            || file::copy_file_range(fa.as_fd(), off_in, fb.as_fd(), off_out, len),
        )
    }

    /// statfs of the image or snapshot `r` is in.
    pub(super) fn statfs_real(&self, r: &Real) -> Result<libc::statvfs> {
        fsio::statvfs(r.fd()).ctx(|| "statfs".into())
    }

    /// getxattr as the daemon: the kernel has checked the caller's right
    /// to read the name (`xattr_permission`: read permission for `user.*`,
    /// CAP_SYS_ADMIN for `trusted.*`) before sending the request, and this
    /// is the request the kernel makes to fetch ACLs for its permission
    /// checks, after every change of a directory: it must stay cheap.
    pub(super) fn getxattr_real(&self, r: &Real, name: &OsStr, size: u32) -> Result<Vec<u8>> {
        file::getxattr(r.fd(), name, size as usize).ctx(|| format!("getxattr {name:?}"))
    }

    /// listxattr as the caller: ext4 lists `trusted.*` names only to
    /// CAP_SYS_ADMIN.
    pub(super) fn listxattr_real(&self, c: &Caller, r: &Real, size: u32) -> Result<Vec<u8>> {
        self.as_user(
            c,
            || "listxattr".into(),
            || file::listxattr(r.fd(), size as usize),
        )
    }

    pub(super) fn setxattr_real(
        &self,
        c: &Caller,
        r: &Real,
        name: &OsStr,
        v: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.as_user(
            c,
            || format!("setxattr {name:?}"),
            || file::setxattr(r.fd(), name, v, flags),
        )
    }

    pub(super) fn removexattr_real(&self, c: &Caller, r: &Real, name: &OsStr) -> Result<()> {
        self.as_user(
            c,
            || format!("removexattr {name:?}"),
            || file::removexattr(r.fd(), name),
        )
    }
}
