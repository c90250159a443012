//! Directory-entry operations inside images and snapshots: lookup,
//! create, mkdir, mknod, symlink, link, unlink, rmdir, rename, readlink.
//! Every change runs as the calling user.

use super::inode::{self, Inode, Node, Real};
use super::namespace::SNAPDIR;
use super::{Caller, Core, attr};
use crate::error::{Error, IoContext, Result};
use crate::meta::DeviceKind;
use crate::sys::file;
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

    pub(super) fn create_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Arc<Inode>, FileAttr, File)> {
        self.refuse_snapdir(p, name)?;
        let f = self.as_user(
            c,
            false,
            || format!("create {name:?}"),
            || file::openat(p.fd(), name, flags | libc::O_CREAT, mode).map(File::from),
        )?;
        let pfd = file::path_handle(f.as_fd()).ctx(|| format!("handle of new file {name:?}"))?;
        let (i, a) = self.enter(p, pfd)?;
        Ok((i, a, f))
    }

    pub(super) fn mkdir_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        self.as_user(
            c,
            false,
            || format!("mkdir {name:?}"),
            || file::mkdirat(p.fd(), name, mode),
        )?;
        self.lookup_real(p, name)
    }

    pub(super) fn mknod_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        self.as_user(
            c,
            false,
            || format!("mknod {name:?}"),
            || file::mknodat(p.fd(), name, mode, rdev as u64),
        )?;
        self.lookup_real(p, name)
    }

    pub(super) fn symlink_real(
        &self,
        c: &Caller,
        p: &Real,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        self.refuse_snapdir(p, name)?;
        self.as_user(
            c,
            false,
            || format!("symlink {name:?}"),
            || file::symlinkat(target, p.fd(), name),
        )?;
        self.lookup_real(p, name)
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
            false,
            || format!("link {name:?}"),
            || file::linkat(src.fd(), p.fd(), name),
        )?;
        self.lookup_real(p, name)
    }

    pub(super) fn unlink_real(&self, c: &Caller, p: &Real, name: &OsStr, dir: bool) -> Result<()> {
        if self.is_snapdir_name(p, name) {
            return Err(Error::Busy(format!("{SNAPDIR} cannot be removed")));
        }
        self.as_user(
            c,
            false,
            || format!("{} {name:?}", if dir { "rmdir" } else { "unlink" }),
            || file::unlinkat(p.fd(), name, dir),
        )
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
            false,
            || format!("rename {name:?} to {newname:?}"),
            || file::renameat2(p.fd(), name, np.fd(), newname, flags),
        )
    }

    pub(super) fn readlink_real(&self, r: &Real) -> Result<Vec<u8>> {
        file::readlink(r.fd()).ctx(|| "readlink".into())
    }
}
