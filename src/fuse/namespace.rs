//! The virtual part of the tree: the root (images), `IMAGE/.snapshots`
//! and `.thinfs`, and the engine calls that mkdir/rmdir/rename there make.

use super::inode::{self, ControlFile, Inode, Node, Real};
use super::{Caller, Core, attr};
use crate::engine::Target;
use crate::error::{Error, IoContext, Result};
use crate::sys::file;
use crate::types::{DeviceId, Name};
use fuser::{FileAttr, FileType};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;

/// Name of the snapshot directory inside every image.
pub const SNAPDIR: &str = ".snapshots";
/// Name of the inspection directory at the root.
pub const CONTROL: &str = ".thinfs";

fn enoent(what: String) -> Error {
    Error::NotFound(what)
}

impl Core {
    /// Names looked up in virtual directories must be valid names; anything
    /// else simply does not exist.
    fn lookup_name(name: &OsStr) -> Result<Name> {
        Name::lookup_os(name).map_err(|_| enoent(format!("{name:?}")))
    }

    /// The root inode of image or snapshot `id`, mounting it if needed.
    pub(super) fn device_root(&self, id: DeviceId) -> Result<(Arc<Inode>, FileAttr)> {
        let m = self.engine.mount(id)?;
        let fd = file::open_path(m.root(), OsStr::new("."))
            .ctx(|| format!("open root of device id {id}"))?;
        let st = file::fstat(fd.as_fd()).ctx(|| format!("stat root of device id {id}"))?;
        let ino = inode::real_ino(id, st.st_ino);
        let i = self.inodes.remember(ino, || {
            Node::Real(Real {
                dev: id,
                fd,
                mount: m,
                is_root: true,
                fmt: libc::S_IFDIR,
            })
        })?;
        Ok((i, attr::from_stat(ino, &st)))
    }

    pub(super) fn lookup_root(&self, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        if name == CONTROL {
            let i = self.inodes.remember(inode::CONTROL_INO, || Node::Control)?;
            let a = self.virtual_attr(&i)?;
            return Ok((i, a));
        }
        let n = Self::lookup_name(name)?;
        let id = self
            .engine
            .image_id(&n)?
            .ok_or_else(|| enoent(format!("no image {n}")))?;
        self.device_root(id)
    }

    pub(super) fn lookup_snapdir(
        &self,
        image: DeviceId,
        name: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        let n = Self::lookup_name(name)?;
        let id = self
            .engine
            .snapshot_id(image, &n)?
            .ok_or_else(|| enoent(format!("no snapshot {n}")))?;
        self.device_root(id)
    }

    pub(super) fn lookup_control(&self, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        if name == "info" {
            let i = self.inodes.remember(inode::INFO_INO, || Node::InfoDir)?;
            let a = self.virtual_attr(&i)?;
            return Ok((i, a));
        }
        let (f, _, ino) = ControlFile::ALL
            .into_iter()
            .find(|(_, n, _)| OsStr::new(n) == name)
            .ok_or_else(|| enoent(format!(".thinfs/{name:?}")))?;
        let i = self.inodes.remember(ino, || Node::ControlFile(f))?;
        let a = self.virtual_attr(&i)?;
        Ok((i, a))
    }

    /// `.thinfs/info/NAME[@SNAP]`.
    pub(super) fn lookup_info(&self, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        let t = name
            .to_str()
            .and_then(|s| Target::parse(s).ok())
            .ok_or_else(|| enoent(format!(".thinfs/info/{name:?}")))?;
        let r = self.engine.resolve(&t)?;
        let i = self.inodes.remember(inode::info_ino(r.id), || {
            Node::ControlFile(ControlFile::Info(r.id))
        })?;
        let a = self.virtual_attr(&i)?;
        Ok((i, a))
    }

    /// `IMAGE/.snapshots` of the image whose root is `root`.
    pub(super) fn snapdir(&self, image: DeviceId) -> Result<(Arc<Inode>, FileAttr)> {
        let i = self
            .inodes
            .remember(inode::snapdir_ino(image), || Node::SnapDir(image))?;
        let a = self.virtual_attr(&i)?;
        Ok((i, a))
    }

    /// Attributes of a virtual inode.
    pub(super) fn virtual_attr(&self, i: &Inode) -> Result<FileAttr> {
        Ok(match &i.node {
            Node::Root | Node::SnapDir(_) => {
                let mut a = attr::virtual_attr(i.ino, true, 0, self.started);
                // The admin group may mkdir/rmdir/mv here: let the kernel's
                // permission check through for it; the daemon checks again.
                if let Some((_, gid)) = &self.opts.admin_group {
                    a.gid = *gid;
                    a.perm = 0o775;
                } else if matches!(i.node, Node::Root) {
                    attr::no_group_class(&mut a);
                }
                a
            }
            Node::Control | Node::InfoDir => attr::virtual_attr(i.ino, true, 0, self.started),
            Node::ControlFile(f) => {
                let len = self.control_len(*f)?;
                attr::virtual_attr(i.ino, false, len, self.started)
            }
            Node::Real(_) | Node::Evicted(_) => {
                return Err(Error::Invalid("not a virtual inode".into()));
            }
        })
    }

