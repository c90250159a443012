//! open and create of files: the handle, the passthrough registration
//! (made as the caller) and the reply that carries both.

use super::budget::{Kind, Pin};
use super::inode::Node;
use super::reply::{errno, no};
use super::{Handle, ThinFs};
use crate::error::Error;
use fuser::{
    FileHandle, FopenFlags, Generation, INodeNo, OpenFlags, ReplyCreate, ReplyOpen, Request,
};
use std::ffi::OsStr;

impl ThinFs {
    /// Serve OPEN: a `.thinfs` file's content, or a file of an image.
    pub(super) fn open_and_reply(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: OpenFlags,
        reply: ReplyOpen,
    ) {
        let c = super::caller_of(req);
        let i = match self.inodes.get(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(errno("open", ino.0, &e)),
        };
        match &i.node {
            Node::ControlFile(f) => {
                if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                    return reply.error(errno(
                        "open",
                        ino.0,
                        &Error::ReadOnly(".thinfs is read-only".into()),
                    ));
                }
                let r = self.control_shared(*f).and_then(|data| {
                    let pin = Pin::of(&data, data.len());
                    let held = self.budget.take(c.uid, Kind::Memory, Some(pin))?;
                    Ok(self.add_handle(Handle::Content { data, _held: held }))
                });
                match r {
                    Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                    Err(e) => reply.error(errno("open", ino.0, &e)),
                }
            }
            Node::Real(_) => {
                let r = match self.real(&i) {
                    Ok(r) => r,
                    Err(e) => return reply.error(errno("open", ino.0, &e)),
                };
                let opened = self
                    .take_for_open(&c)
                    .and_then(|held| Ok((held, self.open_real(&c, r, flags.0)?)));
                let (held, file) = match opened {
                    Ok(v) => v,
                    Err(e) => return reply.error(errno("open", ino.0, &e)),
                };
                let backing = |f: &std::fs::File| reply.open_backing(f);
                let (fh, backing) = match self.file_handle(&c, &i, file, flags.0, held, backing) {
                    Ok(v) => v,
                    Err(e) => return reply.error(errno("open", ino.0, &e)),
                };
                match backing {
                    Some(b) => {
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &b)
                    }
                    None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH),
                }
            }
            _ => reply.error(errno(
                "open",
                ino.0,
                &no(libc::EISDIR, "open of a directory"),
            )),
        }
    }

    /// Serve CREATE in a directory of an image.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_and_reply(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let c = super::caller_of(req);
        let r = self.real_parent(parent.0, "create").and_then(|p| {
            let held = self.take_for_open(&c)?;
            Ok((
                held,
                self.create_real(&c, self.real(&p)?, name, mode, umask, flags)?,
            ))
        });
        match r {
            Ok((held, (i, attr, file))) => {
                let backing = |f: &std::fs::File| reply.open_backing(f);
                let (fh, backing) = match self.file_handle(&c, &i, file, flags, held, backing) {
                    Ok(v) => v,
                    Err(e) => return reply.error(errno("create", parent.0, &e)),
                };
                // One TTL for both: a setuid file's entry goes uncached too.
                let ttl = super::attr::ttl_for(&attr, self.opts.ttl);
                match backing {
                    Some(b) => reply.created_passthrough(
                        &ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_NOFLUSH,
                        &b,
                    ),
                    None => reply.created(
                        &ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_NOFLUSH,
                    ),
                }
            }
            Err(e) => reply.error(errno("create", parent.0, &e)),
        }
    }
}
