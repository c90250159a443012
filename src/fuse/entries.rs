//! Directory-entry operations inside images and snapshots: lookup,
//! create, mkdir, mknod, symlink, link, unlink, rmdir, rename, readlink.
//! Every change runs as the calling user; no symlink inside an image is
//! ever followed, and a create-type request that fails removes what it made.

use super::identity::Need;
use super::inode::{self, Inode, Node, Real};
use super::namespace::SNAPDIR;
use super::{Caller, Core, attr};
use crate::error::{Error, IoContext, Result};
use crate::sys::file;
use crate::types::DeviceKind;
use fuser::FileAttr;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

impl Core {
    /// The real node of an inode.
    pub(super) fn real<'a>(&self, i: &'a Inode) -> Result<&'a Real> {
        match &i.node {
            Node::Real(r) => Ok(r),
            _ => Err(Error::Invalid(format!("inode {:#x} is virtual", i.ino))),
        }
    }

    /// Is `name` in directory `p` the virtual `.snapshots` of an image?
    pub(super) fn is_snapdir_name(&self, p: &Real, name: &OsStr) -> bool {
        p.is_root
            && name == SNAPDIR
            && self
                .engine
                .record(p.dev)
                .map(|r| r.kind == DeviceKind::Image)
                .unwrap_or(false)
    }

    /// Enter an O_PATH handle of a child of `p` into the inode table.
    fn enter(&self, p: &Real, fd: OwnedFd) -> Result<(Arc<Inode>, FileAttr)> {
        let st = file::fstat(fd.as_fd()).ctx(|| "stat new entry".into())?;
        let ino = inode::real_ino(p.dev, st.st_ino);
        let i = self.inodes.remember(ino, || {
            Node::Real(Real {
                dev: p.dev,
                fd,
                mount: p.mount.clone(),
                is_root: false,
                fmt: st.st_mode & libc::S_IFMT,
            })
        })?;
        p.mount.touch();
        Ok((i, attr::from_stat(ino, &st)))
    }

    pub(super) fn lookup_real(&self, p: &Real, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        if self.is_snapdir_name(p, name) {
            return self.snapdir(p.dev);
        }
        let fd = file::open_path(p.fd(), name).ctx(|| format!("look up {name:?}"))?;
        self.enter(p, fd)
    }

    fn refuse_snapdir(&self, p: &Real, name: &OsStr) -> Result<()> {
        if self.is_snapdir_name(p, name) {
            return Err(Error::AlreadyExists(format!(
                "{SNAPDIR} is reserved for snapshots"
            )));
        }
        Ok(())
    }

    /// Create (or, without O_EXCL, open an existing) regular file as the
    /// caller. Never through a symlink: a name that is a symlink fails with
    /// ELOOP (the kernel sends CREATE only for names it believes missing).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Arc<Inode>, FileAttr, File)> {
        self.refuse_snapdir(p, name)?;
        // A new file where the caller's groups cannot change the outcome
        // (its own directory, a 0777 one...): none needed. If the name
        // exists (its own permissions count), the full path.
        let sgid = mode & libc::S_ISGID != 0;
        let quick = if self.groups_moot_for(c, p.fd(), Need::DIR_CHANGE, sgid) {
            let excl = (flags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW) & !libc::O_TRUNC;
            match Self::as_groupless(
                c,
                Some(umask),
                || format!("create {name:?}"),
                || file::openat(p.fd(), name, excl, mode).map(File::from),
            ) {
                Ok(f) => Some((f, true)),
                Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let (f, made) = match quick {
            Some(v) => v,
            None => self.as_user_umask(
                c,
                umask,
                || format!("create {name:?}"),
                || file::create_at(p.fd(), name, flags, mode),
            )?,
        };
        let done = file::path_handle(f.as_fd())
            .ctx(|| format!("handle of new file {name:?}"))
            .and_then(|pfd| self.enter(p, pfd));
        match done {
            Ok((i, a)) => Ok((i, a, f)),
            Err(e) => {
                if made {
                    let ino = file::fstat(f.as_fd()).map(|st| st.st_ino).ok();
                    self.undo_made(p, name, ino, false);
                }
                Err(e)
            }
        }
    }

    /// Finish a request that made `name` in `p`: enter it, or, if that
    /// fails, remove what was made, so that a failed request leaves
    /// nothing behind (the kernel would cache the name as missing).
    fn finish_made(&self, p: &Real, name: &OsStr, dir: bool) -> Result<(Arc<Inode>, FileAttr)> {
        let ino = file::stat_at(p.fd(), name).map(|st| st.st_ino).ok();
        match self.lookup_real(p, name) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.undo_made(p, name, ino, dir);
                Err(e)
            }
        }
    }

    /// Remove `name` from `p` if it is still the inode `ino` this request
    /// made (nothing if that cannot be told).
    fn undo_made(&self, p: &Real, name: &OsStr, ino: Option<u64>, dir: bool) {
        let same = match (ino, file::stat_at(p.fd(), name)) {
            (Some(i), Ok(st)) => st.st_ino == i,
            _ => false,
        };
        let r = if same {
            file::unlinkat(p.fd(), name, dir)
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ESTALE))
        };
        match r {
            Ok(()) => log::debug!("removed {name:?} after its request failed"),
            Err(e) => log::warn!("cannot remove {name:?} after its request failed: {e}"),
        }
    }

    pub(super) fn mkdir_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        let what = || format!("mkdir {name:?}");
        let make = || file::mkdirat(p.fd(), name, mode);
        let sgid = mode & libc::S_ISGID != 0;
        self.as_user_on(c, p.fd(), Need::DIR_CHANGE, sgid, Some(umask), what, make)?;
        self.finish_made(p, name, true)
    }

    pub(super) fn mknod_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        self.as_user_on(
            c,
            p.fd(),
            Need::DIR_CHANGE,
            mode & libc::S_ISGID != 0,
            Some(umask),
            || format!("mknod {name:?}"),
            || file::mknodat(p.fd(), name, mode, rdev as u64),
        )?;
        self.finish_made(p, name, false)
    }

    pub(super) fn symlink_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        self.as_user_on(
            c,
            p.fd(),
            Need::DIR_CHANGE,
            false,
            None,
            || format!("symlink {name:?}"),
            || file::symlinkat(target, p.fd(), name),
        )?;
        self.finish_made(p, name, false)
    }

    pub(super) fn link_real(
        &self,
        c: &Caller,
        src: &Real,
        p: &Real,
        name: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        if src.dev != p.dev {
            return Err(Error::CrossDevice(
                "hard links stay within one image".into(),
            ));
        }
        self.refuse_snapdir(p, name)?;
        self.as_user(
            c,
            || format!("link {name:?}"),
            || file::linkat(src.fd(), p.fd(), name),
        )?;
        self.finish_made(p, name, false)
    }

    pub(super) fn unlink_real(&self, c: &Caller, p: &Real, name: &OsStr, dir: bool) -> Result<()> {
        if self.is_snapdir_name(p, name) {
            return Err(Error::Busy(format!("{SNAPDIR} cannot be removed")));
        }
        // Only the directory's permissions (and, if sticky, owners) count.
        let what = || format!("{} {name:?}", if dir { "rmdir" } else { "unlink" });
        let remove = || file::unlinkat(p.fd(), name, dir);
        self.as_user_on(c, p.fd(), Need::DIR_CHANGE, false, None, what, remove)
    }

    pub(super) fn rename_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        np: &Real,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        if p.dev != np.dev {
            return Err(Error::CrossDevice(
                "rename across images or snapshots".into(),
            ));
        }
        if self.is_snapdir_name(p, name) || self.is_snapdir_name(np, newname) {
            return Err(Error::Busy(format!(
                "{SNAPDIR} cannot be renamed or replaced"
            )));
        }
        self.as_user(
            c,
            || format!("rename {name:?} to {newname:?}"),
            || file::renameat2(p.fd(), name, np.fd(), newname, flags),
        )
    }

    pub(super) fn readlink_real(&self, r: &Real) -> Result<Vec<u8>> {
        file::readlink(r.fd()).ctx(|| "readlink".into())
    }
}
