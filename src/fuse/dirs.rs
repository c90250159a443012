//! Directory streams: opendir, readdir, releasedir, for real and virtual
//! directories. `.snapshots` and the inner `lost+found` are hidden from the
//! root listing of an image (and `lost+found` from a snapshot's) unless the
//! mount shows them.

use super::budget::{Kind, Pin};
use super::inode::{self, Inode, Node};
use super::namespace::SNAPDIR;
use super::{Caller, Core, Handle, attr};
use crate::error::{Error, IoContext, Result};
use crate::sys::file;
use crate::types::DeviceKind;
use fuser::{FileType, INodeNo, ReplyDirectory};
use parking_lot::Mutex;

/// Offset cookie of the synthetic `.snapshots` entry (ext4 cookies are
/// non-negative `i64`s, so this one never collides).
const SNAPS_COOKIE: u64 = u64::MAX - 1;

impl Core {
    pub(super) fn opendir_any(&self, c: &Caller, i: &Inode) -> Result<u64> {
        let h = match &i.node {
            Node::Real(_) => {
                let r = self.real(i)?;
                let held = self.budget.take(c.uid, Kind::Fd, None)?;
                let dir = self.as_user(
                    c,
                    || "opendir".into(),
                    || file::reopen(r.fd(), libc::O_RDONLY | libc::O_DIRECTORY),
                )?;
                r.mount.touch();
                Handle::Dir {
                    dir: Mutex::new(dir),
                    dev: r.dev,
                    is_root: r.is_root,
                    _open: r.mount.open_token(c.pid)?,
                    _held: held,
                }
            }
            Node::ControlFile(_) => {
                return Err(Error::io(
                    "opendir",
                    std::io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            _ => {
                let parent = match &i.node {
                    Node::SnapDir(img) => inode::real_ino(*img, 2),
                    _ => inode::ROOT_INO,
                };
                let mut entries = vec![
                    (i.ino, FileType::Directory, ".".into()),
                    (parent, FileType::Directory, "..".into()),
                ];
                entries.extend(self.virtual_entries(i)?);
                let entries = self.listing_shared(i, entries);
                let pin = Pin::of(&entries, super::control::listing_bytes(&entries));
                let held = self.budget.take(c.uid, Kind::Memory, Some(pin))?;
                Handle::Virtual {
                    entries,
                    _held: held,
                }
            }
        };
        Ok(self.add_handle(h))
    }

    pub(super) fn readdir_fh(&self, fh: u64, offset: u64, mut reply: ReplyDirectory) -> Result<()> {
        let h = self.handle(fh)?;
        match h.as_ref() {
            Handle::Virtual { entries, .. } => {
                for (idx, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), idx as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
                Ok(())
            }
            Handle::Dir {
                dir, dev, is_root, ..
            } => {
                let image_root = *is_root
                    && self
                        .engine
                        .record(*dev)
                        .map(|r| r.kind == DeviceKind::Image)
                        .unwrap_or(false);
                let mut off = offset;
                if image_root && self.opts.show_hidden && off == 0 {
                    {
                        if reply.add(
                            INodeNo(inode::snapdir_ino(*dev)),
                            SNAPS_COOKIE,
                            FileType::Directory,
                            SNAPDIR,
                        ) {
                            reply.ok();
                            return Ok(());
                        }
                        off = SNAPS_COOKIE;
                    }
                }
                if off == SNAPS_COOKIE {
                    off = 0;
                }
                let d = dir.lock();
                'outer: loop {
                    let ents = file::read_dir_at(&d, off as i64).ctx(|| "readdir".into())?;
                    if ents.is_empty() {
                        break;
                    }
                    for e in ents {
                        off = e.off as u64;
                        // lost+found is hidden in snapshot roots as in
                        // image roots, so that both list the same.
                        if *is_root && !self.opts.show_hidden && e.name == "lost+found" {
                            continue;
                        }
                        if image_root && e.name == SNAPDIR {
                            continue;
                        }
                        if reply.add(
                            INodeNo(inode::real_ino(*dev, e.ino)),
                            e.off as u64,
                            attr::kind_of_dt(e.kind),
                            &e.name,
                        ) {
                            break 'outer;
                        }
                    }
                }
                reply.ok();
                Ok(())
            }
            _ => Err(Error::io(
                "readdir",
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            )),
        }
    }
}
