//! The `fuser::Filesystem` trait: each method decodes its request, picks
//! the virtual or passthrough path by the kind of inode, and replies. Every
//! error goes to the caller as an errno and to the log as one line.

use super::files::SetAttr;
use super::inode::Node;
use super::reply::{errno, no, reply_or};
use super::{ThinFs, attr};
use crate::error::Error;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

/// Test hook: `THINFS_NO_PASSTHROUGH` set serves files as on a kernel
/// without passthrough (every open keeps a descriptor). Read only in test
/// builds (the `failpoints` feature).
#[cfg(feature = "failpoints")]
fn passthrough_off_for_tests() -> bool {
    std::env::var_os("THINFS_NO_PASSTHROUGH").is_some()
}

#[cfg(not(feature = "failpoints"))]
fn passthrough_off_for_tests() -> bool {
    false
}

impl Filesystem for ThinFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        if caps.contains(InitFlags::FUSE_PASSTHROUGH)
            && !passthrough_off_for_tests()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        // POSIX_ACL: with default_permissions the kernel checks ACLs too
        // (it reads them through getxattr), as ext4 would. DONT_MASK: the
        // umask is applied here, by the inner ext4 as the caller (so that a
        // default ACL overrides it as on ext4).
        for f in [
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            if caps.contains(f) {
                let _ = config.add_capabilities(f);
            }
        }
        log::info!(
            "FUSE session started (kernel ABI {:?}, passthrough {})",
            config.kernel_abi(),
            if self.passthrough.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        );
        Ok(())
    }

    fn destroy(&mut self) {
        self.engine.unmount_all();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry_of(parent.0, name) {
            Ok((i, a)) => {
                if matches!(i.node, Node::ControlFile(_)) {
                    reply.entry(&Duration::ZERO, &a, Generation(0))
                } else {
                    self.reply_entry(reply, &a)
                }
            }
            // Inside an image every creation goes through this mount, so a
            // missing name may be cached as a negative entry.
            Err(e) if e.errno() == libc::ENOENT && self.is_real(parent.0) => {
                let mut a = super::attr::virtual_attr(0, false, 0, std::time::UNIX_EPOCH);
                a.ino = INodeNo(0);
                reply.entry(&self.opts.ttl, &a, Generation(0))
            }
            Err(e) => reply.error(errno("lookup", parent.0, &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // .thinfs files change under the kernel: never cache their size.
        let control = self
            .inodes
            .peek(ino.0)
            .map(|i| matches!(i.node, Node::ControlFile(_)))
            .unwrap_or(false);
        reply_or!(reply, "getattr", ino.0, self.attr_any(ino.0), |a| {
            let ttl = if control {
                Duration::ZERO
            } else {
                attr::ttl_for(&a, self.opts.ttl)
            };
            reply.attr(&ttl, &a)
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = super::caller_of(req);
        let r = self.inodes.get(ino.0).and_then(|i| {
            let r = self.real(&i).map_err(|_| {
                Error::PermissionDenied("attributes of images and snapshots are fixed".into())
            })?;
            self.setattr_real(
                &c,
                &i,
                r,
                SetAttr {
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                    fh: fh.map(|f| f.0),
                },
            )
        });
        reply_or!(reply, "setattr", ino.0, r, |a| reply
            .attr(&attr::ttl_for(&a, self.opts.ttl), &a))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .inodes
            .get(ino.0)
            .and_then(|i| self.readlink_real(self.real(&i)?));
        reply_or!(reply, "readlink", ino.0, r, |v| reply.data(&v))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let c = super::caller_of(req);
        let r = self
            .real_parent(parent.0, "mknod")
            .and_then(|p| self.mknod_real(&c, self.real(&p)?, name, mode, umask, rdev));
        reply_or!(reply, "mknod", parent.0, r, |v| self
            .reply_entry(reply, &v.1))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let c = super::caller_of(req);
        reply_or!(
            reply,
            "mkdir",
            parent.0,
            self.mkdir_any(&c, parent.0, name, mode, umask),
            |v| self.reply_entry(reply, &v.1)
        )
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = super::caller_of(req);
        reply_or!(
            reply,
            "unlink",
            parent.0,
            self.remove_any(&c, parent.0, name, false),
            |_v| reply.ok()
        )
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = super::caller_of(req);
        reply_or!(
            reply,
            "rmdir",
            parent.0,
            self.remove_any(&c, parent.0, name, true),
            |_v| reply.ok()
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let c = super::caller_of(req);
        let r = self
            .real_parent(parent.0, "symlink")
            .and_then(|p| self.symlink_real(&c, self.real(&p)?, link_name, target.as_os_str()));
        reply_or!(reply, "symlink", parent.0, r, |v| self
            .reply_entry(reply, &v.1))
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let c = super::caller_of(req);
        let r = (|| {
            let p = self.inodes.get(parent.0)?;
            let np = self.inodes.get(newparent.0)?;
            match (&p.node, &np.node) {
                (Node::Real(_), Node::Real(_)) => self.rename_real(
                    &c,
                    self.real(&p)?,
                    name,
                    self.real(&np)?,
                    newname,
                    flags.bits(),
                ),
                // Not EXDEV: mv(1) would fall back to copying, and its
                // mkdir in the .snapshots would snapshot that image.
                (Node::Real(_), Node::SnapDir(_)) => Err(Error::Invalid(
                    "nothing moves into a .snapshots from elsewhere (a snapshot is made by mkdir)"
                        .into(),
                )),
                (Node::Real(_), _) | (_, Node::Real(_)) => Err(Error::CrossDevice(
                    "cannot move between images, snapshots and the root".into(),
                )),
                _ => self.rename_virtual(&c, &p, name, &np, newname, flags.bits()),
            }
        })();
        reply_or!(reply, "rename", parent.0, r, |_v| reply.ok())
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let c = super::caller_of(req);
        let r = (|| {
            let i = self.inodes.get(ino.0)?;
            let p = self.real_parent(newparent.0, "link")?;
            self.link_real(&c, self.real(&i)?, self.real(&p)?, newname)
        })();
        reply_or!(reply, "link", ino.0, r, |v| self.reply_entry(reply, &v.1))
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open_and_reply(req, ino, flags, reply)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply_or!(
            reply,
            "read",
            ino.0,
            self.read_fh(fh.0, offset, size),
            |v| reply.data(&v)
        )
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply_or!(
            reply,
            "write",
            ino.0,
            self.write_fh(&super::caller_of(req), fh.0, offset, data),
            |n| reply.written(n)
        )
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_handle(fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_or!(reply, "fsync", ino.0, self.fsync_fh(fh.0, datasync), |_v| {
            reply.ok()
        })
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let c = super::caller_of(req);
        let r = self
            .inodes
            .get(ino.0)
            .and_then(|i| self.opendir_any(&c, &i));
        reply_or!(reply, "opendir", ino.0, r, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        // readdir_fh replies itself on success (the reply carries the entries).
        let h = match self.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(errno("readdir", ino.0, &e)),
        };
        drop(h);
        if let Err(e) = self.readdir_fh(fh.0, offset, reply) {
            log::warn!("readdir (inode {:#x}) failed: {e}", ino.0);
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.release_handle(fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_or!(
            reply,
            "fsyncdir",
            ino.0,
            self.fsync_fh(fh.0, datasync),
            |_v| reply.ok()
        )
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = self.statfs_any(ino.0);
        reply_or!(reply, "statfs", ino.0, r, |s| reply
            .statfs(s.0, s.1, s.2, s.3, s.4, s.5, s.6, s.7))
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let c = super::caller_of(req);
        let r = self.inodes.get(ino.0).and_then(|i| match &i.node {
            Node::Real(_) => self.setxattr_real(&c, self.real(&i)?, name, value, flags),
            _ => Err(Error::PermissionDenied(
                "no extended attributes on virtual directories".into(),
            )),
        });
        reply_or!(reply, "setxattr", ino.0, r, |_v| reply.ok())
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.inodes.get(ino.0).and_then(|i| match &i.node {
            Node::Real(_) => self.getxattr_real(self.real(&i)?, name, size),
            _ => Err(no(
                libc::ENODATA,
                "virtual directories have no extended attributes",
            )),
        });
        reply_or!(reply, "getxattr", ino.0, r, |v| if size == 0 {
            reply.size(v.len() as u32)
        } else {
            reply.data(&v)
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let c = super::caller_of(req);
        let r = self.inodes.get(ino.0).and_then(|i| match &i.node {
            Node::Real(_) => self.listxattr_real(&c, self.real(&i)?, size),
            _ => Ok(Vec::new()),
        });
        reply_or!(reply, "listxattr", ino.0, r, |v| if size == 0 {
            reply.size(v.len() as u32)
        } else {
            reply.data(&v)
        })
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = super::caller_of(req);
        let r = self.inodes.get(ino.0).and_then(|i| match &i.node {
            Node::Real(_) => self.removexattr_real(&c, self.real(&i)?, name),
            _ => Err(no(
                libc::ENODATA,
                "virtual directories have no extended attributes",
            )),
        });
        reply_or!(reply, "removexattr", ino.0, r, |_v| reply.ok())
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks access itself.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.create_and_reply(req, parent, name, mode, umask, flags, reply)
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let c = super::caller_of(req);
        reply_or!(
            reply,
            "fallocate",
            ino.0,
            self.fallocate_fh(&c, fh.0, offset, length, mode),
            |_v| reply.ok()
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply_or!(
            reply,
            "lseek",
            ino.0,
            self.lseek_fh(fh.0, offset, whence),
            |o| reply.offset(o)
        )
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let c = super::caller_of(req);
        let r = self.copy_range_fh(&c, fh_in.0, offset_in, fh_out.0, offset_out, len);
        reply_or!(reply, "copy_file_range", ino_in.0, r, |n| reply
            .written(n as u32))
    }
}

impl ThinFs {
    /// An entry reply: the name cached for the TTL, the attributes for as
    /// long as [`attr::ttl_for`] allows.
    fn reply_entry(&self, reply: ReplyEntry, a: &fuser::FileAttr) {
        let ttl = self.opts.ttl;
        reply.entry_with_ttls(&attr::ttl_for(a, ttl), &ttl, a, Generation(0))
    }
}