    /// Entries of a virtual directory, without `.` and `..`.
    pub(super) fn virtual_entries(&self, i: &Inode) -> Result<Vec<(u64, FileType, OsString)>> {
        let mut v = Vec::new();
        match &i.node {
            Node::Root => {
                v.push((inode::CONTROL_INO, FileType::Directory, CONTROL.into()));
                for r in self.engine.images()? {
                    v.push((
                        inode::real_ino(r.id, 2),
                        FileType::Directory,
                        r.name.as_str().into(),
                    ));
                }
            }
            Node::Control => {
                v.push((inode::INFO_INO, FileType::Directory, "info".into()));
                for (_, n, ino) in ControlFile::ALL {
                    v.push((ino, FileType::RegularFile, n.into()));
                }
            }
            Node::InfoDir => {
                for r in self.engine.records()? {
                    v.push((
                        inode::info_ino(r.id),
                        FileType::RegularFile,
                        self.engine.full_name(&r).into(),
                    ));
                }
            }
            Node::SnapDir(image) => {
                for r in self.engine.snapshots_of(*image)? {
                    v.push((
                        inode::real_ino(r.id, 2),
                        FileType::Directory,
                        r.name.as_str().into(),
                    ));
                }
            }
            _ => return Err(Error::Invalid("not a virtual directory".into())),
        }
        Ok(v)
    }

    /// `mkdir MOUNT/NAME`: a new image.
    pub(super) fn mkdir_image(&self, c: &Caller, name: &OsStr) -> Result<(Arc<Inode>, FileAttr)> {
        let n = Name::from_os(name)?;
        let id = self.service.create(c, &n, None)?;
        self.device_root(id)
    }

    /// `mkdir MOUNT/NAME/.snapshots/SNAP`: a snapshot.
    pub(super) fn mkdir_snapshot(
        &self,
        c: &Caller,
        image: DeviceId,
        name: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr)> {
        let n = Name::from_os(name)?;
        let id = self.service.snapshot_of(c, image, &n)?;
        let root = self.device_root(id)?;
        // Thousands of snapshots must not mean thousands of mounts: this one
        // goes at the next idle pass unless somebody looks into it.
        if let Some(m) = self.engine.mounted(id) {
            m.mark_idle();
        }
        Ok(root)
    }

    fn target_of(&self, id: DeviceId) -> Result<Target> {
        let r = self.engine.record(id)?;
        match r.parent {
            Some(p) if r.kind == crate::types::DeviceKind::Snapshot => Ok(Target {
                image: self.engine.record(p)?.name,
                snap: Some(r.name),
            }),
            _ => Ok(Target {
                image: r.name,
                snap: None,
            }),
        }
    }

    /// `rmdir MOUNT/NAME`: only an empty image without snapshots.
    pub(super) fn rmdir_image(&self, c: &Caller, name: &OsStr) -> Result<()> {
        let n = Self::lookup_name(name)?;
        let _ns = super::holders::NamespaceRequest::enter();
        self.service.destroy_if_empty(c, &n)
    }

    /// `rmdir MOUNT/NAME/.snapshots/SNAP`: destroy the snapshot.
    pub(super) fn rmdir_snapshot(&self, c: &Caller, image: DeviceId, name: &OsStr) -> Result<()> {
        let n = Self::lookup_name(name)?;
        let id = self
            .engine
            .snapshot_id(image, &n)?
            .ok_or_else(|| enoent(format!("no snapshot {n}")))?;
        let t = self.target_of(id)?;
        let _ns = super::holders::NamespaceRequest::enter();
        self.service.destroy(c, &t, false)
    }

    /// Rename within the root (images) or within one `.snapshots`.
    pub(super) fn rename_virtual(
        &self,
        c: &Caller,
        from_dir: &Inode,
        name: &OsStr,
        to_dir: &Inode,
        new: &OsStr,
        flags: u32,
    ) -> Result<()> {
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(Error::Invalid(
                "RENAME_EXCHANGE of images or snapshots is not supported".into(),
            ));
        }
        let n = Self::lookup_name(name)?;
        let new = Name::from_os(new)?;
        let t = match (&from_dir.node, &to_dir.node) {
            (Node::Root, Node::Root) => Target {
                image: n,
                snap: None,
            },
            (Node::SnapDir(a), Node::SnapDir(b)) if a == b => {
                let img = self.engine.record(*a)?;
                Target {
                    image: img.name,
                    snap: Some(n),
                }
            }
            // Not EXDEV: mv(1) would fall back to copying, and its mkdir
            // in the other .snapshots would snapshot that image.
            (_, Node::SnapDir(_)) => {
                return Err(Error::Invalid(
                    "nothing moves into a .snapshots from elsewhere (snapshots move only within their own .snapshots; a snapshot is made by mkdir)".into(),
                ));
            }
            _ => {
                return Err(Error::CrossDevice(
                    "cannot move between images, snapshots and .thinfs".into(),
                ));
            }
        };
        self.engine.resolve(&t)?;
        let _ns = super::holders::NamespaceRequest::enter();
        self.service.rename(c, &t, &new)
    }
}
