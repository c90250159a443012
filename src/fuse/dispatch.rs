//! Which path serves a request on an inode: the virtual namespace (root,
//! `.snapshots`, `.thinfs`) or an inner filesystem, picked by the kind of
//! inode, for the operations whose target may be either.

use super::inode::Node;
use super::reply::no;
use super::{Caller, Core};
use crate::error::{Error, Result};
use std::ffi::OsStr;

impl Core {
    pub(super) fn entry_of(
        &self,
        parent: u64,
        name: &OsStr,
    ) -> Result<(std::sync::Arc<super::inode::Inode>, fuser::FileAttr)> {
        let p = self.inodes.get(parent)?;
        match &p.node {
            Node::Root => self.lookup_root(name),
            Node::Control => self.lookup_control(name),
            Node::InfoDir => self.lookup_info(name),
            Node::SnapDir(img) => self.lookup_snapdir(*img, name),
            Node::Real(_) => self.lookup_real(self.real(&p)?, name),
            Node::ControlFile(_) => Err(no(libc::ENOTDIR, "lookup in a file")),
            Node::Evicted(_) => Err(no(libc::ESTALE, "inode not reopened")),
        }
    }

    pub(super) fn mkdir_any(
        &self,
        c: &Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<(std::sync::Arc<super::inode::Inode>, fuser::FileAttr)> {
        let p = self.inodes.get(parent)?;
        match &p.node {
            Node::Root => self.mkdir_image(c, name),
            Node::SnapDir(img) => self.mkdir_snapshot(c, *img, name),
            Node::Real(_) => self.mkdir_real(c, self.real(&p)?, name, mode, umask),
            _ => Err(Error::ReadOnly(".thinfs is read-only".into())),
        }
    }

    pub(super) fn remove_any(
        &self,
        c: &Caller,
        parent: u64,
        name: &OsStr,
        dir: bool,
    ) -> Result<()> {
        let p = self.inodes.get(parent)?;
        match (&p.node, dir) {
            (Node::Root, true) => self.rmdir_image(c, name),
            (Node::SnapDir(img), true) => self.rmdir_snapshot(c, *img, name),
            (Node::Real(_), _) => self.unlink_real(c, self.real(&p)?, name, dir),
            (Node::Control | Node::InfoDir, _) => {
                Err(Error::ReadOnly(".thinfs is read-only".into()))
            }
            _ => Err(no(
                libc::EISDIR,
                "unlink of an image or snapshot (use rmdir)",
            )),
        }
    }

    pub(super) fn is_real(&self, ino: u64) -> bool {
        self.inodes
            .peek(ino)
            .map(|i| matches!(i.node, Node::Real(_)))
            .unwrap_or(false)
    }

    pub(super) fn attr_any(&self, ino: u64) -> Result<fuser::FileAttr> {
        let i = self.inodes.get(ino)?;
        match &i.node {
            Node::Real(_) => self.getattr_real(&i, self.real(&i)?),
            _ => self.virtual_attr(&i),
        }
    }

    pub(super) fn real_parent(
        &self,
        parent: u64,
        what: &str,
    ) -> Result<std::sync::Arc<super::inode::Inode>> {
        let p = self.inodes.get(parent)?;
        match &p.node {
            Node::Real(_) => Ok(p),
            Node::Control | Node::InfoDir | Node::ControlFile(_) => {
                Err(Error::ReadOnly(".thinfs is read-only".into()))
            }
            _ => Err(Error::PermissionDenied(format!(
                "{what}: only directories (images, snapshots) can be made here"
            ))),
        }
    }

    /// STATFS: the inner filesystem's figures, or the pool's for the
    /// virtual directories (blocks, free, available, files, free files,
    /// block size, name length, fragment size).
    #[allow(clippy::type_complexity)]
    pub(super) fn statfs_any(&self, ino: u64) -> Result<(u64, u64, u64, u64, u64, u32, u32, u32)> {
        let i = self.inodes.get(ino)?;
        if let Node::Real(_) = &i.node {
            let s = self.statfs_real(self.real(&i)?)?;
            return Ok((
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ));
        }
        let p = self.engine.pool_info()?;
        let bs = 4096u64;
        Ok((
            p.status.total / bs,
            (p.status.total - p.status.used) / bs,
            p.status.available / bs,
            0,
            0,
            bs as u32,
            255,
            bs as u32,
        ))
    }
}
